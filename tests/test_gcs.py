"""Cloud Storage (``gs://``) paths, against a local emulator: every path-taking API, and a two-process run.

The emulator is fake-gcs-server on 127.0.0.1 (the ``gcs`` fixture of tests/gcs_emulator.py, registered in
tests/conftest.py: started once per session, bounded in time, stopped with the session; each test gets a new
bucket and the client variables while it runs). Nothing here reaches the network.

What the emulator cannot do is covered as follows:

* TensorFlow's GCS file system has its endpoints compiled in: the fixture's CONNECT proxy carries it to the
  emulator, and answers the bucket ``storageLayout`` request (TF asks before a folder rename) that
  fake-gcs-server 1.54 lacks.
* Real credentials, IAM and a missing permission cannot be emulated; a bucket that does not exist can, and
  stands for "cannot write there" (`test_workdir_checks_on_gcs`).
* ``jax.distributed`` with process counts other than 2 and real dataset downloads (network) are not run: the
  multi-process preparation logic is also tested with the collectives replaced by a simulated second process
  (`test_dataset_prepared_on_process_0_only`), the narrowest layer that stands between one and several processes.

The tests run with etils' default backend for gs:// (TensorFlow's GCS file system, since TensorFlow is installed);
the file and history tests also with ``EPATH_USE_TF=false`` (gcsfs, what a TPU VM without TensorFlow uses, and
the backend that silently overwrites on ``open('a')``), and so do the two-process runs.
"""

import io
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest
from etils import epath

pytest.importorskip("google.cloud.storage")
pytest.importorskip("gcsfs")

import test_train  # noqa: E402  (tests/ is on sys.path under pytest)

from configs import smoke  # noqa: E402
from cvt_flax import checkpoint as ckpt_lib  # noqa: E402
from cvt_flax import cli, convert, errors, paths, plots, sharding  # noqa: E402
from cvt_flax import train as train_lib  # noqa: E402
from cvt_flax import train_utils as tu  # noqa: E402
from cvt_flax.data import info as info_lib  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture
def epath_use_tf(request, monkeypatch):
    """Sets EPATH_USE_TF (the param); etils caches its TensorFlow check, so it is cleared around the test."""
    from etils.epath import gpath

    monkeypatch.setenv("EPATH_USE_TF", request.param)
    gpath._is_tf_installed.cache_clear()
    yield request.param
    monkeypatch.undo()
    gpath._is_tf_installed.cache_clear()


