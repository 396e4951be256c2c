"""A small byte-level language model trained twice, with learned per-head alpha-entmax
attention and with softmax attention, to see alpha learned per head (Correia, Niculae &
Martins, "Adaptively Sparse Transformers", EMNLP 2019).

    python examples/sparse_lm.py                      # both runs, defaults: about 15 min on 2 CPU cores
    python examples/sparse_lm.py --steps 50 --out runs/try

The corpus is the Python standard library's own source (every machine has it; tests and
site-packages left out), split by file into training and validation (a file goes to
validation when the SHA-256 of its relative path ends in a byte below 26, about 10 %).
Each run prints validation bits per byte (= per character: the sources are nearly all
ASCII) and training tokens per second; the plots go to OUT/: alpha per head over training
(alpha.png), the share of exactly-zero attention weights per layer (sparsity.png) and the
attention of the heads with the largest and the smallest alpha on a sentence-like snippet
(attention_map.png); the numbers to OUT/summary.json.

Checkpoints: OUT/<run>/checkpoint.pt every --checkpoint-every steps (written whole or not
at all); running the same command again resumes from it (a run already finished is
reported, not repeated); different settings in the same OUT are refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import entmax_cuda

RUNS = ("entmax", "softmax")
SNIPPET = b'    """Return the number of items in the queue, or zero when it is empty."""'


# ---------------------------------------------------------------- data


def stdlib_sources() -> tuple[bytes, bytes, int]:
    """(training bytes, validation bytes, number of files) of the standard library's .py files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    train, valid, n = [], [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip & set(rel.parts[:-1]):
            continue
        try:
            text = path.read_bytes()
        except OSError:
            continue
        n += 1
        (valid if hashlib.sha256(rel.as_posix().encode()).digest()[-1] < 26 else train).append(text)
    if not train or not valid:
        raise SystemExit(f"sparse_lm: found no Python sources under {root}")
    return b"\n".join(train), b"\n".join(valid), n


def windows(data: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = (starts[:, None] + torch.arange(context + 1)).to(data.device)
    chunk = data[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


# ---------------------------------------------------------------- model


class Block(nn.Module):
    def __init__(self, width: int, heads: int, attention: str, alpha_init: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        # Entmax attention with alpha = 1 + sigmoid(a) learned per head; softmax: torch's SDPA.
        self.attn = entmax_cuda.EntmaxAttention(heads, alpha_init=alpha_init) if attention == "entmax" else None

    def split(self, x):
        B, L, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return q, k, v  # each (B, heads, L, head_dim)

    def forward(self, x):
        q, k, v = self.split(x)
        if self.attn is not None:
            y = self.attn(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).flatten(2))
        return x + self.mlp(self.norm2(x))

    def weights(self, x) -> torch.Tensor:
        """The attention weights (B, heads, L, L), formed in full: for the plots only."""
        q, k, _ = self.split(x)
        L = q.shape[-2]
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=x.device).tril(), float("-inf"))
        if self.attn is None:
            return torch.softmax(scores, -1)
        return entmax_cuda.entmax(scores, self.attn.alpha().reshape(-1, 1, 1), dim=-1)


class ByteLM(nn.Module):
    def __init__(self, layers: int, heads: int, width: int, context: int, attention: str, alpha_init: float):
        super().__init__()
        self.embed, self.position = nn.Embedding(256, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads, attention, alpha_init) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        for m in self.modules():  # GPT-2's initialisation: small weights, so the first logits are near uniform
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def hidden(self, ids):
        return self.embed(ids) + self.position(torch.arange(ids.shape[1], device=ids.device))

    def forward(self, ids):
        x = self.hidden(ids)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.T  # output layer tied to the byte embeddings

    @torch.no_grad()
    def attention_weights(self, ids) -> list[torch.Tensor]:
        x, out = self.hidden(ids), []
        for block in self.blocks:
            out.append(block.weights(x))
            x = block(x)
        return out

    def alphas(self) -> list[list[float]]:
        return [block.attn.alpha().tolist() if block.attn is not None else [1.0] * block.heads
                for block in self.blocks]


# ---------------------------------------------------------------- training


def settings_of(args, run: str) -> dict:
    keys = ("steps", "batch", "context", "layers", "heads", "width", "lr", "alpha_lr", "alpha_init", "seed",
            "eval_every", "eval_windows")
    return {"run": run, **{k: getattr(args, k) for k in keys}}


