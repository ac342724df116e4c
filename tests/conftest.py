"""Shared test set-up: the backend option and the hypothesis profiles.

    python -m pytest                         # NumPy, fast hypothesis profile (CI)
    python -m pytest --backend cupy          # the same suite on a CUDA GPU
    python -m pytest --backend fake-cupy     # the suite with a NumPy stand-in as CuPy:
                                             # checks that host and device arrays never mix
    HYPOTHESIS_PROFILE=thorough python -m pytest   # many more examples per property
"""
import importlib.util
import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from minilora import backend

BENCH_RUN_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "run.py")

# The fast profile is derandomized: CI tests the same examples on every run, so a
# result never depends on the draw; the thorough profile explores at random.
settings.register_profile("fast", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))


def pytest_addoption(parser):
    parser.addoption("--backend", action="store", default="numpy", choices=("numpy", "cupy", "fake-cupy"),
                     help="array backend the tests run on (cupy needs a CUDA GPU; fake-cupy is "
                          "tests/fake_cupy.py in CuPy's place: NumPy math, CuPy's rules on mixing "
                          "host and device arrays)")


def pytest_configure(config):
    if config.getoption("--backend") == "fake-cupy":
        import fake_cupy
        fake_cupy.install()


def pytest_collection_modifyitems(config, items):
    if config.getoption("--backend") == "cupy" and not backend.cuda_available():
        skip = pytest.mark.skip(reason="--backend cupy needs CuPy and a CUDA device; none found")
        for item in items:
            item.add_marker(skip)
    if not backend.cuda_available():
        skip_gpu = pytest.mark.skip(reason="needs CuPy and a CUDA device; none found")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def bench():
    """bench/run.py as a module (it is a script beside the package, not part of it),
    loaded once for every test that calls its functions."""
    module = sys.modules.get("bench_run")
    if module is None:
        spec = importlib.util.spec_from_file_location("bench_run", BENCH_RUN_PY)
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_run"] = module  # dataclasses look their module up while it loads
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def device(pytestconfig) -> str:
    """'cpu' or 'cuda', from --backend."""
    return "cpu" if pytestconfig.getoption("--backend") == "numpy" else "cuda"


@pytest.fixture(scope="session")
def xp(device):
    """The array module under test (numpy, or cupy with --backend cupy or fake-cupy)."""
    return backend.get_array_module(backend.to_device(np.zeros(1), device))