def png(value: int, size: int = 28, mode: str = "L") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (size, size), value if mode == "L" else (value, 255 - value, value // 2)).save(buf, format="PNG")
    return buf.getvalue()


def fmnist_config(**overrides):
    """configs/smoke.py on the shared Fashion-MNIST, tiled to 3 channels: tests/test_train.py's program."""
    return test_train.fmnist_config(SHARED, **overrides)


# ----------------------------------------------------------------------------- paths, workdir files


def test_missing_gcs_clients_are_named(monkeypatch):
    """No emulator needed: the check happens before any request."""
    monkeypatch.setattr(paths, "_installed", lambda module: module not in ("google.cloud.storage", "gcsfs"))
    paths._missing_gcs_clients.cache_clear()
    try:
        with pytest.raises(errors.UserError, match=r"need google-cloud-storage\..*pip install 'cvt-flax\[gcs\]'"):
            paths.as_path("gs://bucket/run")
        monkeypatch.setenv("EPATH_USE_TF", "false")  # gcsfs is needed when etils does not use TensorFlow
        with pytest.raises(errors.UserError, match=r"need google-cloud-storage and gcsfs"):
            paths.as_path("gs://bucket/run")
        assert paths.as_path("~/run") == epath.Path(os.path.expanduser("~/run"))  # local paths need neither
    finally:
        paths._missing_gcs_clients.cache_clear()


@pytest.mark.parametrize("epath_use_tf", ["true", "false"], indirect=True)
def test_workdir_files_on_gcs(gcs, epath_use_tf):
    """What process 0 writes in a workdir: history (no append on gcsfs), JSON, config, curves; no leftovers."""
    url = gcs.url("run")
    workdir = train_lib._prepare_workdir(url, create=True)  # a probe object written and deleted
    assert os.fspath(workdir) == url and gcs.objects() == []

    records = [{"step": s, "epoch": s / 4, "split": "train", "loss": 2.0 / s, "accuracy": 0.2 * s} for s in (1, 2, 3)]
    history = train_lib.History(workdir / plots.HISTORY_FILE, True, None)
    for r in records:
        history.append(r)
    history.flush()
    assert plots.read_history(workdir / plots.HISTORY_FILE) == records
    # A run resumed at step 2 drops the later entries and appends its own.
    history = train_lib.History(workdir / plots.HISTORY_FILE, True, 2)
    history.append({"step": 4, "epoch": 1.0, "split": "eval", "loss": 0.5, "accuracy": 0.7, "top5_accuracy": 0.9})
    history.flush()
    assert [(r["step"], r["split"]) for r in plots.read_history(url + "/metrics.jsonl")] == [
        (1, "train"),
        (2, "train"),
        (4, "eval"),
    ]
    # Rewrites of the object are throttled; flush() writes what is pending.
    lazy = paths.AppendFile(workdir / "lazy.txt", min_interval_s=3600)
    lazy.append("a\n")
    lazy.append("b\n")
    assert not (workdir / "lazy.txt").exists()
    lazy.flush()
    assert (workdir / "lazy.txt").read_text() == "a\nb\n"

    plots.plot_curves(workdir / plots.HISTORY_FILE, workdir / plots.CURVES_FILE, title="gs")
    assert (workdir / plots.CURVES_FILE).read_bytes().startswith(b"\x89PNG")
    train_lib._write_json(workdir / train_lib.SUMMARY_FILE, {"step": np.int64(4), "accuracy": np.float32(0.5)})
    assert json.loads((workdir / train_lib.SUMMARY_FILE).read_text()) == {"accuracy": 0.5, "step": 4}
    config = smoke.get_config()
    ckpt_lib.save_run_config(config, workdir, 0)
    config.learning_rate = 0.5
    ckpt_lib.save_run_config(config, url, 2)  # keeps the previous one as config.step2.json
    assert json.loads((workdir / "config.step2.json").read_text())["learning_rate"] != 0.5
    train_lib._write_parameter_overview(workdir / train_lib.PARAMETERS_FILE, {"w": np.zeros((2, 3), np.float32)})
    # A folder moved where no folder exists yet (damaged checkpoints are moved aside so).
    for name in ("2/state/x", "2/state/d/y", "2/commit_success.txt"):
        (workdir / "checkpoints" / name).write_text(name)
    paths.rename(workdir / "checkpoints" / "2", workdir / "damaged_checkpoints" / "2")
    assert (workdir / "damaged_checkpoints" / "2" / "state" / "d" / "y").read_text() == "2/state/d/y"
    assert sorted(gcs.objects()) == [
        "run/config.json",
        "run/config.step2.json",
        "run/curves.png",
        "run/damaged_checkpoints/2/commit_success.txt",
        "run/damaged_checkpoints/2/state/d/y",
        "run/damaged_checkpoints/2/state/x",
        "run/lazy.txt",
        "run/metrics.jsonl",
        "run/parameters.txt",
        "run/summary.json",
    ]


def test_workdir_checks_on_gcs(gcs, capsys):
    missing = "gs://no-such-bucket-7c1e/run"
    with pytest.raises(errors.UserError, match=r"Cannot write to --workdir=gs://no-such-bucket-7c1e/run .*bucket"):
        train_lib._prepare_workdir(missing, create=True)
    # The CLI's error log of a gs:// workdir is a local temporary file (the bucket may be what failed).
    log = cli._error_log(["main.py", f"--workdir={missing}"])
    assert log.parent == pathlib.Path(tempfile.gettempdir())
    code = errors.report(errors.UserError("boom"), log_file=log)
    assert code == errors.EXIT_USER_ERROR and "error: boom" in capsys.readouterr().err
    log.unlink(missing_ok=True)
    # An eval-only run creates nothing (not even the probe) before it has results.
    epath.Path(gcs.url("file")).write_text("x")
    with pytest.raises(errors.UserError, match="is a file, but a folder is needed"):
        train_lib._prepare_workdir(gcs.url("file"), create=False)


# ----------------------------------------------------------------------------- models: convert, load, predict


def test_convert_reads_and_writes_gcs(gcs):
    from safetensors.numpy import save
    from test_convert import synthetic_state

    state = synthetic_state("cvt_tiny", 10)
    src = epath.Path(gcs.url("in/cvt_tiny.safetensors"))
    src.write_bytes(save(state))
    out = gcs.url("models/tiny")
    assert convert.main(["--input", os.fspath(src), "--output", out]) == 0
    assert "models/tiny/model.json" in gcs.objects("models/")
    assert convert.main(["--input", os.fspath(src), "--output", out]) == 2  # not empty, no --overwrite

    variables, info = ckpt_lib.load_model(out)
    expected, _ = convert.convert_state_dict(state)
    jax.tree.map(np.testing.assert_array_equal, variables, expected)
    assert info["source_file"] == os.fspath(src) and info["variant"] == "cvt_tiny" and info["num_classes"] == 10
    assert not [n for n in gcs.objects() if n.endswith(".tmp")]

    torch = pytest.importorskip("torch")
    buf = io.BytesIO()
    torch.save({"state_dict": {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}}, buf)
    epath.Path(gcs.url("in/model_best.pth")).write_bytes(buf.getvalue())
    loaded = convert.load_torch_checkpoint(gcs.url("in/model_best.pth"))
    assert loaded.keys() == state.keys() and all(np.array_equal(loaded[k], state[k]) for k in state)

    with pytest.raises(FileNotFoundError, match=r"not a cvt-flax model checkpoint"):
        ckpt_lib.load_model(gcs.url("in"))


def test_predict_and_export_on_gcs(gcs):
    from test_convert import synthetic_state

    from cvt_flax import export, predict

    variables, info = convert.convert_state_dict(synthetic_state("cvt_tiny", 3, in_chans=1), num_classes=3)
    info = {**info, "class_names": ["zero", "one", "two"], "image_size": 16}
    model_dir = gcs.url("model")
    ckpt_lib.save_model(model_dir, variables, info)
    for i, value in enumerate((0, 128, 255)):
        epath.Path(gcs.url(f"images/{'ab'[i % 2]}/{i}.png")).write_bytes(png(value))

    found = predict.predict(model_dir, gcs.url("images"), top_k=2)
    assert [r["image"] for r in found] == [gcs.url(f"images/{n}.png") for n in ("a/0", "a/2", "b/1")]
    assert all(len(r["predictions"]) == 2 and r["predictions"][0]["label"] in info["class_names"] for r in found)

    exported = export.export_model(model_dir, gcs.url("serving"), platforms=["cpu"])
    assert os.fspath(exported) == gcs.url("serving")
    again = predict.predict(gcs.url("serving"), [gcs.url("images/a/0.png")], top_k=2)
    assert again[0]["predictions"][0]["index"] == found[0]["predictions"][0]["index"]
    np.testing.assert_allclose(
        again[0]["predictions"][0]["probability"], found[0]["predictions"][0]["probability"], rtol=1e-4
    )


# ----------------------------------------------------------------------------- train-state checkpoints, init_from


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # an asyncio loop closed by Orbax
def test_checkpoints_init_from_and_eval_only_on_gcs(gcs, caplog):
    """Orbax train-state checkpoints on gs:// (a damaged one moved aside), every init_from form, eval_only."""
    config = fmnist_config()
    mesh = sharding.create_mesh()
    program = tu.build_program(config, mesh, num_classes=10, in_chans=3, num_train_examples=256)
    rng = np.random.default_rng(0)

    def random_state(scale):
        leaf = lambda s: (rng.standard_normal(s.shape) * scale).astype(s.dtype)  # noqa: E731
        return sharding.replicate(jax.tree.map(leaf, program.abstract_state), mesh)

    info = ckpt_lib.run_model_info(config, program.model.spec, 10)
    workdir = gcs.url("w")
    ckpts = ckpt_lib.Checkpoints(workdir + "/checkpoints", keep=2)
    states = {step: random_state(0.1 * step) for step in (1, 2)}
    for step, state in states.items():
        ckpts.save(step, state, {**info, "step": step}, None)
    ckpts.close()
    ckpt_lib.export_model(workdir + "/model", states[2], info)
    assert "w/checkpoints/2/commit_success.txt" in gcs.objects("w/")

    def params_of(path):
        return ckpt_lib.load_init_from(path)[0]["params"]

    want = jax.device_get(states[2].params)
    for source in (workdir, workdir + "/checkpoints", workdir + "/checkpoints/2", workdir + "/model"):
        jax.tree.map(np.testing.assert_array_equal, params_of(source), want)
    from cvt_flax import pretrained

    _, loaded = pretrained.load(workdir + "/model")
    assert loaded["source"] == workdir + "/model"

    # A damaged newest checkpoint: the older one is restored, the damaged one moved aside (not deleted).
    arrays = [n for n in gcs.objects("w/checkpoints/2/state/") if "/d/" in n]
    epath.Path(gcs.url(arrays[0])).unlink()
    ckpts = ckpt_lib.Checkpoints(workdir + "/checkpoints", keep=2)
    with caplog.at_level("WARNING"):
        state, _, step = ckpts.restore_latest_intact(program.abstract_state, sharding.replicated_sharding(mesh), info)
    ckpts.close()
    assert step == 1 and "is damaged" in caplog.text
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), jax.device_get(states[1].params))
    names = gcs.objects("w/")
    assert not [n for n in names if n.startswith("w/checkpoints/2/")]
    assert "w/damaged_checkpoints/2/commit_success.txt" in names

    # eval_only: weights from a gs:// model directory, results to a gs:// workdir that gets eval.json alone.
    config = fmnist_config(eval_only=True, init_from=workdir + "/model")
    result = train_lib.train_and_evaluate(config, gcs.url("eval"))
    assert result["count"] == 40 and result["model"] == "cvt_tiny"
    assert gcs.objects("eval/") == ["eval/eval.json"]
    assert json.loads(epath.Path(gcs.url("eval/eval.json")).read_text())["count"] == 40


