"""Fused scaled-dot-product alpha-entmax attention, differentiable in q, k, v and alpha.

    o = entmax_cuda.scaled_dot_product_entmax(q, k, v, alpha=1.5, attn_mask=None, is_causal=False,
                                              scale=None, enable_gqa=False)
    attn = entmax_cuda.EntmaxAttention(n_heads=H, alpha_init=1.5)    # learnable alpha per head
    o = attn(q, k, v, key_padding_mask=keep, is_causal=True)

The result is entmax(q @ k^T * scale + mask, alpha, dim=-1) @ v without the Lq x Lk score
matrix: the kernels recompute score tiles from q and k (docs/attention.md). The argument
handling lives here (packed sequences and KV-cache decoding in sequences.py), the ops'
autograd formula and fake kernels in attention_ops.py, the kernels in csrc/.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn
from torch.nn.attention.bias import CausalBias, CausalVariant

from . import _build, attention_ops
from .attention_ops import CAUSAL_LOWER_RIGHT, CAUSAL_UPPER_LEFT, MAX_HEAD_DIM, NO_GEOMETRY, NOT_CAUSAL
from .functional import _FLOAT_DTYPES, _accumulation_dtype, _alpha_per_row
from .modules import AdaptiveEntmax

__all__ = ["scaled_dot_product_entmax", "EntmaxAttention"]


# ---------------------------------------------------------------- arguments


def _heads(t: torch.Tensor) -> int:
    return t.shape[-3] if t.dim() >= 3 else 1


def _check_qkv(query, key, value, enable_gqa: bool):
    """(batch_shape, Hq, Hkv, out_shape) of valid q, k, v, or a clear error."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"scaled_dot_product_entmax: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"scaled_dot_product_entmax: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
            )
        if t.dim() < 2:
            raise ValueError(
                f"scaled_dot_product_entmax: {name} must have at least 2 dimensions (..., L, E), got shape "
                f"{tuple(t.shape)}"
            )
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"scaled_dot_product_entmax: query, key and value must have the same dtype, got {query.dtype}, "
            f"{key.dtype} and {value.dtype}"
        )
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"scaled_dot_product_entmax: query, key and value must be on the same device, got {query.device}, "
            f"{key.device} and {value.device}"
        )
    if query.device.type not in ("cpu", "cuda"):
        raise ValueError(f"scaled_dot_product_entmax: tensors must be on the CPU or a CUDA device, got {query.device}")
    if query.is_cuda and not _build.CUDA_KERNELS_LOADED:
        raise RuntimeError(_build.cuda_unavailable_reason())
    E, Lk = query.shape[-1], key.shape[-2]
    if key.shape[-1] != E:
        raise ValueError(
            f"scaled_dot_product_entmax: query and key must have the same last dimension, got {tuple(query.shape)} "
            f"and {tuple(key.shape)}"
        )
    if value.shape[-2] != Lk:
        raise ValueError(
            f"scaled_dot_product_entmax: key and value must have the same length (dimension -2), got "
            f"{tuple(key.shape)} and {tuple(value.shape)}"
        )
    for name, d in (("query/key", E), ("value", value.shape[-1])):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(
                f"scaled_dot_product_entmax: the {name} head dimension must lie in [1, {MAX_HEAD_DIM}], got {d}"
            )
    Hq, Hk, Hv = _heads(query), _heads(key), _heads(value)
    if Hk != Hv:
        raise ValueError(
            f"scaled_dot_product_entmax: key and value must have the same number of heads, got {Hk} and {Hv}"
        )
    if Hk == 0 and Hq != 0:  # (SDPA gives no error here; there is nothing a query row could attend to)
        raise ValueError(
            f"scaled_dot_product_entmax: key and value have 0 heads (dimension -3) but query has {Hq}; "
            "query heads must be 0 too, or key/value need at least one head"
        )
    if Hk != Hq and Hk != 1:
        if not enable_gqa:
            raise ValueError(
                f"scaled_dot_product_entmax: query has {Hq} heads and key/value {Hk} (dimension -3); pass "
                "enable_gqa=True for grouped-query attention"
            )
        if Hq % Hk != 0:
            raise ValueError(
                f"scaled_dot_product_entmax: with enable_gqa the query heads ({Hq}) must be a multiple of the "
                f"key/value heads ({Hk})"
            )
    try:
        batch_shape = torch.broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3])
    except RuntimeError:
        raise ValueError(
            f"scaled_dot_product_entmax: the batch dimensions of query {tuple(query.shape)}, key "
            f"{tuple(key.shape)} and value {tuple(value.shape)} do not broadcast"
        ) from None
    if max(query.dim(), key.dim(), value.dim()) == 2:
        out_shape = (query.shape[-2], value.shape[-1])
    else:
        out_shape = tuple(batch_shape) + (Hq, query.shape[-2], value.shape[-1])
    return tuple(batch_shape), Hq, Hk, out_shape


