"""entmax_cuda.entmax, and the `entmax` library's functions computed by it.

sparsemax, entmax15, entmax_bisect and sparsemax_bisect have the signatures and defaults
of entmax 1.3. The library's tuning arguments (k: partial sorting; n_iter: bisection
steps; ensure_sum_one: renormalisation) have nothing to tune in the fused kernels, which
find the exact threshold and always return rows summing to one: they are validated and
otherwise ignored.
"""

from __future__ import annotations

import math
import numbers

import torch

from . import _build, ops

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_alpha(caller: str, alpha) -> None:
    """alpha is a finite number >= 1 or a floating-point tensor (whose values are not checked:
    that would cost a device sync; bad values give NaN rows)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{caller}: alpha must be a float or a tensor, got {type(alpha).__name__}")
    if isinstance(alpha, torch.Tensor):
        if not alpha.is_floating_point():
            raise TypeError(f"{caller}: alpha must be a floating-point tensor, got {alpha.dtype}")
    elif not math.isfinite(float(alpha)) or float(alpha) < 1.0:
        raise ValueError(f"{caller}: alpha must be a finite number >= 1, got {float(alpha)}")


def _alpha_per_row(alpha, x: torch.Tensor, dim: int, caller: str = "entmax") -> torch.Tensor:
    """alpha broadcast to x's shape with size 1 along dim, in the accumulation dtype."""
    row_shape = list(x.shape)
    row_shape[dim] = 1
    acc = _accumulation_dtype(x.dtype)
    check_alpha(caller, alpha)
    if not isinstance(alpha, torch.Tensor):
        return torch.full(row_shape, float(alpha), dtype=acc, device=x.device)
    if alpha.device != x.device:
        raise ValueError(f"{caller}: alpha is on {alpha.device} but x is on {x.device}")
    if alpha.dim() > x.dim():
        raise ValueError(
            f"{caller}: alpha has shape {tuple(alpha.shape)}, more dimensions than x {tuple(x.shape)}"
        )
    aligned = [1] * (x.dim() - alpha.dim()) + list(alpha.shape)
    if aligned[dim] != 1:
        raise ValueError(
            f"{caller}: alpha of shape {tuple(alpha.shape)} must have size 1 along dim {dim} "
            f"of x {tuple(x.shape)} (one alpha per row)"
        )
    for a, r in zip(aligned, row_shape):
        if a != 1 and a != r:
            raise ValueError(
                f"{caller}: alpha of shape {tuple(alpha.shape)} does not broadcast to x's rows {tuple(row_shape)}"
            )
    return alpha.reshape(aligned).to(acc).expand(row_shape)


def entmax(x: torch.Tensor, alpha=1.5, dim: int = -1) -> torch.Tensor:
    """alpha-entmax of x along dim, differentiable in x and alpha.

    alpha: a float >= 1, a 0-d tensor, or a tensor broadcastable to x with size 1
    along dim (one alpha per row, e.g. per head (1, H, 1, 1) or per row (..., 1)).
    alpha = 1 is softmax; -inf entries get exactly 0; an all -inf row gives zeros.
    Tensor alphas below 1 or NaN give NaN in the affected rows.
    """
    return _entmax("entmax", x, alpha, dim)


def _entmax(caller: str, x, alpha, dim) -> torch.Tensor:
    """entmax with x, alpha and dim checked; errors name the public function called."""
    dim = _checked_dim(caller, x, dim)
    if x.is_cuda and not _build.CUDA_KERNELS_LOADED:
        raise RuntimeError(_build.cuda_unavailable_reason())
    return ops.forward_op(x, _alpha_per_row(alpha, x, dim, caller), dim)


def _checked_dim(caller: str, x, dim) -> int:
    """dim as a non-negative index, after checking x's type, dtype and rank."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{caller}: x must be a tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{caller}: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{caller}: x must have at least one dimension")
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"{caller}: dim must be an integer, got {dim!r}")
    if not -x.dim() <= dim < x.dim():
        raise IndexError(f"{caller}: dim {dim} is out of range for x with {x.dim()} dimensions")
    return int(dim) % x.dim()


def check_k(caller: str, k) -> None:
    """The library's partial-sorting size: None or a positive int."""
    if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1):
        raise ValueError(f"{caller}: k must be None or a positive integer, got {k!r}")


def check_n_iter(caller: str, n_iter, allow_none: bool = False) -> None:
    """The library's bisection step count: a positive int (None where the library's default is None)."""
    if n_iter is None and allow_none:
        return
    if isinstance(n_iter, bool) or not isinstance(n_iter, numbers.Integral) or n_iter < 1:
        raise ValueError(f"{caller}: n_iter must be a positive integer, got {n_iter!r}")


def _check_ensure_sum_one(caller: str, ensure_sum_one) -> None:
    if not isinstance(ensure_sum_one, bool):
        raise TypeError(f"{caller}: ensure_sum_one must be True or False, got {ensure_sum_one!r}")


def sparsemax(X: torch.Tensor, dim: int = -1, k=None) -> torch.Tensor:
    """Drop-in for entmax.sparsemax: entmax at alpha = 2 (k is validated, not needed)."""
    check_k("sparsemax", k)
    return _entmax("sparsemax", X, 2.0, dim)


def entmax15(X: torch.Tensor, dim: int = -1, k=None) -> torch.Tensor:
    """Drop-in for entmax.entmax15: entmax at alpha = 1.5 (k is validated, not needed)."""
    check_k("entmax15", k)
    return _entmax("entmax15", X, 1.5, dim)


def entmax_bisect(X: torch.Tensor, alpha=1.5, dim: int = -1, n_iter: int = 50, ensure_sum_one: bool = True):
    """Drop-in for entmax.entmax_bisect, differentiable in X and alpha.

    Unlike the library, alpha = 1 is allowed (softmax). n_iter and ensure_sum_one are
    validated; the output always sums to one.
    """
    check_n_iter("entmax_bisect", n_iter)
    _check_ensure_sum_one("entmax_bisect", ensure_sum_one)
    return _entmax("entmax_bisect", X, alpha, dim)


def sparsemax_bisect(X: torch.Tensor, dim: int = -1, n_iter: int = 50, ensure_sum_one: bool = True):
    """Drop-in for entmax.sparsemax_bisect: entmax at alpha = 2 (n_iter None means the default,
    as the library's SparsemaxBisect module passes it)."""
    check_n_iter("sparsemax_bisect", n_iter, allow_none=True)
    _check_ensure_sum_one("sparsemax_bisect", ensure_sum_one)
    return _entmax("sparsemax_bisect", X, 2.0, dim)
