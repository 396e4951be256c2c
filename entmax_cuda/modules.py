"""nn.Module normalisers: AdaptiveEntmax (a learnable alpha) and the `entmax` library's
Sparsemax, Entmax15, EntmaxBisect and SparsemaxBisect (same constructor arguments,
defaults and attributes as entmax 1.3), all computed by the fused kernels."""

from __future__ import annotations

import math

import torch
from torch import nn

from .functional import (check_alpha, check_k, check_n_iter, entmax, entmax15, entmax_bisect, sparsemax,
                         sparsemax_bisect)


class AdaptiveEntmax(nn.Module):
    """alpha-entmax over `dim` with a learnable alpha = 1 + sigmoid(a) in (1, 2).

    n_heads=None learns one alpha; n_heads=H learns one per head, for scores shaped
    (..., H, q, k) (the head axis is `head_dim`, -3 by default). Calling it with
    `alpha=` uses that alpha instead (input-dependent alpha, as in DSAN).
    learn_alpha=True: alpha_init in (1, 2), the parameter `alpha_logit` = a.
    learn_alpha=False: alpha stays alpha_init, any float >= 1 (1 is softmax, 2 sparsemax),
    held exactly in the buffer `alpha_fixed` (in the state dict, not a parameter).
    Casting the module to float16/bfloat16 (model.half(), .to(torch.bfloat16)) keeps alpha's
    tensor in float32, so alpha keeps its precision; alpha() is float32 (float64 after .double()).
    """

    def __init__(self, dim: int = -1, n_heads: int | None = None, alpha_init: float = 1.5,
                 head_dim: int = -3, learn_alpha: bool = True):
        super().__init__()
        if not isinstance(learn_alpha, bool):
            raise TypeError(f"AdaptiveEntmax: learn_alpha must be a bool, got {type(learn_alpha).__name__}")
        if isinstance(alpha_init, bool) or not isinstance(alpha_init, (int, float)):
            raise TypeError(f"AdaptiveEntmax: alpha_init must be a float, got {type(alpha_init).__name__}")
        if learn_alpha and not 1.0 < alpha_init < 2.0:
            raise ValueError(
                f"AdaptiveEntmax: a learned alpha = 1 + sigmoid(a) lies in (1, 2), so alpha_init must too, got "
                f"{alpha_init} (learn_alpha=False keeps any alpha >= 1 fixed)"
            )
        if not learn_alpha:
            check_alpha("AdaptiveEntmax", alpha_init)
        if n_heads is not None and (isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1):
            raise ValueError(f"AdaptiveEntmax: n_heads must be a positive integer, got {n_heads!r}")
        if n_heads is not None and head_dim >= 0:
            raise ValueError("AdaptiveEntmax: head_dim must be negative (counted from the end)")
        self.dim = dim
        self.n_heads = n_heads
        self.head_dim = head_dim
        self.learn_alpha = learn_alpha
        size = n_heads if n_heads is not None else 1
        if learn_alpha:
            logit = math.log((alpha_init - 1.0) / (2.0 - alpha_init))
            self.alpha_logit = nn.Parameter(torch.full((size,), logit))
        else:
            self.register_buffer("alpha_fixed", torch.full((size,), float(alpha_init)))

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) / .half() would round alpha (a fixed 1.003 to exactly 1, softmax):
        # casts to a dtype narrower than float32 move alpha's tensor but keep its precision.
        def keep_precision(t):
            out = fn(t)
            if out.is_floating_point() and torch.finfo(out.dtype).bits < 32 and t.is_floating_point():
                return t.to(device=out.device, dtype=torch.promote_types(t.dtype, torch.float32))
            return out

        return super()._apply(keep_precision, recurse)

    def alpha(self) -> torch.Tensor:
        """The current alpha: shape (H,) per head, or (1,); float32 (float64 if the module is)."""
        # _apply keeps both tensors at float32 or wider
        return self.alpha_fixed if not self.learn_alpha else 1.0 + torch.sigmoid(self.alpha_logit)

    def _alpha_for(self, scores: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha().to(scores.device)
        if self.n_heads is None:
            return alpha.reshape(())
        if scores.dim() < -self.head_dim or scores.shape[self.head_dim] != self.n_heads:
            raise ValueError(
                f"AdaptiveEntmax: scores of shape {tuple(scores.shape)} have no axis {self.head_dim} "
                f"of size n_heads={self.n_heads}"
            )
        shape = [1] * (-self.head_dim)
        shape[0] = self.n_heads
        return alpha.reshape(shape)

    def forward(self, scores: torch.Tensor, alpha: torch.Tensor | float | None = None) -> torch.Tensor:
        return entmax(scores, self._alpha_for(scores) if alpha is None else alpha, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_heads={self.n_heads}, learn_alpha={self.learn_alpha}"


class Sparsemax(nn.Module):
    """Drop-in for entmax.Sparsemax: sparsemax (alpha = 2) over `dim`; k is validated, not needed."""

    def __init__(self, dim: int = -1, k=None):
        super().__init__()
        check_k("Sparsemax", k)
        self.dim = dim
        self.k = k

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return sparsemax(X, dim=self.dim, k=self.k)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Entmax15(nn.Module):
    """Drop-in for entmax.Entmax15: 1.5-entmax over `dim`; k is validated, not needed."""

    def __init__(self, dim: int = -1, k=None):
        super().__init__()
        check_k("Entmax15", k)
        self.dim = dim
        self.k = k

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return entmax15(X, dim=self.dim, k=self.k)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class EntmaxBisect(nn.Module):
    """Drop-in for entmax.EntmaxBisect: alpha-entmax over `dim`, alpha a float >= 1 or a tensor
    (one per row, as entmax_bisect takes it; an nn.Parameter is registered and learned).
    n_iter is validated, not needed."""

    def __init__(self, alpha=1.5, dim: int = -1, n_iter: int = 50):
        super().__init__()
        check_alpha("EntmaxBisect", alpha)
        check_n_iter("EntmaxBisect", n_iter)
        self.dim = dim
        self.n_iter = n_iter
        self.alpha = alpha

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return entmax_bisect(X, alpha=self.alpha, dim=self.dim, n_iter=self.n_iter)

    def extra_repr(self) -> str:
        alpha = self.alpha if not isinstance(self.alpha, torch.Tensor) else f"tensor{tuple(self.alpha.shape)}"
        return f"alpha={alpha}, dim={self.dim}"


class SparsemaxBisect(nn.Module):
    """Drop-in for entmax.SparsemaxBisect: sparsemax over `dim`; n_iter is validated, not needed."""

    def __init__(self, dim: int = -1, n_iter=None):
        super().__init__()
        check_n_iter("SparsemaxBisect", n_iter, allow_none=True)
        self.dim = dim
        self.n_iter = n_iter

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return sparsemax_bisect(X, dim=self.dim, n_iter=self.n_iter)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
