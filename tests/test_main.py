"""main.py: flag errors with clear messages, multi-host detection, and a real preempted-then-resumed run."""

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "PYTHONPATH": str(REPO),
    "JAX_PLATFORMS": "cpu",
    "TF_CPP_MIN_LOG_LEVEL": "3",
}


def main_py(*args, timeout=120, env=None):
    cmd = [sys.executable, str(REPO / "main.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env or ENV, timeout=timeout)


def test_unknown_config_field_is_named(tmp_path):
    proc = main_py("--config=configs/smoke.py", f"--workdir={tmp_path}", "--config.lerning_rate=0.1")
    assert proc.returncode != 0
    assert "--config.lerning_rate is not a config field. Did you mean --config.learning_rate" in proc.stderr
    assert "configs/default.py" in proc.stderr and "Traceback" not in proc.stderr


def test_workdir_is_required():
    proc = main_py("--config=configs/smoke.py")
    assert proc.returncode != 0 and "--workdir must have a value" in proc.stderr


def test_bad_config_argument():
    proc = main_py("--config=configs/imagenet.py:variant=99", "--workdir=/tmp/unused")
    assert proc.returncode != 0 and "variant='99' is not one of ['13', '21', 'w24']" in proc.stderr


def test_overrides_reach_the_run(tmp_path):
    """A None-typed field (data_dir) takes a string; the unknown dataset is reported by name."""
    proc = main_py(
        "--config=configs/smoke.py", f"--workdir={tmp_path}", f"--config.data_dir={tmp_path}", "--config.dataset=nope9"
    )
    assert proc.returncode != 0 and "nope9" in proc.stderr.splitlines()[-1]


def test_multi_host_detection():
    spec = importlib.util.spec_from_file_location("cvt_main_under_test", REPO / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not module.multi_host(False, {})
    assert not module.multi_host(False, {"SLURM_NTASKS": "1"})
    assert module.multi_host(True, {})
    assert module.multi_host(False, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert module.multi_host(False, {"SLURM_NTASKS": "4"})
    assert module.multi_host(False, {"OMPI_COMM_WORLD_SIZE": "2"})


@pytest.mark.slow
def test_sigterm_saves_and_a_restart_resumes(shared_dir, tmp_path):
    """A real process: SIGTERM (here during start-up) -> checkpoint after the next step and a clean exit; the same
    command then finishes the run. Same program as tests/test_train.py's Fashion-MNIST runs (compiled once)."""
    args = [
        "--config=configs/smoke.py:dataset=fashion_mnist",
        f"--workdir={tmp_path}",
        f"--config.data_dir={shared_dir / 'tfds'}",
        "--config.num_channels=3",
    ]
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    cmd = [sys.executable, str(REPO / "main.py"), *args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    lines, deadline = [], time.time() + 300
    for line in proc.stderr:
        lines.append(line)
        if "Starting from scratch" in line:  # the SIGTERM handler is installed by then
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, "".join(lines[-30:])
    out = proc.communicate(timeout=300)[1]
    assert proc.returncode == 0, out[-3000:]
    assert "Stopped at step 1 (preempted); restart the same command to resume" in out
    first = json.loads((tmp_path / "summary.json").read_text())
    assert first["status"] == "preempted" and first["step"] == 1
    assert os.listdir(tmp_path / "checkpoints") == ["1"]

    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = json.loads((tmp_path / "summary.json").read_text())
    assert second["status"] == "completed" and second["step"] == 4
    assert second["resumed_from_step"] == 1 and second["final_eval"]["count"] == 40
    assert f"Resumed from {tmp_path / 'checkpoints' / '1'} at step 1" in proc.stderr
