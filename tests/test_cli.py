"""main.py as a user meets it: every user error is one message and exit status 2, never a traceback; --help works.

Each case is a real `python main.py ...` process. A case that printed a traceback, exited 0 or 1, or said more than
one `error:` line fails; so does a message that does not name its cause and fix (the `expect` fragments).
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from cvt_flax import errors

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def main_py(*args, env=None, timeout=180):
    cmd = [sys.executable, str(REPO / "main.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env or ENV, timeout=timeout)


def assert_one_message(proc, *expect):
    err = proc.stderr
    assert proc.returncode == errors.EXIT_USER_ERROR, (proc.returncode, err[-3000:])
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    message = err[err.index("error: ") :]
    for fragment in expect:
        assert fragment in message, (fragment, message)
    return message


SMOKE = ["--config=configs/smoke.py:dataset=fashion_mnist", "--config.num_channels=3"]


@pytest.fixture(scope="module")
def digits_with_a_corrupt_png(shared_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    shutil.copytree(shared_dir / "data" / "digits", root, dirs_exist_ok=True)
    bad = sorted((root / "train" / "3").glob("*.png"))[0]
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    return root, bad


CASES = {
    # flags and config files
    "config argument typo": (
        ["--config=configs/fashion_mnist.py:epoch=1"],
        ["Unknown config argument 'epoch'", "epochs"],
    ),
    "unknown flag": (["--config=configs/smoke.py", "--epochs=3"], ["Unknown flag --epochs", "--config.num_epochs"]),
    "value of the wrong type": (["--config=configs/smoke.py", "--config.num_epochs=abc"], ["num_epochs=abc", "float"]),
    "unknown config field": (["--config=configs/smoke.py", "--config.lerning_rate=1"], ["--config.learning_rate"]),
    "missing config file": (["--config=configs/nope.py"], ["configs/nope.py does not exist", "fashion_mnist.py"]),
    "missing workdir": (["--config=configs/smoke.py", "NOWORKDIR"], ["--workdir must have a value"]),
    # inputs
    "unknown variant": ([*SMOKE, "--config.model=cvt_99"], ["cvt_99", "cvt_13"]),
    "unknown dataset": ([*SMOKE, "--config.dataset=nope9"], ["Unknown dataset 'nope9'", "image_folder"]),
    "batch size": ([*SMOKE, "--config.batch_size=0"], ["--config.batch_size=0", "multiple"]),
    "image too small": ([*SMOKE, "--config.model=cvt_13", "--config.image_size=2"], ["image_size=2", "at least 3"]),
    "missing data dir": ([*SMOKE, "--config.data_dir=/nonexistent/tfds", "--config.download=False"], ["nonexistent"]),
    "bad init_from": ([*SMOKE, "--config.init_from=/nonexistent/run"], ["init_from", "does not exist"]),
    # numeric recipe fields, refused before any compile (cvt_flax.config_checks)
    "nan learning rate": ([*SMOKE, "--config.learning_rate=nan"], ["--config.learning_rate=nan", "(0, inf)"]),
    "beta2 of one": ([*SMOKE, "--config.b2=1.0"], ["--config.b2=1.0 is out of range", "[0, 1)"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_message(case, shared_dir, tmp_path):
    args, expect = CASES[case]
    workdir = [] if "NOWORKDIR" in args else [f"--workdir={tmp_path / 'run'}"]
    args = [a for a in args if a != "NOWORKDIR"]
    assert_one_message(main_py(*args, *workdir), *expect)
    assert not (tmp_path / "run" / "config.json").exists()  # a failed start writes nothing of a run


def test_file_system_errors(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    assert_one_message(main_py(*SMOKE, f"--workdir={a_file}"), str(a_file), "is a file")
    if os.access("/sys/fs", os.W_OK) and not os.path.exists("/sys/fs/cvt_flax_test"):
        try:
            os.mkdir("/sys/fs/cvt_flax_test")
        except OSError:
            assert_one_message(main_py(*SMOKE, "--workdir=/sys/fs/cvt_flax_test"), "/sys/fs/cvt_flax_test")
        else:
            os.rmdir("/sys/fs/cvt_flax_test")
            pytest.skip("/sys/fs is writable here")


def test_empty_and_corrupt_image_folders(digits_with_a_corrupt_png, tmp_path):
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    base = ["--config=configs/smoke.py", "--config.dataset=image_folder", "--config.image_size=8",
            "--config.num_channels=1", f"--workdir={tmp_path / 'run'}"]  # fmt: skip
    assert_one_message(main_py(*base, f"--config.data_dir={empty}"), "No images found", str(empty))
    root, bad = digits_with_a_corrupt_png
    message = assert_one_message(main_py(*base, f"--config.data_dir={root}"), str(bad), "cannot be read")
    assert "Remove or replace" in message


def test_help_lists_the_configs_and_exits_0():
    proc = main_py("--help")
    assert proc.returncode == 0, proc.stderr
    for name in ("configs/fashion_mnist.py", "configs/imagenet.py", "--config.batch_size", "--workdir"):
        assert name in proc.stdout


def test_verbose_shows_the_traceback_and_the_log_keeps_it(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    proc = main_py(*SMOKE, f"--workdir={workdir}", "--config.dataset=nope9", "--verbose")
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "error: Unknown dataset" in proc.stderr
    assert "DatasetError" in (workdir / "error.log").read_text()


def test_internal_errors_keep_their_traceback():
    import numpy as np

    try:
        np.zeros(3).reshape(2, 2)
    except ValueError as e:
        assert not errors.is_user_error(e)  # raised inside numpy: a bug of ours, not the user's
    with pytest.raises(ValueError):
        errors.report(ValueError("internal"))  # raised here (tests/), not by cvt_flax: re-raised


@pytest.mark.slow
def test_full_disk_is_one_message_and_the_saved_checkpoints_stay(shared_dir, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2500k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        args = [*SMOKE, f"--workdir={mnt / 'run'}", f"--config.data_dir={shared_dir / 'tfds'}"]
        # The disk fills while saving the step-4 checkpoint (earlier ones stay), or, when that one fit, while
        # writing the final model; either way one message, and the same command resumes once there is space.
        message = assert_one_message(main_py(*args), "No space left", "stay restorable")
        assert "steps [2]" in message or "while writing the model" in message, message
        subprocess.run(["mount", "-o", "remount,size=20m", str(mnt)], check=True)
        proc = main_py(*args)
        assert proc.returncode == 0 and f"Resumed from {mnt / 'run' / 'checkpoints'}/" in proc.stderr
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_resume_with_another_recipe_needs_the_switch(shared_dir, tmp_path):
    args = [*SMOKE, f"--workdir={tmp_path / 'run'}", f"--config.data_dir={shared_dir / 'tfds'}"]
    first = main_py(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert_one_message(main_py(*args, "--config.num_train_steps=6"), "num_train_steps: 4 -> 6", "allow_recipe_change")
    assert_one_message(main_py(*args, "--config.act=gelu"), "act: 'quick_gelu' -> 'gelu'", "new --workdir")
    run = tmp_path / "run"
    described = {name: (run / name).read_bytes() for name in ("config.json", "parameters.txt")}
    # A changed resume that diverges: one message, exit 2, and the workdir still describes its checkpoints.
    diverged = main_py(*args, "--config.num_train_steps=6", "--config.allow_recipe_change=True",
                       "--config.learning_rate=1e30")  # fmt: skip
    assert_one_message(diverged, "training diverged", "last good checkpoint (step 4)", "--config.learning_rate")
    assert {name: (run / name).read_bytes() for name in described} == described
    assert not (run / "config.step4.json").exists()
    assert "Traceback" in (run / "error.log").read_text()  # the traceback is kept, out of the console
    again = main_py(*args, "--config.num_train_steps=6", "--config.allow_recipe_change=True")
    assert again.returncode == 0 and "Resuming at step 4 with a changed recipe" in again.stderr
    assert (run / "config.step4.json").read_bytes() == described["config.json"]  # the earlier config is kept
    assert json.loads((run / "config.json").read_text())["num_train_steps"] == 6


def test_the_package_is_installed_with_its_commands(tmp_path):
    """The README's commands install the project (pip install -e .): importable anywhere, cvt-* commands on PATH."""
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", "import cvt_flax, cvt_flax.cli; print(cvt_flax.__file__)"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, "cvt_flax is not installed: run `pip install -e .` (README, Set up)\n" + proc.stderr
    bindir = pathlib.Path(sys.executable).parent
    for command in ("cvt-train", "cvt-convert", "cvt-predict", "cvt-export"):
        assert (bindir / command).exists(), f"{command} is not installed: run `pip install -e .`"
    proc = subprocess.run([str(bindir / "cvt-train"), "--help"], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 0 and "configs/fashion_mnist.py" in proc.stdout, proc.stderr


@pytest.mark.slow
def test_a_damaged_checkpoint_is_one_warning_and_a_move(shared_dir, tmp_path):
    """A deleted manifest in the newest checkpoint (the case whose reader threads printed 353 tracebacks): the
    resume prints the warning and the move, no traceback, and continues from the intact step; the tracebacks are
    kept in error.log."""
    run = tmp_path / "run"
    args = [*SMOKE, f"--workdir={run}", f"--config.data_dir={shared_dir / 'tfds'}"]
    first = main_py(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    (run / "checkpoints" / "4" / "state" / "manifest.ocdbt").unlink()
    again = main_py(*args)  # the same command: resumes from step 2 and trains to step 4 again
    err = again.stderr
    assert again.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-5000:]
    assert "is damaged" in err and "Moved the damaged checkpoint" in err and "checkpoints/2" in err, err[-3000:]
    assert (run / "damaged_checkpoints" / "4" / "state").is_dir()


def test_reader_thread_noise_is_split_from_the_log():
    """errors.split_noise: the tracebacks of Orbax's reader threads go, log records and other tracebacks stay."""
    text = (
        "05:00:01 WARNING: The checkpoint /w/checkpoints/4 is damaged and cannot be restored (...).\n"
        'Exception in thread Thread-7:\nTraceback (most recent call last):\n  File "x.py", line 1, in f\n'
        "    loop.call_soon(cb)\nRuntimeError: Event loop is closed\n"
        "Task exception was never retrieved\nfuture: <Task finished coro=<read()>>\nTraceback (most recent call "
        'last):\n  File "y.py", line 2, in read\nValueError: truncated\n'
        "05:00:02 WARNING: Moved the damaged checkpoint /w/checkpoints/4 to /w/damaged_checkpoints/4 (not deleted).\n"
        "Traceback (most recent call last):\n  File \"z.py\", line 3, in g\nKeyError: 'real'\n"
    )
    kept, noise = errors.split_noise(text)
    assert kept.splitlines()[0].endswith("cannot be restored (...).") and "Moved the damaged" in kept
    assert "KeyError: 'real'" in kept and "Event loop is closed" not in kept and "never retrieved" not in kept
    assert noise.count("Traceback") == 2 and "ValueError: truncated" in noise


def test_interleaved_reader_thread_noise_is_split_from_the_log():
    """Two threads' tracebacks interleaved line by line (what leaked on CI: the tail of the second block, after the
    first block's exception line closed both heads) are noise as a whole; the log records around them stay."""
    a = ["Traceback (most recent call last):\n", '  File "a.py", line 1, in cb\n', "    loop.call_soon(cb)\n"]
    b = ["Exception ignored in: <function cb>\n", "Traceback (most recent call last):\n",
         '  File "base_events.py", line 540\n', "    raise RuntimeError('Event loop is closed')\n"]  # fmt: skip
    tangled = [line for pair in zip([*a, ""], b, strict=True) for line in pair]
    text = (
        "05:00:01 WARNING: The checkpoint /w/checkpoints/4 is damaged and cannot be restored (...).\n"
        + "".join(tangled[:5]) + "RuntimeError: Event loop is closed\n" + "".join(tangled[5:])
        + "RuntimeError: Event loop is closed\n"
        + "RuntimeError: Event loop is closed\n"  # a stray exception line whose block went elsewhere
        + "05:00:02 WARNING: Moved the damaged checkpoint /w/checkpoints/4 to /w/damaged_checkpoints/4.\n"
        + "/x/y.py:3: UserWarning: keep me\n  warnings.warn('keep me')\n"
        + "05:00:03 INFO: Resumed from step 2\n"
    )  # fmt: skip
    kept, noise = errors.split_noise(text)
    assert kept.splitlines() == [
        "05:00:01 WARNING: The checkpoint /w/checkpoints/4 is damaged and cannot be restored (...).",
        "05:00:02 WARNING: Moved the damaged checkpoint /w/checkpoints/4 to /w/damaged_checkpoints/4.",
        "/x/y.py:3: UserWarning: keep me",
        "  warnings.warn('keep me')",
        "05:00:03 INFO: Resumed from step 2",
    ], kept
    assert noise.count("Event loop is closed") == 4 and "Traceback" not in kept


def test_reader_thread_exceptions_go_to_the_log_whole(tmp_path, capfd, monkeypatch):
    """Exceptions that threads raise during the hold (Python's hooks, which print in several writes that interleave)
    reach error.log one whole traceback each and never the console; other exceptions go to the hook before."""
    import threading

    log = tmp_path / "error.log"
    passed_on: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda a: passed_on.append(a.exc_value))
    hooks = (sys.unraisablehook, threading.excepthook)

    def closed_loop() -> None:
        raise RuntimeError("Event loop is closed")

    def real_bug() -> None:
        raise KeyError("real")

    with errors.quiet_reader_threads(log_file=log) as held:
        threads = [threading.Thread(target=closed_loop) for _ in range(8)] + [threading.Thread(target=real_bug)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        held.linger = True
    err = capfd.readouterr().err
    assert "Event loop is closed" not in err, err
    assert [type(e) for e in passed_on] == [KeyError]
    text = log.read_text()
    assert text.count("Exception in thread") == 8 and text.count("RuntimeError: Event loop is closed") == 8, text
    assert (sys.unraisablehook, threading.excepthook) == hooks
