"""Shared helpers of the benchmark scripts: timing, memory, bandwidth, metadata, tables, JSON.

Timing protocol (both devices):
  * a first, untimed warm-up call (it also serves as the correctness check in the callers);
  * then repeated calls until both `min_reps` calls were made and `budget_s` seconds were
    spent, or `max_reps` calls were made, whichever comes first;
  * the summary is the median, with the 10th and 90th percentiles and the count.
CUDA: every call is timed with a pair of torch.cuda.Event on the current stream; the L2
cache is flushed (a 256 MiB buffer is zeroed) before each call unless flush_l2=False, so
small tensors are not timed out of cache; one synchronize at the end of a measurement.
CPU: time.perf_counter around each call (the calls are synchronous).
CPU: a call whose warm-up took longer than `slow_call_s` gets `slow_reps` samples in all, the
warm-up counted as the first (one-off overheads are negligible at that scale).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- imports


def import_entmax_cuda():
    """Imports entmax_cuda: whatever the path finds first (an installed build, or the source tree
    with an in-place build via PYTHONPATH=.); if that fails and the source tree was in the way
    (PYTHONPATH=. after `pip install .`, where the tree has no compiled kernels), retries without
    the tree so that the installed package is used. Exits with a message if neither works."""
    try:
        import entmax_cuda
        return entmax_cuda
    except ImportError as first:
        error = first
    saved = list(sys.path)
    for k in [k for k in sys.modules if k == "entmax_cuda" or k.startswith("entmax_cuda.")]:
        del sys.modules[k]
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != str(REPO_ROOT)]
    try:
        import entmax_cuda
        return entmax_cuda
    except ImportError:
        raise SystemExit(f"cannot import entmax_cuda ({error}).\n  Installed build: `pip install "
                         f"--no-build-isolation .`, then run the script without PYTHONPATH=.;\n  in-place "
                         f"build: `python setup.py build_ext --inplace`, then PYTHONPATH=<repo root>.") from None
    finally:
        sys.path[:] = saved  # keep the tree reachable for `dsan` (entmax_cuda stays cached)


# ---------------------------------------------------------------- timing


def _percentile(sorted_values, q):
    if not sorted_values:
        return float("nan")
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times_s):
    """{'median_ms', 'p10_ms', 'p90_ms', 'n'} of a list of durations in seconds."""
    values = sorted(t * 1e3 for t in times_s)
    return {
        "median_ms": _percentile(values, 0.5),
        "p10_ms": _percentile(values, 0.1),
        "p90_ms": _percentile(values, 0.9),
        "n": len(values),
    }


class L2Flusher:
    """Zeroes a buffer larger than the L2 cache (H100: 50 MiB, H200: 60 MiB) before each timed call."""

    def __init__(self, device, nbytes=256 * 2**20):
        self.buffer = torch.empty(nbytes // 4, dtype=torch.int32, device=device)

    def __call__(self):
        self.buffer.zero_()


def time_fn(fn, device, *, min_reps=3, max_reps=100, budget_s=1.0, warmup=1, slow_call_s=2.0, slow_reps=2,
            flush_l2=True, setup=None, first_time_s=None):
    """Times fn() and returns summarize(...) of the per-call durations.

    setup: called before each call, untimed (e.g. to drop references); flush_l2 (CUDA only).
    first_time_s: the caller already made a warm-up call and measured it (wall clock, s).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    flusher = L2Flusher(device) if (cuda and flush_l2) else None
    times = []

    # warm-up (untimed unless slow)
    warm_s = first_time_s
    for _ in range(warmup if first_time_s is None else 0):
        if setup:
            setup()
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        warm_s = time.perf_counter() - t0
    if warm_s is not None and warm_s > slow_call_s and not cuda:
        # one call takes seconds (CPU baselines on big shapes): the warm-up is a sample, and
        # slow_reps samples in all are taken (the spread of multi-second calls is small)
        times.append(warm_s)
        max_reps = min_reps = max(1, slow_reps)

    if cuda:
        starts, ends = [], []
        spent = 0.0
        wall0 = time.perf_counter()
        while len(starts) < max_reps and (len(starts) < min_reps or spent < budget_s):
            if setup:
                setup()
            if flusher:
                flusher()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            starts.append(s)
            ends.append(e)
            # avoid a sync per call: use wall clock as the budget, sync every 16 calls
            if len(starts) % 16 == 0:
                torch.cuda.synchronize(device)
            spent = time.perf_counter() - wall0
        torch.cuda.synchronize(device)
        times += [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    else:
        spent = sum(times)
        while len(times) < max_reps and (len(times) < min_reps or spent < budget_s):
            if setup:
                setup()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            times.append(dt)
            spent += dt
    return summarize(times)


def measure_peak_memory(fn, device, setup=None):
    """Peak CUDA memory (MiB) allocated by one call of fn above what was allocated before it
    (inputs excluded, outputs and everything kept for backward included); None on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if setup:
        setup()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2**20


def copy_bandwidth_gbs(device, nbytes=None, reps=20):
    """Measured copy bandwidth in GB/s (1e9 B/s), counting read + write, of a `nbytes`
    float32 tensor copied into a preallocated one (median of reps): device-to-device on a
    GPU (1 GiB), memory-to-memory on the CPU with torch's threads (256 MiB)."""
    device = torch.device(device)
    if device.type != "cuda":
        nbytes = nbytes or 2**28
        src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
        times.sort()
        return 2 * nbytes / times[len(times) // 2] / 1e9
    nbytes = nbytes or 2**30
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    median = times[len(times) // 2]
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / median / 1e9


# ---------------------------------------------------------------- metadata


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        commit = out.stdout.strip() or None
        if commit:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            if dirty:
                commit += "+dirty"
        return commit
    except Exception:  # no git, not a checkout
        return None


def metadata(device):
    device = torch.device(device)
    meta = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }
    try:
        meta["loadavg"] = os.getloadavg()
    except OSError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update({
            "device_name": props.name,
            "device_memory_gib": round(props.total_memory / 2**30, 1),
            "compute_capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
        })
    else:
        meta["device_name"] = _cpu_model_name() or meta["cpu"]
    try:
        import entmax_cuda
        meta["entmax_cuda"] = getattr(entmax_cuda, "__version__", None)
    except Exception:
        pass
    return meta


def _cpu_model_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def metadata_lines(meta):
    keys = ["date_utc", "git_commit", "device_name", "device", "torch", "cuda", "threads", "cpu_count", "loadavg",
            "copy_bandwidth_gbs", "command"]
    return [f"- {k}: {meta[k]}" for k in keys if meta.get(k) is not None]


# ---------------------------------------------------------------- output


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only), or None with a note when it cannot be imported."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print(f"note: no plot ({e})", file=sys.stderr)
        return None
    return plt


def markdown_table(headers, rows):
    cells = [[str(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines)


def fmt(value, digits=3):
    """Numbers for tables: significant digits, '—' for missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, int):
        return str(value)
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(0, digits - 1 - magnitude)
    return f"{value:.{decimals}f}"


def write_json(path, payload):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    tmp.replace(path)
    return path


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def device_from_arg(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
        torch.cuda.set_device(device if device.index is not None else 0)
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Progress:
    """Prints a timestamped line to stderr (so the table on stdout stays clean)."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self, message):
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {message}", file=sys.stderr, flush=True)