def save_atomically(state: dict, path: Path):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@torch.no_grad()
def evaluate(model, valid, starts, context, batch) -> float:
    """Validation bits per byte over fixed windows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(starts), batch):
        x, y = windows(valid, starts[i:i + batch], context)
        total += F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count / math.log(2)


@torch.no_grad()
def zero_share(model, probe) -> list[float]:
    """Per layer: the share of exactly-zero weights among the causally visible ones."""
    L = probe.shape[1]
    visible = torch.ones(L, L, dtype=torch.bool, device=probe.device).tril()
    return [(w[..., visible] == 0).float().mean().item() for w in model.attention_weights(probe)]


def progress(total: int, start: int, desc: str):
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
            return tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True, leave=False)
        except ImportError:
            pass
    return None


def train(args, run: str, train_data, valid_data, out: Path) -> dict:
    folder = out / run
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "checkpoint.pt"
    settings = settings_of(args, run)
    torch.manual_seed(args.seed)
    model = ByteLM(args.layers, args.heads, args.width, args.context, run, args.alpha_init).to(args.device)
    alpha_params = [p for n, p in model.named_parameters() if n.endswith("alpha_logit")]
    others = [p for n, p in model.named_parameters() if not n.endswith("alpha_logit")]
    groups = [{"params": others, "lr": args.lr}] + ([{"params": alpha_params, "lr": args.alpha_lr}]
                                                    if alpha_params else [])
    optimiser = torch.optim.AdamW(groups, weight_decay=0.0)
    sampler = torch.Generator().manual_seed(args.seed)
    eval_gen = torch.Generator().manual_seed(args.seed + 1)
    eval_starts = torch.randint(0, len(valid_data) - args.context - 1, (args.eval_windows,), generator=eval_gen)
    probe = windows(valid_data, eval_starts[:8], args.context)[0]
    state = {"step": 0, "history": [], "train_seconds": 0.0, "tokens": 0}
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["settings"] != settings:
            raise SystemExit(f"sparse_lm: {path} was written with other settings ({saved['settings']}); "
                             "use another --out")
        model.load_state_dict(saved["model"])
        optimiser.load_state_dict(saved["optimiser"])
        sampler.set_state(saved["sampler"])
        state = saved["state"]
        done = "finished earlier, not repeated" if state["step"] >= args.steps else "resuming"
        print(f"[{run}] {done}: step {state['step']} of {args.steps} ({path})")
    bar = progress(args.steps, state["step"], run)

    def record():
        entry = {"step": state["step"], "valid_bpc": evaluate(model, valid_data, eval_starts, args.context,
                                                              args.batch),
                 "alpha": model.alphas(), "zero_share": zero_share(model, probe)}
        state["history"].append(entry)
        return entry

    def checkpoint():
        save_atomically({"settings": settings, "model": model.state_dict(), "optimiser": optimiser.state_dict(),
                         "sampler": sampler.get_state(), "state": state}, path)

    if not state["history"]:
        record()
    model.train()
    while state["step"] < args.steps:
        started = time.perf_counter()
        starts = torch.randint(0, len(train_data) - args.context - 1, (args.batch,), generator=sampler)
        x, y = windows(train_data, starts, args.context)
        for group, base in zip(optimiser.param_groups, (args.lr, args.alpha_lr)):  # warm-up, cosine decay
            group["lr"] = base * schedule(state["step"], args.steps)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        state["train_seconds"] += time.perf_counter() - started
        state["tokens"] += y.numel()
        state["step"] += 1
        if bar is not None:
            bar.set_postfix(loss=f"{loss.item() / math.log(2):.3f} bpc")
            bar.update(1)
        if state["step"] % args.eval_every == 0 or state["step"] == args.steps:
            entry = record()
            if bar is None:
                print(f"[{run}] step {state['step']}/{args.steps}  valid {entry['valid_bpc']:.3f} bits/byte  "
                      f"{state['tokens'] / state['train_seconds']:,.0f} tokens/s", flush=True)
        if state["step"] % args.checkpoint_every == 0 or state["step"] == args.steps:
            checkpoint()
    if bar is not None:
        bar.close()
    last = state["history"][-1]
    return {"run": run, "valid_bpc": last["valid_bpc"], "tokens_per_s": state["tokens"] / state["train_seconds"],
            "train_seconds": state["train_seconds"], "alpha": last["alpha"], "zero_share": last["zero_share"],
            "history": state["history"], "model": model}


def schedule(step: int, steps: int) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return (step + 1) / warm
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


# ---------------------------------------------------------------- plots


def plot(results: dict, out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ent = results["entmax"]
    steps = [h["step"] for h in ent["history"]]
    layers = len(ent["alpha"])
    fig, axes = plt.subplots(1, layers, figsize=(3.2 * layers, 3), sharey=True, squeeze=False)
    for layer, ax in enumerate(axes[0]):
        for head in range(len(ent["alpha"][layer])):
            ax.plot(steps, [h["alpha"][layer][head] for h in ent["history"]], label=f"head {head}")
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("step")
        ax.set_ylim(1.0, 2.0)
    axes[0][0].set_ylabel("alpha")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "alpha.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for layer in range(layers):
        ax.plot(steps, [h["zero_share"][layer] for h in ent["history"]], label=f"layer {layer}")
    ax.set_xlabel("step")
    ax.set_ylabel("share of exactly-zero weights")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "sparsity.png", dpi=120)
    plt.close(fig)

    model = ent["model"].eval()
    snippet = SNIPPET[:model.position.num_embeddings]
    ids = torch.tensor(list(snippet), device=next(model.parameters()).device)[None]
    weights = model.attention_weights(ids)
    flat = [(a, layer, head) for layer, row in enumerate(ent["alpha"]) for head, a in enumerate(row)]
    picks = [max(flat), min(flat)]  # the heads with the largest and the smallest alpha
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.4))
    labels = [chr(b) if 32 <= b < 127 else "?" for b in snippet]
    for ax, (alpha, layer, head) in zip(axes, picks):
        w = weights[layer][0, head].cpu().numpy()
        vmin = max(w[w > 0].min(), 1e-4)
        shown = np.where(w > 0, np.maximum(w, vmin), vmin / 10)  # only exact zeros fall below the scale: white
        shown[np.triu(np.ones_like(w, dtype=bool), 1)] = np.nan  # the causally hidden future: grey
        cmap = matplotlib.colormaps["viridis"].with_extremes(under="white", bad="0.8")
        image = ax.imshow(shown, cmap=cmap, norm=matplotlib.colors.LogNorm(vmin=vmin, vmax=1))
        zeros = (w[np.tril(np.ones_like(w, dtype=bool))] == 0).mean()
        ax.set_title(f"layer {layer}, head {head}: alpha = {alpha:.2f}, {100 * zeros:.0f} % of the weights are 0",
                     fontsize=9)
        ax.set_xticks(range(len(labels)), labels, fontsize=5, family="monospace")
        ax.set_yticks(range(len(labels)), labels, fontsize=5, family="monospace")
        fig.colorbar(image, ax=ax, fraction=0.046, label=f"weight (lowest colour: <= {vmin:.0e}; white: exactly 0; grey: future)")
    fig.tight_layout()
    fig.savefig(out / "attention_map.png", dpi=150)
    plt.close(fig)


# ---------------------------------------------------------------- command line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/sparse_lm"), help="results, plots and checkpoints")
    p.add_argument("--runs", default=",".join(RUNS), help="which attentions to train (entmax, softmax or both)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=8, help="windows per step")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--alpha-lr", type=float, default=2e-2,
                   help="learning rate of the alpha logits (larger: alpha settles within a short run)")
    p.add_argument("--alpha-init", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    args = p.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not runs or any(r not in RUNS for r in runs) or len(set(runs)) != len(runs):
        p.error(f"--runs takes entmax, softmax or both, got {args.runs!r}")
    for name in ("steps", "batch", "context", "layers", "heads", "width", "eval_every", "eval_windows",
                 "checkpoint_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.width % args.heads:
        p.error(f"--width ({args.width}) must be a multiple of --heads ({args.heads})")
    if not 1 < args.alpha_init < 2:
        p.error("--alpha-init must lie in (1, 2)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        p.error(f"--device {args.device}: {str(e).splitlines()[0]}")
    train_data, valid_data, n_files = stdlib_sources()
    print(f"corpus: {n_files} files of the Python {sys.version.split()[0]} standard library, "
          f"{len(train_data):,} training and {len(valid_data):,} validation bytes; {torch.get_num_threads()} threads")
    train_data = torch.frombuffer(bytearray(train_data), dtype=torch.uint8).to(device)
    valid_data = torch.frombuffer(bytearray(valid_data), dtype=torch.uint8).to(device)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {run: train(args, run, train_data, valid_data, args.out) for run in runs}
    print(f"{'attention':<10} {'valid bits/byte':>16} {'tokens/s':>10}")
    for run, r in results.items():
        print(f"{run:<10} {r['valid_bpc']:>16.3f} {r['tokens_per_s']:>10,.0f}")
    if "entmax" in results:
        for layer, row in enumerate(results["entmax"]["alpha"]):
            print(f"layer {layer}: alpha {' '.join(f'{a:.2f}' for a in row)}   exactly-zero weights "
                  f"{100 * results['entmax']['zero_share'][layer]:.0f} %")
        plot(results, args.out)
        print(f"plots: {args.out / 'alpha.png'}, {args.out / 'sparsity.png'}, {args.out / 'attention_map.png'}")
    summary = {"python": sys.version.split()[0], "torch": torch.__version__, "threads": torch.get_num_threads(),
               "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
               "settings": vars(args) | {"out": str(args.out)},
               "runs": {run: {k: v for k, v in r.items() if k not in ("model",)} for run, r in results.items()}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
