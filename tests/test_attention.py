"""entmax_cuda.scaled_dot_product_entmax and EntmaxAttention against the materialised
composite entmax(q @ k^T * scale + mask, alpha) @ v: outputs and gradients (q, k, v,
alpha), every alpha form, masks, causal alignment, GQA, strides, head dims, dtypes,
all-masked rows, block skipping, determinism, gradcheck, and the argument errors."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import entmax_cuda
from entmax_cuda import attention, attention_ops
from testing import ALPHA_GRAD_RTOL_FLOAT32, REPO_ROOT, acc_dtype, requires_cuda

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import bench_attention  # noqa: E402  (its locally structured inputs)

# Tolerances of the fused kernel against the float64 composite on the same (rounded) inputs.
# float32: scores of |s| ~ 10 carry ~1e-6 of rounding, and the composite in float32 is off by
# as much (up to 5.4e-6 on these shapes, alpha 2): 1e-5 absolute for outputs; gradients 5e-5
# of their largest entry (alpha: the entmax tests' bound). float16/bfloat16: the output's own
# rounding (relative 2^-11 / 2^-8 of |o| <= ~3).
FWD_ATOL = {torch.float64: 1e-11, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
GRAD_RTOL = {torch.float64: 1e-9, torch.float32: 5e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
ALPHA_GRAD_RTOL = {torch.float64: 1e-9, torch.float32: ALPHA_GRAD_RTOL_FLOAT32, torch.float16: 1e-3,
                   torch.bfloat16: 1e-3}


# ---------------------------------------------------------------- the composite


def composite(q, k, v, alpha, mask=None, causal=None, scale=None):
    """entmax(q k^T scale + mask, alpha) v with the score matrix in memory (the reference).

    q (B, Hq, Lq, E), k/v (B, Hkv, Lk, *) (heads repeated for GQA); alpha a float or a tensor
    broadcastable to (B, Hq, Lq, 1) (a 1-d alpha is per head); mask bool (True = keep) or
    additive; causal None, "upper_left" or "lower_right"."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5 if scale is None else scale)
    Lq, Lk = s.shape[-2:]
    if causal is not None:
        diagonal = Lk - Lq if causal == "lower_right" else 0
        keep = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(diagonal)
        s = s.masked_fill(~keep, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    if torch.is_tensor(alpha) and alpha.dim() == 1:
        alpha = alpha.reshape(-1, 1, 1)
    return entmax_cuda.entmax(s, alpha, dim=-1) @ v


def _inputs(B, Hq, Hkv, Lq, Lk, E, Ev=None, dtype=torch.float64, device="cpu", q_scale=1.5):
    q = (torch.randn(B, Hq, Lq, E, dtype=torch.float64) * q_scale).to(dtype).to(device)
    k = torch.randn(B, Hkv, Lk, E, dtype=torch.float64).to(dtype).to(device)
    v = torch.randn(B, Hkv, Lk, Ev or E, dtype=torch.float64).to(dtype).to(device)
    return q, k, v


def _grads(fn, tensors, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, grad_out)


def _rel(got, want) -> float:
    want = want.detach().cpu().double()
    return ((got.detach().cpu().double() - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()


def _check_against_composite(q, k, v, alpha, mask=None, causal=None, enable_gqa=False, atol_scale=1.0):
    """Fused output and gradients (q, k, v and a tensor alpha) against the float64 composite."""
    dtype = q.dtype
    alpha_t = alpha if torch.is_tensor(alpha) else torch.tensor(alpha, dtype=acc_dtype(dtype), device=q.device)
    attn_mask = None
    if causal == "lower_right":
        attn_mask = causal_lower_right(q.shape[-2], k.shape[-2])
    elif causal == "upper_left":
        attn_mask = causal_upper_left(q.shape[-2], k.shape[-2])
    elif mask is not None:
        attn_mask = mask

    def fused(q, k, v, a):
        return entmax_cuda.scaled_dot_product_entmax(q, k, v, a, attn_mask=attn_mask, enable_gqa=enable_gqa)

    wide_mask = mask if mask is None or mask.dtype == torch.bool else mask.double()

    def reference(q, k, v, a):
        return composite(q, k, v, a, mask=wide_mask, causal=causal)

    grad_out = torch.randn(q.shape[:-1] + v.shape[-1:], dtype=torch.float64, device=q.device).to(dtype)
    out, grads = _grads(fused, (q, k, v, alpha_t), grad_out)
    wide = [t.double() for t in (q, k, v, alpha_t)]
    out_ref, grads_ref = _grads(reference, wide, grad_out.double())
    assert out.dtype == dtype and out.shape == out_ref.shape
    err = (out.double() - out_ref).abs().max().item()
    assert err <= FWD_ATOL[dtype] * atol_scale, f"output off by {err}"
    for name, got, want in zip("qkv", grads[:3], grads_ref[:3]):
        assert got.shape == want.shape and got.dtype == dtype
        assert _rel(got, want) <= GRAD_RTOL[dtype], f"grad {name} off by {_rel(got, want)}"
    assert grads[3].shape == alpha_t.shape
    assert _rel(grads[3], grads_ref[3]) <= ALPHA_GRAD_RTOL[dtype], f"grad alpha off by {_rel(grads[3], grads_ref[3])}"
    return out


# ---------------------------------------------------------------- values and gradients

RAGGED_SHAPES = [  # (B, Hq, Hkv, Lq, Lk, E): lengths on, below and above the 64-tile grid
    (2, 3, 3, 5, 7, 4),
    (1, 2, 2, 70, 130, 16),
    (1, 1, 1, 129, 64, 33),
    (2, 2, 2, 64, 1, 8),
]


@pytest.mark.parametrize("shape", RAGGED_SHAPES)
@pytest.mark.parametrize("alpha", [1.0, 1.25, 1.5, 2.0, 3.0])
def test_float64_matches_composite(device, shape, alpha):
    B, Hq, Hkv, Lq, Lk, E = shape
    _check_against_composite(*_inputs(B, Hq, Hkv, Lq, Lk, E, device=device), alpha)


@pytest.mark.filterwarnings("ignore:Lower right causal bias")  # torch's: SDPA gives NaN rows there, we zeros
@pytest.mark.parametrize("causal", ["upper_left", "lower_right"])
@pytest.mark.parametrize("lengths", [(70, 130), (130, 70), (64, 64), (1, 9)])
def test_causal_float64_matches_composite(device, causal, lengths):
    q, k, v = _inputs(1, 2, 2, *lengths, 8, device=device)
    _check_against_composite(q, k, v, 1.5, causal=causal)


@pytest.mark.parametrize("alpha", [1.0, 1.25, 1.5, 1.75, 2.0])
@pytest.mark.parametrize("causal", [None, "upper_left"])
def test_float32_matches_float64_composite(device, alpha, causal):
    q, k, v = _inputs(1, 2, 2, 129, 300, 64, dtype=torch.float32, device=device)
    _check_against_composite(q, k, v, alpha, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0])
def test_half_types_match_float64_composite(device, dtype, alpha):
    q, k, v = _inputs(2, 2, 2, 70, 130, 32, dtype=dtype, device=device)
    _check_against_composite(q, k, v, alpha)


def test_long_rows_float32(device):
    q, k, v = _inputs(1, 1, 1, 64, 3000, 64, dtype=torch.float32, device=device)
    _check_against_composite(q, k, v, 1.5)


@pytest.mark.parametrize("alpha", [1.0, 1.5])
def test_alpha_one_is_softmax_attention(device, alpha):
    """alpha = 1 equals torch's scaled_dot_product_attention, with masks and causal too."""
    q, k, v = _inputs(2, 3, 3, 70, 90, 16, dtype=torch.float32, device=device)
    mask = torch.rand(2, 1, 70, 90, device=device) > 0.3
    for kwargs in ({}, {"attn_mask": mask}, {"is_causal": True}, {"attn_mask": causal_lower_right(70, 90)}):
        want = F.scaled_dot_product_attention(q, k, v, **kwargs)
        got = entmax_cuda.scaled_dot_product_entmax(q, k, v, 1.0, **kwargs)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
        if alpha != 1.0:  # and alpha > 1 differs from it
            assert (entmax_cuda.scaled_dot_product_entmax(q, k, v, alpha, **kwargs) - want).abs().max() > 1e-2


def test_is_causal_is_upper_left_as_sdpa(device):
    """SDPA's is_causal aligns the diagonal top-left when Lq != Lk (query i sees keys j <= i)."""
    for Lq, Lk in ((3, 8), (8, 3)):
        q, k, v = _inputs(1, 1, 1, Lq, Lk, 4, dtype=torch.float32, device=device)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        got = entmax_cuda.scaled_dot_product_entmax(q, k, v, 1.0, is_causal=True)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- alpha forms


ALPHA_FORMS = {
    "float": lambda B, H, Lq: 1.4,
    "0-d": lambda B, H, Lq: torch.tensor(1.6),
    "per head (Hq,)": lambda B, H, Lq: torch.linspace(1.1, 2.0, H),
    "per head (1,Hq,1,1)": lambda B, H, Lq: torch.linspace(1.0, 1.9, H).reshape(1, H, 1, 1),
    "per batch-head (B,Hq,1,1)": lambda B, H, Lq: 1 + torch.rand(B, H, 1, 1),
    "per query (B,Hq,Lq,1)": lambda B, H, Lq: 1 + torch.rand(B, H, Lq, 1) * 1.2,
    "per query, shared heads (Lq,1)": lambda B, H, Lq: 1 + torch.rand(Lq, 1),
}


@pytest.mark.parametrize("form", list(ALPHA_FORMS))
def test_every_alpha_form_matches_composite_with_gradient_in_alpha_shape(device, form):
    B, H, Lq = 2, 3, 20
    q, k, v = _inputs(B, H, H, Lq, 30, 8, device=device)
    alpha = ALPHA_FORMS[form](B, H, Lq)
    if torch.is_tensor(alpha):
        alpha = alpha.double().to(device)
    _check_against_composite(q, k, v, alpha)


def test_float_alpha_of_float16_inputs_is_float32_inside(device):
    q, k, v = _inputs(1, 2, 2, 10, 12, 8, dtype=torch.float16, device=device)
    alpha = torch.tensor([1.3, 1.7], dtype=torch.float16, device=device, requires_grad=True)
    out = entmax_cuda.scaled_dot_product_entmax(q, k, v, alpha)
    out.float().sum().backward()
    assert alpha.grad is not None and alpha.grad.dtype == torch.float16 and alpha.grad.shape == (2,)


def test_tensor_alpha_below_one_gives_nan_rows(device):
    q, k, v = _inputs(1, 2, 2, 4, 6, 8, device=device)
    out = entmax_cuda.scaled_dot_product_entmax(q, k, v, torch.tensor([1.5, 0.5], dtype=torch.float64, device=device))
    assert torch.isfinite(out[:, 0]).all() and torch.isnan(out[:, 1]).all()


# ---------------------------------------------------------------- masks


def test_bool_and_additive_masks_match_composite(device):
    B, H, Lq, Lk = 2, 2, 70, 100
    q, k, v = _inputs(B, H, H, Lq, Lk, 16, device=device)
    key_keep = torch.rand(B, 1, 1, Lk, device=device) > 0.4
    pair_keep = torch.rand(Lq, Lk, device=device) > 0.3
    bias = torch.randn(B, H, Lq, Lk, dtype=torch.float64, device=device)
    bias[..., ::7] = float("-inf")
    for mask in (key_keep, pair_keep, bias, bias[0, 0]):
        _check_against_composite(q, k, v, 1.5, mask=mask)


def test_additive_float32_mask_on_float64_inputs(device):
    q, k, v = _inputs(1, 1, 1, 8, 9, 4, device=device)
    bias = torch.randn(8, 9, device=device)
    got = entmax_cuda.scaled_dot_product_entmax(q, k, v, 1.5, attn_mask=bias)
    torch.testing.assert_close(got, composite(q, k, v, 1.5, mask=bias.double()), rtol=0, atol=1e-12)


def test_all_masked_rows_give_zero_output_and_zero_gradients(device):
    B, H, Lq, Lk = 1, 2, 70, 80
    q, k, v = _inputs(B, H, H, Lq, Lk, 8, device=device)
    keep = torch.rand(B, H, Lq, Lk, device=device) > 0.5
    keep[0, 0, 3] = False
    keep[0, 1, 65:] = False  # a whole tail of rows, in the second query tile
    alpha = torch.tensor([1.5, 1.2], dtype=torch.float64, device=device).reshape(1, 2, 1, 1).expand(B, H, Lq, 1)
    alpha = alpha.clone().requires_grad_()
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    out = entmax_cuda.scaled_dot_product_entmax(qq, kk, vv, alpha, attn_mask=keep)
    assert out[0, 0, 3].eq(0).all() and out[0, 1, 65:].eq(0).all()
    out.backward(torch.randn_like(out))
    assert qq.grad[0, 0, 3].eq(0).all() and qq.grad[0, 1, 65:].eq(0).all()
    assert alpha.grad[0, 0, 3].eq(0).all() and alpha.grad[0, 1, 65:].eq(0).all()
    _check_against_composite(q, k, v, alpha.detach(), mask=keep)


@pytest.mark.filterwarnings("ignore:Lower right causal bias")
def test_lower_right_causal_with_more_queries_than_keys_zeroes_the_first_rows(device):
    q, k, v = _inputs(1, 1, 1, 10, 4, 4, device=device)
    out = entmax_cuda.scaled_dot_product_entmax(q, k, v, 1.5, attn_mask=causal_lower_right(10, 4))
    assert out[0, 0, :6].eq(0).all() and out[0, 0, 6:].ne(0).any()
    _check_against_composite(q, k, v, 1.5, causal="lower_right")


def test_zero_length_keys_give_zero_output(device):
    q, k, v = _inputs(1, 2, 2, 5, 0, 4, device=device)
    q.requires_grad_()
    out = entmax_cuda.scaled_dot_product_entmax(q, k, v)
    assert out.shape == (1, 2, 5, 4) and out.eq(0).all()
    out.sum().backward()
    assert q.grad.eq(0).all()


def test_plus_infinity_in_an_additive_mask_gives_a_nan_row_as_the_composite(device):
    q, k, v = _inputs(1, 1, 1, 4, 6, 4, device=device)
    bias = torch.zeros(4, 6, dtype=torch.float64, device=device)
    bias[1, 2] = float("inf")
    out = entmax_cuda.scaled_dot_product_entmax(q, k, v, 1.5, attn_mask=bias)
    want = composite(q, k, v, 1.5, mask=bias)
    assert torch.isnan(out[0, 0, 1]).all() and torch.isnan(want[0, 0, 1]).all()
    torch.testing.assert_close(out[0, 0, [0, 2, 3]], want[0, 0, [0, 2, 3]], rtol=0, atol=1e-12)


def test_nan_in_a_query_row_gives_nan_in_that_row_only(device):
    q, k, v = _inputs(1, 1, 1, 6, 10, 4, device=device)
    q[0, 0, 2, 1] = float("nan")
    q.requires_grad_()
    out = entmax_cuda.scaled_dot_product_entmax(q, k, v, 1.5)
    assert torch.isnan(out[0, 0, 2]).all() and torch.isfinite(out[0, 0, [0, 1, 3, 4, 5]]).all()
    out.sum().backward()
    assert torch.isnan(q.grad[0, 0, 2]).all()


# ---------------------------------------------------------------- heads, shapes, strides


def test_grouped_query_attention_matches_composite(device):
    q, k, v = _inputs(2, 6, 2, 40, 70, 16, device=device)
    _check_against_composite(q, k, v, torch.linspace(1.1, 1.9, 6, dtype=torch.float64, device=device),
                             enable_gqa=True)
    _check_against_composite(q, k[:, :1], v[:, :1], 1.5)  # one key/value head broadcasts without enable_gqa


def test_causal_grouped_query_attention_float32(device):
    q, k, v = _inputs(1, 4, 2, 130, 130, 32, dtype=torch.float32, device=device)
    _check_against_composite(q, k, v, 1.5, causal="upper_left", enable_gqa=True)


@pytest.mark.parametrize("dims", [(1, 1), (200, 200), (256, 256), (16, 40), (40, 3)])
def test_head_dims(device, dims):
    E, Ev = dims
    q, k, v = _inputs(1, 2, 2, 20, 70, E, Ev, device=device, q_scale=1.0)
    _check_against_composite(q, k, v, 1.5)


def test_non_contiguous_inputs_give_the_same_result(device):
    B, H, L, E = 2, 3, 40, 16
    base = torch.randn(B, L, H, 3 * E, dtype=torch.float64, device=device)
    q, k, v = (base[..., i * E:(i + 1) * E].transpose(1, 2) for i in range(3))  # (B, H, L, E) views
    assert not q.is_contiguous()
    stepped = torch.randn(B, H, 2 * L, E, dtype=torch.float64, device=device)[:, :, ::2]
    alpha = (1 + torch.rand(B, H, 1, L, dtype=torch.float64, device=device)).transpose(-1, -2)  # strided (B,H,L,1)
    want = composite(q.contiguous(), stepped.contiguous(), v.contiguous(), alpha.contiguous())
    got = entmax_cuda.scaled_dot_product_entmax(q, stepped, v, alpha)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    _check_against_composite(q, stepped, v, alpha)


def test_batch_dimensions_broadcast_and_follow_sdpa_shapes(device):
    q = torch.randn(2, 3, 4, 10, 8, dtype=torch.float64, device=device)
    k = torch.randn(1, 3, 4, 12, 8, dtype=torch.float64, device=device)
    v = torch.randn(3, 4, 12, 5, dtype=torch.float64, device=device)
    want = F.scaled_dot_product_attention(q, k, v)
    got = entmax_cuda.scaled_dot_product_entmax(q, k, v, 1.0)
    assert got.shape == want.shape == (2, 3, 4, 10, 5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for shape in ((4, 10, 8), (10, 8)):  # (H, L, E) and (L, E)
        x = torch.randn(shape, dtype=torch.float64, device=device)
        torch.testing.assert_close(entmax_cuda.scaled_dot_product_entmax(x, x, x, 1.0),
                                   F.scaled_dot_product_attention(x, x, x), rtol=0, atol=1e-12)
        one_alpha = torch.tensor([1.5], dtype=torch.float64, device=device)  # (Hq,) with Hq = 1, or per head
        torch.testing.assert_close(entmax_cuda.scaled_dot_product_entmax(x, x, x, one_alpha[0] if len(shape) == 2
                                                                         else one_alpha.expand(4)),
                                   entmax_cuda.scaled_dot_product_entmax(x, x, x, 1.5), rtol=0, atol=0)
    x = torch.randn(10, 8, dtype=torch.float64, device=device)
    torch.testing.assert_close(entmax_cuda.scaled_dot_product_entmax(x, x, x, torch.tensor([1.5], device=device)),
                               entmax_cuda.scaled_dot_product_entmax(x, x, x, 1.5), rtol=0, atol=0)


def test_gradients_of_broadcast_batch_dimensions_are_summed(device):
    q = torch.randn(1, 2, 9, 8, dtype=torch.float64, device=device, requires_grad=True)
    k, v = (torch.randn(3, 2, 11, 8, dtype=torch.float64, device=device, requires_grad=True) for _ in range(2))
    grad_out = torch.randn(3, 2, 9, 8, dtype=torch.float64, device=device)
    got = torch.autograd.grad(entmax_cuda.scaled_dot_product_entmax(q, k, v, 1.5), (q, k, v), grad_out)
    want = torch.autograd.grad(composite(q.expand(3, -1, -1, -1), k, v, 1.5), (q, k, v), grad_out)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_empty_query_length(device):
    q = torch.randn(2, 3, 0, 8, device=device, requires_grad=True)
    k, v = (torch.randn(2, 3, 5, 8, device=device, requires_grad=True) for _ in range(2))
    out = entmax_cuda.scaled_dot_product_entmax(q, k, v)
    assert out.shape == (2, 3, 0, 8)
    out.sum().backward()
    assert k.grad.eq(0).all() and v.grad.eq(0).all()


def test_explicit_scale(device):
    q, k, v = _inputs(1, 2, 2, 9, 11, 8, device=device)
    got = entmax_cuda.scaled_dot_product_entmax(q, k, v, 1.5, scale=0.9)
    torch.testing.assert_close(got, composite(q, k, v, 1.5, scale=0.9), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("case", ["plain", "masked", "causal-gqa", "softmax"])
def test_gradcheck_q_k_v_alpha(device, case):
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 1 if case == "causal-gqa" else 2, 5, 7, 3, device=device))
    alpha = torch.tensor([1.3, 1.8], dtype=torch.float64, device=device, requires_grad=True)
    kwargs = {}
    if case == "masked":
        kwargs["attn_mask"] = torch.tensor([[1, 1, 0, 1, 0, 1, 1]], dtype=torch.bool, device=device)
    elif case == "causal-gqa":
        kwargs.update(attn_mask=causal_lower_right(5, 7), enable_gqa=True)
    elif case == "softmax":  # alpha = 1 is the edge of the domain: its gradient is one-sided (tested above)
        alpha = torch.tensor([1.0, 1.0], dtype=torch.float64, device=device)

    def fn(q, k, v, a):
        return entmax_cuda.scaled_dot_product_entmax(q, k, v, a, **kwargs)

    assert torch.autograd.gradcheck(fn, (q, k, v, alpha))


# ---------------------------------------------------------------- block skipping


def local_inputs(B, H, L, E, dtype=torch.float64, device="cpu"):
    """The benchmark's locally structured q, k, v (scores peak at j = i): most blocks far from
    the diagonal are exactly zero for alpha > 1."""
    return bench_attention.make_inputs("local", B, H, L, E, dtype, device, seed=0)


@pytest.mark.parametrize("alpha", [1.5, 2.0])
@pytest.mark.parametrize("causal", [attention_ops.NOT_CAUSAL, attention_ops.CAUSAL_UPPER_LEFT])
def test_block_map_skips_zero_blocks_and_results_are_unchanged(device, alpha, causal):
    B, H, L, E = 1, 2, 512, 32
    q, k, v = local_inputs(B, H, L, E, device=device)
    alpha_rows = torch.full((B, H, L), alpha, dtype=torch.float64, device=device)
    out, stats, block_map = attention_ops.forward_op(q, k, v, alpha_rows, None, causal, E ** -0.5)
    nb = L // attention_ops.BLOCK_Q
    assert block_map.shape == (B, H, nb, L // attention_ops.BLOCK_K)
    # the skipped blocks are zero in the materialised weights
    p = entmax_cuda.entmax(q @ k.transpose(-1, -2) * E ** -0.5
                           + (0 if causal == 0 else torch.full((L, L), float("-inf"), device=device).triu(1)), alpha)
    block_nonzero = p.reshape(B, H, nb, 64, nb, 64).ne(0).any(-1).any(-2)
    assert not (block_nonzero & block_map.eq(0)).any()
    assert block_map.eq(0).double().mean() > 0.6  # most of the map is skipped on this input
    assert block_map.eq(1).any()
    _check_against_composite(q, k, v, alpha, causal=None if causal == 0 else "upper_left")


def test_all_blocks_active_for_softmax(device):
    q, k, v = local_inputs(1, 1, 200, 16, device=device)
    _, _, block_map = attention_ops.forward_op(q, k, v, torch.ones(1, 1, 200, dtype=torch.float64, device=device),
                                           None, 0, 0.25)
    assert block_map.eq(1).all()


# ---------------------------------------------------------------- determinism


def test_cpu_results_do_not_depend_on_the_thread_count():
    q, k, v = (t.float().requires_grad_() for t in _inputs(2, 4, 2, 200, 190, 32))
    alpha = torch.tensor([1.2, 1.5, 1.8, 2.0], requires_grad=True)
    grad_out = torch.randn(2, 4, 200, 32)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = entmax_cuda.scaled_dot_product_entmax(q, k, v, alpha, is_causal=True, enable_gqa=True)
            results.append((out,) + torch.autograd.grad(out, (q, k, v, alpha), grad_out))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ---------------------------------------------------------------- EntmaxAttention


def test_module_learns_alpha_per_head_like_adaptive_entmax(device):
    attn = entmax_cuda.EntmaxAttention(n_heads=3, alpha_init=1.3).to(device)
    assert torch.allclose(attn.alpha(), torch.full((3,), 1.3, device=device))
    assert attn.alpha().shape == (3,) and [n for n, _ in attn.named_parameters()] == ["entmax.alpha_logit"]
    q, k, v = (t.float() for t in _inputs(2, 3, 3, 10, 12, 8, device=device))
    with torch.no_grad():
        attn.entmax.alpha_logit.copy_(torch.tensor([-1.0, 0.0, 2.0]))
    got = attn(q, k, v)
    want = entmax_cuda.scaled_dot_product_entmax(q, k, v, attn.alpha().detach())
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.square().sum().backward()
    assert attn.entmax.alpha_logit.grad is not None and attn.entmax.alpha_logit.grad.ne(0).all()


def test_module_key_padding_mask_keeps_true_keys(device):
    attn = entmax_cuda.EntmaxAttention(n_heads=2).to(device).double()
    q, k, v = _inputs(3, 2, 2, 9, 11, 8, device=device)
    keep = torch.rand(3, 11, device=device) > 0.3
    keep[:, 0] = True
    pair = torch.rand(9, 11, device=device) > 0.2
    bias = torch.randn(9, 11, dtype=torch.float64, device=device)
    alpha = attn.alpha().detach()
    for kwargs, mask, causal in (
        ({}, keep[:, None, None, :], None),
        ({"is_causal": True}, keep[:, None, None, :], "upper_left"),
        ({"attn_mask": pair}, keep[:, None, None, :] & pair, None),
        ({"attn_mask": bias}, torch.where(keep[:, None, None, :], bias, float("-inf")), None),
    ):
        got = attn(q, k, v, key_padding_mask=keep, **kwargs)
        torch.testing.assert_close(got, composite(q, k, v, alpha, mask=mask, causal=causal), rtol=0, atol=1e-12)


def test_module_grouped_query_heads(device):
    attn = entmax_cuda.EntmaxAttention(n_heads=4, alpha_init=1.7).to(device).double()
    q, k, v = _inputs(1, 4, 2, 10, 10, 8, device=device)
    torch.testing.assert_close(attn(q, k, v), composite(q, k, v, attn.alpha().detach()), rtol=0, atol=1e-12)


def test_module_errors():
    with pytest.raises(ValueError, match="n_heads"):
        entmax_cuda.EntmaxAttention(n_heads=0)
    with pytest.raises(ValueError, match="alpha_init"):
        entmax_cuda.EntmaxAttention(n_heads=2, alpha_init=2.5)
    attn = entmax_cuda.EntmaxAttention(n_heads=2)
    q = torch.randn(1, 3, 4, 8)
    with pytest.raises(ValueError, match="n_heads=2"):
        attn(q, q, q)
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        attn(q, q, q, key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="is_causal"):
        attn(q, q, q, attn_mask=causal_lower_right(4, 4))


# ---------------------------------------------------------------- argument errors


def _qkv():
    return torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)


@pytest.mark.parametrize("change, error, match", [
    (lambda q, k, v: (q.long(), k, v), TypeError, "query must be float16"),
    (lambda q, k, v: (q, k.double(), v), TypeError, "same dtype"),
    (lambda q, k, v: (q.to("meta"), k.to("meta"), v.to("meta")), ValueError, "CPU or a CUDA"),
    (lambda q, k, v: (q, k.to("meta"), v), ValueError, "same device"),
    (lambda q, k, v: (q[..., :4], k, v), ValueError, "same last dimension"),
    (lambda q, k, v: (q, k, v[:, :, :3]), ValueError, "same length"),
    (lambda q, k, v: (q, k[:, :1], v), ValueError, "same number of heads"),
    (lambda q, k, v: (torch.randn(1, 3, 4, 8), k, v), ValueError, "enable_gqa"),
    (lambda q, k, v: (torch.randn(1, 2, 4, 300), torch.randn(1, 2, 5, 300), v), ValueError, r"\[1, 256\]"),
    (lambda q, k, v: (q, k, torch.randn(1, 2, 5, 257)), ValueError, "value head dimension"),
    (lambda q, k, v: (torch.randn(2, 2, 4, 8), torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8)), ValueError,
     "do not broadcast"),
    (lambda q, k, v: (q, k, "v"), TypeError, "value must be a tensor"),
    (lambda q, k, v: (q[0, 0, 0], k, v), ValueError, "at least 2 dimensions"),
])
def test_bad_tensors_get_clear_errors(change, error, match):
    with pytest.raises(error, match=match):
        entmax_cuda.scaled_dot_product_entmax(*change(*_qkv()))


def test_gqa_heads_must_divide():
    q, k, v = torch.randn(1, 5, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="multiple"):
        entmax_cuda.scaled_dot_product_entmax(q, k, v, enable_gqa=True)


@pytest.mark.parametrize("alpha, error, match", [
    (True, TypeError, "float or a tensor"),
    ("1.5", TypeError, "float or a tensor"),
    (0.5, ValueError, "finite number >= 1"),
    (float("nan"), ValueError, "finite number >= 1"),
    (torch.tensor([1, 2]), TypeError, "floating-point"),
    (torch.full((3,), 1.5), ValueError, "one value per query head"),
    (torch.full((1, 2, 4, 5), 1.5), ValueError, "size 1 in its last dimension"),
    (torch.full((1, 2, 3, 1), 1.5), ValueError, "does not broadcast"),
    (torch.full((2, 1, 2, 4, 1), 1.5), ValueError, "does not broadcast"),
    (torch.full((2,), 1.5, device="meta"), ValueError, "alpha is on meta"),
])
def test_bad_alpha_gets_a_clear_error(alpha, error, match):
    with pytest.raises(error, match=match):
        entmax_cuda.scaled_dot_product_entmax(*_qkv(), alpha=alpha)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"attn_mask": torch.ones(4, 5, dtype=torch.long)}, TypeError, "bool"),
    ({"attn_mask": torch.zeros(4, 5, dtype=torch.float64)}, TypeError, "float32 or query's dtype"),
    ({"attn_mask": torch.ones(4, 6, dtype=torch.bool)}, ValueError, "does not broadcast"),
    ({"attn_mask": torch.zeros(4, 5, requires_grad=True)}, ValueError, "requires grad"),
    ({"attn_mask": torch.ones(4, 5, dtype=torch.bool, device="meta")}, ValueError, "attn_mask is on meta"),
    ({"attn_mask": torch.ones(4, 5, dtype=torch.bool), "is_causal": True}, ValueError, "not both"),
    ({"attn_mask": causal_lower_right(4, 5), "is_causal": True}, ValueError, "CausalBias"),
    ({"attn_mask": causal_lower_right(4, 6)}, ValueError, "lengths"),
    ({"attn_mask": [[True]]}, TypeError, "attn_mask must be a tensor"),
    ({"is_causal": 1}, TypeError, "is_causal must be a bool"),
    ({"scale": "0.5"}, TypeError, "scale"),
])
def test_bad_masks_and_options_get_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        entmax_cuda.scaled_dot_product_entmax(*_qkv(), **kwargs)


