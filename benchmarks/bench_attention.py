"""Benchmark of the fused alpha-entmax attention (entmax_cuda.scaled_dot_product_entmax).

    PYTHONPATH=. python benchmarks/bench_attention.py --device cpu      # CPU plan: L 512-4096, D 64, f32 (minutes)
    PYTHONPATH=. python benchmarks/bench_attention.py --device cuda     # GPU plan: L 512-32768, D 64/128, bf16/f16
    PYTHONPATH=. python benchmarks/bench_attention.py --quick           # 2 lengths, one of everything else

Methods:
  fused      entmax_cuda.scaled_dot_product_entmax (this package)
  fused_simt the same with ENTMAX_ATTENTION_PATH=simt (CUDA; not run unless named in --methods): the
             CUDA-core path against the tensor-core one
  composite  entmax_cuda.entmax(q @ k^T * scale (+ causal mask), alpha) @ v: the score matrix in memory
  sdpa       torch.nn.functional.scaled_dot_product_attention (softmax): the flash backend on CUDA,
             the math backend on CPU
  adasplash  AdaSplash's `adasplash(q, k, v, alpha=1.5, is_causal=...)` (CUDA, alpha 1.5, fixed alpha
             only; skipped with the reason when it is not importable or refuses a case)
Cases: length L (Lq = Lk), head dim D, causal or not, dtype, inputs, alpha:
  inputs  random: q, k, v ~ N(0, 1) (scores of standard deviation 1 at scale 1/sqrt(D));
          local: rotary-like features whose scores peak at j = i (up to 8), plus noise: most blocks far
          from the diagonal are exactly zero for alpha > 1 (high block sparsity)
  alpha   1.5: a fixed float; head: a learnable per-head tensor (linspace 1.3..1.7) whose gradient is
          computed too (the cost of learning alpha; methods without an alpha gradient skip it)
Each case measures forward (no_grad) and forward+backward (grads of q, k, v and a tensor alpha) with
common.time_fn (median, p10-p90), CUDA peak memory of forward+backward, nominal TFLOP/s (dense
attention's count: 4 B H L^2 D forward, 2.5x that backward, halved when causal; the same count
for every method, so it compares times), and for the fused method the measured block sparsity
(share of the blocks a dense kernel computes that the block map skips) and the threshold
evaluations per row (mean, and the mean over query tiles of their max: a tile's pass count).
Before timing, the composite's and AdaSplash's outputs are compared once with the fused one (max |diff|).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))  # after site-packages: an installed build wins

import common  # noqa: E402

METHODS = ["fused", "composite", "sdpa", "adasplash"]
EXTRA_METHODS = ["fused_simt"]  # run only when named in --methods
METHOD_ENV = {"fused_simt": {"ENTMAX_ATTENTION_PATH": "simt"}}  # set while the method is measured
ALPHA_MODES = ["1.5", "head"]
INPUTS = ["random", "local"]
PLANS = {  # lengths, head dims, dtypes, batch, heads
    "cpu": {"lengths": [512, 2048, 4096], "dims": [64], "dtypes": ["float32"], "batch": 1, "heads": 2},
    "cuda": {"lengths": [512, 1024, 2048, 4096, 8192, 16384, 32768], "dims": [64, 128],
             "dtypes": ["bfloat16", "float16"], "batch": 1, "heads": 16},
}
QUICK_LENGTHS = {"cpu": [512, 2048], "cuda": [1024, 8192]}
LOCAL_PEAK = 8.0  # the local inputs' largest score
COMPOSITE_MEMORY_FRACTION = 0.8  # CUDA: skip the composite where its score matrices exceed this share of free memory
CPU_COMPOSITE_LIMIT_BYTES = 8 * 2**30


# ---------------------------------------------------------------- inputs


def make_inputs(kind, B, H, L, D, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    else:
        omega = 0.05 + 0.95 * torch.rand(B, H, 1, D // 2, generator=g, dtype=torch.float64)
        angle = omega * torch.arange(L, dtype=torch.float64).reshape(1, 1, L, 1)
        k = torch.cat([angle.cos(), angle.sin()], -1) * math.sqrt(LOCAL_PEAK * math.sqrt(D) / (D // 2))
        q = k + 0.1 * torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
        v = torch.randn(B, H, L, D, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def alpha_of(mode, H, device):
    """(alpha for the call, needs grad)."""
    if mode == "head":
        return torch.linspace(1.3, 1.7, H, device=device).requires_grad_(), True
    return float(mode), False


# ---------------------------------------------------------------- methods


def build_methods(device):
    """{name: fn(q, k, v, alpha, causal)} of the importable methods, {name: reason} of the others."""
    entmax_cuda = common.import_entmax_cuda()
    methods, unavailable = {}, {}

    def fused(q, k, v, alpha, causal):
        return entmax_cuda.scaled_dot_product_entmax(q, k, v, alpha, is_causal=causal)

    def composite(q, k, v, alpha, causal):
        s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        if causal:
            L = s.shape[-1]
            s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
        a = alpha.reshape(-1, 1, 1) if torch.is_tensor(alpha) else alpha
        return entmax_cuda.entmax(s, a, dim=-1) @ v

    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.FLASH_ATTENTION if device.type == "cuda" else SDPBackend.MATH

    def sdpa(q, k, v, alpha, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    methods.update(fused=fused, fused_simt=fused, composite=composite, sdpa=sdpa)
    if device.type != "cuda":
        unavailable["adasplash"] = "CUDA only"
    else:
        try:
            from adasplash import adasplash as _adasplash

            def adasplash(q, k, v, alpha, causal):
                return _adasplash(q, k, v, alpha=1.5, is_causal=causal)

            methods["adasplash"] = adasplash
        except Exception as e:  # noqa: BLE001
            unavailable["adasplash"] = f"adasplash is not importable ({type(e).__name__}: {e})"
    return methods, unavailable


def not_planned(method, alpha_mode, L, B, H, dtype, device):
    """None if the method runs this case, else why not."""
    if method in ("sdpa", "adasplash") and alpha_mode != "1.5":
        return "fixed alpha only (no alpha gradient)"
    if method == "fused_simt" and device.type != "cuda":
        return "CUDA only (the CPU kernel has one path)"
    if method == "sdpa" and device.type == "cuda" and dtype not in (torch.float16, torch.bfloat16):
        return "flash backend: float16/bfloat16 only"
    if method == "composite":
        need = 6 * B * H * L * L * max(4, torch.empty((), dtype=dtype).element_size())  # scores, p, grads
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
            if need > COMPOSITE_MEMORY_FRACTION * free:
                return f"score matrices need ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"
        elif need > CPU_COMPOSITE_LIMIT_BYTES:
            limit = CPU_COMPOSITE_LIMIT_BYTES / 2**30
            return f"score matrices need ~{need / 2**30:.0f} GiB (CPU limit {limit:.0f} GiB)"
    return None


# ---------------------------------------------------------------- one case


def nominal_flops(B, H, L, D, causal):
    fwd = 4 * B * H * L * L * D / (2 if causal else 1)
    return fwd, 3.5 * fwd


def fused_diagnostics(q, k, v, alpha, causal):
    """Block sparsity and threshold evaluations of the fused forward on these inputs."""
    from entmax_cuda import attention_ops

    B, H, L, D = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    a = torch.as_tensor(alpha.detach() if torch.is_tensor(alpha) else alpha, dtype=acc, device=q.device)
    rows = (a.reshape(1, -1, 1) if a.dim() == 1 else a).expand(B, H, L).contiguous()
    with torch.no_grad():
        _, stats, block_map = attention_ops.forward_op(q, k, v, rows, None, 1 if causal else 0, D ** -0.5)
    nq, nk = block_map.shape[-2:]
    if causal:  # the blocks a dense causal kernel computes: key tiles up to each query tile's diagonal
        last_row = torch.clamp((torch.arange(nq) + 1) * attention_ops.BLOCK_Q, max=L) - 1
        visible = torch.arange(nk).reshape(1, nk) * attention_ops.BLOCK_K <= last_row.reshape(nq, 1)
    else:
        visible = torch.ones(nq, nk, dtype=torch.bool)
    visible = visible.to(block_map.device)
    active = (block_map.bool() & visible).sum().item()
    total = visible.sum().item() * B * H
    evaluations = stats[:, :, 3].float()
    pad = (-L) % attention_ops.BLOCK_Q
    tiles = F.pad(evaluations, (0, pad)).reshape(B, H, -1, attention_ops.BLOCK_Q).amax(-1)
    return {"block_sparsity": 1.0 - active / total, "evaluations_mean": evaluations.mean().item(),
            "tile_passes_mean": tiles.mean().item()}


@contextlib.contextmanager
def environment(variables):
    """os.environ with `variables` set, restored after (the kernels read their switches per call)."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_case(name, fn, case, inputs, device, reps, reference):
    with environment(METHOD_ENV.get(name, {})):
        return _run_case(name, fn, case, inputs, device, reps, reference)


