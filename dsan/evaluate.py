"""Full-ranking evaluation: HR@K, MRR@K, NDCG@K (K = 5, 10, 20) over every real item."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .data import PrefixSamples, SessionData, batch_index_lists
from .device import choose_device, rank_and_world
from .errors import DataError, RunError

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


@torch.no_grad()
def evaluate_scores(score_batch, samples: PrefixSamples, batch_size: int, device="cpu",
                    max_batches=None) -> dict:
    """score_batch(items, lengths) -> (B, n_items). Under torch.distributed each rank takes
    whole batches round-robin (the same batches as one process) and the sums are reduced."""
    rank, world = rank_and_world()
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


def evaluate_popularity(train_samples: PrefixSamples, samples: PrefixSamples, n_items: int, batch_size: int) -> dict:
    """Most-popular baseline: every session gets the items ranked by training click count
    (equal counts ordered by id, so ties do not flatter the baseline)."""
    counts = train_samples.item_counts(n_items)[1:n_items + 1].astype(np.float64)
    counts = torch.from_numpy(counts - np.arange(n_items) / (n_items + 1))
    return evaluate_scores(lambda items, lengths: counts.expand(len(items), -1), samples, batch_size)


def format_metrics(metrics: dict, names=("hr@20", "mrr@20")) -> str:
    return " ".join(f"{name} {metrics[name]:.4f}" for name in names)


def check_catalogue(model, checkpoint: dict, data: SessionData, source) -> None:
    """The data must have exactly the model's catalogue (same size, same item ids)."""
    if model.n_items != data.n_items:
        raise DataError(f"{source} ranks {model.n_items} items, but {data.directory} has {data.n_items}: "
                        "a model is evaluated on data with the catalogue it was trained on")
    saved = checkpoint.get("catalogue")
    if saved is not None and saved != data.catalogue:
        raise DataError(f"{source} was trained on other item ids than those of {data.directory} "
                        f"(catalogue {saved} vs {data.catalogue})")


def evaluate_run(run_dir, split: str = "test", checkpoint: str = "best", attention=None, data_dir=None,
                 protocol=None, batch_size=None, device: str = "auto"):
    """(metrics, data notes) of a trained run's checkpoint on its test or validation split."""
    from .checkpoint import load_model
    from .config import read_run_config

    config = read_run_config(run_dir)
    model, state = load_model(run_dir, checkpoint, attention=attention)
    data = SessionData.load(data_dir or config.data, protocol or config.protocol)
    check_catalogue(model, state, data, Path(run_dir) / f"{checkpoint}.pt")
    if split == "test":
        sessions = data.test_sessions
    elif config.selection != "valid":
        raise RunError(f"{run_dir} was trained with selection {config.selection}: it has no validation split")
    else:
        sessions = data.split_validation(config.valid_fraction)[1]
    device = choose_device(device)
    model.to(device)
    samples = data.samples(sessions, model.max_session_length, f"{split} split")
    return evaluate_model(model, samples, batch_size or config.eval_batch_size, device), data.notes


def evaluate_popularity_on(data_dir, split: str, valid_fraction: float, protocol, batch_size: int):
    """(metrics, data notes) of the most-popular baseline; for the validation split it counts
    the training part only."""
    data = SessionData.load(data_dir, protocol)
    if split == "test":
        train_sessions, evaluated = data.train_sessions, data.test_sessions
    else:
        train_sessions, evaluated = data.split_validation(valid_fraction)
    # The baseline's scores ignore the input clicks: the evaluated prefixes keep only their last
    # click, so that a very long session costs what a short one does.
    metrics = evaluate_popularity(data.samples(train_sessions, None, "training split"),
                                  data.samples(evaluated, 1, f"{split} split"), data.n_items, batch_size)
    return metrics, data.notes


def metrics_table(title: str, metrics: dict) -> str:
    """HR/MRR/NDCG at each cut-off as a small text table under `title`."""
    lines = [title, "  " + "  ".join(f"{k:>8}" for k in ("K", "HR@K", "MRR@K", "NDCG@K"))]
    for k in CUTOFFS:
        lines.append("  " + "  ".join([f"{k:>8}"] + [f"{metrics[f'{m}@{k}']:>8.4f}" for m in ("hr", "mrr", "ndcg")]))
    lines.append(f"  ({metrics['samples']} samples)")
    return "\n".join(lines)
