"""DSAN training throughput with each attention backend, at Retailrocket's shapes.

    PYTHONPATH=. python benchmarks/bench_dsan.py --device cpu
    PYTHONPATH=. python benchmarks/bench_dsan.py --device cuda --data ../shared/data/retailrocket
    PYTHONPATH=. python benchmarks/bench_dsan.py --quick

The same `--warmup` + `--batches` training batches (batch 512, shuffled with a fixed seed) run
through one full training step each -- item-embedding renormalisation, host-to-device copy,
forward, full-catalogue cross-entropy (DSAN.loss), backward, Adam (amsgrad) step, as dsan's
Trainer does -- for every backend: adaptive-entmax (the fused entmax_cuda op; the
self-attention as one fused entmax attention over the sessions packed without padding,
varlen_entmax), adaptive-entmax-padded (the same on the padded batch with a key mask,
scaled_dot_product_entmax: what dsan ran before packing), adaptive-entmax-materialised (the same
with the self-attention's scores materialised and normalised by the entmax op), softmax,
entmax-bisect-lib (the `entmax` library's entmax_bisect, 50 steps) and entmax-reference (the
project's pure-PyTorch bisection, 50 steps). Every backend starts from the same seed and
weights. Only the timed batches count (warm-up excluded); the batch tensors are cut before
timing (numpy indexing, the same for every backend).

Data: the Retailrocket data folder (train.txt, test.txt) if found (--data, or
../shared/data/retailrocket beside the checkout); otherwise synthetic sessions whose lengths
follow Retailrocket's training-session length histogram (embedded below), 36,968 items,
126,168 sessions -> 433,648 prefix samples; the output says which.
Projected epoch time = epoch samples / measured samples per second; the table also gives the
timed batches' mean padded length against the whole epoch's, since attention cost grows with it.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))  # after site-packages: an installed build wins

import common  # noqa: E402

BACKENDS = ["adaptive-entmax", "adaptive-entmax-padded", "adaptive-entmax-materialised", "softmax", "entmax-bisect-lib",
            "entmax-reference"]
MATERIALISED = "-materialised"  # the same normaliser with the self-attention's L x L scores materialised
PADDED = "-padded"  # the fused self-attention on the padded batch (key mask) instead of the packed sessions
EPOCH_SAMPLES_RETAILROCKET = 433_648
RR_ITEMS = 36_968
RR_SESSIONS = 126_168
# Retailrocket (DSAN protocol) train.txt: session length -> number of sessions (126,168 sessions,
# 685,984 clicks, 433,648 prefix samples with min prefix 2, longest 285).
RR_SESSION_LENGTHS = {
    3: 53853, 4: 25349, 5: 14587, 6: 8820, 7: 5720, 8: 3950, 9: 2924, 10: 1990, 11: 1550, 12: 1256, 13: 903,
    14: 710, 15: 603, 16: 470, 17: 410, 18: 332, 19: 256, 20: 215, 21: 205, 22: 162, 23: 177, 24: 146, 25: 124,
    26: 112, 27: 87, 28: 80, 29: 78, 30: 60, 31: 65, 32: 62, 33: 56, 34: 38, 35: 36, 36: 41, 37: 31, 38: 33,
    39: 26, 40: 34, 41: 28, 42: 29, 43: 21, 44: 20, 45: 25, 46: 14, 47: 25, 48: 23, 49: 29, 50: 17, 51: 16,
    52: 13, 53: 16, 54: 13, 55: 13, 56: 13, 57: 16, 58: 7, 59: 11, 60: 12, 61: 11, 62: 5, 63: 11, 64: 8, 65: 6,
    66: 9, 67: 6, 68: 4, 69: 7, 70: 4, 71: 5, 72: 8, 73: 5, 74: 7, 75: 8, 76: 8, 77: 4, 78: 4, 79: 5, 80: 3,
    81: 4, 82: 2, 83: 1, 85: 2, 86: 7, 87: 4, 88: 4, 89: 2, 90: 1, 91: 2, 92: 3, 93: 1, 94: 1, 95: 4, 96: 3,
    98: 1, 99: 3, 100: 2, 101: 3, 102: 5, 103: 3, 104: 4, 106: 1, 107: 1, 108: 1, 109: 6, 112: 3, 115: 2,
    116: 1, 117: 1, 118: 2, 119: 1, 120: 1, 121: 2, 122: 2, 123: 1, 124: 2, 125: 3, 127: 1, 128: 1, 130: 1,
    136: 1, 142: 1, 145: 1, 146: 1, 147: 1, 148: 2, 149: 1, 150: 1, 153: 2, 154: 1, 155: 1, 162: 1, 163: 2,
    169: 1, 171: 1, 176: 1, 177: 1, 178: 1, 187: 1, 191: 1, 192: 1, 195: 1, 197: 1, 207: 1, 213: 1, 218: 1,
    224: 1, 266: 1, 278: 1, 285: 1,
}


def default_data_dir():
    """../shared/data/retailrocket beside the checkout, if it holds the data."""
    candidate = common.REPO_ROOT.parent / "shared" / "data" / "retailrocket"
    return candidate if (candidate / "train.txt").is_file() else None


def synthetic_sessions(seed):
    """Retailrocket-like training sessions: the exact length histogram (shuffled), Zipf item ids."""
    rng = np.random.default_rng(seed)
    lengths = np.repeat(np.array(list(RR_SESSION_LENGTHS), dtype=np.int64),
                        np.array(list(RR_SESSION_LENGTHS.values()), dtype=np.int64))
    rng.shuffle(lengths)
    ranks = np.arange(1, RR_ITEMS + 1, dtype=np.float64)
    popularity = ranks ** -0.8
    popularity /= popularity.sum()
    flat = rng.choice(RR_ITEMS, size=int(lengths.sum()), p=popularity) + 1
    cuts = np.cumsum(lengths)[:-1]
    return [s.tolist() for s in np.split(flat, cuts)], RR_ITEMS, int(lengths.max())


def load_samples(args, log):
    from dsan.data import PrefixSamples, SessionData

    data_dir = None if args.synthetic else (Path(args.data) if args.data else default_data_dir())
    if data_dir is not None:
        data = SessionData.load(data_dir)
        samples = PrefixSamples(data.train_sessions, data.protocol.min_prefix)
        source = f"real data: {data_dir} (train.txt, all training sessions)"
        n_items, longest = data.n_items, data.longest_session
    else:
        sessions, n_items, longest = synthetic_sessions(args.seed)
        samples = PrefixSamples(sessions, 2)
        why = "--synthetic" if args.synthetic else "no data folder found; pass --data DIR for the real data"
        source = f"SYNTHETIC sessions with Retailrocket's session-length histogram ({why})"
    log(f"{source}: {len(samples)} samples, {n_items} items, longest session {longest}")
    return samples, n_items, longest, source


def train_step(model, optimizer, batch, device):
    items, lengths, targets = batch
    items = items.to(device, non_blocking=True)
    lengths = lengths.to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    loss = model.loss(model(items, lengths), targets, reduction="sum")
    optimizer.zero_grad(set_to_none=True)
    (loss / len(targets)).backward()
    optimizer.step()
    return loss.detach()


def padded_self_attention(model, H, is_key, alpha_self, with_weights=False):
    """DSAN.self_attention's fused path on the padded batch (every padded query and key computed, the
    keys masked): the baseline of the packed path."""
    import entmax_cuda
    Q = model.dropout(torch.relu(model.query(H)))
    A = entmax_cuda.scaled_dot_product_entmax(Q[:, None], H[:, None], H[:, None], alpha=alpha_self[:, :, None, None],
                                              attn_mask=is_key[:, None, None, :], scale=1.0 / math.sqrt(model.d))
    return A[:, 0], None


def bench_backend(backend, batches, warmup, n_items, longest, device, seed):
    import types

    from dsan.model import DSAN

    torch.manual_seed(seed)
    variant = next((v for v in (MATERIALISED, PADDED) if backend.endswith(v)), "")
    attention = backend[: len(backend) - len(variant)]
    model = DSAN(n_items, longest, embedding_dim=100, dropout=0.5, wk=20.0, attention=attention).to(device)
    if variant == MATERIALISED:
        model.fused_attention = None  # DSAN.self_attention then materialises the scores
    elif variant == PADDED:
        model.self_attention = types.MethodType(padded_self_attention, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True)
    model.train()
    cuda = device.type == "cuda"
    for batch in batches[:warmup]:
        train_step(model, optimizer, batch, device)
    common.sync(device)
    timed = batches[warmup:]
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    losses, step_times = [], []
    events = []
    t0 = time.perf_counter()
    for batch in timed:
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            losses.append(train_step(model, optimizer, batch, device))
            e.record()
            events.append((s, e))
        else:
            t = time.perf_counter()
            losses.append(train_step(model, optimizer, batch, device))
            step_times.append(time.perf_counter() - t)
    common.sync(device)
    total = time.perf_counter() - t0
    if cuda:
        step_times = [s.elapsed_time(e) / 1e3 for s, e in events]
    n_samples = sum(len(b[2]) for b in timed)
    losses = [float(l) / len(b[2]) for l, b in zip(losses, timed)]
    rec = {"backend": backend, "batches": len(timed), "samples": n_samples, "total_s": total,
           "samples_per_s": n_samples / total, "step": common.summarize(step_times),
           "first_loss": losses[0], "last_loss": losses[-1], "loss_finite": all(math.isfinite(l) for l in losses),
           "peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None}
    del model, optimizer
    if cuda:
        torch.cuda.empty_cache()
    return rec


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--batches", type=int, default=None, help="timed batches per backend (default 20; quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed batches first (default 2; quick 1)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated from {','.join(BACKENDS)}")
    p.add_argument("--data", default=None, help="Retailrocket data folder (train.txt, test.txt)")
    p.add_argument("--synthetic", action="store_true", help="use synthetic sessions even if the data is found")
    p.add_argument("--quick", action="store_true", help="3 timed batches after 1 warm-up")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="out/benchmarks", help="folder for bench_dsan_<device>.{json,md}")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.device_from_arg(args.device)
    n_batches = args.batches or (3 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    backends = args.backends.split(",")
    for b in backends:
        if b not in BACKENDS:
            raise SystemExit(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    log = common.Progress()
    if any(b != "softmax" for b in backends):
        common.import_entmax_cuda()  # the installed build if there is one (see common.py)
    meta = common.metadata(device)
    from dsan.data import batch_index_lists

    samples, n_items, longest, source = load_samples(args, log)
    epoch_samples = len(samples)
    order = batch_index_lists(len(samples), args.batch_size, shuffle=True, seed=args.seed)
    epoch_pad = [int(samples.prefix_length[idx].max()) for idx in order]
    chosen = order[:warmup + n_batches]
    batches = [samples.batch(idx) for idx in chosen]
    timed_pad = [int(b[1].max()) for b in batches[warmup:]]
    log(f"{len(chosen)} batches of {args.batch_size}; padded length of timed batches mean "
        f"{np.mean(timed_pad):.1f} (max {max(timed_pad)}), of the whole epoch mean {np.mean(epoch_pad):.1f}")

    notes = [source]
    results = []
    for backend in backends:
        if backend == "entmax-bisect-lib":
            try:
                import entmax  # noqa: F401
            except Exception as e:  # noqa: BLE001
                notes.append(f"entmax-bisect-lib: skipped, the `entmax` package is not importable ({e})")
                log(notes[-1])
                continue
        log(f"{backend}: {warmup} warm-up + {n_batches} timed batches ...")
        try:
            rec = bench_backend(backend, batches, warmup, n_items, longest, device, args.seed)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc(limit=4, file=sys.stderr)
            notes.append(f"{backend}: failed, {type(e).__name__}: {e}")
            log(notes[-1])
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        rec["epoch_s"] = epoch_samples / rec["samples_per_s"]
        results.append(rec)
        log(f"  {rec['samples_per_s']:.0f} samples/s, projected epoch {rec['epoch_s'] / 60:.1f} min, "
            f"loss {rec['first_loss']:.3f} -> {rec['last_loss']:.3f}")

    by = {r["backend"]: r for r in results}
    for r in results:
        if "softmax" in by:
            r["x_softmax_epoch"] = r["epoch_s"] / by["softmax"]["epoch_s"]
        if "entmax-bisect-lib" in by:
            r["speedup_bisect_lib"] = by["entmax-bisect-lib"]["epoch_s"] / r["epoch_s"]

    cuda = device.type == "cuda"
    headers = ["backend", "samples/s", "ms/batch median (p10–p90)", "projected epoch", "epoch ×softmax",
               "speed-up vs entmax-bisect-lib"] + (["peak MB"] if cuda else []) + ["loss first → last"]
    rows = []
    for r in results:
        s = r["step"]
        row = [r["backend"], f"{r['samples_per_s']:.0f}",
               f"{common.fmt(s['median_ms'])} ({common.fmt(s['p10_ms'], 2)}–{common.fmt(s['p90_ms'], 2)})",
               f"{r['epoch_s'] / 60:.2f} min", common.fmt(r.get("x_softmax_epoch")),
               common.fmt(r.get("speedup_bisect_lib"))]
        if cuda:
            row.append(common.fmt(r["peak_mb"]))
        row.append(f"{r['first_loss']:.3f} → {r['last_loss']:.3f}" + ("" if r["loss_finite"] else " **NaN!**"))
        rows.append(row)
    table = common.markdown_table(headers, rows)
    info = [f"- data: {source}",
            f"- epoch: {epoch_samples} samples ({math.ceil(epoch_samples / args.batch_size)} batches of "
            f"{args.batch_size}); timed {n_batches} batches after {warmup} warm-up, the same for every backend",
            f"- padded length (longest prefix in the batch): timed batches mean {np.mean(timed_pad):.1f}, "
            f"max {max(timed_pad)}; whole epoch mean {np.mean(epoch_pad):.1f}, max {max(epoch_pad)}"]
    meta["epoch_samples"] = epoch_samples
    payload = {"metadata": meta, "config": {"batches": n_batches, "warmup": warmup, "batch_size": args.batch_size,
                                            "backends": backends, "seed": args.seed, "data": source,
                                            "timed_padded_lengths": timed_pad,
                                            "epoch_mean_padded_length": float(np.mean(epoch_pad))},
               "notes": notes, "results": results}
    out = Path(args.out)
    common.write_json(out / f"bench_dsan_{device.type}.json", payload)
    md = ([f"# bench_dsan on {meta['device_name']}", ""] + common.metadata_lines(meta) + info
          + [f"- note: {n}" for n in notes[1:]] + ["", table, ""])
    (out / f"bench_dsan_{device.type}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {out / f'bench_dsan_{device.type}.json'}, {out / f'bench_dsan_{device.type}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
