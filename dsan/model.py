"""DSAN (Yuan et al., AAAI 2021), written in the order of the equations of docs/dsan.md.

Shapes: B sessions, L = the batch's longest session (right-padded with item 0),
d = 2 * embedding_dim = 200 (item and position embeddings concatenated).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import attention_problem, fixed_alpha
from .errors import EXTRA_HINT, AttentionUnavailable, ConfigError

EMBEDDING_MAX_NORM = 1.5  # both tables, as in the original notebooks
TARGET_ATTENTION_INIT_STD = 0.05
REFERENCE_BISECTION_STEPS = 50  # as the original's entmax_bisect


# ---------------------------------------------------------------- attention normalisers


def _entmax_reference():
    """The pure-PyTorch bisection of entmax_cuda; loaded from the source file when the
    compiled package cannot be imported (a checkout whose extension is not built yet)."""
    try:
        from entmax_cuda.reference import entmax_bisect_reference
    except ImportError:
        path = Path(__file__).resolve().parents[1] / "entmax_cuda" / "reference.py"
        if not path.is_file():
            raise
        spec = importlib.util.spec_from_file_location("_entmax_cuda_reference", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        entmax_bisect_reference = module.entmax_bisect_reference
    return entmax_bisect_reference


def _entmax_cuda(name: str):
    try:
        import entmax_cuda
    except ImportError as e:
        raise AttentionUnavailable(
            f"--attention {name} needs the compiled entmax_cuda kernels, which cannot be imported ({e}); "
            f"build them ({EXTRA_HINT}) or choose --attention entmax-reference (pure PyTorch, slower)") from None
    return entmax_cuda


def fused_self_attention(name: str):
    """The fused entmax attention on packed sequences (entmax_cuda.varlen_entmax) for the
    normalisers computed by entmax_cuda (adaptive-entmax, entmax:A), else None (softmax, the
    reference and the entmax library keep the materialised scores)."""
    if name != "adaptive-entmax" and not name.startswith("entmax:"):
        return None
    return _entmax_cuda(name).varlen_entmax


def attention_normaliser(name: str):
    """Returns (normalise(scores, alpha, dim) -> weights, uses_learned_alpha).

    alpha has scores' shape with size 1 along dim (one alpha per session)."""
    problem = attention_problem(name)
    if problem:
        raise ConfigError(f"attention {problem}, got {name!r}")
    if name == "softmax":
        return (lambda scores, alpha, dim: torch.softmax(scores, dim=dim)), False
    if name == "adaptive-entmax":
        fused = _entmax_cuda(name).entmax
        return (lambda scores, alpha, dim: fused(scores, alpha, dim=dim)), True
    if name == "entmax-reference":
        reference = _entmax_reference()
        return (lambda scores, alpha, dim: reference(scores, alpha, dim=dim, n_iter=REFERENCE_BISECTION_STEPS)), True
    if name == "entmax-bisect-lib":
        try:
            from entmax import entmax_bisect
        except ImportError as e:
            raise AttentionUnavailable(
                f"--attention entmax-bisect-lib needs the `entmax` package ({e}): pip install entmax") from None
        return (lambda scores, alpha, dim: entmax_bisect(scores, alpha, dim=dim, n_iter=REFERENCE_BISECTION_STEPS)), True
    fused, alpha_value = _entmax_cuda(name).entmax, fixed_alpha(name)
    return (lambda scores, alpha, dim: fused(scores, alpha_value, dim=dim)), False


# ---------------------------------------------------------------- the model


def _capped(rows: torch.Tensor) -> torch.Tensor:
    """rows (..., dim) with norm above EMBEDDING_MAX_NORM scaled to it. Rows within a relative
    1e-6 of it are left alone, so capping twice changes nothing (torch's embedding_renorm_
    may rescale a just-capped row by an ulp)."""
    norms = rows.norm(dim=-1, keepdim=True)
    return torch.where(norms > EMBEDDING_MAX_NORM * (1 + 1e-6), rows * (EMBEDDING_MAX_NORM / norms), rows)


@torch.no_grad()
def _cap_row_norms(weight: torch.Tensor, ids: torch.Tensor) -> None:
    """Caps the rows weight[ids] in place."""
    weight.index_copy_(0, ids, _capped(weight.index_select(0, ids)))


