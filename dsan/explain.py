"""Heat maps of one test session's attention weights: the learned normaliser beside another
(softmax by default) with the same weights, as the technical appendix's Figures 1 and 2.
Exact zeros are drawn grey."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_model
from .config import read_run_config
from .data import SessionData
from .errors import ConfigError, DataError, require_extra
from .evaluate import check_catalogue
from .files import write_atomically


@torch.no_grad()
def session_attention(model, items, lengths, attention: str) -> dict:
    """The weights (and, for a normaliser that learns alpha, the alphas) of one session."""
    model.set_attention(attention)
    _, weights = model(items, lengths, with_attention=True)
    panel = {name: value[0].cpu().numpy() for name, value in weights.items()}
    if not model.uses_learned_alpha:  # softmax and entmax:A do not use the alpha layer
        del panel["alpha_self"], panel["alpha_target"]
    return panel


def weight_scale(weights: np.ndarray) -> tuple[float, float]:
    """A panel's colour scale (log): from its smallest non-zero weight to 1, so the structure
    among the non-zero weights shows over every decade they span, while nearly equal weights
    keep nearly equal colours; exact zeros are drawn apart (grey)."""
    nonzero = weights[weights > 0]
    low = float(nonzero.min()) if nonzero.size else 1e-6
    return (0.1, 1.0) if low >= 1.0 else (low, 1.0)


def explain(run_dir, out_path, test_index: int | None = None, data_dir=None, attention=None,
            compare_with: str | None = None, protocol=None) -> dict:
    """Draws the figure for test sample `test_index` (prefix-expanded test set order; default:
    the longest test prefix) and returns what it shows. compare_with: the other side's
    normaliser (default softmax; entmax-reference beside a softmax run)."""
    matplotlib = require_extra("matplotlib")
    matplotlib.use("Agg")
    plt = require_extra("matplotlib.pyplot")

    config = read_run_config(run_dir)
    model, state = load_model(run_dir, "best", attention=attention)
    data = SessionData.load(data_dir or config.data, protocol or config.protocol)
    check_catalogue(model, state, data, Path(run_dir) / "best.pt")
    samples = data.samples(data.test_sessions, model.max_session_length, "test set")
    if test_index is None:
        test_index = int(np.argmax(samples.prefix_length))
    if not 0 <= test_index < len(samples):
        raise DataError(f"--test-index {test_index} out of range: the test set has {len(samples)} samples "
                        f"(0..{len(samples) - 1})")
    items, lengths, target = samples.batch([test_index])
    learned_name = model.attention
    compare_with = compare_with or ("entmax-reference" if learned_name == "softmax" else "softmax")
    if compare_with == learned_name:
        raise ConfigError(f"--compare-with {compare_with} is the normaliser shown already; choose another")
    panels = {learned_name: session_attention(model, items, lengths, learned_name),
              compare_with: session_attention(model, items, lengths, compare_with)}

    session = [data.original_id(i) for i in items[0].tolist()]
    labels = [str(i) for i in session] + ["target"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), height_ratios=[4, 1], layout="constrained")
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")  # masked = exact zero
    scales = {}
    for column, (name, weights) in enumerate(panels.items()):
        alphas = "alpha_self" in weights
        self_weights, target_weights = weights["self_weights"], weights["target_weights"][None, :]
        ax = axes[0, column]
        scales[name] = {"self": weight_scale(self_weights), "target": weight_scale(target_weights)}
        image = ax.imshow(np.ma.masked_equal(self_weights, 0.0), cmap=cmap,
                          norm=matplotlib.colors.LogNorm(*scales[name]["self"]))
        ax.set_title(f"self-attention, {name}" + (f" (α₁ = {float(weights['alpha_self']):.4f})" if alphas else "")
                     + f"\n{int((self_weights == 0).sum())} of {self_weights.size} weights exactly zero (grey)")
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("key (item id, click order)")
        ax.set_ylabel("query (item id, click order)")
        fig.colorbar(image, ax=ax, fraction=0.046, label="weight (log scale)")
        ax = axes[1, column]
        image = ax.imshow(np.ma.masked_equal(target_weights, 0.0), cmap=cmap, aspect="auto",
                          norm=matplotlib.colors.LogNorm(*scales[name]["target"]))
        ax.set_title(f"target attention, {name}"
                     + (f" (α₂ = {float(weights['alpha_target']):.4f})" if alphas else "")
                     + f"\n{int((target_weights == 0).sum())} of {target_weights.size} weights exactly zero (grey)")
        ax.set_xticks(range(len(session)), labels[:-1], rotation=90, fontsize=7)
        ax.set_yticks([0], ["β"])
        ax.set_xlabel("item (id, click order)")
        ax.set_ylabel("weight of each item")
        fig.colorbar(image, ax=ax, fraction=0.046, label="weight (log scale)")
    fig.suptitle(f"test sample {test_index}: a session of {len(session)} clicks, "
                 f"next item {data.original_id(int(target[0]))}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomically({out_path: lambda tmp: fig.savefig(tmp, dpi=110, format="png")})
    finally:
        plt.close(fig)
    return {"out": str(out_path), "test_index": test_index, "session": session,
            "target": data.original_id(int(target[0])),
            "panels": {name: {**({"alpha_self": float(w["alpha_self"]), "alpha_target": float(w["alpha_target"])}
                                 if "alpha_self" in w else {}),
                              "scale": scales[name],
                              "self_zeros": int((w["self_weights"] == 0).sum()),
                              "target_zeros": int((w["target_weights"] == 0).sum())}
                       for name, w in panels.items()}}
