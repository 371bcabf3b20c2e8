"""Test-wide setup: 8 fake CPU devices (sharding tests) before JAX initialises its backend.

Not `--xla_backend_optimization_level=0`: it cuts compile time by about a third, but the ESR
diversity Jacobian of a batch of one comes out non-finite under it (finite at the default)."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def load_script():
    """load_script('benchmarks/x.py') -> that script imported as a fresh module (scripts are not
    in a package)."""
    import importlib.util

    def load(relative: str):
        path = pathlib.Path(__file__).resolve().parents[1] / relative
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def shared_data():
    """Path of ../shared/data (real FER data); skips the test when it is absent."""
    root = pathlib.Path(os.environ.get("FER_JAX_SHARED_DATA", SHARED_DATA))
    if not root.is_dir():
        pytest.skip(f"real FER data not found at {root} (set FER_JAX_SHARED_DATA)")
    return root


def _make_config(name: str, arg: str | None = None, **overrides):
    """configs/<name>.py's get_config(arg) with dotted-key overrides ('fed.rounds': 3)."""
    import importlib
    import sys

    repo = str(pathlib.Path(__file__).resolve().parents[1])
    if repo not in sys.path:
        sys.path.insert(0, repo)
    config = importlib.import_module(f"configs.{name}").get_config(arg)
    for key, value in overrides.items():
        node = config
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    return config


@pytest.fixture
def make_config():
    return _make_config