class DSAN(nn.Module):
    def __init__(self, n_items: int, max_session_length: int, embedding_dim: int = 100,
                 dropout: float = 0.5, wk: float = 20.0, attention: str = "adaptive-entmax"):
        super().__init__()
        self.n_items = n_items
        self.target_id = n_items + 1
        self.max_session_length = max_session_length
        self.wk = wk
        d = 2 * embedding_dim
        self.d = d
        # (1) inputs: item (0 = padding, n_items + 1 = target) and position (0 = padding) tables
        # rows are renormalised to norm <= 1.5 when looked up (max_norm), in both tables: with N(0, 1)
        # rows of norm ~10, an uncapped position table would dominate every 200-d token
        # (renormalise_embeddings, called by forward, plays nn.Embedding's max_norm)
        self.item_embedding = nn.Embedding(n_items + 2, embedding_dim, padding_idx=0)
        self.position_embedding = nn.Embedding(max_session_length + 2, embedding_dim, padding_idx=0)
        # (2), (4) one linear layer gives both alphas
        self.alpha_layer = nn.Linear(d, 1)
        # (3) self-attention: query projection only; feed-forward block
        self.query = nn.Linear(d, d)
        nn.init.zeros_(self.query.bias)
        self.feed_forward_in = nn.Linear(d, d)
        self.feed_forward_out = nn.Linear(d, d)
        self.layer_norm = nn.LayerNorm(d)
        # (5) additive target attention
        self.target_item_weight = nn.Linear(d, d, bias=False)  # W1'
        self.target_session_weight = nn.Linear(d, d, bias=False)  # W2'
        self.target_bias = nn.Parameter(torch.zeros(d))  # b
        self.target_score = nn.Linear(d, 1, bias=False)  # w0
        for layer in (self.target_item_weight, self.target_session_weight, self.target_score):
            nn.init.normal_(layer.weight, std=TARGET_ATTENTION_INIT_STD)
        # (6) fusion
        self.fusion = nn.Linear(2 * d, embedding_dim)
        self.dropout = nn.Dropout(dropout)
        self.set_attention(attention)

    def set_attention(self, name: str) -> None:
        """Swap the normaliser of both attentions (same weights), e.g. for heat maps."""
        self.normalise, self.uses_learned_alpha = attention_normaliser(name)
        self.fused_attention = fused_self_attention(name)
        self.attention = name

    @torch.no_grad()
    def renormalise_embeddings(self, items: torch.Tensor, lengths: torch.Tensor) -> None:
        """Caps at norm 1.5 the rows of both tables that a forward pass over (items, lengths)
        looks up, as nn.Embedding(max_norm=1.5) does at lookup. Idempotent (a capped row is
        left exactly as it is), so data-parallel ranks can apply it to the whole global batch
        before their forward passes apply it to their shares, and stay identical."""
        weight = self.item_embedding.weight
        item_ids = torch.cat([torch.unique(items).to(weight.device),
                              torch.tensor([self.target_id], device=weight.device)])
        _cap_row_norms(weight, item_ids)
        # a session of length L looks up positions 1..L + 1, so the batch looks up 1..max(L) + 1
        weight = self.position_embedding.weight
        _cap_row_norms(weight, torch.arange(1, int(lengths.max()) + 2, device=weight.device))

    def _lookup(self, table: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        """Training: the rows were capped in place. Evaluation: the same capped values, computed
        without writing to the weights, so evaluating never changes what training does next."""
        rows = table(ids)
        return rows if self.training else _capped(rows)

    def self_attention(self, H: torch.Tensor, is_key: torch.Tensor, alpha_self: torch.Tensor,
                       with_weights: bool = False):
        """Step (3)'s attention: Q = Dropout(ReLU(W_q H + b_q)); keys and values are H itself;
        padded keys are masked; one alpha_1 per session (B, 1). Returns (A (B, L + 1, d), weights
        (B, L + 1, L + 1), or None when the fused kernel computed A without them).

        The entmax_cuda normalisers run as one fused entmax attention over the sessions packed
        without their padding (no L x L matrix, no padded query or key computed; the padded rows
        of A are 0, and nothing downstream reads them); with_weights (heat maps) and the other
        normalisers materialise the scores."""
        Q = self.dropout(torch.relu(self.query(H)))
        if self.fused_attention is not None and not with_weights:
            B, L1, d = H.shape
            tokens = is_key.reshape(-1).nonzero().squeeze(1)  # the sessions' tokens, session by session
            cu_seqlens = F.pad(is_key.sum(1).cumsum(0), (1, 0)).to(torch.int32)
            alpha = alpha_self if self.uses_learned_alpha else fixed_alpha(self.attention)  # per session (B, 1)
            packed = [t.reshape(B * L1, 1, d).index_select(0, tokens) for t in (Q, H)]
            A = self.fused_attention(packed[0], packed[1], packed[1], cu_seqlens, cu_seqlens, L1, L1, alpha=alpha,
                                     scale=1.0 / math.sqrt(self.d))
            return H.new_zeros(B * L1, d).index_copy(0, tokens, A[:, 0]).reshape(B, L1, d), None
        scores = Q @ H.transpose(1, 2) / math.sqrt(self.d)
        scores = scores.masked_fill(~is_key[:, None, :], float("-inf"))
        weights = self.normalise(scores, alpha_self[:, :, None], -1)
        return weights @ H, weights

    def forward(self, items: torch.Tensor, lengths: torch.Tensor, with_attention: bool = False):
        """items (B, L) right-padded with 0, lengths (B,) -> scores (B, n_items) for ids 1..n_items."""
        B, L = items.shape
        if self.training:
            self.renormalise_embeddings(items, lengths)  # in place, like the original's max_norm lookups
        embed = self._lookup
        steps = torch.arange(L, device=items.device)
        is_item = steps[None, :] < lengths[:, None]  # (B, L)
        positions = torch.where(is_item, steps[None, :] + 1, 0)

        # (1) h_t = [item embedding; position embedding]; the target token sits at position L_s + 1
        h_items = torch.cat([embed(self.item_embedding, items), embed(self.position_embedding, positions)], dim=-1)
        h_target = torch.cat([embed(self.item_embedding, torch.full_like(lengths, self.target_id)),
                              embed(self.position_embedding, lengths + 1)], dim=-1)  # (B, d)
        H = torch.cat([h_items, h_target[:, None, :]], dim=1)  # (B, L + 1, d)
        is_key = torch.cat([is_item, is_item.new_ones(B, 1)], dim=1)

        # (2) alpha_1 = 1 + sigmoid(w_alpha . h_target + b_alpha), one per session
        alpha_self = 1 + torch.sigmoid(self.alpha_layer(h_target))  # (B, 1)

        # (3) A = alpha_1-entmax(Q H^T / sqrt(d)) H, then the feed-forward block:
        A, self_weights = self.self_attention(H, is_key, alpha_self, with_weights=with_attention)
        # O = LayerNorm(A + Dropout(W_2 ReLU(W_1 A)))
        O = self.layer_norm(A + self.dropout(self.feed_forward_out(torch.relu(self.feed_forward_in(A)))))
        x_hat, m_s = O[:, :L], O[:, L]

        # (4) alpha_2 = 1 + sigmoid(w_alpha . m_s + b_alpha)
        alpha_target = 1 + torch.sigmoid(self.alpha_layer(m_s))  # (B, 1)

        # (5) e_t = w_0 . ReLU(x_hat_t W_1' + m_s W_2' + b); beta = alpha_2-entmax(e); c = sum_t beta_t h_t
        e = self.target_score(torch.relu(
            self.target_item_weight(x_hat) + self.target_session_weight(m_s)[:, None, :] + self.target_bias
        )).squeeze(-1)
        e = e.masked_fill(~is_item, float("-inf"))
        beta = self.normalise(e, alpha_target, -1)  # (B, L)
        c = (beta[:, :, None] * h_items).sum(dim=1)  # raw input tokens, not x_hat

        # (6) s = Dropout(SELU(W_f [c; m_s]))
        s = self.dropout(F.selu(self.fusion(torch.cat([c, m_s], dim=-1))))

        # (7) y_hat = w_k cos(s, e_i) over the real items 1..n_items
        item_table = self.item_embedding.weight[1:self.n_items + 1]
        item_scores = self.wk * F.normalize(s, dim=-1) @ F.normalize(item_table, dim=-1).t()
        if not with_attention:
            return item_scores
        attention = {"self_weights": self_weights, "target_weights": beta,
                     "alpha_self": alpha_self.squeeze(-1), "alpha_target": alpha_target.squeeze(-1)}
        return item_scores, attention

    @staticmethod
    def loss(scores: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of forward()'s scores over the full catalogue; targets are item ids
        1..n_items. It takes the scores rather than the batch so that data-parallel training
        can call forward() through its DistributedDataParallel wrapper."""
        return F.cross_entropy(scores, targets - 1, reduction=reduction)

    def model_args(self) -> dict:
        return {"n_items": self.n_items, "max_session_length": self.max_session_length,
                "embedding_dim": self.d // 2, "dropout": self.dropout.p, "wk": self.wk,
                "attention": self.attention}