# ----------------------------------------------------------------------------- data on gs://


def test_datasets_on_gcs(gcs):
    """A TFDS dataset prepared into gs:// and read by tf.data, ArrayRecord through tfds.data_source, an image folder."""
    import gcs_digits

    from cvt_flax.data import device, tfdata

    config = fmnist_config(dataset=gcs_digits.NAME, data_dir=gcs.url("tfds"), download=True)
    config.input.pipeline = "tfdata"
    info = info_lib.get_dataset_info(config)  # one process: prepared here, into gs://
    assert (info.num_train_examples, info.num_eval_examples, info.num_classes) == (256, 40, 10)
    assert f"tfds/{gcs_digits.NAME}/1.0.0/dataset_info.json" in gcs.objects("tfds/")
    ds = tfdata.make_train_dataset(config, seed=0, start_step=3, local_batch=4, process_index=1, process_count=2)
    batch = next(ds.as_numpy_iterator())
    assert batch["image"].shape == (4, 28, 28, 3) and batch["label"].shape == (4,)

    # The device pipeline needs ArrayRecord, which TFDS cannot write to Cloud Storage: the message says what to do.
    config.input.pipeline = "device"
    config.data_dir = gcs.url("tfds_ar")
    with pytest.raises(info_lib.DatasetError, match=r"cannot be written to Cloud Storage.*gcloud storage cp -r"):
        info_lib.get_dataset_info(config)
    # ArrayRecord copied up (metadata and the test split) reads through tfds.data_source.
    local = SHARED / "tfds_array_record" / "fashion_mnist" / "3.0.1"
    if not local.is_dir():
        pytest.skip("../shared/tfds_array_record is absent")
    for f in local.iterdir():
        if "train" not in f.name:
            epath.Path(gcs.url(f"tfds_ar/fashion_mnist/3.0.1/{f.name}")).write_bytes(f.read_bytes())
    config = fmnist_config(data_dir=gcs.url("tfds_ar"))
    config.input.pipeline = "device"
    source = info_lib.open_source(config, for_device=True)
    images, labels = device.load_arrays(source, source.resolve("test[:8]"), None)
    assert images.shape == (8, 28, 28, 1) and labels.shape == (8,)

    # An image folder on gs://: scanned, verified and read by both pipelines.
    for split, n in (("train", 4), ("test", 2)):
        for i in range(n):
            epath.Path(gcs.url(f"images/{split}/{'cd'[i % 2]}/{i}.png")).write_bytes(png(40 * i, 20, "RGB"))
    config = fmnist_config(dataset="image_folder", data_dir=gcs.url("images"), train_split="train", eval_split="test")
    config.input.pipeline = "device"
    info = info_lib.get_dataset_info(config)
    assert (info.num_train_examples, info.num_eval_examples, info.class_names) == (4, 2, ["c", "d"])
    source = info_lib.open_source(config)
    assert all(p.startswith(gcs.url("images/train/")) for p, _ in source.files["train"])
    images, _ = device.load_arrays(source, source.resolve("train"), (16, "resize", 1.0))
    assert images.shape == (4, 16, 16, 3)
    reader = tfdata._Reader(source, 3)
    assert next(reader.read(source.resolve("test"), decode=True).as_numpy_iterator())["image"].shape == (20, 20, 3)
    epath.Path(gcs.url("images/test/c/bad.png")).write_bytes(b"not an image")
    with pytest.raises(info_lib.DatasetError, match=r"1 of 7 images cannot be read:\n  gs://.*/images/test/c/bad.png"):
        info_lib.get_dataset_info(config)


