"""The CUDA attention kernels' own source, run on the CPU (tests/cuda_emulation): every
matmul policy (SIMT for each dtype, tensor cores with 64- and 128-column chunks) against the
CPU kernel, outputs, statistics, block map and the four gradients, on the cases the CUDA op
must get right (ragged lengths, causal, GQA, masks, NaN and empty rows, head dims up to 256,
strides). The emulator runs each CTA's 128 threads as fibers and implements ldmatrix and
mma.sync from the PTX ISA's fragment layouts, so index, layout and synchronisation errors of
the kernels show here; what it cannot show is listed in docs/attention.md ("CUDA")."""

from __future__ import annotations

import sys

import pytest
import torch

import entmax_cuda
from entmax_cuda import attention, attention_ops
from testing import REPO_ROOT, acc_dtype

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import bench_attention  # noqa: E402  (its locally structured inputs)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the emulator uses glibc's ucontext")

SIMT, TC64, TC128, TC64_SM75 = 0, 1, 2, 3  # the emulator's policy numbers (attention_emulation.cpp)
# Agreement with the CPU kernel on the same inputs. float64 SIMT: rounding only; float32: the
# two devices sum in different orders; tensor cores round P and dS to the input type for the
# mma (as FlashAttention), relative 2^-11 (float16) and 2^-8 (bfloat16) of an entry.
RTOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _inputs(B, Hq, Hkv, Lq, Lk, D, Dv=None, dtype=torch.float64, alpha=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, Lq, D, generator=g, dtype=torch.float64) * 1.5).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, Lk, Dv or D, generator=g, dtype=torch.float64).to(dtype)
    if alpha is None:
        alpha = 1 + torch.rand(B, Hq, Lq, generator=g, dtype=torch.float64)
    alpha = torch.as_tensor(alpha, dtype=torch.float64).expand(B, Hq, Lq).to(acc_dtype(dtype))
    grad_out = torch.randn(B, Hq, Lq, Dv or D, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, alpha, grad_out


def _run(ops, args, mask, causal, scale, alpha_grad=True, policy=None, block_max_bytes=0, schedule=0):
    """(out, stats, block_map, dq, dk, dv, dalpha) of the CPU kernel (policy None) or the emulated CUDA kernels."""
    q, k, v, alpha, grad_out = args
    if policy is None:
        fwd = attention_ops.forward_op(q, k, v, alpha, mask, causal, scale)
        bwd = attention_ops.backward_op(grad_out, q, k, v, alpha, mask, causal, scale, fwd[1], fwd[2], alpha_grad)
    else:
        fwd = ops.attention_forward(q, k, v, alpha, mask, causal, scale, policy, block_max_bytes, schedule)
        bwd = ops.attention_backward(grad_out, q, k, v, alpha, mask, causal, scale, fwd[1], fwd[2], alpha_grad,
                                     policy, schedule)
    return tuple(fwd) + tuple(bwd)


NAMES = ["out", "stats", "block_map", "dq", "dk", "dv", "dalpha"]


def _rel(got, want):
    """Largest difference relative to the largest entry, NaN where both are NaN counted as equal."""
    if want.numel() == 0:
        return 0.0
    got, want = got.double(), want.double()
    both_nan = got.isnan() & want.isnan()
    assert torch.equal(got.isnan(), want.isnan()), "NaN in different places"
    diff = (got - want).abs().masked_fill(both_nan, 0)
    scale = want.abs().masked_fill(want.isnan() | want.isinf(), 0).max().clamp(min=1e-30)
    return (diff.nan_to_num(posinf=float("inf")).max() / scale).item()


def _check(emulated, reference, dtype, exact_evaluations=True):
    for name, got, want in zip(NAMES, emulated, reference):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        if name == "block_map":
            assert torch.equal(got, want), "block maps differ"
        elif name == "stats":
            assert _rel(got[:, :, :3], want[:, :, :3]) <= RTOL[dtype], "stats differ"
            if exact_evaluations:
                assert torch.equal(got[:, :, 3], want[:, :, 3]), "threshold evaluations differ"
        else:
            err = _rel(got, want)
            assert err <= RTOL[dtype], f"{name} differs by {err:.2e}"


CASES = {  # (B, Hq, Hkv, Lq, Lk, D, Dv), causal, mask kind
    "ragged": ((2, 2, 2, 70, 130, 16, 16), 0, None),
    "ragged, one key": ((1, 2, 2, 64, 1, 8, 8), 0, None),
    "more queries than keys": ((1, 1, 1, 129, 64, 33, 20), 0, None),
    "causal upper-left": ((1, 2, 2, 130, 70, 16, 16), 1, None),
    "causal lower-right": ((1, 2, 2, 70, 130, 16, 16), 2, None),
    "causal lower-right, empty first rows": ((1, 1, 1, 130, 64, 8, 8), 2, None),
    "gqa causal": ((1, 4, 2, 130, 130, 32, 32), 1, None),
    "key mask": ((2, 2, 2, 70, 100, 16, 16), 0, "keys"),
    "bias with -inf and an all-masked row": ((1, 2, 2, 70, 100, 16, 16), 0, "bias"),
    "+inf in the bias: a NaN row": ((1, 1, 1, 66, 70, 8, 8), 0, "inf"),
    "head dim 200": ((1, 1, 1, 20, 70, 200, 200), 0, None),
    "head dims 256 and 3": ((1, 1, 1, 20, 70, 256, 3), 0, None),
}


def _mask(kind, B, Hq, Lq, Lk, dtype):
    g = torch.Generator().manual_seed(1)
    if kind is None:
        return None
    if kind == "keys":  # a key-padding mask as the Python layer passes it: a stride-0 view
        return (torch.rand(B, 1, 1, Lk, generator=g) > 0.4).expand(B, Hq, Lq, Lk)
    bias = torch.randn(B, Hq, Lq, Lk, generator=g, dtype=torch.float64)
    if kind == "bias":
        bias[..., ::7] = float("-inf")
        bias[0, 0, 5] = float("-inf")  # every key of one row masked
    else:
        bias[0, 0, 65, 3] = float("inf")  # a row in the second query tile
    return bias.to(acc_dtype(dtype))


def _case(name, dtype, alpha=None):
    shape, causal, mask_kind = CASES[name]
    B, Hq, Hkv, Lq, Lk, D, Dv = shape
    args = _inputs(B, Hq, Hkv, Lq, Lk, D, Dv, dtype=dtype, alpha=alpha)
    return args, _mask(mask_kind, B, Hq, Lq, Lk, dtype), causal, D ** -0.5


@pytest.mark.parametrize("name", list(CASES))
def test_simt_float64_matches_the_cpu_kernel(emulation, name):
    args, mask, causal, scale = _case(name, torch.float64)
    _check(_run(emulation, args, mask, causal, scale, policy=SIMT), _run(None, args, mask, causal, scale),
           torch.float64)


@pytest.mark.parametrize("name", ["ragged", "gqa causal", "key mask", "head dims 256 and 3"])
def test_simt_float32_matches_the_cpu_kernel(emulation, name):
    args, mask, causal, scale = _case(name, torch.float32)
    _check(_run(emulation, args, mask, causal, scale, policy=SIMT), _run(None, args, mask, causal, scale),
           torch.float32, exact_evaluations=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name, policy", [("ragged", TC64), ("gqa causal", TC64),
                                          ("bias with -inf and an all-masked row", TC64), ("ragged", TC128),
                                          ("head dim 200", TC128), ("ragged", SIMT)])
