"""Fenchel-Young losses of the `entmax` library, computed by the fused kernels.

For scores x (n_samples, n_classes) and target classes y (n_samples,), the loss of a sample is

    L(x, y) = H_alpha(p) + <p, x> - x_y,    p = alpha-entmax(x),

with H_alpha the Tsallis entropy (1 - sum p^alpha) / (alpha (alpha - 1)) (Shannon's at alpha = 1,
where L is the cross-entropy). Its gradient in x is p - onehot(y); in alpha, when alpha is a
tensor that requires grad, dH_alpha/dalpha at p (the library gives alpha no gradient). Signatures
and defaults are entmax 1.3's; unlike the library, a negative ignore_index is honoured (as in
torch's cross_entropy), a per-sample alpha of shape (n,) or (n, 1) gives one loss per sample,
and reduction also accepts torch's name 'mean' for 'elementwise_mean'.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from . import _build, ops
from .functional import _alpha_per_row, _checked_dim, check_alpha, check_k, check_n_iter

REDUCTIONS = ("elementwise_mean", "mean", "sum", "none")
# Below this |(alpha - 1) log p| the alpha-derivative uses its series (expm1(z) - z cancels).
_SERIES_BELOW = 1e-2


def _log_and_w(p: torch.Tensor, eps: torch.Tensor):
    """log p (0 off the support) and w = expm1(eps log p) / eps (log p at eps = 0), so that
    H_alpha(p) = -sum p w / alpha without the cancellation of 1 - sum p^alpha near alpha = 1."""
    ell = torch.where(p > 0, torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
    soft = eps == 0
    safe_eps = torch.where(soft, torch.ones_like(eps), eps)
    w = torch.where(soft, ell, torch.expm1(eps * ell) / safe_eps)
    return ell, w


def _dw_deps(ell: torch.Tensor, w: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """d w / d eps = ell w - (expm1(z) - z) / eps^2 with z = eps ell (a series for small z)."""
    z = eps * ell
    safe_eps = torch.where(eps == 0, torch.ones_like(eps), eps)
    series = ell**2 / 2 * (1 + z / 3 + z**2 / 12 + z**3 / 60 + z**4 / 360 + z**5 / 2520)
    r = torch.where(z.abs() < _SERIES_BELOW, series, (torch.expm1(z) - z) / safe_eps**2)
    return ell * w - r


class _FenchelYoungLoss(torch.autograd.Function):
    """Per-sample loss of X (n, C) for valid targets (n,) and alpha_rows (n, 1) in the
    accumulation dtype; the gradients of the module docstring."""

    @staticmethod
    def forward(ctx, X, target, alpha_rows):
        # float16/bfloat16 scores: p in float32, so the loss is not built from rounded p.
        xa = X.to(alpha_rows.dtype)
        pa = ops.forward_op(xa, alpha_rows, 1)
        _, w = _log_and_w(pa, alpha_rows - 1)
        entropy = -(pa * w).sum(1) / alpha_rows.squeeze(1)
        # Scores relative to the row maximum: fewer digits cancel; -inf entries have p = 0.
        top = xa.amax(1, keepdim=True)
        shifted = torch.where(pa > 0, xa - top, torch.zeros_like(xa))
        x_target = (xa.gather(1, target.unsqueeze(1)) - top).squeeze(1)
        loss = entropy + (pa * shifted).sum(1) - x_target
        ctx.save_for_backward(pa, target, alpha_rows)
        ctx.x_dtype = X.dtype
        return loss.to(X.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        pa, target, alpha_rows = ctx.saved_tensors
        g = grad_loss.to(alpha_rows.dtype).unsqueeze(1)
        grad_x = grad_alpha = None
        if ctx.needs_input_grad[0]:
            residual = pa.scatter_add(1, target.unsqueeze(1), torch.full_like(pa[:, :1], -1.0))
            grad_x = (g * residual).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            eps = alpha_rows - 1
            ell, w = _log_and_w(pa, eps)
            d_entropy = ((pa * w).sum(1, keepdim=True) / alpha_rows**2
                         - (pa * _dw_deps(ell, w, eps)).sum(1, keepdim=True) / alpha_rows)
            grad_alpha = g * d_entropy
        return grad_x, None, grad_alpha


def _check_ignore_index(caller: str, ignore_index) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"{caller}: ignore_index must be an integer, got {ignore_index!r}")


def _check_reduction(caller: str, reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{caller}: reduction must be one of {', '.join(map(repr, REDUCTIONS))}, "
                         f"got {reduction!r}")


def _per_sample_alpha(caller: str, alpha, X: torch.Tensor) -> torch.Tensor:
    """alpha as (n, 1) rows: a float, a 0-d tensor, or one value per sample, (n,) or (n, 1)."""
    if isinstance(alpha, torch.Tensor) and alpha.dim() == 1:
        alpha = alpha.unsqueeze(1)
    return _alpha_per_row(alpha, X, 1, caller)


def fenchel_young_loss(caller: str, X, target, alpha, ignore_index=None):
    """(per-sample loss with ignored samples set to 0, number of samples not ignored).

    X: (n, C) scores; target: (n,) integer classes in [0, C), or ignore_index."""
    _checked_dim(caller, X, -1)
    if X.dim() != 2:
        raise ValueError(f"{caller}: X must be 2-D (n_samples, n_classes), got shape {tuple(X.shape)}; "
                         "flatten the leading dimensions first")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{caller}: target must be a tensor of class indices, got {type(target).__name__}")
    if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
        raise TypeError(f"{caller}: target must hold integer class indices, got {target.dtype}")
    if target.shape != X.shape[:1]:
        raise ValueError(f"{caller}: target has shape {tuple(target.shape)} but X {tuple(X.shape)} "
                         f"has {X.shape[0]} samples (expected shape ({X.shape[0]},))")
    if target.device != X.device:
        raise ValueError(f"{caller}: target is on {target.device} but X is on {X.device}")
    if X.is_cuda and not _build.CUDA_KERNELS_LOADED:
        raise RuntimeError(_build.cuda_unavailable_reason())
    alpha_rows = _per_sample_alpha(caller, alpha, X)
    target = target.long()
    ignored = target == ignore_index if ignore_index is not None else torch.zeros_like(target, dtype=torch.bool)
    out_of_range = ((target < 0) | (target >= X.shape[1])) & ~ignored
    ignoring = f" and is not ignore_index ({ignore_index})" if ignore_index is not None else ""
    compiling = torch.compiler.is_compiling()
    if compiling:
        # torch.compile(fullgraph=True) cannot branch on data: the same check as a graph op, which
        # raises a RuntimeError when the compiled code runs (on the CPU; on CUDA a device-side
        # assert, which ends the process's CUDA context). Its message cannot name the bad index.
        # Out-of-range targets index class 0 below (so that this message, not an indexing error,
        # is what the compiled code reports) and their loss and gradients are NaN, never a
        # plausible number, should the assert be compiled out.
        torch._assert_async(~out_of_range.any(), f"{caller}: target holds a class index outside "
                            f"[0, n_classes = X.shape[1]){ignoring}")
    elif out_of_range.any():  # one device sync: a wrong class index must not become a plausible number
        bad = target[out_of_range][0].item()
        raise ValueError(f"{caller}: target holds class index {bad}, outside [0, {X.shape[1]}) for "
                         f"X of shape {tuple(X.shape)}{ignoring}")
    loss = _FenchelYoungLoss.apply(X, target.masked_fill(ignored | out_of_range, 0), alpha_rows)
    if compiling:
        loss = loss * torch.where(out_of_range, float("nan"), 1.0).to(loss.dtype)
    return loss.masked_fill(ignored, 0.0), (~ignored).sum()


def sparsemax_loss(X, target, k=None):
    """Drop-in for entmax.sparsemax_loss: per-sample sparsemax (alpha = 2) loss, shape (n,)."""
    check_k("sparsemax_loss", k)
    return fenchel_young_loss("sparsemax_loss", X, target, 2.0)[0]


def entmax15_loss(X, target, k=None):
    """Drop-in for entmax.entmax15_loss: per-sample 1.5-entmax loss, shape (n,)."""
    check_k("entmax15_loss", k)
    return fenchel_young_loss("entmax15_loss", X, target, 1.5)[0]


def entmax_bisect_loss(X, target, alpha=1.5, n_iter=50):
    """Drop-in for entmax.entmax_bisect_loss: per-sample alpha-entmax loss, shape (n,);
    alpha a float >= 1, a 0-d tensor or one per sample ((n,) or (n, 1)), differentiable."""
    check_n_iter("entmax_bisect_loss", n_iter)
    return fenchel_young_loss("entmax_bisect_loss", X, target, alpha)[0]


def sparsemax_bisect_loss(X, target, n_iter=50):
    """Drop-in for entmax.sparsemax_bisect_loss: the sparsemax loss."""
    check_n_iter("sparsemax_bisect_loss", n_iter)
    return fenchel_young_loss("sparsemax_bisect_loss", X, target, 2.0)[0]


class _FenchelYoungLossModule(nn.Module):
    """ignore_index and reduction as in the library's loss modules (see the module docstring)."""

    def __init__(self, ignore_index=-100, reduction="elementwise_mean"):
        super().__init__()
        _check_ignore_index(type(self).__name__, ignore_index)
        _check_reduction(type(self).__name__, reduction)
        self.ignore_index = ignore_index
        self.reduction = reduction

    def _alpha(self):
        raise NotImplementedError

    def loss(self, X, target):
        """The per-sample loss, no sample ignored (the library's method of that name)."""
        return fenchel_young_loss(type(self).__name__, X, target, self._alpha())[0]

    def forward(self, X, target):
        loss, kept = fenchel_young_loss(type(self).__name__, X, target, self._alpha(), self.ignore_index)
        if self.reduction == "sum":
            return loss.sum()
        if self.reduction in ("elementwise_mean", "mean"):
            return loss.sum() / kept.to(loss.dtype)  # NaN when every sample is ignored, as torch's
        return loss