class _Builder:
    """Stands in for a TFDS builder of one process: prepared once some process prepared the storage it sees."""

    def __init__(self, storage: dict, host: str, process: int):
        self.storage, self.host, self.process, self.data_dir = storage, host, process, "gs://b/tfds"

    def is_prepared(self) -> bool:
        return self.host in self.storage["prepared"]

    def download_and_prepare(self, **kwargs):
        if self.storage["fail"]:
            raise OSError("no network")
        self.storage["calls"].append(f"process {self.process}")
        self.storage["prepared"].add(self.host)


def _prepare_as(monkeypatch, process: int, shared: bool, fail: bool = False) -> dict:
    """Runs `info._prepare_on_process_0` as ``process`` of two; the collectives answer for the other process."""
    import tensorflow_datasets as tfds

    storage = {"prepared": set(), "calls": [], "fail": fail}
    host = lambda i: "shared" if shared else f"host{i}"  # noqa: E731 - where process i's data_dir is
    gathers = []

    def all_processes(flag):
        other = not gathers  # at first nothing is prepared; later the other process did not fail
        if len(gathers) == 1 and process == 1:  # process 1 gets here once process 0 has tried
            other = fail
            if not fail:
                storage["calls"].append("process 0")
                storage["prepared"].add(host(0))
        gathers.append(flag)
        return [flag, other] if process == 0 else [other, flag]

    monkeypatch.setattr(jax, "process_index", lambda: process)
    monkeypatch.setattr(info_lib, "_all_processes", all_processes)
    monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: _Builder(storage, host(process), process))
    builder = info_lib._prepare_on_process_0(_Builder(storage, host(process), process), "digits", "gs://b/t", False)
    assert builder.is_prepared()
    return storage


