import math

import numpy as np
import torch

import testing  # noqa: F401  (puts the checkout on sys.path)
from dsan.data import PrefixSamples
from dsan.evaluate import CUTOFFS, evaluate_popularity, evaluate_scores, target_ranks


def brute_force_metrics(scores: np.ndarray, targets: np.ndarray) -> dict:
    """One sample at a time: sort the whole catalogue, find the target's position."""
    totals = {f"{m}@{k}": 0.0 for k in CUTOFFS for m in ("hr", "mrr", "ndcg")}
    for row, target in zip(scores, targets):
        ranking = list(np.argsort(-row, kind="stable"))
        rank = ranking.index(target - 1) + 1
        for k in CUTOFFS:
            if rank <= k:
                totals[f"hr@{k}"] += 1
                totals[f"mrr@{k}"] += 1 / rank
                totals[f"ndcg@{k}"] += 1 / math.log2(rank + 1)
    return {k: v / len(targets) for k, v in totals.items()}


def test_batched_metrics_match_brute_force():
    rng = np.random.default_rng(0)
    n_items = 40
    sessions = [list(rng.integers(1, n_items + 1, size=int(n))) for n in rng.integers(3, 9, size=60)]
    samples = PrefixSamples(sessions, 2)
    table = torch.from_numpy(rng.normal(size=(n_items, 4)))

    def score_batch(items, lengths):  # a fixed, deterministic "model": sum of item vectors . table
        return (table[(items - 1).clamp(min=0)] * (items > 0)[..., None]).sum(1) @ table.T

    batched = evaluate_scores(score_batch, samples, batch_size=7)
    items, lengths, targets = samples.batch(range(len(samples)))
    expected = brute_force_metrics(score_batch(items, lengths).numpy(), targets.numpy())
    assert batched["samples"] == len(samples)
    for name, value in expected.items():
        assert math.isclose(batched[name], value, rel_tol=1e-12, abs_tol=1e-12), name
    assert 0 < batched["hr@5"] <= batched["hr@10"] <= batched["hr@20"]


def test_ties_and_nan_ranks():
    scores = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [float("nan")] * 3])
    ranks = target_ranks(scores, torch.tensor([2, 3, 1]))
    assert ranks.tolist() == [1, 2, 3]


def test_most_popular_baseline_ranks_by_training_counts():
    train = PrefixSamples([[1, 1, 1, 2, 2, 3]], 2)
    test = PrefixSamples([[3, 3, 1], [3, 3, 2], [2, 2, 3]], 2)  # targets 1, 2, 3
    metrics = evaluate_popularity(train, test, n_items=3, batch_size=2)
    assert metrics["mrr@5"] == (1 + 1 / 2 + 1 / 3) / 3
    assert metrics["hr@5"] == 1.0


def test_the_popularity_baseline_of_a_data_folder_reads_only_the_last_click(tmp_path, monkeypatch):
    """Its scores ignore the inputs: the evaluated prefixes keep one click (a session of 10^5 clicks
    costs what a short one does), and the metrics equal those over the full prefixes."""
    from dsan import evaluate as evaluate_module
    from testing import make_tiny_synthetic

    data = make_tiny_synthetic(tmp_path / "data")
    widths = []
    original = PrefixSamples.batch

    def batch(self, indices):
        items, lengths, targets = original(self, indices)
        widths.append(items.shape[1])
        return items, lengths, targets

    monkeypatch.setattr(PrefixSamples, "batch", batch)
    metrics, _ = evaluate_module.evaluate_popularity_on(data, "test", 0.1, None, batch_size=64)
    assert set(widths) == {1}
    from dsan.data import SessionData

    loaded = SessionData.load(data)
    full = evaluate_popularity(loaded.samples(loaded.train_sessions, None, "training split"),
                               loaded.samples(loaded.test_sessions, None, "test split"), loaded.n_items, 64)
    assert metrics == full
