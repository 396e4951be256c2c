"""Benchmark of the fused adaptive alpha-entmax op against softmax and the alternatives.

    PYTHONPATH=. python benchmarks/bench_entmax.py --device cpu            # CPU plan (see README)
    PYTHONPATH=. python benchmarks/bench_entmax.py --device cuda           # everything on the GPU
    PYTHONPATH=. python benchmarks/bench_entmax.py --quick                 # 3 small shapes, alpha 1.5

Methods: fused (entmax_cuda.entmax), fused_xgrad (the same, alpha without gradient: the backward
forms the x-gradient alone), softmax (torch.softmax), entmax_bisect50 / entmax_bisect25
(the `entmax` library's bisection), entmax15 (the library's exact sort-based 1.5-entmax, alpha 1.5
only), reference50 (entmax_cuda.reference.entmax_bisect_reference, pure PyTorch, 50 steps),
triton_entmax (AdaSplash, CUDA only, alpha 1.5 only, no alpha gradient). Optional baselines that
cannot be imported are skipped with a note.

Each (shape, alpha, method) is measured three ways, float32 by default:
  fwd      forward under torch.no_grad()
  bwd      torch.autograd.grad(y, [x, alpha], dy, retain_graph=True) of one recorded forward
  fwd+bwd  forward with autograd on, then that backward (grads of x and of alpha where the
           method supports an alpha gradient: fused, entmax_bisect*, reference50)
Inputs: x = 2 * randn(shape) (attention logits of standard deviation 2), dy = randn(shape),
alpha a tensor of the shape's alpha shape (per session / per head / per row), filled with the
value, or 'rand' = uniform in [1.02, 1.98] per alpha entry; fixed seeds.
Before timing, each method's output and gradients are compared once against the fused op.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))  # after site-packages: an installed build wins

import common  # noqa: E402

SHAPES = {
    # name: (shape, dim, alpha shape, description)
    "dsan-diginetica": ((512, 70, 70), -1, (512, 1, 1), "DSAN Diginetica self-attention, one alpha per session"),
    "dsan-retailrocket": ((512, 285, 285), -1, (512, 1, 1), "DSAN Retailrocket self-attention, one alpha per session"),
    "target-attention": ((512, 69, 1), 1, (512, 1, 1), "DSAN target attention along dim 1, one alpha per session"),
    "transformer": ((8, 8, 1024, 1024), -1, (1, 8, 1, 1), "transformer attention (B, H, q, k), one alpha per head"),
    "long-rows": ((64, 32768), -1, (64, 1), "long rows, one alpha per row"),
    "catalogue": ((512, 40841), -1, (512, 1), "catalogue-sized rows (Diginetica items), one alpha per row"),
}
ALPHAS = ["1.1", "1.5", "1.9", "rand"]
METHODS = ["fused", "fused_xgrad", "softmax", "entmax_bisect50", "entmax_bisect25", "entmax15", "reference50",
           "triton_entmax"]
SLOW = {"entmax_bisect50", "entmax_bisect25", "reference50", "entmax15"}
QUICK_SHAPES = ["dsan-diginetica", "target-attention", "long-rows"]
QUICK_ALPHAS = ["1.5"]
SMALL_NUMEL = 4_000_000  # CPU plan: slow baselines at every alpha only up to this many entries
X_SCALE = 2.0
RAND_ALPHA = (1.02, 1.98)
# flag (!) a forward max abs difference to the fused op (or a row-sum error) above this
ORACLE_ROWS = 256  # rows of each case checked against the float64 reference (the fused op only)
CHECK_TOL = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


# ---------------------------------------------------------------- methods


class Method:
    def __init__(self, name, fn, alpha_grad, only_alpha=None, devices=("cpu", "cuda"), compare_alpha=None,
                 label=None):
        self.name = name
        self.fn = fn  # fn(x, alpha_tensor, dim) -> y
        self.alpha_grad = alpha_grad
        self.only_alpha = only_alpha  # e.g. "1.5"
        self.devices = devices
        self.compare_alpha = compare_alpha  # the fused op's alpha to compare against (None: the same alpha)
        self.label = label or name


def build_methods(device):
    """{name: Method} of the importable methods, and {name: reason} of the others."""
    methods, unavailable = {}, {}
    entmax_cuda = common.import_entmax_cuda()
    methods["fused"] = Method("fused", lambda x, a, d: entmax_cuda.entmax(x, a, dim=d), True, label="fused entmax_cuda")
    # the same op with alpha not requiring grad: the backward forms the x-gradient alone
    methods["fused_xgrad"] = Method("fused_xgrad", lambda x, a, d: entmax_cuda.entmax(x, a, dim=d), False,
                                    label="fused, x-grad only")
    methods["softmax"] = Method("softmax", lambda x, a, d: torch.softmax(x, dim=d), False, compare_alpha=1.0)
    try:
        import entmax as entmax_lib

        methods["entmax_bisect50"] = Method(
            "entmax_bisect50", lambda x, a, d: entmax_lib.entmax_bisect(x, a, dim=d, n_iter=50), True,
            label="entmax_bisect(50)")
        methods["entmax_bisect25"] = Method(
            "entmax_bisect25", lambda x, a, d: entmax_lib.entmax_bisect(x, a, dim=d, n_iter=25), True,
            label="entmax_bisect(25)")
        methods["entmax15"] = Method("entmax15", lambda x, a, d: entmax_lib.entmax15(x, dim=d), False,
                                     only_alpha="1.5", compare_alpha=1.5)
    except Exception as e:  # noqa: BLE001
        for name in ("entmax_bisect50", "entmax_bisect25", "entmax15"):
            unavailable[name] = f"the `entmax` package is not importable ({type(e).__name__}: {e})"
    from entmax_cuda.reference import entmax_bisect_reference

    methods["reference50"] = Method(
        "reference50", lambda x, a, d: entmax_bisect_reference(x, a, dim=d, n_iter=50), True,
        label="reference(50)")
    if device.type == "cuda":
        try:
            from adasplash import triton_entmax as _triton_entmax

            def triton_fn(x, a, d):
                # triton_entmax works on the last dim of a contiguous tensor; for every shape here
                # movedim(d, -1) is already contiguous, so no copy is made
                xl = x.movedim(d, -1)
                if not xl.is_contiguous():
                    xl = xl.contiguous()
                return _triton_entmax(xl, alpha=1.5).movedim(-1, d)

            methods["triton_entmax"] = Method("triton_entmax", triton_fn, False, only_alpha="1.5",
                                              devices=("cuda",), compare_alpha=1.5,
                                              label="adasplash triton_entmax")
        except Exception as e:  # noqa: BLE001
            unavailable["triton_entmax"] = f"adasplash is not importable ({type(e).__name__}: {e})"
    else:
        unavailable["triton_entmax"] = "CUDA only"
    return methods, unavailable


def planned(method, shape_name, alpha, device, full):
    """None if (method, shape, alpha) is measured, else the reason it is not."""
    if method.only_alpha is not None and alpha != method.only_alpha:
        return f"alpha {method.only_alpha} only"
    if device.type not in method.devices:
        return f"{'/'.join(method.devices)} only"
    if full or device.type == "cuda" or method.name not in SLOW:
        return None
    numel = math.prod(SHAPES[shape_name][0])
    small = numel <= SMALL_NUMEL
    if shape_name == "transformer":
        return "CPU plan: transformer shape with fused and softmax only (--full runs all)"
    if method.name == "entmax_bisect50":
        return None if (small or alpha == "rand") else "CPU plan: on big shapes only at alpha rand (--full runs all)"
    if method.name == "reference50":
        return None if (small and alpha == "rand") else "CPU plan: small shapes, alpha rand only (--full runs all)"
    if method.name in ("entmax_bisect25", "entmax15"):
        return None if small else "CPU plan: small shapes only (--full runs all)"
    return None


# ---------------------------------------------------------------- inputs


def make_inputs(shape_name, alpha, device, dtype, seed):
    shape, dim, alpha_shape, _ = SHAPES[shape_name]
    g = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float32, device=device) * X_SCALE).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float32, device=device).to(dtype)
    if alpha == "rand":
        lo, hi = RAND_ALPHA
        a = lo + (hi - lo) * torch.rand(alpha_shape, generator=g, dtype=torch.float32, device=device)
    else:
        a = torch.full(alpha_shape, float(alpha), dtype=torch.float32, device=device)
    a = a.to(device=device, dtype=dtype if dtype == torch.float64 else torch.float32)
    if dtype in (torch.float16, torch.bfloat16):
        a = a.to(dtype)  # the library expects alpha in x's dtype
    return x, a, dy, dim


def _grad_inputs(method, xg, ag):
    return [xg, ag] if method.alpha_grad else [xg]


def _max_rel(a, b):
    denom = b.abs().max().item()
    diff = (a.float() - b.float()).abs().max().item()
    return diff / denom if denom > 0 else diff


def oracle_errors(x, a, dy, dim, y, dalpha):
    """The fused op's worst errors against the float64 bisection reference (100 steps), on the
    rows of the first alpha entries (at least one entry, about ORACLE_ROWS rows): max |y - y_ref|
    and, with an alpha-gradient, max |dalpha - dalpha_ref| / max(1e-4 |dalpha_ref|, 1e-6), the
    README's float32 bound as a ratio (<= 1 meets it)."""
    from entmax_cuda.reference import entmax_reference_backward, entmax_reference_forward

    n = x.shape[dim]
    group = torch.arange(a.numel(), device=x.device).reshape(a.shape).expand(x.shape)
    group = group.movedim(dim, -1)[..., 0].reshape(-1)  # the alpha entry of each row
    entries = min(a.numel(), max(1, ORACLE_ROWS // (group.numel() // a.numel())))
    sel = group < entries

    def rows(t):
        return t.expand(x.shape).movedim(dim, -1).reshape(-1, n)[sel].detach().cpu().double()

    x2, dy2, y2, a2 = rows(x), rows(dy), rows(y), rows(a)[:, :1]
    ref = entmax_reference_forward(x2, a2, -1, n_iter=100)
    out = {"oracle_rows": x2.shape[0], "oracle_fwd_max_abs_err": (y2 - ref).abs().max().item()}
    if dalpha is not None:
        _, da_rows = entmax_reference_backward(ref, dy2, a2, -1, "stable")
        da_ref = torch.zeros(entries, dtype=torch.float64).index_add_(0, group[sel].cpu(), da_rows[:, 0])
        da = dalpha.detach().reshape(-1)[:entries].cpu().double()
        bound = (1e-4 * da_ref.abs()).clamp(min=1e-6)
        out["oracle_dalpha_err_over_bound"] = ((da - da_ref).abs() / bound).max().item()
    return out


# ---------------------------------------------------------------- one measurement


def run_one(method, fused, shape_name, alpha, x, a, dy, dim, device, cfg, fused_cache):
    rec = {"shape": shape_name, "dims": list(x.shape), "dim": dim, "alpha": alpha, "method": method.name,
           "label": method.label, "alpha_grad": method.alpha_grad}
    # ---- correctness guard against the fused op (forward + gradients), doubles as fwd+bwd warm-up
    key = method.compare_alpha if method.compare_alpha is not None else "tensor"
    if key not in fused_cache:
        fa = a if key == "tensor" else float(key)
        xf = x.detach().clone().requires_grad_(True)
        af = a.detach().clone().requires_grad_(True) if key == "tensor" else None
        yf = fused.fn(xf, af if af is not None else fa, dim)
        grads = torch.autograd.grad(yf, [xf] + ([af] if af is not None else []), dy)
        fused_cache[key] = (yf.detach(), grads[0].detach(), grads[1].detach() if af is not None else None)
        del xf, af, yf, grads
    yf, dxf, daf = fused_cache[key]

    xg = x.detach().clone().requires_grad_(True)
    ag = a.detach().clone().requires_grad_(method.alpha_grad)
    common.sync(device)
    t0 = time.perf_counter()
    y = method.fn(xg, ag, dim)
    grads = torch.autograd.grad(y, _grad_inputs(method, xg, ag), dy)
    common.sync(device)
    first_fb = time.perf_counter() - t0
    check = {"fwd_max_abs_diff": (y.detach().float() - yf.float()).abs().max().item(),
             "dx_max_rel_diff": _max_rel(grads[0], dxf)}
    if method.alpha_grad and daf is not None:
        check["dalpha_max_rel_diff"] = _max_rel(grads[1], daf)
    if method.name == "fused":
        yd = y.detach().float()
        check = {"row_sum_max_err": (yd.sum(dim) - 1).abs().max().item(), "min": yd.min().item()}
        check.update(oracle_errors(x, a, dy, dim, y.detach(), grads[1] if method.alpha_grad else None))
        check["ok"] = bool(check["row_sum_max_err"] <= CHECK_TOL[x.dtype] and check["min"] >= 0)
    else:
        check["ok"] = bool(check["fwd_max_abs_diff"] <= CHECK_TOL[x.dtype])
    if not math.isfinite(check.get("fwd_max_abs_diff", 0.0)) or not math.isfinite(check.get("row_sum_max_err", 0.0)):
        check["ok"] = False
    rec["check"] = check
    del y, grads

    reps = dict(min_reps=cfg.min_reps, max_reps=cfg.max_reps, budget_s=cfg.budget_s,
                slow_call_s=cfg.slow_call_s, slow_reps=cfg.slow_reps, flush_l2=cfg.flush_l2)

    # ---- forward (no autograd)
    def fwd():
        with torch.no_grad():
            return method.fn(x, a, dim)

    rec["fwd"] = common.time_fn(fwd, device, **reps)
    rec["peak_mb_fwd"] = common.measure_peak_memory(fwd, device)

    # ---- backward alone (one recorded forward, backward repeated with retain_graph)
    y = method.fn(xg, ag, dim)
    inputs = _grad_inputs(method, xg, ag)

    def bwd():
        return torch.autograd.grad(y, inputs, dy, retain_graph=True)

    rec["bwd"] = common.time_fn(bwd, device, **reps)
    del y

    # ---- forward + backward
    def fwd_bwd():
        yy = method.fn(xg, ag, dim)
        return torch.autograd.grad(yy, inputs, dy)

    rec["fwd_bwd"] = common.time_fn(fwd_bwd, device, first_time_s=first_fb, **reps)
    rec["peak_mb_fwd_bwd"] = common.measure_peak_memory(fwd_bwd, device)

    nbytes = x.numel() * x.element_size()
    rec["bytes_fwd"] = 2 * nbytes  # read x, write y
    rec["bytes_bwd"] = 3 * nbytes  # read y and dy, write dx
    rec["gbs_fwd"] = rec["bytes_fwd"] / (rec["fwd"]["median_ms"] * 1e-3) / 1e9
    rec["gbs_bwd"] = rec["bytes_bwd"] / (rec["bwd"]["median_ms"] * 1e-3) / 1e9
    if cfg.copy_gbs:
        rec["pct_copy_fwd"] = 100 * rec["gbs_fwd"] / cfg.copy_gbs
        rec["pct_copy_bwd"] = 100 * rec["gbs_bwd"] / cfg.copy_gbs
    del xg, ag
    return rec


# ---------------------------------------------------------------- ratios, table, plot


def add_ratios(results):
    by = {(r["shape"], r["alpha"], r["method"]): r for r in results if "fwd" in r}
    for r in results:
        if "fwd" not in r:
            continue
        for mode in ("fwd", "bwd", "fwd_bwd"):
            soft = by.get((r["shape"], r["alpha"], "softmax")) or next(
                (s for (sh, _, m), s in by.items() if sh == r["shape"] and m == "softmax"), None)
            if soft is not None:
                r[f"x_softmax_{mode}"] = r[mode]["median_ms"] / soft[mode]["median_ms"]
            bis = by.get((r["shape"], r["alpha"], "entmax_bisect50"))
            if bis is not None:
                r[f"speedup_bisect50_{mode}"] = bis[mode]["median_ms"] / r[mode]["median_ms"]


def _t(s):
    return f"{common.fmt(s['median_ms'])} ({common.fmt(s['p10_ms'], 2)}–{common.fmt(s['p90_ms'], 2)})"


def _check_cell(c):
    if "row_sum_max_err" in c:
        cell = f"Σ−1 {c['row_sum_max_err']:.0e}"
        if "oracle_fwd_max_abs_err" in c:
            cell += f"; err {c['oracle_fwd_max_abs_err']:.1e}"
        if "oracle_dalpha_err_over_bound" in c:
            cell += f", dα {c['oracle_dalpha_err_over_bound']:.2g}×bound"
    else:
        cell = f"{c['fwd_max_abs_diff']:.0e} / {c['dx_max_rel_diff']:.0e}"
        if "dalpha_max_rel_diff" in c:
            cell += f" / {c['dalpha_max_rel_diff']:.0e}"
    return cell + ("" if c.get("ok") else " **!**")


def table(results, device):
    cuda = device.type == "cuda"
    headers = ["shape", "α", "method", "fwd ms (p10–p90)", "bwd ms (p10–p90)", "fwd+bwd ms (p10–p90)",
               "fwd ×softmax", "bwd ×softmax", "f+b ×softmax", "fwd speed-up vs bisect(50)",
               "f+b speed-up vs bisect(50)"]
    if cuda:
        headers += ["peak MB f+b"]
    headers += ["fwd GB/s (% copy)", "bwd GB/s (% copy)"]
    headers += ["check Δy / Δdx / Δdα"]
    rows = []
    for r in results:
        if "fwd" not in r:
            continue
        row = [r["shape"], r["alpha"], r["label"], _t(r["fwd"]), _t(r["bwd"]), _t(r["fwd_bwd"]),
               common.fmt(r.get("x_softmax_fwd")), common.fmt(r.get("x_softmax_bwd")),
               common.fmt(r.get("x_softmax_fwd_bwd")), common.fmt(r.get("speedup_bisect50_fwd")),
               common.fmt(r.get("speedup_bisect50_fwd_bwd"))]
        if cuda:
            row += [common.fmt(r.get("peak_mb_fwd_bwd"))]
        row += [f"{common.fmt(r.get('gbs_fwd'))} ({common.fmt(r.get('pct_copy_fwd'), 2)}%)",
                f"{common.fmt(r.get('gbs_bwd'))} ({common.fmt(r.get('pct_copy_bwd'), 2)}%)"]
        row.append(_check_cell(r["check"]))
        rows.append(row)
    return common.markdown_table(headers, rows)


def plot(results, device, path):
    plt = common.pyplot()
    if plt is None:
        return None
    done = [r for r in results if "fwd" in r]
    if not done:
        return None
    groups = []
    for r in done:
        if (r["shape"], r["alpha"]) not in groups:
            groups.append((r["shape"], r["alpha"]))
    methods = [m for m in METHODS if any(r["method"] == m for r in done)]
    labels = {r["method"]: r["label"] for r in done}
    width = 0.8 / max(1, len(methods))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.9 * len(groups) + 3), 9), sharex=True)
    for ax, mode, title in ((axes[0], "fwd", "forward"), (axes[1], "fwd_bwd", "forward + backward")):
        for k, m in enumerate(methods):
            xs, ys, lo, hi = [], [], [], []
            for i, g in enumerate(groups):
                r = next((r for r in done if (r["shape"], r["alpha"]) == g and r["method"] == m), None)
                if r is None:
                    continue
                s = r[mode]
                xs.append(i - 0.4 + width * (k + 0.5))
                ys.append(s["median_ms"])
                lo.append(s["median_ms"] - s["p10_ms"])
                hi.append(s["p90_ms"] - s["median_ms"])
            ax.bar(xs, ys, width, yerr=[lo, hi], label=labels[m], capsize=1.5)
        ax.set_yscale("log")
        ax.set_ylabel("time per call, ms (median, p10–p90)")
        ax.set_title(f"{title} on {device.type}")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[1].set_xticks(range(len(groups)))
    axes[1].set_xticklabels([f"{s}\nα={a}" for s, a in groups], rotation=45, ha="right", fontsize=8)
    axes[0].legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default: cuda if available)")
    p.add_argument("--shapes", default=None, help=f"comma-separated, from {','.join(SHAPES)} (default: all)")
    p.add_argument("--alphas", default=None, help="comma-separated from 1.1,1.5,1.9,rand or any number >= 1 "
                                                  "(default: all four)")
    p.add_argument("--methods", default=None, help=f"comma-separated, from {','.join(METHODS)} (default: all)")
    p.add_argument("--quick", action="store_true",
                   help=f"shapes {','.join(QUICK_SHAPES)}, alpha {','.join(QUICK_ALPHAS)}, few repeats")
    p.add_argument("--full", action="store_true",
                   help="on CPU, run the slow baselines at every shape and alpha (the CPU default plan skips "
                        "some to finish in ~15 min on 2 cores); CUDA always runs everything")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--min-reps", type=int, default=None, help="default: 3 CPU, 10 CUDA (quick: 2 / 5)")
    p.add_argument("--max-reps", type=int, default=None, help="default: 50 CPU, 200 CUDA")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds of timed calls per measurement (default: 1.0 CPU, 0.3 CUDA; quick: 0.2 / 0.1)")
    p.add_argument("--slow-call-s", type=float, default=2.0,
                   help="CPU: a call slower than this gets --slow-reps samples in all, its warm-up counted")
    p.add_argument("--slow-reps", type=int, default=2)
    p.add_argument("--no-flush-l2", action="store_true", help="CUDA: do not flush the L2 cache between calls")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/benchmarks", help="folder for bench_entmax_<device>.{json,md,png}")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.device_from_arg(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype)
    shapes = args.shapes.split(",") if args.shapes else (QUICK_SHAPES if args.quick else list(SHAPES))
    for s in shapes:
        if s not in SHAPES:
            raise SystemExit(f"unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    alphas = args.alphas.split(",") if args.alphas else (QUICK_ALPHAS if args.quick else ALPHAS)
    for a in alphas:
        if a != "rand" and not (a.replace(".", "", 1).isdigit() and float(a) >= 1):
            raise SystemExit(f"bad alpha {a!r}: a number >= 1 or 'rand'")
    wanted = args.methods.split(",") if args.methods else METHODS
    for m in wanted:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")

    class Cfg:
        pass

    cfg = Cfg()
    cfg.min_reps = args.min_reps or ((5 if cuda else 2) if args.quick else (10 if cuda else 3))
    cfg.max_reps = args.max_reps or (200 if cuda else 50)
    cfg.budget_s = args.budget_s or ((0.1 if cuda else 0.2) if args.quick else (0.3 if cuda else 1.0))
    cfg.slow_call_s = args.slow_call_s
    cfg.slow_reps = args.slow_reps
    cfg.flush_l2 = not args.no_flush_l2
    log = common.Progress()

    meta = common.metadata(device)
    cfg.copy_gbs = common.copy_bandwidth_gbs(device)
    meta["copy_bandwidth_gbs"] = round(cfg.copy_gbs, 1)
    log(f"{meta['device_name']}: copy bandwidth {cfg.copy_gbs:.0f} GB/s (read + write, "
        f"{torch.get_num_threads() if not cuda else 'device'} {'threads' if not cuda else ''})")
    methods, unavailable = build_methods(device)
    if "fused" not in wanted:
        wanted = ["fused"] + wanted  # needed for the correctness check
    notes = []
    for m in wanted:
        if m in unavailable:
            note = f"{m}: skipped, {unavailable[m]}"
            notes.append(note)
            print(f"note: {note}", file=sys.stderr)
    try:
        import entmax as _e

        meta["entmax_lib"] = getattr(_e, "__version__", "installed")
    except Exception:  # noqa: BLE001
        meta["entmax_lib"] = None
    if "triton_entmax" in methods:
        import adasplash

        meta["adasplash"] = getattr(adasplash, "__version__", "installed")

    config = {"shapes": {s: {"shape": SHAPES[s][0], "dim": SHAPES[s][1], "alpha_shape": SHAPES[s][2],
                             "description": SHAPES[s][3]} for s in shapes},
              "alphas": alphas, "methods": [m for m in wanted if m in methods], "dtype": args.dtype,
              "x_scale": X_SCALE, "rand_alpha": RAND_ALPHA, "min_reps": cfg.min_reps, "max_reps": cfg.max_reps,
              "budget_s": cfg.budget_s, "slow_call_s": cfg.slow_call_s, "slow_reps": cfg.slow_reps, "flush_l2": cfg.flush_l2 and cuda,
              "quick": args.quick, "full": args.full or cuda, "seed": args.seed}
    out = Path(args.out)
    stem = f"bench_entmax_{device.type}"
    results, skipped = [], []
    log(f"threads {torch.get_num_threads()}, torch {torch.__version__}, shapes {shapes}, alphas {alphas}, "
        f"methods {config['methods']}")

    def save():
        add_ratios(results)
        payload = {"metadata": meta, "config": config, "notes": notes, "results": results, "skipped": skipped}
        common.write_json(out / f"{stem}.json", payload)
        md = [f"# bench_entmax on {meta['device_name']}", ""] + common.metadata_lines(meta) + [""]
        md += [f"- note: {n}" for n in notes]
        md += ["", table(results, device), ""]
        (out / f"{stem}.md").write_text("\n".join(md) + "\n")

    for si, shape_name in enumerate(shapes):
        for alpha in alphas:
            x, a, dy, dim = make_inputs(shape_name, alpha, device, dtype, args.seed + si)
            fused_cache = {}
            for m in wanted:
                if m not in methods:
                    continue
                method = methods[m]
                reason = planned(method, shape_name, alpha, device, args.full)
                if reason:
                    skipped.append({"shape": shape_name, "alpha": alpha, "method": m, "reason": reason})
                    continue
                log(f"{shape_name} {tuple(x.shape)} alpha={alpha} {method.label} ...")
                try:
                    rec = run_one(method, methods["fused"], shape_name, alpha, x, a, dy, dim, device, cfg,
                                  fused_cache)
                except Exception as e:  # noqa: BLE001  (OOM, unsupported shape, ...) -> recorded, go on
                    msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    traceback.print_exc(limit=3, file=sys.stderr)
                    skipped.append({"shape": shape_name, "alpha": alpha, "method": m, "reason": f"error {msg}"})
                    log(f"  FAILED: {msg}")
                    if cuda:
                        torch.cuda.empty_cache()
                    continue
                results.append(rec)
                c = rec["check"]
                log(f"  fwd {rec['fwd']['median_ms']:.4g} ms, bwd {rec['bwd']['median_ms']:.4g} ms, "
                    f"fwd+bwd {rec['fwd_bwd']['median_ms']:.4g} ms (n={rec['fwd']['n']}/{rec['bwd']['n']}/"
                    f"{rec['fwd_bwd']['n']}); check {_check_cell(c)}")
                if not c["ok"]:
                    print(f"WARNING: {method.label} at {shape_name} alpha={alpha} disagrees with the fused op: {c}",
                          file=sys.stderr)
                save()
            del x, a, dy, fused_cache
            if cuda:
                torch.cuda.empty_cache()

    save()
    png = plot(results, device, out / f"{stem}.png")
    print(f"# bench_entmax on {meta['device_name']}\n")
    print("\n".join(common.metadata_lines(meta)))
    for n in notes:
        print(f"- note: {n}")
    print()
    print(table(results, device))
    print()
    print("Times: median (p10–p90) per call; fwd under no_grad; bwd = autograd.grad of a recorded forward "
          "(x and alpha grads where supported); ratios from medians of the same run. check: max |y - y_fused|, "
          "max rel. diff of dx and dalpha against the fused op (!: forward diff > "
          f"{CHECK_TOL[dtype]:g} for {args.dtype}).")
    if skipped:
        by_reason = {}
        for s in skipped:
            by_reason.setdefault(s["reason"], []).append(f"{s['method']}@{s['shape']}/{s['alpha']}")
        print("\nNot measured:")
        for reason, items in by_reason.items():
            print(f"- {reason}: {len(items)} ({', '.join(items[:6])}{', ...' if len(items) > 6 else ''})")
    print(f"\nwrote {out / (stem + '.json')}, {out / (stem + '.md')}" + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
