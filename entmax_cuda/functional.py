"""entmax_cuda.entmax and the entmax-library-compatible entmax_bisect."""

from __future__ import annotations

import math
import numbers

import torch

from . import _build, ops

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _alpha_per_row(alpha, x: torch.Tensor, dim: int) -> torch.Tensor:
    """alpha broadcast to x's shape with size 1 along dim, in the accumulation dtype."""
    row_shape = list(x.shape)
    row_shape[dim] = 1
    acc = _accumulation_dtype(x.dtype)
    if isinstance(alpha, bool) or not isinstance(alpha, (numbers.Real, torch.Tensor)):
        raise TypeError(f"entmax: alpha must be a float or a tensor, got {type(alpha).__name__}")
    if not isinstance(alpha, torch.Tensor):
        value = float(alpha)
        if not math.isfinite(value) or value < 1.0:
            raise ValueError(f"entmax: alpha must be a finite number >= 1, got {value}")
        return torch.full(row_shape, value, dtype=acc, device=x.device)
    if not alpha.is_floating_point():
        raise TypeError(f"entmax: alpha must be a floating-point tensor, got {alpha.dtype}")
    if alpha.device != x.device:
        raise ValueError(f"entmax: alpha is on {alpha.device} but x is on {x.device}")
    if alpha.dim() > x.dim():
        raise ValueError(
            f"entmax: alpha has shape {tuple(alpha.shape)}, more dimensions than x {tuple(x.shape)}"
        )
    aligned = [1] * (x.dim() - alpha.dim()) + list(alpha.shape)
    if aligned[dim] != 1:
        raise ValueError(
            f"entmax: alpha of shape {tuple(alpha.shape)} must have size 1 along dim {dim} "
            f"of x {tuple(x.shape)} (one alpha per row)"
        )
    for a, r in zip(aligned, row_shape):
        if a != 1 and a != r:
            raise ValueError(
                f"entmax: alpha of shape {tuple(alpha.shape)} does not broadcast to x's rows {tuple(row_shape)}"
            )
    return alpha.reshape(aligned).to(acc).expand(row_shape)


def entmax(x: torch.Tensor, alpha=1.5, dim: int = -1) -> torch.Tensor:
    """alpha-entmax of x along dim, differentiable in x and alpha.

    alpha: a float >= 1, a 0-d tensor, or a tensor broadcastable to x with size 1
    along dim (one alpha per row, e.g. per head (1, H, 1, 1) or per row (..., 1)).
    alpha = 1 is softmax; -inf entries get exactly 0; an all -inf row gives zeros.
    Tensor alphas below 1 or NaN give NaN in the affected rows.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"entmax: x must be a tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"entmax: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("entmax: x must have at least one dimension")
    if not -x.dim() <= dim < x.dim():
        raise IndexError(f"entmax: dim {dim} is out of range for x with {x.dim()} dimensions")
    dim = dim % x.dim()
    if x.is_cuda and not _build.CUDA_KERNELS_LOADED:
        raise RuntimeError(_build.cuda_unavailable_reason())
    return ops.forward_op(x, _alpha_per_row(alpha, x, dim), dim)


def entmax_bisect(X: torch.Tensor, alpha=1.5, dim: int = -1, n_iter: int = 50, ensure_sum_one: bool = True):
    """Drop-in for the `entmax` library's entmax_bisect, computed by the fused kernels.

    The fused kernel iterates to the floating-point floor on its own, so n_iter is
    only validated (the library's default of 50 bisection steps is never fewer
    digits than this); the output always sums to one (ensure_sum_one is accepted
    for compatibility).
    """
    if not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"entmax_bisect: n_iter must be a positive integer, got {n_iter!r}")
    return entmax(X, alpha, dim)
