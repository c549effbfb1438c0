"""Test set-up: eight fake CPU devices, quiet TensorFlow, no GPU for TensorFlow."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """The read-only ../shared folder (real datasets); skips when absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not present")
    return SHARED
