"""AdaptiveEntmax: an nn.Module normaliser with a learnable alpha."""

from __future__ import annotations

import math

import torch
from torch import nn

from .functional import entmax


class AdaptiveEntmax(nn.Module):
    """alpha-entmax over `dim` with a learnable alpha = 1 + sigmoid(a) in (1, 2).

    n_heads=None learns one alpha; n_heads=H learns one per head, for scores shaped
    (..., H, q, k) (the head axis is `head_dim`, -3 by default). Calling it with
    `alpha=` uses that alpha instead (input-dependent alpha, as in DSAN).
    """

    def __init__(self, dim: int = -1, n_heads: int | None = None, alpha_init: float = 1.5,
                 head_dim: int = -3, learn_alpha: bool = True):
        super().__init__()
        if not 1.0 < alpha_init < 2.0:
            raise ValueError(f"AdaptiveEntmax: alpha_init must lie in (1, 2), got {alpha_init}")
        if n_heads is not None and n_heads < 1:
            raise ValueError(f"AdaptiveEntmax: n_heads must be positive, got {n_heads}")
        if n_heads is not None and head_dim >= 0:
            raise ValueError("AdaptiveEntmax: head_dim must be negative (counted from the end)")
        self.dim = dim
        self.n_heads = n_heads
        self.head_dim = head_dim
        logit = math.log((alpha_init - 1.0) / (2.0 - alpha_init))
        a = torch.full((n_heads if n_heads is not None else 1,), logit)
        if learn_alpha:
            self.alpha_logit = nn.Parameter(a)
        else:
            self.register_buffer("alpha_logit", a)

    def alpha(self) -> torch.Tensor:
        """The current alpha: shape (H,) per head, or (1,)."""
        return 1.0 + torch.sigmoid(self.alpha_logit)

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
        return f"dim={self.dim}, n_heads={self.n_heads}"