def test_half_types_match_the_cpu_kernel(emulation, dtype, name, policy):
    """The CPU kernel on the same half inputs, in float; the tensor-core path rounds P and dS to dtype."""
    args, mask, causal, scale = _case(name, dtype)
    _check(_run(emulation, args, mask, causal, scale, policy=policy), _run(None, args, mask, causal, scale), dtype,
           exact_evaluations=False)


@pytest.mark.parametrize("name", ["ragged", "gqa causal"])
def test_turing_float16_mma_as_two_k8_steps(emulation, name):
    """sm_75 has mma.m16n8k8 only: the float16 path splits each m16n8k16 into two (emulated from the
    k8 shape's own fragment layout)."""
    args, mask, causal, scale = _case(name, torch.float16)
    _check(_run(emulation, args, mask, causal, scale, policy=TC64_SM75), _run(None, args, mask, causal, scale),
           torch.float16, exact_evaluations=False)


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0, 2.5])
def test_closed_forms_and_softmax_rows(emulation, alpha):
    args, mask, causal, scale = _case("ragged", torch.float64, alpha=alpha)
    _check(_run(emulation, args, mask, causal, scale, policy=SIMT), _run(None, args, mask, causal, scale),
           torch.float64)


def test_alpha_below_one_gives_nan_rows(emulation):
    alpha = torch.full((1, 2, 70), 1.5, dtype=torch.float64)
    alpha[0, 1, 3] = 0.5
    alpha[0, 0, 66] = float("nan")
    args, mask, causal, scale = _case("ragged", torch.float64, alpha=alpha[:1])
    got = _run(emulation, args, mask, causal, scale, policy=SIMT)
    _check(got, _run(None, args, mask, causal, scale), torch.float64)
    assert got[0][0, 1, 3].isnan().all() and got[0][0, 0, 66].isnan().all()


def test_without_the_alpha_gradient(emulation):
    args, mask, causal, scale = _case("gqa causal", torch.float64)
    got = _run(emulation, args, mask, causal, scale, alpha_grad=False, policy=SIMT)
    _check(got, _run(None, args, mask, causal, scale, alpha_grad=False), torch.float64)
    assert got[-1].eq(0).all()


