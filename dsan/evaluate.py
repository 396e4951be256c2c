"""Full-ranking evaluation: HR@K, MRR@K, NDCG@K (K = 5, 10, 20) over every real item."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from .data import PrefixSamples, batch_index_lists

CUTOFFS = (5, 10, 20)
METRICS = [f"{name}@{k}" for k in CUTOFFS for name in ("hr", "mrr", "ndcg")]


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank of each target among all items (ids 1..n = columns 0..n-1); ties
    count in the target's favour. NaN scores of a row rank its target last."""
    target_scores = scores.gather(1, (targets - 1)[:, None])
    ranks = (scores > target_scores).sum(dim=1) + 1
    return torch.where(torch.isnan(target_scores[:, 0]), scores.shape[1], ranks)


def metric_sums(ranks: torch.Tensor) -> torch.Tensor:
    """Per-metric sums over samples in METRICS order, float64."""
    ranks = ranks.to(torch.float64)
    sums = []
    for k in CUTOFFS:
        hit = ranks <= k
        sums += [hit.sum(), torch.where(hit, 1 / ranks, 0.0).sum(),
                 torch.where(hit, 1 / torch.log2(ranks + 1), 0.0).sum()]
    return torch.stack(sums)


def finish(sums: torch.Tensor, count: int) -> dict:
    metrics = {name: float(value) / max(count, 1) for name, value in zip(METRICS, sums.tolist())}
    metrics["samples"] = int(count)
    return metrics


def _rank_and_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def evaluate_scores(score_batch, samples: PrefixSamples, batch_size: int, device="cpu",
                    max_batches=None) -> dict:
    """score_batch(items, lengths) -> (B, n_items). Under torch.distributed each rank takes
    whole batches round-robin (the same batches as one process) and the sums are reduced."""
    rank, world = _rank_and_world()
    batches = batch_index_lists(len(samples), batch_size, shuffle=False)
    if max_batches is not None:
        batches = batches[:max_batches]
    sums = torch.zeros(len(METRICS), dtype=torch.float64)
    count = 0
    for indices in batches[rank::world]:
        items, lengths, targets = samples.batch(indices)
        scores = score_batch(items.to(device), lengths.to(device))
        sums += metric_sums(target_ranks(scores, targets.to(device))).cpu()
        count += len(indices)
    if world > 1:
        reduce_device = device if dist.get_backend() == "nccl" else "cpu"
        totals = torch.cat([sums, torch.tensor([float(count)], dtype=torch.float64)]).to(reduce_device)
        dist.all_reduce(totals)
        totals = totals.cpu()
        sums, count = totals[:-1], int(totals[-1].item())
    return finish(sums, count)


def evaluate_model(model, samples: PrefixSamples, batch_size: int, device="cpu", max_batches=None) -> dict:
    was_training = model.training
    model.eval()
    try:
        return evaluate_scores(lambda items, lengths: model(items, lengths), samples, batch_size,
                               device, max_batches)
    finally:
        model.train(was_training)


def evaluate_popularity(train_samples: PrefixSamples, samples: PrefixSamples, n_items: int,
                        batch_size: int = 512) -> dict:
    """Most-popular baseline: every session gets the items ranked by training click count
    (equal counts ordered by id, so ties do not flatter the baseline)."""
    counts = train_samples.item_counts(n_items)[1:n_items + 1].astype(np.float64)
    counts = torch.from_numpy(counts - np.arange(n_items) / (n_items + 1))
    return evaluate_scores(lambda items, lengths: counts.expand(len(items), -1), samples, batch_size)


def format_metrics(metrics: dict, names=("hr@20", "mrr@20")) -> str:
    return " ".join(f"{name} {metrics[name]:.4f}" for name in names)