@pytest.mark.parametrize("shared", [True, False], ids=["shared-data_dir", "disk-per-host"])
@pytest.mark.parametrize("process", [0, 1])
def test_dataset_prepared_on_process_0_only(monkeypatch, process, shared):
    """`info._prepare_on_process_0` seen from each process of two (its collectives answer for the other one).

    Process 0 prepares while process 1 waits; with a shared data_dir (gs://) process 1 then reads process 0's
    copy; with a disk per host it prepares its own copy after process 0. When process 0 fails, both stop with a
    message. The two-process run of `test_two_processes_on_gcs_preempted_and_resumed_equal_uninterrupted` does
    the same for real with a shared gs:// data_dir.
    """
    storage = _prepare_as(monkeypatch, process, shared)
    if process == 1 and not shared:
        assert storage["calls"] == ["process 0", "process 1"]
    else:
        assert storage["calls"] == ["process 0"]
    match = r"failed \(OSError: no network\)" if process == 0 else "Process 0 could not prepare dataset 'digits'"
    with pytest.raises(info_lib.DatasetError, match=match):
        _prepare_as(monkeypatch, process, shared, fail=True)


# ----------------------------------------------------------------------------- two processes, preempted, resumed


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(workdir: str, data_dir: str, tmp_path: pathlib.Path, name: str, *, sigterm_at: str | None = None):
    """Runs tests/gcs_digits.py (main.py with the test dataset) as two jax.distributed processes; returns logs.

    ``sigterm_at``: a line of process 1's log after which process 1 gets SIGTERM (a preempted host).
    """
    port = _free_port()
    cmd = [
        sys.executable,
        str(REPO / "tests" / "gcs_digits.py"),
        "--config=configs/smoke.py:dataset=fashion_mnist",
        f"--workdir={workdir}",
        "--config.dataset=gcs_test_digits",
        f"--config.data_dir={data_dir}",
        "--config.download=True",
        "--config.num_channels=3",
        "--config.input.pipeline=tfdata",
    ]
    env = {
        **os.environ,  # the emulator's variables (the gcs fixture)
        "PYTHONPATH": str(REPO),
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        # As tests/test_train_distributed.py (the same compiled programs): 4 CPU devices per process, LLVM at -O0.
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0",
        "EPATH_USE_TF": "false",  # gcsfs: the backend of a TPU VM without TensorFlow (no append on gs://)
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": "2",
    }
    logs = [tmp_path / f"{name}.{i}.log" for i in range(2)]
    procs = []
    for i in range(2):
        with open(logs[i], "w") as log:
            procs.append(
                subprocess.Popen(
                    cmd, env={**env, "JAX_PROCESS_ID": str(i)}, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
                )
            )
    deadline = time.time() + 400
    try:
        if sigterm_at is not None:
            while sigterm_at not in logs[1].read_text() and procs[1].poll() is None:
                assert time.time() < deadline, logs[1].read_text()[-3000:]
                time.sleep(0.2)
            procs[1].send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = [log.read_text() for log in logs]
    for p, text in zip(procs, texts, strict=True):
        assert p.returncode == 0, text[-4000:]
    return texts


