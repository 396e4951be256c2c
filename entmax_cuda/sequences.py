"""Entmax attention on packed sequences (training) and against a KV cache (decoding).

    out = entmax_cuda.varlen_entmax(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    alpha=1.5, is_causal=True)
    out = entmax_cuda.entmax_with_kvcache(q, k_cache, v_cache, cache_seqlens, alpha=1.5, k=k_new, v=v_new)

Both follow flash-attn's layouts and conventions (varlen: (total, H, D) with int32
cu_seqlens; decode: (B, L, H, D) caches written in place) and run the fused attention
kernels (csrc/): no tile mixes two sequences, and nothing of size Lq x Lk is formed.
"""

from __future__ import annotations

import os

import torch

from . import _build, attention_ops
from .attention import _scale_of, alibi_of, window_of
from .attention_ops import CAUSAL_LOWER_RIGHT, DECODE_ROWS, MAX_DECODE_SPLITS, MAX_HEAD_DIM, NOT_CAUSAL
from .functional import _FLOAT_DTYPES, _accumulation_dtype, check_alpha

__all__ = ["varlen_entmax", "entmax_with_kvcache"]

# Value checks of cu_seqlens / cache_seqlens on a GPU read them back (a device sync); this
# environment variable turns them off there (CPU tensors are always checked).
SKIP_DEVICE_CHECKS_ENV = "ENTMAX_CUDA_SKIP_SEQLEN_CHECKS"


