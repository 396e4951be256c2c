"""Pure-PyTorch reference for adaptive alpha-entmax.

Independent of the compiled kernels: bisection for the forward pass (in the
log1p form of docs/entmax-math.md section 2, stable as alpha -> 1) and the
analytic backward (section 4), with three forms of the alpha-gradient
(section 5), equal whenever sum p = 1. Works in any floating dtype; the tests run it in float64.

Semantics match the fused op: ``-inf`` entries give 0, a row that is all
``-inf`` gives all zeros, NaN in a row gives NaN in that row, alpha = 1 is
softmax, and alpha < 1 or NaN gives NaN rows.
"""

from __future__ import annotations

import torch

__all__ = [
    "entmax_bisect_reference",
    "entmax_reference_forward",
    "entmax_reference_backward",
    "EntmaxBisectReference",
]


def _alpha_rows(alpha, x: torch.Tensor) -> torch.Tensor:
    """alpha as a tensor broadcastable to x (x has the reduced dim last)."""
    if not torch.is_tensor(alpha):
        alpha = torch.tensor(float(alpha), dtype=x.dtype, device=x.device)
    alpha = alpha.to(dtype=x.dtype, device=x.device)
    return alpha


def _p_of_t(u: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """p_i(t) = [1 + eps (u_i - t)]_+^(1/eps), exp(u_i - t) where eps == 0."""
    soft = eps == 0
    safe_eps = torch.where(soft, torch.ones_like(eps), eps)
    z = safe_eps * (u - t)
    inside = z > -1
    z_safe = torch.where(inside, z, torch.zeros_like(z))
    p = torch.exp(torch.log1p(z_safe) / safe_eps)
    p = torch.where(inside, p, torch.zeros_like(p))
    return torch.where(soft, torch.exp(u - t), p)


def entmax_reference_forward(x: torch.Tensor, alpha, dim: int = -1, n_iter: int = 50) -> torch.Tensor:
    """Bisection on the threshold t of the stable form; returns p with sum 1."""
    x = x.transpose(dim, -1)
    a = _alpha_rows(alpha, x)
    if a.dim() > 0:
        a = a.transpose(dim, -1) if a.dim() == x.dim() else a
    eps = (a - 1).expand(*x.shape[:-1], 1) if x.dim() > 0 else a - 1
    if x.numel() == 0:
        return x.clone().transpose(dim, -1)
    m = x.max(dim=-1, keepdim=True).values
    all_masked = m == float("-inf")
    m = torch.where(all_masked, torch.zeros_like(m), m)
    u = x - m  # -inf stays -inf (p = 0 there), NaN stays NaN
    d = (x != float("-inf")).sum(dim=-1, keepdim=True).clamp(min=1).to(x.dtype)
    log_d = torch.log(d)
    safe_eps = torch.where(eps == 0, torch.ones_like(eps), eps)
    hi = torch.where(eps == 0, log_d, -torch.expm1(-safe_eps * log_d) / safe_eps)
    lo = torch.zeros_like(hi)
    for _ in range(n_iter):
        mid = (lo + hi) / 2
        f = _p_of_t(u, mid, eps).sum(dim=-1, keepdim=True) - 1
        go_right = f >= 0
        lo = torch.where(go_right, mid, lo)
        hi = torch.where(go_right, hi, mid)
    p = _p_of_t(u, (lo + hi) / 2, eps)
    p = p / p.sum(dim=-1, keepdim=True)
    p = torch.where(all_masked, torch.zeros_like(p), p)
    bad_alpha = ~(eps >= 0) | torch.isinf(eps)  # alpha < 1, NaN or inf
    p = torch.where(bad_alpha, torch.full_like(p, float("nan")), p)
    return p.transpose(dim, -1)


def _alpha_grad_textbook(p, dy, eps, g, q):
    """(A - q)/eps^2 - (B - q E)/eps: cancels badly as eps -> 0 (kept for tests)."""
    logp = torch.where(p > 0, torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
    A = (dy * p).sum(-1, keepdim=True)
    B = (dy * p * logp).sum(-1, keepdim=True)
    E = (p * logp).sum(-1, keepdim=True)
    return (A - q) / eps**2 - (B - q * E) / eps


def _alpha_grad_stable(p, dy, eps, g):
    """The cancellation-free form of docs/entmax-math.md section 5."""
    supp = p > 0
    ell = torch.where(supp, torch.log(torch.where(supp, p, torch.ones_like(p))), torch.zeros_like(p))
    el = eps * ell
    safe_eps = torch.where(eps == 0, torch.ones_like(eps), eps)
    w = torch.where(eps == 0, ell, torch.expm1(el) / safe_eps)
    v = torch.where(eps == 0, -ell, torch.expm1(-el) / safe_eps)
    series = ell**2 / 2 * (1 + el / 3 + el**2 / 12 + el**3 / 60 + el**4 / 360 + el**5 / 2520)
    r = torch.where(el.abs() < 1e-2, series, (torch.expm1(el) - el) / safe_eps**2)
    gsum = g.sum(-1, keepdim=True)
    pt = g / gsum
    E = (p * ell).sum(-1, keepdim=True)
    pv = (p * v).sum(-1, keepdim=True)
    Z = 1 + eps * pv
    wbar = (pt * w).sum(-1, keepdim=True)
    D = ((p * v * ell).sum(-1, keepdim=True) - pv * E) / Z
    rbar = (pt * r).sum(-1, keepdim=True)
    dp_dalpha = g * (r - w * ell - (rbar + D - E * wbar))
    dp_dalpha = torch.where(supp, dp_dalpha, torch.zeros_like(dp_dalpha))
    return (dy * dp_dalpha).sum(-1, keepdim=True)


def _alpha_grad_centred(p, dy, eps, g, q):
    """sum g (dy - q) (c - c0) with c = r - w ln p (docs/entmax-math.md section 5), the
    form the kernels use: sum g (dy - q) = 0 lets any constant c0 (here the g-weighted mean
    of c) be subtracted, which keeps the terms of a long flat row from cancelling."""
    supp = p > 0
    ell = torch.where(supp, torch.log(torch.where(supp, p, torch.ones_like(p))), torch.zeros_like(p))
    el = eps * ell
    safe_eps = torch.where(eps == 0, torch.ones_like(eps), eps)
    w = torch.where(eps == 0, ell, torch.expm1(el) / safe_eps)
    series = ell**2 / 2 * (1 + el / 3 + el**2 / 12 + el**3 / 60 + el**4 / 360 + el**5 / 2520)
    r = torch.where(el.abs() < 1e-2, series, (torch.expm1(el) - el) / safe_eps**2)
    c = torch.where(supp, r - w * ell, torch.zeros_like(p))
    gsum = g.sum(-1, keepdim=True)
    c0 = (g * c).sum(-1, keepdim=True) / torch.where(gsum > 0, gsum, torch.ones_like(gsum))
    return (g * (dy - q) * (c - c0)).sum(-1, keepdim=True)


ALPHA_GRAD_FORMS = ("stable", "textbook", "centred")


def entmax_reference_backward(p: torch.Tensor, dy: torch.Tensor, alpha, dim: int = -1, alpha_grad_form: str = "stable"):
    """Returns (dX, dalpha_rows); dalpha_rows has p's shape with size 1 along dim."""
    p = p.transpose(dim, -1)
    dy = dy.transpose(dim, -1)
    a = _alpha_rows(alpha, p)
    if a.dim() == p.dim():
        a = a.transpose(dim, -1)
    eps = (a - 1).expand(*p.shape[:-1], 1)
    supp = p > 0
    psafe = torch.where(supp, p, torch.ones_like(p))
    g = torch.where(supp, torch.exp((1 - eps) * torch.log(psafe)), torch.zeros_like(p))
    gsum = g.sum(-1, keepdim=True)
    gsum_safe = torch.where(gsum > 0, gsum, torch.ones_like(gsum))
    q = (g * dy).sum(-1, keepdim=True) / gsum_safe
    dx = g * (dy - q)
    if alpha_grad_form == "stable":
        da = _alpha_grad_stable(p, dy, eps, g)
    elif alpha_grad_form == "textbook":
        da = _alpha_grad_textbook(p, dy, eps, g, q)
    elif alpha_grad_form == "centred":
        da = _alpha_grad_centred(p, dy, eps, g, q)
    else:
        raise ValueError(f"alpha_grad_form must be one of {ALPHA_GRAD_FORMS}, got {alpha_grad_form!r}")
    empty_row = gsum == 0  # all -inf rows: zero output, zero gradient
    da = torch.where(empty_row, torch.zeros_like(da), da)
    return dx.transpose(dim, -1), da.transpose(dim, -1)


class EntmaxBisectReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, dim, n_iter):
        a = alpha.expand(*[1 if i == (dim % x.dim()) else s for i, s in enumerate(x.shape)])
        p = entmax_reference_forward(x, a, dim, n_iter)
        ctx.save_for_backward(p, alpha)
        ctx.dim = dim
        return p

    @staticmethod
    def backward(ctx, dy):
        p, alpha = ctx.saved_tensors
        dim = ctx.dim % p.dim()
        a = alpha.expand(*[1 if i == dim else s for i, s in enumerate(p.shape)])
        dx, da = entmax_reference_backward(p, dy, a, dim)
        da_alpha = None
        if ctx.needs_input_grad[1]:
            # sum the per-row gradient down to alpha's (broadcast) shape
            da_alpha = da.sum_to_size(alpha.shape) if alpha.dim() > 0 else da.sum()
        return dx, da_alpha, None, None


def entmax_bisect_reference(x: torch.Tensor, alpha=1.5, dim: int = -1, n_iter: int = 50) -> torch.Tensor:
    """Differentiable (in x and alpha) pure-PyTorch alpha-entmax by bisection.

    alpha: float, 0-d tensor, or tensor broadcastable to x with size 1 along dim.
    """
    if not torch.is_tensor(alpha):
        alpha = torch.tensor(float(alpha), dtype=x.dtype, device=x.device)
    if alpha.dim() > x.dim():
        raise ValueError(f"alpha has {alpha.dim()} dims, more than x's {x.dim()}")
    while alpha.dim() < x.dim():
        alpha = alpha.unsqueeze(0)
    return EntmaxBisectReference.apply(x, alpha.to(x.dtype), dim, n_iter)