def _as_bhld(t: torch.Tensor, batch_shape: tuple) -> torch.Tensor:
    """t (..., H, L, E) or (L, E) as (B, H, L, E), batch dims broadcast (stride 0, no copy for 4-d)."""
    while t.dim() < len(batch_shape) + 3:
        t = t.unsqueeze(0)
    t = t.expand(*batch_shape, *t.shape[-3:])
    return t.reshape(math.prod(batch_shape), *t.shape[-3:])


def _broadcasts_to(shape, target: tuple) -> bool:
    try:
        return len(shape) <= len(target) and torch.broadcast_shapes(shape, target) == torch.Size(target)
    except RuntimeError:
        return False


def _alpha_rows(alpha, out_shape: tuple, Hq: int, B: int, query: torch.Tensor) -> torch.Tensor:
    """alpha as one value per query row, (B, Hq, Lq) in the accumulation dtype (a broadcast view)."""
    Lq = out_shape[-2]
    device = query.device
    if not isinstance(alpha, torch.Tensor):  # entmax's rule for a number (a finite float >= 1)
        rows = torch.empty((), dtype=query.dtype, device=device).expand(B, Hq, Lq, 1)
        return _alpha_per_row(alpha, rows, -1).reshape(B, Hq, Lq)
    if not alpha.is_floating_point():
        raise TypeError(f"scaled_dot_product_entmax: alpha must be a floating-point tensor, got {alpha.dtype}")
    if alpha.device != device:
        raise ValueError(f"scaled_dot_product_entmax: alpha is on {alpha.device} but query is on {device}")
    if alpha.dim() == 1:
        if alpha.shape[0] not in (1, Hq):
            raise ValueError(
                f"scaled_dot_product_entmax: a 1-d alpha holds one value per query head ({Hq}), got shape "
                f"{tuple(alpha.shape)}"
            )
        alpha = alpha.reshape(()) if alpha.shape[0] == 1 else alpha.reshape(Hq, 1, 1)
    elif alpha.dim() >= 2 and alpha.shape[-1] != 1:
        raise ValueError(
            f"scaled_dot_product_entmax: alpha of shape {tuple(alpha.shape)} must have size 1 in its last "
            "dimension (one alpha per query row, shared by its keys)"
        )
    row_shape = out_shape[:-1] + (1,)
    if not _broadcasts_to(alpha.shape, row_shape):
        raise ValueError(
            f"scaled_dot_product_entmax: alpha of shape {tuple(alpha.shape)} does not broadcast to the query rows "
            f"{row_shape} (float, 0-d, (Hq,), (1, Hq, 1, 1), (B, Hq, 1, 1) or (B, Hq, Lq, 1))"
        )
    return alpha.to(_accumulation_dtype(query.dtype)).expand(row_shape).reshape(B, Hq, Lq)