def _values_checked(t: torch.Tensor) -> bool:
    """Whether the values of t are read back for checking (not while tracing for torch.compile)."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or os.environ.get(SKIP_DEVICE_CHECKS_ENV, "") not in ("1", "true", "yes")


def _check_tensors(caller: str, named: dict, ranks: dict):
    """Types, dtypes, ranks and devices of q, k, v (and the caches)."""
    first = None
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{caller}: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{caller}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.dim() != ranks[name]:
            raise ValueError(f"{caller}: {name} must be {ranks[name]}-d, got shape {tuple(t.shape)}")
        if first is None:
            first = (name, t)
        elif t.dtype != first[1].dtype:
            raise TypeError(f"{caller}: {name} must have {first[0]}'s dtype {first[1].dtype}, got {t.dtype}")
        elif t.device != first[1].device:
            raise ValueError(f"{caller}: {name} is on {t.device} but {first[0]} is on {first[1].device}")
    q = first[1]
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{caller}: tensors must be on the CPU or a CUDA device, got {q.device}")
    if q.is_cuda and not _build.CUDA_KERNELS_LOADED:
        raise RuntimeError(_build.cuda_unavailable_reason())


def _check_heads(caller: str, Hq: int, Hkv: int, D: int, Dk: int, Dv: int):
    if Dk != D:
        raise ValueError(f"{caller}: query and key must have the same head dimension, got {D} and {Dk}")
    for name, d in (("query/key", D), ("value", Dv)):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"{caller}: the {name} head dimension must lie in [1, {MAX_HEAD_DIM}], got {d}")
    if Hkv < 1 or Hq < 1 or Hq % Hkv != 0:
        raise ValueError(
            f"{caller}: the query heads ({Hq}) must be a positive multiple of the key/value heads ({Hkv})"
        )


def _int32_vector(caller: str, name: str, t, n: int, device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{caller}: {name} must be an int32 tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{caller}: {name} must be int32 (as flash-attn's), got {t.dtype}")
    if t.dim() != 1 or (n >= 0 and t.shape[0] != n):
        want = f"({n},)" if n >= 0 else "1-d"
        raise ValueError(f"{caller}: {name} must have shape {want}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{caller}: {name} is on {t.device} but the inputs are on {device}")
    return t.contiguous()


def _check_cu_seqlens(caller: str, name: str, cu: torch.Tensor, total: int, max_seqlen: int, max_name: str):
    if not _values_checked(cu):
        return
    c = cu.to("cpu", torch.int64)
    if c[0].item() != 0:
        raise ValueError(f"{caller}: {name} must start at 0, got {c[0].item()}")
    if c[-1].item() != total:
        raise ValueError(f"{caller}: {name} must end at the total length {total}, got {c[-1].item()}")
    lengths = c[1:] - c[:-1]
    if lengths.numel() and lengths.min().item() < 0:
        s = int((lengths < 0).nonzero()[0].item())
        raise ValueError(f"{caller}: {name} must be nondecreasing; it decreases after sequence {s}")
    if lengths.numel() and lengths.max().item() > max_seqlen:
        raise ValueError(
            f"{caller}: {max_name} ({max_seqlen}) is below the longest sequence's length ({lengths.max().item()})"
        )


def _max_seqlen(caller: str, name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise TypeError(f"{caller}: {name} must be a non-negative int, got {n!r}")
    return n


def _varlen_alpha(alpha, q: torch.Tensor, cu_q: torch.Tensor, Hq: int) -> torch.Tensor:
    """alpha as one value per packed query row, a (1, Hq, total_q) view in the accumulation dtype."""
    caller = "varlen_entmax"
    total, n_seqs = q.shape[0], cu_q.shape[0] - 1
    acc = _accumulation_dtype(q.dtype)
    check_alpha(caller, alpha)
    if not isinstance(alpha, torch.Tensor):
        return torch.full((), float(alpha), dtype=acc, device=q.device).expand(1, Hq, total)
    if alpha.device != q.device:
        raise ValueError(f"{caller}: alpha is on {alpha.device} but q is on {q.device}")
    alpha = alpha.to(acc)
    if alpha.dim() == 0:
        return alpha.expand(1, Hq, total)
    if alpha.shape == (Hq,):
        return alpha.reshape(1, Hq, 1).expand(1, Hq, total)
    if alpha.shape == (n_seqs, Hq):  # per sequence (read so also when total_q == n_seqs)
        per_token = alpha.repeat_interleave((cu_q[1:] - cu_q[:-1]).long(), dim=0, output_size=total)
        return per_token.t().unsqueeze(0)
    if alpha.shape == (total, Hq):  # per token
        return alpha.t().unsqueeze(0)
    raise ValueError(
        f"{caller}: alpha must be a float, 0-d, per head ({Hq},), per sequence and head ({n_seqs}, {Hq}) or per "
        f"token ({total}, {Hq}), got shape {tuple(alpha.shape)}"
    )


def varlen_entmax(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alpha=1.5, is_causal=False,
                  scale=None, alibi_slopes=None, window_size=(-1, -1)) -> torch.Tensor:
    """alpha-entmax attention over packed sequences (flash-attn's varlen layout), fused.

    q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv): the sequences one after
    the other; sequence s has queries cu_seqlens_q[s]:cu_seqlens_q[s + 1] and keys
    cu_seqlens_k[s]:cu_seqlens_k[s + 1] (int32, n_seqs + 1 offsets from 0 to the total);
    max_seqlen_q/k: the longest (ints). Hq a multiple of Hkv. Returns (total_q, Hq, Dv):
    each sequence attends only to its own keys, as scaled_dot_product_entmax on that
    sequence alone. alpha: a float >= 1, 0-d, per head (Hq,), per sequence and head
    (n_seqs, Hq) or per token (total_q, Hq) (when total_q == n_seqs, an (n_seqs, Hq) alpha
    is read per sequence); differentiable (its gradient has alpha's shape), as are q, k and v. is_causal: aligned bottom-right within each sequence (query
    i of Lq sees key j iff j <= i + Lk - Lq; the same as top-left when Lq == Lk).
    alibi_slopes (Hq,) or (n_seqs, Hq) and window_size (left, right) as in
    scaled_dot_product_entmax, per sequence. The offsets are checked (start at 0,
    nondecreasing, end at the total, no sequence above max_seqlen): always for CPU tensors,
    on a GPU at the cost of one device sync unless ENTMAX_CUDA_SKIP_SEQLEN_CHECKS=1 (then a
    wrong max_seqlen gives wrong results, as in flash-attn).
    """
    caller = "varlen_entmax"
    _check_tensors(caller, {"q": q, "k": k, "v": v}, {"q": 3, "k": 3, "v": 3})
    total_q, Hq, D = q.shape
    total_k, Hkv, Dk = k.shape
    if v.shape[:2] != (total_k, Hkv):
        raise ValueError(f"{caller}: k and v must have the same length and heads, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    _check_heads(caller, Hq, Hkv, D, Dk, v.shape[2])
    cu_q = _int32_vector(caller, "cu_seqlens_q", cu_seqlens_q, -1, q.device)
    if cu_q.shape[0] < 1:
        raise ValueError(f"{caller}: cu_seqlens_q must hold n_seqs + 1 >= 1 offsets, got none")
    cu_k = _int32_vector(caller, "cu_seqlens_k", cu_seqlens_k, cu_q.shape[0], q.device)
    max_q = _max_seqlen(caller, "max_seqlen_q", max_seqlen_q)
    max_k = _max_seqlen(caller, "max_seqlen_k", max_seqlen_k)
    _check_cu_seqlens(caller, "cu_seqlens_q", cu_q, total_q, max_q, "max_seqlen_q")
    _check_cu_seqlens(caller, "cu_seqlens_k", cu_k, total_k, max_k, "max_seqlen_k")
    if not isinstance(is_causal, bool):
        raise TypeError(f"{caller}: is_causal must be a bool, got {type(is_causal).__name__}")
    left, right = window_of(caller, window_size)
    n_seqs = cu_q.shape[0] - 1
    alibi = alibi_of(caller, alibi_slopes, n_seqs, Hq, q, batch_name="n_seqs")
    alpha_rows = _varlen_alpha(alpha, q, cu_q, Hq)
    rows = [t.permute(1, 0, 2).unsqueeze(0) for t in (q, k, v)]  # (1, H, total, D) views
    out, _, _ = attention_ops.forward_op(
        *rows, alpha_rows, None, CAUSAL_LOWER_RIGHT if is_causal else NOT_CAUSAL, _scale_of(scale, D),
        alibi, left, right, cu_q, cu_k, None, max_q, max_k)
    return out[0].permute(1, 0, 2)


def entmax_with_kvcache(q, k_cache, v_cache, cache_seqlens, alpha=1.5, k=None, v=None, scale=None,
                        alibi_slopes=None, window_size=(-1, -1), num_splits=0) -> torch.Tensor:
    """Decoding step: alpha-entmax attention of a few new queries against a KV cache (forward only).

    q (B, Lq, Hq, D) (Lq >= 1, usually 1), k_cache (B, Lcache, Hkv, D), v_cache
    (B, Lcache, Hkv, Dv), cache_seqlens int32 (B,) (or an int for every entry): the keys
    already in the cache. With k, v (B, Lnew, Hkv, D/Dv) given they are first written into
    the caches at positions cache_seqlens[b]:cache_seqlens[b] + Lnew, in place (as
    flash_attn_with_kvcache), and attended. The Lq queries are causal, aligned bottom-right
    to each entry's keys (query i of Lq sees keys j <= i + L - Lq, L the keys in use), so
    the result equals the last Lq rows of the full causal computation. alpha: a float >= 1,
    0-d, per head (Hq,) or per entry and head (B, Hq). alibi_slopes (Hq,) or (B, Hq) and
    window_size (left, right) as in scaled_dot_product_entmax. Returns (B, Lq, Hq, Dv).
    No gradients (use scaled_dot_product_entmax or varlen_entmax to train). The lengths
    are checked (cache_seqlens + Lnew <= Lcache) as varlen_entmax's offsets are.

    num_splits: into how many parts the keys are split, each worked on in parallel (the
    parts agree on every row's threshold before the output is formed, so the result does not
    depend on it beyond rounding). 0 (default): chosen per call; on a GPU enough parts to
    fill the device when B * Hkv cannot. 1 to 128: that many (at most one per 64-key tile).
    With Lq > 16 and num_splits = 0, the queries go through the tiled attention kernel
    instead (prefill).
    """
    caller = "entmax_with_kvcache"
    named = {"q": q, "k_cache": k_cache, "v_cache": v_cache}
    if (k is None) != (v is None):
        raise ValueError(f"{caller}: pass both k and v (the new keys and values), or neither")
    if k is not None:
        named.update(k=k, v=v)
    _check_tensors(caller, named, {name: 4 for name in named})
    B, Lq, Hq, D = q.shape
    Bc, Lcache, Hkv, Dk = k_cache.shape
    if Bc != B or v_cache.shape[:3] != (B, Lcache, Hkv):
        raise ValueError(f"{caller}: k_cache and v_cache must be (B, Lcache, Hkv, *) with q's batch {B}, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    _check_heads(caller, Hq, Hkv, D, Dk, v_cache.shape[3])
    if Lq < 1:
        raise ValueError(f"{caller}: q needs at least one query row (dimension 1), got shape {tuple(q.shape)}")
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=q.device)
    seqlens = _int32_vector(caller, "cache_seqlens", cache_seqlens, B, q.device)
    Lnew = 0 if k is None else k.shape[1]
    if k is not None:
        if k.shape != (B, Lnew, Hkv, D) or v.shape != (B, Lnew, Hkv, v_cache.shape[3]):
            raise ValueError(f"{caller}: k and v must be (B, Lnew, Hkv, D) and (B, Lnew, Hkv, Dv) matching the "
                             f"caches, got {tuple(k.shape)} and {tuple(v.shape)}")
    if _values_checked(seqlens) and B > 0:
        s = seqlens.to("cpu", torch.int64)
        if s.min().item() < 0 or s.max().item() + Lnew > Lcache:
            raise ValueError(
                f"{caller}: cache_seqlens + Lnew must lie in [0, Lcache = {Lcache}], got cache_seqlens from "
                f"{s.min().item()} to {s.max().item()} with Lnew = {Lnew}"
            )
    left, right = window_of(caller, window_size)
    alibi = alibi_of(caller, alibi_slopes, B, Hq, q)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 0 <= num_splits <= MAX_DECODE_SPLITS:
        raise ValueError(f"{caller}: num_splits must be an int in [0, {MAX_DECODE_SPLITS}] (0: chosen per call), "
                         f"got {num_splits!r}")
    acc = _accumulation_dtype(q.dtype)
    check_alpha(caller, alpha)
    if not isinstance(alpha, torch.Tensor):
        alpha_rows = torch.full((), float(alpha), dtype=acc, device=q.device).expand(B, Hq, Lq)
    elif alpha.device != q.device:
        raise ValueError(f"{caller}: alpha is on {alpha.device} but q is on {q.device}")
    elif alpha.dim() == 0 or alpha.shape == (Hq,) or alpha.shape == (B, Hq):
        alpha_rows = alpha.to(acc).reshape(alpha.shape + (1,) if alpha.dim() else ()).expand(B, Hq, Lq)
    else:
        raise ValueError(f"{caller}: alpha must be a float, 0-d, per head ({Hq},) or per entry and head ({B}, {Hq}), "
                         f"got shape {tuple(alpha.shape)}")
    with torch.no_grad():
        if Lnew:
            positions = seqlens.long().unsqueeze(1) + torch.arange(Lnew, device=q.device)  # (B, Lnew)
            batch = torch.arange(B, device=q.device).unsqueeze(1).expand(B, Lnew)
            k_cache[batch, positions] = k
            v_cache[batch, positions] = v
        used = seqlens + Lnew
        rows = (q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2))
        if num_splits > 0 or Lq <= DECODE_ROWS:
            out, _ = attention_ops.decode_op(*rows, alpha_rows, _scale_of(scale, D), alibi, left, right, used,
                                             num_splits)
        else:
            out, _, _ = attention_ops.forward_op(*rows, alpha_rows, None, CAUSAL_LOWER_RIGHT, _scale_of(scale, D),
                                                 alibi, left, right, None, None, used, 0, 0)
    return out.transpose(1, 2)
