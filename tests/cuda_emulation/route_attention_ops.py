"""pytest plugin: the fused attention's CPU test cases, computed by the emulated CUDA kernels.

    PYTHONPATH=tests:tests/cuda_emulation python -m pytest -p route_attention_ops tests/test_attention.py

Replaces entmax_cuda.attention's forward, backward and decode ops, for the whole session, by the CUDA
kernels run on the CPU (tests/cuda_emulation), with the path the CUDA op would take on a GPU with
tensor cores for both half types (ENTMAX_ATTENTION_PATH=simt: SIMT for every dtype), so every CPU
test of the semantics (masks, causal, GQA, NaN rows, alpha forms, gradcheck, block skipping, ...)
checks the CUDA kernels too. A tool for changing the kernels without a GPU; slower than the CPU
kernel (about a minute for tests/test_attention.py).
"""

from __future__ import annotations

import os
import tempfile

import torch

AUTO, SIMT = -1, 0  # the emulator's policy numbers (attention_emulation.cpp)
# The emulated device's size for the decode op's own choice of splits (num_splits = 0): work
# items that fill it. Small, so that short caches split too.
DECODE_TARGET_ITEMS = 16


class _EmulatedAttention(torch.autograd.Function):
    """forward_op's signature and outputs; the backward calls the emulated backward (alpha's sums only if needed)."""

    ops = None

    @staticmethod
    def policy():
        return SIMT if os.environ.get("ENTMAX_ATTENTION_PATH") == "simt" else AUTO

    @staticmethod
    def forward(ctx, q, k, v, alpha, mask, causal, scale, *geometry):
        out, stats, block_map = _EmulatedAttention.ops.attention_forward(q, k, v, alpha, mask, causal, scale,
                                                                         _EmulatedAttention.policy(), 0, 0, *geometry)
        ctx.save_for_backward(q, k, v, alpha, stats, block_map)
        ctx.mask, ctx.causal, ctx.scale, ctx.geometry = mask, causal, scale, geometry
        ctx.mark_non_differentiable(stats, block_map)
        return out, stats, block_map

    @staticmethod
    def backward(ctx, grad_out, _grad_stats, _grad_block_map):
        q, k, v, alpha, stats, block_map = ctx.saved_tensors
        grads = _EmulatedAttention.ops.attention_backward(
            grad_out.contiguous(), q, k, v, alpha, ctx.mask, ctx.causal, ctx.scale, stats, block_map,
            ctx.needs_input_grad[3], _EmulatedAttention.policy(), 0, *ctx.geometry)
        n_inputs = len(ctx.needs_input_grad)
        return tuple(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad[:4])) + (None,) * (
            n_inputs - 4)


def _backward_op(grad_out, q, k, v, alpha, mask, causal, scale, stats, block_map, alpha_grad, *geometry):
    return _EmulatedAttention.ops.attention_backward(grad_out, q, k, v, alpha, mask, causal, scale, stats, block_map,
                                                     alpha_grad, _EmulatedAttention.policy(), 0, *geometry)


def emulated_decode_op(ops, schedule=0):
    """decode_op's signature, computed by the emulated decode kernels."""
    def decode_op(q, k, v, alpha, scale, alibi_slopes, window_left, window_right, seqused_k, num_splits):
        return ops.attention_decode(q, k, v, alpha, scale, alibi_slopes, window_left, window_right, seqused_k,
                                    num_splits, DECODE_TARGET_ITEMS, schedule)
    return decode_op


def pytest_configure(config):
    from entmax_cuda import attention_ops
    from testing import load_attention_emulation

    ops = load_attention_emulation(tempfile.mkdtemp(prefix="attention_emulation_"))
    if ops is None:
        raise RuntimeError("route_attention_ops: no CUDA toolkit headers (cuda_fp16.h) or C++ compiler to build "
                           "the emulator")
    _EmulatedAttention.ops = ops
    attention_ops.forward_op = _EmulatedAttention.apply
    attention_ops.backward_op = _backward_op
    attention_ops.decode_op = emulated_decode_op(ops)
