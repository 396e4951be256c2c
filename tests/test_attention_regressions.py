"""Regression tests of scaled_dot_product_entmax, one per reported bug, named after it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import entmax_cuda


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("enable_gqa", [False, True])
def test_zero_heads_give_the_empty_result_as_sdpa(device, dtype, enable_gqa):
    """Hq = Hkv = 0 raised 'the query heads (0) must be a multiple of the key/value heads (0)' from the op;
    SDPA returns an empty (B, 0, Lq, Ev). Now the same, differentiable: empty gradients for q, k, v and
    zeros of alpha's shape for a learnable alpha."""
    q = torch.randn(1, 0, 3, 8, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(1, 0, 4, 8, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(1, 0, 4, 5, dtype=dtype, device=device, requires_grad=True)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=enable_gqa)
    for alpha in (1.5, torch.tensor(1.3, device=device, requires_grad=True),
                  torch.tensor([1.3], device=device, requires_grad=True),
                  torch.full((0,), 1.5, device=device, requires_grad=True),  # per head, Hq = 0
                  torch.full((1, 1, 3, 1), 1.5, device=device, requires_grad=True)):  # per query row
        out = entmax_cuda.scaled_dot_product_entmax(q, k, v, alpha, enable_gqa=enable_gqa)
        assert out.shape == want.shape == (1, 0, 3, 5)
        assert out.dtype == dtype and out.device == q.device
        leaves = [q, k, v] + ([alpha] if torch.is_tensor(alpha) else [])
        grads = torch.autograd.grad(out.float().sum(), leaves)
        for leaf, grad in zip(leaves, grads):
            assert grad.shape == leaf.shape and grad.dtype == leaf.dtype and grad.eq(0).all()


def test_zero_heads_with_masks_causal_and_broadcast_batches(device):
    q = torch.randn(2, 0, 3, 8, device=device, requires_grad=True)
    k, v = (torch.randn(0, 5, 8, device=device) for _ in range(2))  # (Hkv, Lk, E): batch broadcasts
    for kwargs in ({"is_causal": True}, {"attn_mask": torch.ones(3, 5, dtype=torch.bool, device=device)},
                   {"attn_mask": torch.zeros(3, 5, device=device)}):
        out = entmax_cuda.scaled_dot_product_entmax(q, k, v, **kwargs)
        assert out.shape == F.scaled_dot_product_attention(q, k, v, **kwargs).shape == (2, 0, 3, 8)
        out.sum().backward()
    with pytest.raises(ValueError, match="does not broadcast"):  # the arguments are still checked
        entmax_cuda.scaled_dot_product_entmax(q, k, v, attn_mask=torch.ones(3, 6, dtype=torch.bool, device=device))


def test_zero_query_heads_with_key_value_heads_still_uses_the_op(device):
    """Hq = 0 with Hkv >= 1 (GQA, or one broadcast kv head) always worked; k and v get zero gradients."""
    q = torch.randn(1, 0, 3, 8, device=device, requires_grad=True)
    for Hkv, gqa in ((2, True), (1, False)):
        k, v = (torch.randn(1, Hkv, 4, 8, device=device, requires_grad=True) for _ in range(2))
        out = entmax_cuda.scaled_dot_product_entmax(q, k, v, enable_gqa=gqa)
        assert out.shape == (1, 0, 3, 8)
        gk, gv = torch.autograd.grad(out.sum(), (k, v))
        assert gk.eq(0).all() and gv.eq(0).all()


@pytest.mark.parametrize("enable_gqa", [False, True])
def test_query_heads_without_key_value_heads_are_a_clear_error(enable_gqa):
    """Hq > 0 with Hkv = 0: was 'pass enable_gqa=True' (or a ZeroDivisionError with it); now says what is wrong."""
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 0, 4, 8)
    with pytest.raises(ValueError, match=r"key and value have 0 heads .* but query has 2"):
        entmax_cuda.scaled_dot_product_entmax(q, k, k, enable_gqa=enable_gqa)
    attn = entmax_cuda.EntmaxAttention(n_heads=2)
    with pytest.raises(ValueError, match=r"key and value have 0 heads"):
        attn(q, k, k)