def _mask_rows(mask: torch.Tensor, out_shape: tuple, Lk: int, B: int, Hq: int, query: torch.Tensor, name: str):
    """A bool or additive mask as a (B, Hq, Lq, Lk) view, additive masks in the accumulation dtype."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"scaled_dot_product_entmax: {name} must be a tensor or a torch.nn.attention.bias.CausalBias, got "
            f"{type(mask).__name__}"
        )
    if mask.dtype != torch.bool and mask.dtype not in (torch.float32, query.dtype):
        raise TypeError(
            f"scaled_dot_product_entmax: {name} must be bool (True = attend) or an additive float mask of "
            f"float32 or query's dtype ({query.dtype}), got {mask.dtype}"
        )
    if mask.device != query.device:
        raise ValueError(f"scaled_dot_product_entmax: {name} is on {mask.device} but query is on {query.device}")
    if mask.requires_grad:
        raise ValueError(
            f"scaled_dot_product_entmax: {name} requires grad, but the fused kernel gives no gradient for masks "
            "(it never forms the score matrix); detach it, or use the composite for a learned bias"
        )
    full = out_shape[:-1] + (Lk,)
    if not _broadcasts_to(mask.shape, full):
        raise ValueError(
            f"scaled_dot_product_entmax: {name} of shape {tuple(mask.shape)} does not broadcast to the scores' "
            f"shape {full}"
        )
    if mask.dtype != torch.bool:
        mask = mask.to(_accumulation_dtype(query.dtype))
    return mask.expand(full).reshape(B, Hq, out_shape[-2], Lk)


def _scale_of(scale, E: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(E)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scaled_dot_product_entmax: scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def window_of(caller: str, window_size) -> tuple:
    """(left, right) of a window_size argument: integers >= -1 (-1: unbounded)."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or any(isinstance(w, bool) or not isinstance(w, numbers.Integral) for w in window_size)):
        raise TypeError(f"{caller}: window_size must be a pair of integers (left, right), got {window_size!r}")
    left, right = (int(w) for w in window_size)
    if left < -1 or right < -1:
        raise ValueError(f"{caller}: window_size values must be -1 (unbounded) or >= 0, got ({left}, {right})")
    return left, right


def alibi_of(caller: str, slopes, B: int, Hq: int, query: torch.Tensor, batch_name: str = "B"):
    """ALiBi slopes (Hq,) or (B, Hq) as a (B, Hq) view in the accumulation dtype, or None."""
    if slopes is None:
        return None
    if not isinstance(slopes, torch.Tensor):
        raise TypeError(f"{caller}: alibi_slopes must be a tensor, got {type(slopes).__name__}")
    if not slopes.is_floating_point():
        raise TypeError(f"{caller}: alibi_slopes must be a floating-point tensor, got {slopes.dtype}")
    if slopes.device != query.device:
        raise ValueError(f"{caller}: alibi_slopes is on {slopes.device} but query is on {query.device}")
    if slopes.requires_grad:
        raise ValueError(f"{caller}: alibi_slopes requires grad, but the fused kernel gives no gradient for them")
    if tuple(slopes.shape) not in ((Hq,), (B, Hq)):
        raise ValueError(
            f"{caller}: alibi_slopes must have shape (Hq,) = ({Hq},) or ({batch_name}, Hq) = ({B}, {Hq}), got "
            f"{tuple(slopes.shape)}"
        )
    return slopes.to(_accumulation_dtype(query.dtype)).expand(B, Hq)


def _attention(query, key, value, alpha, mask, causal: int, scale, enable_gqa: bool, mask_name: str,
               alibi_slopes=None, window_size=(-1, -1), caller: str = "scaled_dot_product_entmax"):
    batch_shape, Hq, Hkv, out_shape = _check_qkv(query, key, value, enable_gqa)
    B = math.prod(batch_shape)
    left, right = window_of(caller, window_size)
    alibi = alibi_of(caller, alibi_slopes, B, Hq, query)
    q, k, v = (_as_bhld(t, batch_shape) for t in (query, key, value))
    alpha_rows = _alpha_rows(alpha, out_shape, Hq, B, query)
    mask_rows = None if mask is None else _mask_rows(mask, out_shape, key.shape[-2], B, Hq, query, mask_name)
    if Hkv == 0:
        # No heads at all (Hq == 0 too, _check_qkv saw to it): the empty result, as SDPA's. The ops
        # need Hkv >= 1, so build it from empty tensors with autograd ops, which keeps it differentiable:
        # q, k, v get empty gradients and a tensor alpha zeros of its shape (through the expand).
        empty = (q @ k.transpose(-2, -1)) @ v + alpha_rows.unsqueeze(-1).to(q.dtype)
        return empty.reshape(out_shape)
    geometry = (alibi, left, right) + NO_GEOMETRY[3:]
    out, _, _ = attention_ops.forward_op(q, k, v, alpha_rows, mask_rows, causal, _scale_of(scale, query.shape[-1]),
                                         *geometry)
    return out.reshape(out_shape)