def test_strided_inputs(emulation):
    """q, k, v, alpha and grad_out as views with arbitrary strides (no 16-byte loads on the TC path)."""
    g = torch.Generator().manual_seed(3)
    B, H, L, E = 2, 3, 70, 16
    for dtype, policy in ((torch.float64, SIMT), (torch.float16, TC64)):
        base = torch.randn(B, L, H, 3 * E, generator=g, dtype=torch.float64).to(dtype)
        q, k, v = (base[..., i * E:(i + 1) * E].transpose(1, 2) for i in range(3))
        alpha = (1 + torch.rand(B, H, 1, L, generator=g, dtype=torch.float64)).to(acc_dtype(dtype))[:, :, 0]
        grad_out = torch.randn(B, H, E, L, generator=g, dtype=torch.float64).to(dtype).transpose(-1, -2)
        args = (q, k, v, alpha, grad_out)
        _check(_run(emulation, args, None, 1, 0.3, policy=policy), _run(None, args, None, 1, 0.3), dtype,
               exact_evaluations=dtype == torch.float64)


def test_coarse_block_maxima_skip_less_and_change_nothing_else(emulation):
    """With room for few block maxima, one covers several key tiles: the map marks a superset of the
    blocks, the results are the same."""
    q, k, v = bench_attention.make_inputs("local", 1, 2, 600, 16, torch.float64, "cpu", seed=0)
    alpha = torch.full((1, 2, 600), 1.5, dtype=torch.float64)
    grad_out = torch.randn(1, 2, 600, 16, dtype=torch.float64)
    args = (q, k, v, alpha, grad_out)
    fine = _run(emulation, args, None, 0, 0.25, policy=SIMT)
    coarse = _run(emulation, args, None, 0, 0.25, policy=SIMT, block_max_bytes=3 * 8)  # 3 maxima for 10 tiles
    assert (coarse[2] >= fine[2]).all() and coarse[2].sum() > fine[2].sum()
    assert fine[2].eq(0).any()
    for name, a, b in zip(NAMES, coarse, fine):
        if name != "block_map":
            assert _rel(a, b) <= 1e-12, name


def test_empty_inputs(emulation):
    for Lq, Lk in ((0, 5), (5, 0)):
        args = _inputs(1, 2, 2, Lq, Lk, 8)
        _check(_run(emulation, args, None, 0, 0.3, policy=SIMT), _run(None, args, None, 0, 0.3), torch.float64)


@pytest.mark.parametrize("name, dtype, policy", [("gqa causal", torch.float16, TC64), ("key mask", torch.float32, SIMT),
                                                 ("head dim 200", torch.bfloat16, TC128)])
def test_results_do_not_depend_on_the_order_threads_run_in(emulation, name, dtype, policy):
    """The emulated threads resumed in random orders: a shared-memory race (a missing barrier) would
    change the results; every output is bitwise the same."""
    args, mask, causal, scale = _case(name, dtype)
    runs = [_run(emulation, args, mask, causal, scale, policy=policy, schedule=s) for s in (0, 1, 2)]
    for other in runs[1:]:
        for name_, a, b in zip(NAMES, runs[0], other):
            assert torch.equal(a.nan_to_num(), b.nan_to_num()), name_


@pytest.mark.parametrize("policy", [TC64, TC64_SM75])
def test_float16_tensor_cores_take_ds_beyond_the_half_range(emulation, policy):
    """alpha > 2: dS = g (dP - q_i) with g = p^(2 - alpha) unbounded at the support's edge. Here its
    largest entry is 7.7e4 (float16 overflows at 65520) while every gradient fits float16; the
    tensor-core backward packs dS for the mma, row by row scaled by a power of two, so dQ stays
    finite and within the half types' rounding of the CPU kernel (it was NaN before)."""
    B, H, L, D = 1, 1, 64, 64
    g = torch.Generator().manual_seed(25)
    q = (torch.randn(B, H, L, D, generator=g) * 1.5).half()
    k = (torch.randn(B, H, L, D, generator=g) * 2).half()
    v = (torch.randn(B, H, L, D, generator=g) * 100).half()
    grad_out = (torch.randn(B, H, L, D, generator=g) * 10).half()
    alpha = torch.full((B, H, L), 5.0)
    scale = D ** -0.5
    scores = (q.double() @ k.double().transpose(-1, -2) * scale).requires_grad_()
    (entmax_cuda.entmax(scores, 5.0, dim=-1) @ v.double() * grad_out.double()).sum().backward()
    assert scores.grad.abs().max() > 65520  # the case reaches float16's overflow
    args = (q, k, v, alpha, grad_out)
    want = _run(emulation, args, None, 0, scale)
    got = _run(emulation, args, None, 0, scale, policy=policy)
    for name, a, b in zip(NAMES[3:], got[3:], want[3:]):
        assert b.isfinite().all() and a.isfinite().all(), f"{name} not finite"
        assert _rel(a, b) <= RTOL[torch.float16], f"{name} off by {_rel(a, b):.3g} of its largest entry"
