"""Before/after comparison of bench_entmax.py results: a Markdown table and a roofline-style plot.

    python benchmarks/compare.py before=OLD.json after=NEW.json --out DIR [--method fused]

For every (shape, alpha) the table gives, per run, the fused op's time, its ratio to softmax
of the same run and the share of the copy bandwidth measured in that run (bytes: read x +
write y forward, read y and dy + write dx backward), forward and backward. The plot shows
the achieved GB/s of the fused op and of softmax per case against the run's copy bandwidth
(the ceiling a normaliser that reads and writes each entry once can approach) and the 60 %
line of the issue's target.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TARGET_SHARE = 0.60  # the operator's target: >= 60 % of copy bandwidth on every shape of >= 64 MB


def load(spec):
    label, _, path = spec.partition("=")
    if not path:
        raise SystemExit(f"expected LABEL=path.json, got {spec!r}")
    data = json.loads(Path(path).read_text())
    return label, data


def index(data):
    return {(r["shape"], r["alpha"], r["method"]): r for r in data["results"] if "fwd" in r}


def cases(runs):
    seen = []
    for _, data in runs:
        for r in data["results"]:
            key = (r["shape"], r["alpha"])
            if "fwd" in r and key not in seen:
                seen.append(key)
    return seen


def cell(r, mode, soft):
    if r is None:
        return "—"
    ms = r[mode]["median_ms"]
    text = common.fmt(ms)
    if soft is not None:
        text += f" ({common.fmt(ms / soft[mode]['median_ms'], 2)}×)"
    share = r.get(f"pct_copy_{mode}")
    if share is not None:
        text += f", {common.fmt(share, 2)} %"
    return text


def table(runs, method):
    headers = ["shape", "α"]
    for label, _ in runs:
        headers += [f"{label}: fwd ms (×softmax, % copy)", f"{label}: bwd ms (×softmax, % copy)"]
    rows = []
    indexed = [(label, index(data)) for label, data in runs]
    for shape, alpha in cases(runs):
        row = [shape, alpha]
        for _, ix in indexed:
            r = ix.get((shape, alpha, method))
            soft = ix.get((shape, alpha, "softmax"))
            row += [cell(r, "fwd", soft), cell(r, "bwd", soft)]
        rows.append(row)
    return common.markdown_table(headers, rows)


def plot(runs, method, path):
    plt = common.pyplot()
    if plt is None:
        return None
    keys = cases(runs)
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.8 * len(keys) + 3), 8), sharex=True)
    markers = ["o", "s", "^", "D"]
    for ax, mode, title in ((axes[0], "fwd", "forward (read x, write y)"),
                            (axes[1], "bwd", "backward (read y and dy, write dx)")):
        for k, (label, data) in enumerate(runs):
            ix = index(data)
            copy = data["metadata"].get("copy_bandwidth_gbs")
            for name, color in ((method, "C0"), ("softmax", "C1")):
                xs = [i for i, (s, a) in enumerate(keys) if (s, a, name) in ix]
                ys = [ix[(keys[i][0], keys[i][1], name)][f"gbs_{mode}"] for i in xs]
                ax.plot([x + 0.1 * (k - len(runs) / 2) for x in xs], ys, markers[k % len(markers)], color=color,
                        label=f"{name} ({label})", fillstyle="full" if k == len(runs) - 1 else "none")
            if copy:
                ax.axhline(copy, color="k", lw=0.8, ls=["-", "--", ":", "-."][k % 4])
                ax.axhline(TARGET_SHARE * copy, color="gray", lw=0.6, ls=["-", "--", ":", "-."][k % 4])
                ax.text(len(keys) - 0.5, copy, f"copy {copy:.0f} GB/s ({label})", fontsize=7, va="bottom", ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("achieved GB/s")
        ax.set_title(f"{title}: {method} vs softmax; lines: copy bandwidth and {int(TARGET_SHARE * 100)} % of it")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[1].set_xticks(range(len(keys)))
    axes[1].set_xticklabels([f"{s}\nα={a}" for s, a in keys], rotation=45, ha="right", fontsize=8)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="LABEL=bench_entmax_<device>.json, in order (e.g. before=... after=...)")
    p.add_argument("--method", default="fused", help="the method compared against softmax (default: fused)")
    p.add_argument("--out", default="out/benchmarks", help="folder for compare_<method>.{md,png}")
    args = p.parse_args(argv)
    runs = [load(spec) for spec in args.runs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for label, data in runs:
        meta = data["metadata"]
        lines.append(f"- {label}: {meta.get('device_name')}, torch {meta.get('torch')}, threads {meta.get('threads')}, "
                     f"{meta.get('date_utc')}, commit {meta.get('git_commit')}, copy bandwidth "
                     f"{meta.get('copy_bandwidth_gbs')} GB/s, `{meta.get('command')}`")
    md = "\n".join(lines) + "\n\n" + table(runs, args.method) + "\n"
    (out / f"compare_{args.method}.md").write_text(md)
    print(md)
    png = plot(runs, args.method, out / f"compare_{args.method}.png")
    print(f"wrote {out / f'compare_{args.method}.md'}" + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
