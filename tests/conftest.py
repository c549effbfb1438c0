"""Test set-up: eight fake CPU devices, quiet TensorFlow, one persistent JAX compilation cache.

The environment is set before JAX is imported, so that every test module, every pytest-xdist worker and every
subprocess a test starts (main.py runs, jax.distributed processes, the benchmark scripts) shares one on-disk
compilation cache: a program that several tests compile (the tiny model's train step) compiles once.
"""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "cvt_flax_test_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pathlib  # noqa: E402

import pytest  # noqa: E402

# The `gcs_emulator` / `gcs` fixtures: a local Cloud Storage emulator for the gs:// tests (tests/test_gcs.py).
pytest_plugins = ["gcs_emulator"]

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """The read-only ../shared folder (real datasets); skips when absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not present")
    return SHARED