class SparsemaxLoss(_FenchelYoungLossModule):
    """Drop-in for entmax.SparsemaxLoss (k is validated, not needed)."""

    def __init__(self, k=None, ignore_index=-100, reduction="elementwise_mean"):
        super().__init__(ignore_index, reduction)
        check_k("SparsemaxLoss", k)
        self.k = k

    def _alpha(self):
        return 2.0


class Entmax15Loss(_FenchelYoungLossModule):
    """Drop-in for entmax.Entmax15Loss (k is validated, not needed)."""

    def __init__(self, k=100, ignore_index=-100, reduction="elementwise_mean"):
        super().__init__(ignore_index, reduction)
        check_k("Entmax15Loss", k)
        self.k = k

    def _alpha(self):
        return 1.5


class EntmaxBisectLoss(_FenchelYoungLossModule):
    """Drop-in for entmax.EntmaxBisectLoss; alpha a float >= 1, a 0-d tensor or one per
    sample, with a gradient when it requires one (n_iter is validated, not needed)."""

    def __init__(self, alpha=1.5, n_iter=50, ignore_index=-100, reduction="elementwise_mean"):
        super().__init__(ignore_index, reduction)
        check_alpha("EntmaxBisectLoss", alpha)
        check_n_iter("EntmaxBisectLoss", n_iter)
        self.alpha = alpha
        self.n_iter = n_iter

    def _alpha(self):
        return self.alpha


class SparsemaxBisectLoss(_FenchelYoungLossModule):
    """Drop-in for entmax.SparsemaxBisectLoss (n_iter is validated, not needed)."""

    def __init__(self, n_iter=50, ignore_index=-100, reduction="elementwise_mean"):
        super().__init__(ignore_index, reduction)
        check_n_iter("SparsemaxBisectLoss", n_iter)
        self.n_iter = n_iter

    def _alpha(self):
        return 2.0
