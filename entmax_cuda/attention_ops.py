"""Python side of the fused attention ops: fake (meta) kernels and the autograd formula.

The schemas and the CPU/CUDA kernels live in csrc/ (attention.cpp); the backward is an op
of its own (entmax_cuda::attention_backward), so torch.compile sees both. Decoding has an
op of its own too (entmax_cuda::attention_decode, forward only: keys split across work items). The ops take a
padded batch (B, H, L, D), or packed sequences along the rows of batch-1 tensors with
cu_seqlens, plus ALiBi slopes, a window and per-entry key counts (the "geometry"
arguments, the same on both ops).
"""

from __future__ import annotations

import torch

# The kernels' block grid and head-dim limit (csrc/attention_math.h: kBlockQ, kBlockK,
# kMaxHeadDim); the fake kernel needs the grid for the block map's shape, and a test
# checks these against what the compiled op returns.
BLOCK_Q = 64
BLOCK_K = 64
MAX_HEAD_DIM = 256
# The op's causal argument (attention_math.h: CausalKind).
NOT_CAUSAL, CAUSAL_UPPER_LEFT, CAUSAL_LOWER_RIGHT = 0, 1, 2

forward_op = torch.ops.entmax_cuda.attention_forward.default
backward_op = torch.ops.entmax_cuda.attention_backward.default
decode_op = torch.ops.entmax_cuda.attention_decode.default

# Query rows of one decoding work item (attention_decode_math.h: kDecodeRows), and the most
# key splits the decode op takes (kDecodeMaxSplits).
DECODE_ROWS = 16
MAX_DECODE_SPLITS = 128

# The geometry arguments of both ops, in schema order, and their defaults (a padded batch).
GEOMETRY_ARGS = ("alibi_slopes", "window_left", "window_right", "cu_seqlens_q", "cu_seqlens_k", "seqused_k",
                 "max_seqlen_q", "max_seqlen_k")
NO_GEOMETRY = (None, -1, -1, None, None, None, 0, 0)


def _tiles(n: int, tile: int) -> int:
    return (n + tile - 1) // tile


def _block_map_shape(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    """(B, Hq, nQ, nK) of the block map: B sequences of at most Lq queries and Lk keys."""
    if cu_seqlens_q is not None:
        B, Lq, Lk = cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k
    else:
        B, Lq, Lk = q.shape[0], q.shape[2], k.shape[2]
    return (B, q.shape[1], _tiles(Lq, BLOCK_Q), _tiles(Lk, BLOCK_K))


@torch.library.register_fake("entmax_cuda::attention_forward")
def _attention_forward_fake(q, k, v, alpha, mask, causal, scale, alibi_slopes=None, window_left=-1,
                            window_right=-1, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, max_seqlen_q=0,
                            max_seqlen_k=0):
    rows_b, Hq, rows_q, _ = q.shape
    out = q.new_empty(rows_b, Hq, rows_q, v.shape[3])
    stats = alpha.new_empty(rows_b, Hq, 4, rows_q)
    block_map = q.new_empty(_block_map_shape(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k), dtype=torch.uint8)
    return out, stats, block_map


@torch.library.register_fake("entmax_cuda::attention_backward")
def _attention_backward_fake(grad_out, q, k, v, alpha, mask, causal, scale, stats, block_map, alpha_grad,
                             *geometry):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), alpha.new_empty(alpha.shape))


@torch.library.register_fake("entmax_cuda::attention_decode")
def _attention_decode_fake(q, k, v, alpha, scale, alibi_slopes, window_left, window_right, seqused_k, num_splits):
    B, Hq, Lq, _ = q.shape
    return q.new_empty(B, Hq, Lq, v.shape[3]), alpha.new_empty(B, Hq, 4, Lq)


def _setup_context(ctx, inputs, output):
    q, k, v, alpha, mask, causal, scale, *geometry = inputs
    _, stats, block_map = output
    tensors = [g for g in geometry if isinstance(g, torch.Tensor)]
    ctx.save_for_backward(q, k, v, alpha, mask, stats, block_map, *tensors)
    # the geometry with its tensors replaced by their index among the saved ones
    ctx.geometry = []
    n = 0
    for g in geometry:
        if isinstance(g, torch.Tensor):
            ctx.geometry.append(("saved", n))
            n += 1
        else:
            ctx.geometry.append(("value", g))
    ctx.causal = causal
    ctx.scale = scale


def _backward(ctx, grad_out, _grad_stats, _grad_block_map):
    q, k, v, alpha, mask, stats, block_map, *tensors = ctx.saved_tensors
    geometry = [tensors[x] if kind == "saved" else x for kind, x in ctx.geometry]
    grad_q, grad_k, grad_v, grad_alpha = backward_op(
        grad_out, q, k, v, alpha, mask, ctx.causal, ctx.scale, stats, block_map, ctx.needs_input_grad[3], *geometry
    )
    grads = [grad_q, grad_k, grad_v, grad_alpha]
    needed = ctx.needs_input_grad
    return tuple(g if n else None for g, n in zip(grads, needed[:4])) + (None,) * (len(needed) - 4)


torch.library.register_autograd("entmax_cuda::attention_forward", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "entmax_cuda: double backward (gradients of gradients) of the fused attention is not implemented; "
        "use the composite entmax_cuda.reference.entmax_bisect_reference(q @ k^T * scale) @ v for that"
    )


torch.library.register_autograd(
    "entmax_cuda::attention_backward", _no_double_backward, setup_context=lambda ctx, inputs, output: None
)