# ---------------------------------------------------------------- public API


def scaled_dot_product_entmax(query, key, value, alpha=1.5, attn_mask=None, is_causal=False, scale=None,
                              enable_gqa=False, alibi_slopes=None, window_size=(-1, -1)) -> torch.Tensor:
    """alpha-entmax attention: entmax(q @ k^T * scale + mask, alpha, dim=-1) @ v, fused.

    Arguments and shapes as torch.nn.functional.scaled_dot_product_attention: query
    (..., Hq, Lq, E), key (..., Hkv, Lk, E), value (..., Hkv, Lk, Ev); batch dimensions
    broadcast; Hkv == Hq, Hkv == 1, or (enable_gqa) Hq a multiple of Hkv. E, Ev <= 256.
    alpha: a float >= 1, or a tensor: 0-d, per head (Hq,) or (1, Hq, 1, 1), per batch and
    head (B, Hq, 1, 1), per query (B, Hq, Lq, 1) (anything broadcastable to the query rows
    (..., Hq, Lq, 1)); differentiable, its gradient has alpha's shape. alpha = 1 is softmax
    attention. Tensor alphas below 1 (or NaN) give NaN rows, as entmax_cuda.entmax does.
    attn_mask: bool (True = attend), an additive float mask broadcastable to
    (..., Hq, Lq, Lk), or a torch.nn.attention.bias.CausalBias (causal_upper_left /
    causal_lower_right). is_causal: the upper-left causal mask, as SDPA (query i sees keys
    j <= i); not together with attn_mask. scale: default 1/sqrt(E).
    alibi_slopes: (Hq,) or (B, Hq) (B the flattened batch), not differentiable: adds
    -slope * |i + Lk - Lq - j| to the score of query i and key j (flash-attn's convention).
    window_size (left, right): query i sees only keys j with i + Lk - Lq - left <= j <=
    i + Lk - Lq + right (-1: unbounded); key tiles outside every row's window are never read.
    Both combine with masks and causality.
    A query row whose keys are all masked gives a zero output row and zero gradients.
    Float32 is computed exactly (no TF32); float16/bfloat16 accumulate in float32.
    Memory is linear in the lengths: masks are read through broadcast views (with more than
    one batch dimension, a mask broadcast over some of them but not the others is copied to
    the scores' full shape). Gradients of masks are not supported.
    """
    if not isinstance(is_causal, bool):
        raise TypeError(f"scaled_dot_product_entmax: is_causal must be a bool, got {type(is_causal).__name__}")
    causal = CAUSAL_UPPER_LEFT if is_causal else NOT_CAUSAL
    if isinstance(attn_mask, CausalBias):
        if is_causal:
            raise ValueError("scaled_dot_product_entmax: a CausalBias attn_mask must not be used with is_causal=True")
        Lq, Lk = query.shape[-2], key.shape[-2]
        if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (Lq, Lk):
            raise ValueError(
                f"scaled_dot_product_entmax: the CausalBias is for lengths ({attn_mask.seq_len_q}, "
                f"{attn_mask.seq_len_kv}), the inputs have ({Lq}, {Lk})"
            )
        causal = CAUSAL_LOWER_RIGHT if attn_mask.variant == CausalVariant.LOWER_RIGHT else CAUSAL_UPPER_LEFT
        attn_mask = None
    elif attn_mask is not None and is_causal:
        raise ValueError("scaled_dot_product_entmax: pass either attn_mask or is_causal=True, not both (as SDPA)")
    return _attention(query, key, value, alpha, attn_mask, causal, scale, enable_gqa, "attn_mask", alibi_slopes,
                      window_size)