def _run_case(name, fn, case, inputs, device, reps, reference):
    B, H, L, D, causal, alpha_mode = (case[k] for k in ("B", "H", "L", "D", "causal", "alpha"))
    q, k, v = inputs
    alpha, alpha_grad = alpha_of(alpha_mode, H, device)
    rec = dict(case, method=name)

    def fwd():
        with torch.no_grad():
            return fn(q, k, v, alpha, causal)

    leaves = [t.detach().requires_grad_() for t in (q, k, v)] + ([alpha] if alpha_grad else [])
    grad_out = torch.randn_like(q)

    def fwd_bwd():
        out = fn(*leaves[:3], alpha, causal)
        return torch.autograd.grad(out, leaves, grad_out)

    common.sync(device)
    t0 = time.perf_counter()
    out = fwd()
    common.sync(device)
    first = time.perf_counter() - t0
    if reference is not None and name in ("composite", "adasplash", "fused_simt"):  # the same function, same inputs
        rec["max_abs_diff_vs_fused"] = (out.float() - reference.float()).abs().max().item()
    del out
    rec["fwd"] = common.time_fn(fwd, device, first_time_s=first, **reps)
    rec["fwd_bwd"] = common.time_fn(fwd_bwd, device, **reps)
    rec["peak_mb_fwd_bwd"] = common.measure_peak_memory(fwd_bwd, device)
    flops_fwd, flops_fwd_bwd = nominal_flops(B, H, L, D, causal)
    rec["tflops_fwd"] = flops_fwd / (rec["fwd"]["median_ms"] * 1e-3) / 1e12
    rec["tflops_fwd_bwd"] = flops_fwd_bwd / (rec["fwd_bwd"]["median_ms"] * 1e-3) / 1e12
    if name == "fused":
        rec.update(fused_diagnostics(q, k, v, alpha, causal))
    return rec


