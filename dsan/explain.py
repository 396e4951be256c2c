"""Heat maps of one session's attention weights: the learned normaliser beside softmax
(the technical appendix's Figures 1 and 2). Exact zeros are drawn grey."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_model
from .data import PrefixSamples, SessionData


@torch.no_grad()
def session_attention(model, items, lengths, attention: str) -> dict:
    model.set_attention(attention)
    _, weights = model(items, lengths, with_attention=True)
    return {name: value[0].cpu().numpy() for name, value in weights.items()}


def explain(run_dir, test_index: int, out_path, data_dir=None, attention=None, compare_with="softmax") -> dict:
    """Draws the figure for test sample `test_index` (prefix-expanded test set order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model, _ = load_model(run_dir, "best", attention=attention)
    import yaml

    config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    data = SessionData.load(data_dir or config["data"])
    samples = PrefixSamples(data.test_sessions, data.protocol.min_prefix)
    if not 0 <= test_index < len(samples):
        raise IndexError(f"--test-index {test_index} out of range: the test set has {len(samples)} samples")
    items, lengths, target = samples.batch([test_index])
    learned_name = model.attention
    panels = {learned_name: session_attention(model, items, lengths, learned_name),
              compare_with: session_attention(model, items, lengths, compare_with)}

    session = items[0].tolist()
    labels = [str(i) for i in session] + ["target"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 10), gridspec_kw={"height_ratios": [len(labels), 3]})
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")  # masked = exact zero
    for column, (name, weights) in enumerate(panels.items()):
        a1, a2 = float(weights["alpha_self"]), float(weights["alpha_target"])
        shown_alpha = name not in ("softmax",) and not name.startswith("entmax:")
        self_weights = weights["self_weights"]
        ax = axes[0, column]
        image = ax.imshow(np.ma.masked_equal(self_weights, 0.0), cmap=cmap, vmin=0, vmax=1)
        ax.set_title(f"self-attention, {name}" + (f" (α₁ = {a1:.4f})" if shown_alpha else "")
                     + f"\n{int((self_weights == 0).sum())} exact zeros (grey)")
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("key (item id)")
        ax.set_ylabel("query (item id)")
        fig.colorbar(image, ax=ax, fraction=0.046)
        target_weights = weights["target_weights"][None, :]
        ax = axes[1, column]
        ax.imshow(np.ma.masked_equal(target_weights, 0.0), cmap=cmap, vmin=0, vmax=1, aspect="auto")
        ax.set_title(f"target attention, {name}" + (f" (α₂ = {a2:.4f})" if shown_alpha else ""))
        ax.set_xticks(range(len(session)), labels[:-1], rotation=90, fontsize=7)
        ax.set_yticks([])
    fig.suptitle(f"test sample {test_index}: session of {len(session)} items, next item {int(target[0])}")
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return {"out": str(out_path), "session": session, "target": int(target[0]),
            "panels": {name: {"alpha_self": float(w["alpha_self"]), "alpha_target": float(w["alpha_target"]),
                              "self_zeros": int((w["self_weights"] == 0).sum()),
                              "target_zeros": int((w["target_weights"] == 0).sum())}
                       for name, w in panels.items()}}