class EntmaxAttention(nn.Module):
    """Scaled-dot-product alpha-entmax attention with a learnable alpha per head.

    alpha = 1 + sigmoid(a) in (1, 2), one per head, parametrised (and initialised) as in
    AdaptiveEntmax; learn_alpha=False keeps alpha_init fixed instead, any alpha >= 1 (1 is
    softmax attention). alpha() gives the current alpha per head. forward(q, k, v) takes heads already split, as
    scaled_dot_product_entmax: q (..., n_heads, Lq, E), k/v (..., Hkv, Lk, E) with
    n_heads a multiple of Hkv (grouped-query attention is inferred).
    key_padding_mask: (..., Lk) over q's batch dimensions, bool with True = a real key
    (attend; the opposite of nn.MultiheadAttention's convention, the same as attn_mask's)
    or additive float. attn_mask: as scaled_dot_product_entmax. is_causal (upper-left)
    combines with both masks. Combining key_padding_mask with attn_mask materialises
    their broadcast (as one mask of the scores' shape, without the head dimension if
    attn_mask has none). alibi_slopes and window_size: as scaled_dot_product_entmax.
    """

    def __init__(self, n_heads: int, alpha_init: float = 1.5, learn_alpha: bool = True):
        super().__init__()
        if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
            raise ValueError(f"EntmaxAttention: n_heads must be a positive integer, got {n_heads!r}")
        self.n_heads = n_heads
        self.entmax = AdaptiveEntmax(dim=-1, n_heads=n_heads, alpha_init=alpha_init, learn_alpha=learn_alpha)

    def alpha(self) -> torch.Tensor:
        """The current alpha per head, shape (n_heads,)."""
        return self.entmax.alpha()

    def forward(self, q, k, v, key_padding_mask=None, attn_mask=None, is_causal: bool = False, scale=None,
                alibi_slopes=None, window_size=(-1, -1)):
        if not isinstance(q, torch.Tensor) or q.dim() < 3 or q.shape[-3] != self.n_heads:
            shape = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
            raise ValueError(f"EntmaxAttention: q must be (..., n_heads={self.n_heads}, Lq, E), got {shape}")
        if isinstance(attn_mask, CausalBias):
            raise TypeError("EntmaxAttention: pass is_causal=True instead of a CausalBias attn_mask")
        if not isinstance(is_causal, bool):
            raise TypeError(f"EntmaxAttention: is_causal must be a bool, got {type(is_causal).__name__}")
        mask = self._combined_mask(q, k, key_padding_mask, attn_mask)
        causal = CAUSAL_UPPER_LEFT if is_causal else NOT_CAUSAL
        enable_gqa = isinstance(k, torch.Tensor) and k.dim() >= 3 and k.shape[-3] != self.n_heads
        alpha = self.alpha().to(q.device)
        return _attention(q, k, v, alpha, mask, causal, scale, enable_gqa, "mask", alibi_slopes, window_size,
                          caller="EntmaxAttention")

    @staticmethod
    def _combined_mask(q, k, key_padding_mask, attn_mask):
        if key_padding_mask is None:
            return attn_mask
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(
                f"EntmaxAttention: key_padding_mask must be a tensor, got {type(key_padding_mask).__name__}"
            )
        want = tuple(q.shape[:-3]) + (k.shape[-2],)
        if tuple(key_padding_mask.shape) != want:
            raise ValueError(
                f"EntmaxAttention: key_padding_mask must have shape (batch..., Lk) = {want}, got "
                f"{tuple(key_padding_mask.shape)}"
            )
        kpm = key_padding_mask.unsqueeze(-2).unsqueeze(-2)  # (..., 1, 1, Lk): broadcast over heads and queries
        if attn_mask is None:
            return kpm
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"EntmaxAttention: attn_mask must be a tensor, got {type(attn_mask).__name__}")
        if kpm.dtype == torch.bool and attn_mask.dtype == torch.bool:
            return kpm & attn_mask
        return _additive(kpm, q.dtype) + _additive(attn_mask, q.dtype)

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}"


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, zero, torch.full((), float("-inf"), dtype=dtype, device=mask.device))
    return mask