# ---------------------------------------------------------------- tables, plot


def _ms(s):
    return f"{common.fmt(s['median_ms'])} ({common.fmt(s['p10_ms'], 2)}–{common.fmt(s['p90_ms'], 2)})"


def add_ratios(results):
    key = ("inputs", "dtype", "D", "causal", "L", "alpha")
    by = {tuple(r[k] for k in key) + (r["method"],): r for r in results}
    for r in results:
        for other in ("composite", "sdpa"):
            o = by.get(tuple(r[k] for k in key) + (other,))
            if o is None and other == "sdpa":  # sdpa runs at alpha 1.5 only: compare the head mode with it too
                o = by.get(tuple(r[k] for k in key[:-1]) + ("1.5", other))
            if o is not None and r["method"] == "fused":
                for mode in ("fwd", "fwd_bwd"):
                    r[f"x_{other}_{mode}"] = r[mode]["median_ms"] / o[mode]["median_ms"]


def table(results, device):
    cuda = device.type == "cuda"
    headers = ["inputs", "dtype", "D", "causal", "L", "α", "method", "fwd ms (p10–p90)", "fwd+bwd ms (p10–p90)",
               "fwd TFLOP/s", "f+b TFLOP/s", "fused ÷ composite fwd / f+b", "fused ÷ SDPA fwd / f+b",
               "block sparsity", "evals/row (tile)"]
    if cuda:
        headers.append("peak MB f+b")
    headers.append("max |Δ| vs fused")
    rows = []
    for r in results:
        fused = r["method"] == "fused"
        row = [r["inputs"], r["dtype"], r["D"], "yes" if r["causal"] else "no", r["L"], r["alpha"], r["method"],
               _ms(r["fwd"]), _ms(r["fwd_bwd"]), common.fmt(r["tflops_fwd"]), common.fmt(r["tflops_fwd_bwd"]),
               f"{common.fmt(r.get('x_composite_fwd'))} / {common.fmt(r.get('x_composite_fwd_bwd'))}" if fused else "",
               f"{common.fmt(r.get('x_sdpa_fwd'))} / {common.fmt(r.get('x_sdpa_fwd_bwd'))}" if fused else "",
               f"{100 * r['block_sparsity']:.0f}%" if fused else "",
               f"{r['evaluations_mean']:.2f} ({r['tile_passes_mean']:.2f})" if fused else ""]
        if cuda:
            row.append(common.fmt(r.get("peak_mb_fwd_bwd")))
        row.append(f"{r['max_abs_diff_vs_fused']:.1e}" if "max_abs_diff_vs_fused" in r else "")
        rows.append(row)
    return common.markdown_table(headers, rows)


