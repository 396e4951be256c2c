"""First look at the CUDA attention kernels on a GPU: which path and dtype runs, and how far from
the CPU kernel it lands, in seconds, before the test suite.

    python scripts/gpu_smoke_attention.py [--json FILE]     # the installed entmax_cuda
    PYTHONPATH=. python scripts/gpu_smoke_attention.py        # an in-place build

Each path (ENTMAX_ATTENTION_PATH=tensor_core, then simt, then the decode op with its keys split)
runs in a process of its own with a time limit, so a kernel that faults or hangs is named and the other path still reports. Per case:
the largest difference from the CPU kernel on the same inputs (relative to the largest entry) of
the output and the four gradients, the share of block-map entries and of rows' evaluation counts
that differ, and the CUDA forward+backward time. Numbers only: tests/test_attention.py judges them.
Exit status 1 when a case raised, crashed, timed out or gave NaN where the CPU kernel did not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CASE_TIMEOUT_S = 120  # per path process
# (dtype, B, Hq, Hkv, Lq, Lk, D, Dv, causal, key mask) per path; for "decode" (the decode op,
# causal bottom-right, no mask) the causal column holds num_splits (0: the op's choice).
CASES = {
    "tensor_core": [
        ("float16", 1, 2, 2, 130, 200, 64, 64, 0, False),
        ("bfloat16", 2, 4, 2, 300, 500, 64, 64, 1, True),
        ("float16", 1, 2, 1, 257, 190, 128, 128, 2, False),
        ("bfloat16", 1, 2, 2, 100, 150, 200, 200, 1, True),
        ("float16", 1, 1, 1, 70, 300, 256, 3, 0, False),
    ],
    "simt": [
        ("float32", 1, 2, 2, 130, 200, 64, 64, 0, False),
        ("float64", 2, 4, 2, 300, 500, 64, 64, 1, True),
        ("bfloat16", 1, 2, 1, 257, 190, 128, 128, 2, False),
        ("float32", 1, 2, 2, 100, 150, 200, 200, 1, True),
    ],
    "decode": [
        ("bfloat16", 1, 32, 8, 1, 32768, 128, 128, 0, False),
        ("float16", 8, 32, 8, 1, 4096, 128, 128, 0, False),
        ("float32", 2, 8, 2, 3, 5000, 64, 96, 7, False),
        ("float64", 3, 4, 4, 1, 1000, 256, 256, 1, False),
    ],
}
NAMES = ["out", "dq", "dk", "dv", "dalpha"]


def _rel(got, want):
    import torch

    got, want = got.double().cpu(), want.double().cpu()
    if want.numel() == 0:
        return 0.0
    new_nan = (got.isnan() & ~want.isnan()).any().item()
    scale = want.nan_to_num(0, 0, 0).abs().max().clamp(min=1e-30)
    diff = (got - want).nan_to_num(0, 0, 0).abs().max()
    return float("nan") if new_nan else (diff / scale).item()


def _inputs(case):
    """q, k, v, alpha rows of a case, its dtype and the generator that made them (for more)."""
    import torch

    dtype_name, B, Hq, Hkv, Lq, Lk, D, Dv = case[:8]
    dtype = getattr(torch, dtype_name)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(B, Hq, Lq, D, generator=g, dtype=torch.float64) * 1.5).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, Lk, Dv, generator=g, dtype=torch.float64).to(dtype)
    alpha = (1 + torch.rand(B, Hq, Lq, generator=g, dtype=torch.float64)).to(acc)
    return q, k, v, alpha, dtype, g


def run_case(case):
    import torch

    from entmax_cuda import attention_ops

    _, B, Hq, Hkv, Lq, Lk, D, Dv, causal, key_mask = case
    q, k, v, alpha, dtype, g = _inputs(case)
    grad_out = torch.randn(B, Hq, Lq, Dv, generator=g, dtype=torch.float64).to(dtype)
    mask = (torch.rand(B, 1, 1, Lk, generator=g) > 0.2).expand(B, Hq, Lq, Lk) if key_mask else None
    scale = D ** -0.5

    def results(device):
        t = [x.to(device) for x in (q, k, v, alpha, grad_out)]
        m = None if mask is None else mask.to(device)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out, stats, block_map = attention_ops.forward_op(*t[:4], m, causal, scale)
        grads = attention_ops.backward_op(t[4], *t[:4], m, causal, scale, stats, block_map, True)
        if device == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        return [x.cpu() for x in (out, stats, block_map, *grads)], ms

    cpu, _ = results("cpu")
    cuda, _ = results("cuda")  # the first call includes the shared-memory attribute set-up
    cuda, ms = results("cuda")
    errors = {name: _rel(a, b) for name, a, b in zip(NAMES, [cuda[0]] + cuda[3:], [cpu[0]] + cpu[3:])}
    return {"errors": errors, "map_differ": cuda[2].ne(cpu[2]).double().mean().item(),
            "evals_differ": cuda[1][:, :, 3].ne(cpu[1][:, :, 3]).double().mean().item(), "cuda_ms": ms}


def run_decode_case(case):
    import torch

    from entmax_cuda import attention_ops

    _, B, Hq, Hkv, Lq, Lk, D, Dv, num_splits, _ = case
    q, k, v, alpha, _, g = _inputs(case)
    used = torch.randint(Lk // 2, Lk + 1, (B,), generator=g, dtype=torch.int32)

    def results(device):
        t = [x.to(device) for x in (q, k, v, alpha, used)]
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out, stats = attention_ops.decode_op(*t[:4], D ** -0.5, None, -1, -1, t[4], num_splits)
        if device == "cuda":
            torch.cuda.synchronize()
        return [out.cpu(), stats.cpu()], (time.perf_counter() - t0) * 1e3

    cpu, _ = results("cpu")
    results("cuda")
    cuda, ms = results("cuda")
    errors = {name: 0.0 for name in NAMES}  # forward only
    errors["out"] = _rel(cuda[0], cpu[0])
    return {"errors": errors, "map_differ": 0.0, "evals_differ": cuda[1][:, :, 3].ne(cpu[1][:, :, 3]).double().mean().item(),
            "cuda_ms": ms}


def worker(path):
    for i, case in enumerate(CASES[path]):
        try:
            rec = {"index": i, "status": "ran", **(run_decode_case(case) if path == "decode" else run_case(case))}
        except Exception as e:  # noqa: BLE001  (reported, the next case still runs)
            rec = {"index": i, "status": f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        print(json.dumps(rec), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write every case's record here")
    p.add_argument("--worker", choices=list(CASES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    records, failed = [], False
    for path, cases in CASES.items():
        env = dict(os.environ, ENTMAX_ATTENTION_PATH="auto" if path == "decode" else path, PYTHONUNBUFFERED="1")
        t0 = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, __file__, "--worker", path], capture_output=True, text=True,
                                  env=env, timeout=CASE_TIMEOUT_S)
            stdout, stderr, ended = done.stdout, done.stderr, f"exit {done.returncode}"
        except subprocess.TimeoutExpired as e:
            stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            ended = f"timed out after {CASE_TIMEOUT_S} s"
        by_index = {}
        for line in stdout.splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                by_index[rec["index"]] = rec
        last_err = (stderr.strip().splitlines() or [""])[-1]
        for i, case in enumerate(cases):
            rec = by_index.get(i, {"index": i, "status": f"not run: the process ended ({ended}) {last_err}".strip()})
            rec.update(path=path, case=dict(zip(["dtype", "B", "Hq", "Hkv", "Lq", "Lk", "D", "Dv", "causal",
                                                  "key_mask"], case)))
            bad = rec["status"] != "ran" or any(e != e for e in rec["errors"].values())
            failed |= bad
            records.append(rec)
        print(f"{path}: {ended}, {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    header = "| path | dtype | B,Hq,Hkv | Lq x Lk | D, Dv | causal | mask | status | " + \
             " | ".join(f"{n} rel. diff" for n in NAMES) + " | map differ | evals differ | CUDA ms |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in records:
        c = r["case"]
        cells = [r["path"], c["dtype"], f"{c['B']},{c['Hq']},{c['Hkv']}", f"{c['Lq']} x {c['Lk']}",
                 f"{c['D']}, {c['Dv']}", str(c["causal"]), "yes" if c["key_mask"] else "no", r["status"]]
        if r["status"] == "ran":
            cells += [f"{r['errors'][n]:.1e}" for n in NAMES]
            cells += [f"{r['map_differ']:.3f}", f"{r['evals_differ']:.3f}", f"{r['cuda_ms']:.1f}"]
        else:
            cells += [""] * (len(NAMES) + 3)
        print("| " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
