"""Fixtures of the test suite (helpers and tolerances: tests/testing.py).

`device` runs a test on the CPU always and on CUDA when a GPU is visible (CUDA
variants are marked `cuda`, so a GPU machine selects them with `-m cuda`).

Hypothesis profiles of the property tests (test_entmax_properties.py): "short" (the default:
derandomized, a fixed number of examples per test, a couple of minutes for the module) and
"long" (thousands of random examples per test), chosen with ENTMAX_HYPOTHESIS_PROFILE=long.

`slow` marks what takes long on a 2-core machine: the demo, torch.compile, torchrun, the
example's training, and every test that builds or runs the CUDA emulation (marked here, by
its fixture), so `pytest -m "not slow"` is the quick everyday run; `pytest -q` runs them all.
"""

from __future__ import annotations

import os

import pytest
import torch

from testing import DEVICES, load_attention_emulation, make_tiny_synthetic

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the property tests skip themselves without hypothesis
    settings = None
else:
    _HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
               HealthCheck.function_scoped_fixture]
    settings.register_profile("short", derandomize=True, max_examples=100, deadline=None, database=None,
                              suppress_health_check=_HEALTH, print_blob=True)
    settings.register_profile("long", max_examples=2000, deadline=None, database=None,
                              suppress_health_check=_HEALTH, print_blob=True)
    settings.load_profile(os.environ.get("ENTMAX_HYPOTHESIS_PROFILE", "short"))


@pytest.fixture(scope="session")
def emulation(tmp_path_factory):
    """The CUDA attention kernels run on the CPU (tests/cuda_emulation), built once per session."""
    ops = load_attention_emulation(tmp_path_factory.mktemp("attention_emulation"))
    if ops is None:
        pytest.skip("no CUDA toolkit headers (cuda_fp16.h: set CUDA_HOME) or no C++ compiler for the emulated kernels")
    return ops


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "emulation" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Tiny synthetic session data (dsan's text format), one copy per test module."""
    return make_tiny_synthetic(tmp_path_factory.mktemp("dsan-data"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread_for_entmax_tests(request):
    """One intra-op thread in the entmax tests: the reference's many small tensor ops slow
    down 10-100x when threads oversubscribe a busy machine. The kernels' multi-threaded
    path has a test of its own (test_multithreaded_cpu_forward_equals_single_threaded)."""
    if not request.module.__name__.startswith("test_entmax"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