def plot(results, device, path):
    plt = common.pyplot()
    if plt is None:
        return None
    if not results:
        return None
    first = results[0]
    panels = []
    for r in results:
        p = (r["inputs"], r["causal"])
        if p not in panels:
            panels.append(p)
    fig, axes = plt.subplots(2, len(panels), figsize=(4.5 * len(panels), 8), squeeze=False)
    for col, (inputs, causal) in enumerate(panels):
        for row, mode in enumerate(("fwd", "fwd_bwd")):
            ax = axes[row][col]
            for method in METHODS + EXTRA_METHODS:
                for alpha in ALPHA_MODES:
                    pts = sorted((r["L"], r[mode]["median_ms"]) for r in results
                                 if r["method"] == method and r["alpha"] == alpha and r["inputs"] == inputs
                                 and r["causal"] == causal and r["D"] == first["D"] and r["dtype"] == first["dtype"])
                    if pts:
                        ax.plot(*zip(*pts), marker="o", linestyle="-" if alpha == "1.5" else "--",
                                label=f"{method} α={alpha}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("L")
            ax.set_ylabel("ms per call (median)")
            ax.set_title(f"{'forward' if mode == 'fwd' else 'forward+backward'}: {inputs}, "
                         f"{'causal' if causal else 'full'}, D={first['D']}, {first['dtype']}", fontsize=9)
            ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- main


def _csv(text, cast=str):
    return [cast(x) for x in text.split(",")] if text else None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default: cuda if available)")
    p.add_argument("--lengths", type=lambda s: _csv(s, int), default=None, help="comma-separated L (plan default)")
    p.add_argument("--dims", type=lambda s: _csv(s, int), default=None, help="head dims (plan default)")
    p.add_argument("--dtypes", type=_csv, default=None, help="float32,float16,bfloat16,float64 (plan default)")
    p.add_argument("--causal", type=_csv, default=["no", "yes"], help="no,yes (default both)")
    p.add_argument("--inputs", type=_csv, default=INPUTS, help="random,local (default both)")
    p.add_argument("--alphas", type=_csv, default=ALPHA_MODES,
                   help="1.5,head (default both); any number >= 1 is a fixed alpha (SDPA/AdaSplash run at 1.5 only)")
    p.add_argument("--methods", type=_csv, default=METHODS,
                   help=f"from {','.join(METHODS + EXTRA_METHODS)} (default: {','.join(METHODS)})")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="two lengths, first dim and dtype, few repeats")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--min-reps", type=int, default=None, help="default 2 CPU, 5 CUDA")
    p.add_argument("--max-reps", type=int, default=None, help="default 20 CPU, 100 CUDA")
    p.add_argument("--budget-s", type=float, default=None, help="timed seconds per measurement (0.5 CPU, 0.3 CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/benchmarks", help="folder for bench_attention_<device>.{json,md,png}")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.device_from_arg(args.device)
    cuda = device.type == "cuda"
    plan = PLANS[device.type]
    lengths = args.lengths or (QUICK_LENGTHS[device.type] if args.quick else plan["lengths"])
    dims = args.dims or (plan["dims"][:1] if args.quick else plan["dims"])
    dtypes = args.dtypes or (plan["dtypes"][:1] if args.quick else plan["dtypes"])
    B, H = args.batch or plan["batch"], args.heads or plan["heads"]
    for m in args.methods:
        if m not in METHODS + EXTRA_METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS + EXTRA_METHODS)}")
    reps = dict(min_reps=args.min_reps or (5 if cuda else 2), max_reps=args.max_reps or (100 if cuda else 20),
                budget_s=args.budget_s or (0.3 if cuda else 0.5))
    log = common.Progress()
    meta = common.metadata(device)
    methods, unavailable = build_methods(device)
    notes = [f"{m}: skipped, {unavailable[m]}" for m in args.methods if m in unavailable]
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    if "adasplash" in methods:
        import adasplash

        meta["adasplash"] = getattr(adasplash, "__version__", "installed")
    config = {"lengths": lengths, "dims": dims, "dtypes": dtypes, "causal": args.causal, "inputs": args.inputs,
              "alphas": args.alphas, "methods": [m for m in args.methods if m in methods], "batch": B, "heads": H,
              "local_peak": LOCAL_PEAK, **reps, "seed": args.seed}
    out = Path(args.out)
    stem = f"bench_attention_{device.type}"
    results, skipped = [], []
    log(f"threads {torch.get_num_threads()}, torch {torch.__version__}, B={B} H={H}, L {lengths}, D {dims}, "
        f"{dtypes}, methods {config['methods']}")

    def save():
        add_ratios(results)
        common.write_json(out / f"{stem}.json", {"metadata": meta, "config": config, "notes": notes,
                                                 "results": results, "skipped": skipped})
        md = [f"# bench_attention on {meta['device_name']}", ""] + common.metadata_lines(meta) + [""]
        md += [f"- note: {n}" for n in notes] + ["", table(results, device), ""]
        (out / f"{stem}.md").write_text("\n".join(md) + "\n")

    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for D in dims:
            for inputs_kind in args.inputs:
                for causal in (c == "yes" for c in args.causal):
                    for L in lengths:
                        inputs = make_inputs(inputs_kind, B, H, L, D, dtype, device, args.seed)
                        for alpha_mode in args.alphas:
                            case = {"inputs": inputs_kind, "dtype": dtype_name, "D": D, "causal": causal, "L": L,
                                    "alpha": alpha_mode, "B": B, "H": H}
                            reference = None
                            for name in config["methods"]:
                                reason = not_planned(name, alpha_mode, L, B, H, dtype, device)
                                if reason:
                                    skipped.append(dict(case, method=name, reason=reason))
                                    continue
                                log(f"{inputs_kind} {dtype_name} D={D} causal={causal} L={L} alpha={alpha_mode} "
                                    f"{name} ...")
                                try:
                                    rec = run_case(name, methods[name], case, inputs, device, reps, reference)
                                except Exception as e:  # noqa: BLE001  (OOM, unsupported case) -> recorded
                                    msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                                    traceback.print_exc(limit=2, file=sys.stderr)
                                    skipped.append(dict(case, method=name, reason=f"error {msg}"))
                                    if cuda:
                                        torch.cuda.empty_cache()
                                    continue
                                if name == "fused":
                                    with torch.no_grad():
                                        alpha, _ = alpha_of(alpha_mode, H, device)
                                        reference = methods["fused"](*inputs, alpha, causal)
                                results.append(rec)
                                extra = (f", sparsity {100 * rec['block_sparsity']:.0f}%, evals "
                                         f"{rec['evaluations_mean']:.2f}" if name == "fused" else "")
                                log(f"  fwd {rec['fwd']['median_ms']:.4g} ms, fwd+bwd "
                                    f"{rec['fwd_bwd']['median_ms']:.4g} ms{extra}")
                                save()
                            del reference
                        del inputs
                        if cuda:
                            torch.cuda.empty_cache()
    save()
    png = plot(results, device, out / f"{stem}.png")
    print(f"# bench_attention on {meta['device_name']}\n")
    print("\n".join(common.metadata_lines(meta)))
    for n in notes:
        print(f"- note: {n}")
    print()
    print(table(results, device))
    print("\nTimes: median (p10–p90) per call; fwd under no_grad, fwd+bwd = forward then autograd.grad of q, k, v "
          "(and alpha in the head mode). TFLOP/s: dense attention's nominal FLOPs (4·B·H·L²·D forward, 3.5x for "
          "forward+backward, halved when causal). block sparsity: share of the blocks a dense kernel computes "
          "that the fused block map skips. evals/row: threshold evaluations per row, the output pass included "
          "(in brackets: the mean over query tiles of their largest). max |Δ| vs fused: output difference "
          "(composite, AdaSplash, fused_simt).")
    if skipped:
        by_reason = {}
        for s in skipped:
            by_reason.setdefault(f"{s['method']}: {s['reason']}", []).append(f"L={s['L']}")
        print("\nNot measured:")
        for reason, items in by_reason.items():
            print(f"- {reason} ({len(items)} cases)")
    print(f"\nwrote {out / (stem + '.json')}, {out / (stem + '.md')}" + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