# ---------------------------------------------------------------- CUDA


# ENTMAX_ATTENTION_PATH (csrc/cuda/attention_cuda.cu) and the dtypes each path serves.
CUDA_PATHS = {"simt": [torch.float64, torch.float32, torch.float16, torch.bfloat16],
              "tensor_core": [torch.float16, torch.bfloat16]}
CUDA_PATH_CASES = [(path, dtype) for path, dtypes in CUDA_PATHS.items() for dtype in dtypes]
# Share of block-map entries and of rows' evaluation counts allowed to differ from the CPU kernel
# (float64: none): a score a few ulps off moves a decision only at a stopping-rule or skip-test
# boundary (the emulated kernels, summing in another order, match the CPU's exactly on these inputs).
DECISIONS_DIFFER = 0.01


def _rel_finite(got, want) -> float:
    """_rel with equal infinities and NaN in the same places counted as equal (stats of empty/bad rows)."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    if not finite.any():
        return 0.0
    assert torch.equal(got[~finite & ~want.isnan()], want[~finite & ~want.isnan()])
    return _rel(got[finite], want[finite])


def _op_results(device, q, k, v, alpha, mask, causal, scale, grad_out):
    """(out, stats, block_map, dq, dk, dv, dalpha) of the ops on `device`, back on the CPU."""
    q, k, v, alpha, grad_out = (t.to(device) for t in (q, k, v, alpha, grad_out))
    mask = None if mask is None else mask.to(device)
    out, stats, block_map = attention_ops.forward_op(q, k, v, alpha, mask, causal, scale)
    grads = attention_ops.backward_op(grad_out, q, k, v, alpha, mask, causal, scale, stats, block_map, True)
    return [t.cpu() for t in (out, stats, block_map, *grads)]


def _check_cuda_against_cpu(got, want, dtype, what=""):
    names = ["out", "stats", "block_map", "dq", "dk", "dv", "dalpha"]
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what}{name}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        if name == "block_map":
            differ = a.ne(b).double().mean().item()
            assert differ <= (0 if dtype == torch.float64 else DECISIONS_DIFFER), f"{what}block maps differ ({differ})"
        elif name == "stats":
            err = _rel_finite(a[:, :, :3], b[:, :, :3])
            assert err <= GRAD_RTOL[dtype], f"{what}stats differ by {err}"
            differ = a[:, :, 3].ne(b[:, :, 3]).double().mean().item()
            assert differ <= (0 if dtype == torch.float64 else DECISIONS_DIFFER), f"{what}evaluations differ ({differ})"
        else:
            err = _rel_finite(a, b)
            assert err <= GRAD_RTOL[dtype], f"{what}{name}: CUDA and CPU differ by {err}"


@requires_cuda
@pytest.mark.parametrize("causal", [0, 1, 2])
@pytest.mark.parametrize("path, dtype", CUDA_PATH_CASES)
def test_cuda_ops_match_the_cpu_kernel(monkeypatch, path, dtype, causal):
    """Each CUDA path against the CPU kernel on the same inputs: outputs, statistics, block map and the four
    gradients; GQA, a key mask, ragged lengths, alpha per head from 1 (softmax rows) to 2."""
    monkeypatch.setenv("ENTMAX_ATTENTION_PATH", path)
    q, k, v = _inputs(2, 4, 2, 300, 500, 64, dtype=dtype)
    alpha = torch.linspace(1.0, 2.0, 4, dtype=acc_dtype(dtype)).reshape(1, 4, 1).expand(2, 4, 300)
    mask = (torch.rand(2, 1, 1, 500) > 0.1).expand(2, 4, 300, 500)
    grad_out = torch.randn(2, 4, 300, 64, dtype=torch.float64).to(dtype)
    args = (q, k, v, alpha, mask, causal, 0.125, grad_out)
    _check_cuda_against_cpu(_op_results("cuda", *args), _op_results("cpu", *args), dtype)


@requires_cuda
@pytest.mark.parametrize("dims", [(32, 32), (64, 64), (96, 96), (128, 128), (160, 160), (200, 200), (256, 256),
                                  (40, 3), (16, 130)])
@pytest.mark.parametrize("path, dtype", [("tensor_core", torch.float16), ("tensor_core", torch.bfloat16),
                                         ("simt", torch.float32)])
def test_cuda_head_dims_match_the_cpu_kernel(monkeypatch, path, dtype, dims):
    """Head dims of every column-chunk count (64-column chunks up to 64, 128 above; 200 and 256 take two);
    ragged lengths, causal."""
    monkeypatch.setenv("ENTMAX_ATTENTION_PATH", path)
    E, Ev = dims
    q, k, v = _inputs(1, 2, 2, 100, 150, E, Ev, dtype=dtype, q_scale=1.0)
    alpha = torch.tensor([1.3, 1.7], dtype=acc_dtype(dtype)).reshape(1, 2, 1).expand(1, 2, 100)
    grad_out = torch.randn(1, 2, 100, Ev, dtype=torch.float64).to(dtype)
    args = (q, k, v, alpha, None, 2, E ** -0.5, grad_out)
    _check_cuda_against_cpu(_op_results("cuda", *args), _op_results("cpu", *args), dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_simt_and_tensor_core_paths_agree(monkeypatch, dtype):
    """The two CUDA paths against each other on one call of the public API (outputs and the four gradients)."""
    q, k, v = _inputs(2, 4, 2, 333, 257, 64, dtype=dtype, device="cuda")
    alpha = torch.linspace(1.1, 1.9, 4, device="cuda")
    results = []
    for path in ("simt", "tensor_core"):
        monkeypatch.setenv("ENTMAX_ATTENTION_PATH", path)
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, alpha)]
        out = entmax_cuda.scaled_dot_product_entmax(*leaves[:3], leaves[3], is_causal=True, enable_gqa=True)
        results.append([out] + list(torch.autograd.grad(out, leaves, torch.ones_like(out))))
    for name, a, b in zip(["out", "q", "k", "v", "alpha"], *results):
        assert _rel(a, b) <= GRAD_RTOL[dtype], f"{name}: the paths differ by {_rel(a, b)}"


@requires_cuda
def test_cuda_path_switch_errors(monkeypatch):
    q = torch.randn(1, 2, 8, 16, device="cuda")
    monkeypatch.setenv("ENTMAX_ATTENTION_PATH", "tensor_core")
    with pytest.raises(RuntimeError, match="tensor cores serve float16 and bfloat16"):
        entmax_cuda.scaled_dot_product_entmax(q, q, q)
    assert entmax_cuda.scaled_dot_product_entmax(q.half(), q.half(), q.half()).dtype == torch.float16
    monkeypatch.setenv("ENTMAX_ATTENTION_PATH", "fast")
    with pytest.raises(RuntimeError, match="must be auto, simt or tensor_core, got 'fast'"):
        entmax_cuda.scaled_dot_product_entmax(q, q, q)


@requires_cuda
@pytest.mark.parametrize("dtype, causal", [(torch.float32, None), (torch.float32, "upper_left"),
                                           (torch.bfloat16, "upper_left")])
def test_cuda_long_sequence_matches_composite(dtype, causal):
    q, k, v = _inputs(1, 2, 2, 16384, 16384, 64, dtype=dtype, device="cuda")
    out = entmax_cuda.scaled_dot_product_entmax(q, k, v, 1.5, is_causal=causal is not None)
    with torch.no_grad():
        want = composite(*(t.float() for t in (q, k, v)), 1.5, causal=causal)
    assert (out.float() - want).abs().max().item() <= FWD_ATOL[dtype]


@pytest.mark.parametrize("alpha", [1.0, 1.3, 1.5, 2.0])
def test_qkv_gradients_do_not_depend_on_alpha_requiring_grad(device, alpha):
    """The backward skips the alpha-gradient sums when alpha needs none; dq, dk, dv are the same
    (to float32 rounding: the two loops sum in different vector orders)."""
    q, k, v = (t.float() for t in _inputs(1, 2, 2, 70, 90, 16, device=device))
    grad_out = torch.randn(1, 2, 70, 16, device=device)
    results = []
    for alpha_grad in (True, False):
        a = torch.tensor(alpha, device=device, requires_grad=alpha_grad)
        _, grads = _grads(lambda q, k, v: entmax_cuda.scaled_dot_product_entmax(q, k, v, a), (q, k, v), grad_out)
        results.append(grads)
    for with_alpha, without in zip(*results):
        assert _rel(with_alpha, without) <= 1e-6
