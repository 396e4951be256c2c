"""The entmax operator's speed targets, checked on a bench_entmax.py result (JSON), one line per case.

    python benchmarks/targets.py out/benchmarks/bench_entmax_cuda.json

CUDA (every case of the matrix): fused forward <= 1.5x softmax (stretch 1.2x); >= 60 % of the
copy bandwidth on every shape whose x is >= 64 MB; backward <= 1.5x softmax's, with the
alpha-gradient (fused) and without (fused_xgrad); backward faster than AdaSplash's
triton_entmax at alpha 1.5 where it was measured.
CPU: (512,70,70) forward >= 50x entmax_bisect(50) and <= 3x softmax, forward+backward >= 30x
and <= 4x; long rows (64,32768) forward and forward+backward >= 20x entmax_bisect(50).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BIG_BYTES = 64 * 2**20


def median(r, mode):
    return r[mode]["median_ms"]


def check(ok, text):
    print(f"{'PASS' if ok else 'MISS'}  {text}")
    return ok


def cuda_targets(ix, cases):
    ok = True
    for shape, alpha in cases:
        soft = ix.get((shape, alpha, "softmax"))
        fused = ix.get((shape, alpha, "fused"))
        if soft is None or fused is None:
            continue
        ratio = median(fused, "fwd") / median(soft, "fwd")
        ok &= check(ratio <= 1.5, f"{shape} a={alpha}: fwd {ratio:.2f}x softmax (<= 1.5, stretch 1.2)")
        if fused["bytes_fwd"] / 2 >= BIG_BYTES and "pct_copy_fwd" in fused:
            ok &= check(fused["pct_copy_fwd"] >= 60, f"{shape} a={alpha}: fwd {fused['pct_copy_fwd']:.0f} % of copy (>= 60)")
        for name in ("fused", "fused_xgrad"):
            r = ix.get((shape, alpha, name))
            if r is not None:
                b = median(r, "bwd") / median(soft, "bwd")
                ok &= check(b <= 1.5, f"{shape} a={alpha}: {name} bwd {b:.2f}x softmax (<= 1.5)")
        tri = ix.get((shape, alpha, "triton_entmax"))
        if tri is not None:
            for name in ("fused", "fused_xgrad"):
                r = ix.get((shape, alpha, name))
                if r is not None:
                    ok &= check(median(r, "bwd") < median(tri, "bwd"),
                                f"{shape} a={alpha}: {name} bwd {median(r, 'bwd'):.4g} ms vs triton_entmax "
                                f"{median(tri, 'bwd'):.4g} ms (faster)")
    return ok


def cpu_targets(ix, cases):
    ok = True
    for shape, alpha in cases:
        fused, soft, bis = (ix.get((shape, alpha, m)) for m in ("fused", "softmax", "entmax_bisect50"))
        if fused is None:
            continue
        if shape == "dsan-diginetica":
            for mode, most, least in (("fwd", 3.0, 50.0), ("fwd_bwd", 4.0, 30.0)):
                if soft is not None:
                    r = median(fused, mode) / median(soft, mode)
                    ok &= check(r <= most, f"{shape} a={alpha}: {mode} {r:.2f}x softmax (<= {most:g})")
                if bis is not None:
                    s = median(bis, mode) / median(fused, mode)
                    ok &= check(s >= least, f"{shape} a={alpha}: {mode} {s:.1f}x faster than bisect(50) (>= {least:g})")
        if shape == "long-rows" and bis is not None:
            for mode in ("fwd", "fwd_bwd"):
                s = median(bis, mode) / median(fused, mode)
                ok &= check(s >= 20, f"{shape} a={alpha}: {mode} {s:.1f}x faster than bisect(50) (>= 20)")
    return ok


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit(__doc__)
    data = json.loads(Path(argv[0]).read_text())
    ix = {(r["shape"], r["alpha"], r["method"]): r for r in data["results"] if "fwd" in r}
    cases = []
    for r in data["results"]:
        if (r["shape"], r["alpha"]) not in cases:
            cases.append((r["shape"], r["alpha"]))
    cuda = str(data["metadata"].get("device", "")).startswith("cuda")
    ok = cuda_targets(ix, cases) if cuda else cpu_targets(ix, cases)
    print("all targets met" if ok else "some targets missed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
