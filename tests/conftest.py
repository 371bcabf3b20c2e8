"""Test-wide setup: 8 fake CPU devices (sharding tests) before JAX initialises its backend."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
    """Path of ../shared/data (real FER data); skips the test when it is absent."""
    root = pathlib.Path(os.environ.get("FER_JAX_SHARED_DATA", SHARED_DATA))
    if not root.is_dir():
        pytest.skip(f"real FER data not found at {root} (set FER_JAX_SHARED_DATA)")
    return root
