"""Fixtures of the test suite (helpers and tolerances: tests/testing.py).

`device` runs a test on the CPU always and on CUDA when a GPU is visible (CUDA
variants are marked `cuda`, so a GPU machine selects them with `-m cuda`).
"""

from __future__ import annotations

import pytest
import torch

from testing import DEVICES


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


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