@pytest.mark.slow
def test_two_processes_on_gcs_preempted_and_resumed_equal_uninterrupted(gcs, tmp_path):
    """Two jax.distributed processes train with workdir and data_dir on gs://.

    Process 0 alone prepares the dataset (TFDS "download") while process 1 waits, then both read it. Process 1
    gets SIGTERM at start-up: both stop at the next log step with a checkpoint on gs://; the same command then
    resumes and finishes. The parameters equal those of an uninterrupted two-process run (local workdir)
    exactly.
    """
    import gcs_digits

    data_dir, workdir = gcs.url("tfds"), gcs.url("run")
    first = _two_processes(workdir, data_dir, tmp_path, "first", sigterm_at="Starting from scratch")
    assert f"{gcs_digits.GENERATED} train on process 0" in first[0]
    assert gcs_digits.GENERATED not in first[1]  # process 1 read process 0's copy
    assert "Stopped at step 2 (preempted); restart the same command to resume" in first[0]
    summary = json.loads(epath.Path(workdir + "/summary.json").read_text())
    assert (summary["status"], summary["step"], summary["num_processes"]) == ("preempted", 2, 2)
    assert "run/checkpoints/2/commit_success.txt" in gcs.objects("run/")

    second = _two_processes(workdir, data_dir, tmp_path, "second")
    assert f"Resumed from {workdir}/checkpoints/2 at step 2" in second[0]
    assert not any(gcs_digits.GENERATED in text for text in second)
    summary = json.loads(epath.Path(workdir + "/summary.json").read_text())
    assert (summary["status"], summary["step"], summary["resumed_from_step"]) == ("completed", 4, 2)
    assert summary["final_eval"]["count"] == 40  # every eval example once over both processes
    history = plots.read_history(workdir + "/metrics.jsonl")  # gcsfs cannot append: rewritten whole
    assert [(r["step"], r["split"]) for r in history] == [(2, "train"), (4, "train"), (4, "eval")]

    names = gcs.objects("run/")
    top = {n.split("/")[1] for n in names}
    assert {t for t in top if "tfevents" not in t} == {
        "checkpoints",
        "config.json",
        "curves.png",
        "metrics.jsonl",
        "model",
        "parameters.txt",
        "summary.json",
    }
    assert len([t for t in top if "tfevents" in t]) == 2  # one per start, from process 0 only
    assert "run/model/model.json" in names and not [n for n in names if ".tmp" in n or ".write_test" in n]

    straight = tmp_path / "straight"
    _two_processes(str(straight), data_dir, tmp_path, "straight")
    a = ckpt_lib.load_init_from(workdir)[0]
    b = ckpt_lib.load_init_from(str(straight))[0]
    leaves = dict(jax.tree_util.tree_leaves_with_path(b))
    for path, x in jax.tree_util.tree_leaves_with_path(a):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(leaves[path]), err_msg=str(path))
    assert json.loads((straight / "summary.json").read_text())["final_eval"] == summary["final_eval"]
