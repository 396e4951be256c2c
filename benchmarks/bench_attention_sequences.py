"""Benchmark of entmax attention on packed sequences and in KV-cache decoding.

    PYTHONPATH=. python benchmarks/bench_attention_sequences.py --device cpu     # minutes
    PYTHONPATH=. python benchmarks/bench_attention_sequences.py --device cuda    # the GPU plan

varlen (training step: forward + backward of q, k, v and a per-head alpha), for a batch of
sequences whose lengths are all equal ("equal") or spread ("ragged": uniform in [L/8, L]):
  varlen         entmax_cuda.varlen_entmax on the packed sequences (no padding computed)
  padded         entmax_cuda.scaled_dot_product_entmax on the batch padded to the longest: equal
                 lengths with is_causal (no mask), ragged ones with a causal and key-padding bool
                 mask (padded query rows computed and dropped)
  sdpa_padded    F.scaled_dot_product_attention on the same padded batch (softmax: the baseline
                 a softmax model pays)
  torch_varlen   torch.nn.attention.varlen.varlen_attn on the packed sequences (softmax, causal
                 as window (-1, 0)), where this torch has it and the device runs it (CUDA)
decode (one step, forward only): B queries of one token, Hq 32, Hkv 8, D 128, against a cache of
Lcache keys per entry:
  kvcache        entmax_cuda.entmax_with_kvcache (keys split across work items, the number of
                 splits chosen per call: docs/attention.md, section 8)
  tiled          the same rows through the tiled attention kernel (attention_forward with
                 seqused_k: one work item per (entry, head, 64 queries), keys not split), the
                 path entmax_with_kvcache takes for prefill
  sdpa           F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True) (softmax)
Ratios are measured side by side in one run; each row records a worst difference (varlen:
of varlen's output from padded's, the same kernels, so 0 up to the padded rows' different
tiles; decode: of kvcache's output from a float64 composite, entmax_cuda.entmax on the
float64 scores) and the milliseconds per step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

PLANS = {
    "cpu": {"varlen": [(8, 256), (8, 1024)], "heads": 4, "dim": 64, "dtype": "float32",
            "decode": [(1, 4096), (8, 4096), (1, 32768)]},
    "cuda": {"varlen": [(16, 1024), (16, 4096), (8, 16384)], "heads": 16, "dim": 128, "dtype": "bfloat16",
             "decode": [(b, n) for b in (1, 8) for n in (4096, 32768, 131072)]},
}


def _lengths(kind, n, L, gen):
    if kind == "equal":
        return [L] * n
    return torch.randint(L // 8, L + 1, (n,), generator=gen).tolist()


def varlen_case(entmax_cuda, kind, n, L, H, D, dtype, device, reps):
    gen = torch.Generator().manual_seed(n * L)
    lengths = _lengths(kind, n, L, gen)
    total, Lmax = sum(lengths), max(lengths)
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    q, k, v = (torch.randn(total, H, D, generator=gen).to(device, dtype) for _ in range(3))
    alpha = torch.full((H,), 1.5, device=device)
    # the padded batch: (n, H, Lmax, D), padding zero, keys masked
    index = torch.cat([torch.arange(l) + i * Lmax for i, l in enumerate(lengths)]).to(device)

    def padded_of(x):
        out = x.new_zeros(n * Lmax, H, D)
        out[index] = x
        return out.reshape(n, Lmax, H, D).transpose(1, 2)

    keep = torch.zeros(n * Lmax, dtype=torch.bool, device=device)
    keep[index] = True
    keep = keep.reshape(n, Lmax)

    def leaves():
        return [t.detach().clone().requires_grad_() for t in (q, k, v, alpha)]

    def run_varlen():
        lq, lk, lv, la = leaves()
        out = entmax_cuda.varlen_entmax(lq, lk, lv, cu, cu, Lmax, Lmax, alpha=la, is_causal=True)
        out.sum().backward()
        return out

    def run_padded(sdpa=False):
        lq, lk, lv, la = leaves()
        pq, pk, pv = padded_of(lq), padded_of(lk), padded_of(lv)
        if kind == "equal":  # no padding: plain causal attention, no mask
            mask, causal = None, True
        else:  # causal and the padded keys masked: one (n, 1, Lmax, Lmax) mask, as a user would pass it
            mask, causal = keep[:, None, None, :] & torch.ones(Lmax, Lmax, dtype=torch.bool, device=device).tril(), False
        if sdpa:
            out = F.scaled_dot_product_attention(pq, pk, pv, attn_mask=mask, is_causal=causal)
        else:
            out = entmax_cuda.scaled_dot_product_entmax(pq, pk, pv, la, attn_mask=mask, is_causal=causal)
        out = out.transpose(1, 2).reshape(n * Lmax, H, D)[index]
        out.sum().backward()
        return out

    def run_torch_varlen():
        from torch.nn.attention.varlen import varlen_attn

        lq, lk, lv, _ = leaves()
        out = varlen_attn(lq, lk, lv, cu, cu, Lmax, Lmax, window_size=(-1, 0))
        out.sum().backward()
        return out

    diff = (run_varlen().float() - run_padded().float()).abs().max().item()
    row = {"suite": "varlen", "lengths": kind, "n_seqs": n, "L": L, "tokens": total, "padded_tokens": n * Lmax,
           "max_diff_varlen_padded": diff, "torch_varlen": None}
    methods = [("varlen", run_varlen), ("padded", run_padded), ("sdpa_padded", lambda: run_padded(True))]
    if device.startswith("cuda") and _has_torch_varlen():
        methods.append(("torch_varlen", run_torch_varlen))
    for name, fn in methods:
        row[name] = common.time_fn(fn, device, min_reps=reps[0], max_reps=reps[1], budget_s=reps[2])["median_ms"]
    row["padded_over_varlen"] = row["padded"] / row["varlen"]
    return row


def _has_torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def decode_case(entmax_cuda, B, Lcache, device, dtype, reps, Hq=32, Hkv=8, D=128):
    gen = torch.Generator().manual_seed(B * Lcache)
    q = torch.randn(B, 1, Hq, D, generator=gen).to(device, dtype)
    k_cache, v_cache = (torch.randn(B, Lcache, Hkv, D, generator=gen).to(device, dtype) for _ in range(2))
    seqlens = torch.full((B,), Lcache, dtype=torch.int32, device=device)
    alpha = torch.full((Hq,), 1.5, device=device)

    def run_kvcache():
        return entmax_cuda.entmax_with_kvcache(q, k_cache, v_cache, seqlens, alpha=alpha)

    def run_tiled():
        from entmax_cuda import attention_ops

        alpha_rows = alpha.reshape(1, Hq, 1).expand(B, Hq, 1)
        return attention_ops.forward_op(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                        alpha_rows, None, attention_ops.CAUSAL_LOWER_RIGHT, D ** -0.5, None, -1, -1,
                                        None, None, seqlens, 0, 0)[0].transpose(1, 2)

    def run_sdpa():
        return F.scaled_dot_product_attention(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                              enable_gqa=True)

    row = {"suite": "decode", "B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "Lcache": Lcache}
    with torch.no_grad():
        scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k_cache.double().repeat_interleave(Hq // Hkv, 2))
        want = torch.einsum("bhqk,bkhd->bqhd", entmax_cuda.entmax(scores * D ** -0.5, 1.5, dim=-1),
                            v_cache.double().repeat_interleave(Hq // Hkv, 2))
        row["max_err"] = (run_kvcache().double() - want).abs().max().item()
        del scores, want
        for name, fn in (("kvcache", run_kvcache), ("tiled", run_tiled), ("sdpa", run_sdpa)):
            row[name] = common.time_fn(fn, device, min_reps=reps[0], max_reps=reps[1], budget_s=reps[2])["median_ms"]
    row["kvcache_over_sdpa"] = row["kvcache"] / row["sdpa"]
    row["tiled_over_kvcache"] = row["tiled"] / row["kvcache"]
    return row


def table(rows):
    lines = ["| suite | case | varlen / kvcache ms | padded / sdpa ms | padded ÷ varlen, kvcache ÷ sdpa | "
             "sdpa_padded / tiled ms | torch varlen ms | max diff |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["suite"] == "varlen":
            case = f"{r['n_seqs']} × {r['lengths']} ≤ {r['L']} ({r['tokens']} of {r['padded_tokens']} tokens)"
            lines.append(f"| varlen fwd+bwd | {case} | {r['varlen']:.1f} | {r['padded']:.1f} | "
                         f"{r['padded_over_varlen']:.2f} | {r['sdpa_padded']:.1f} | "
                         f"{'' if r['torch_varlen'] is None else format(r['torch_varlen'], '.1f')} | "
                         f"{r['max_diff_varlen_padded']:.1e} |")
        else:
            case = f"B {r['B']}, Hq {r['Hq']}, Hkv {r['Hkv']}, D {r['D']}, Lcache {r['Lcache']}"
            lines.append(f"| decode fwd | {case} | {r['kvcache']:.2f} | {r['sdpa']:.2f} | "
                         f"{r['kvcache_over_sdpa']:.2f} | {r['tiled']:.2f} | | {r['max_err']:.1e} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--suites", default="varlen,decode")
    p.add_argument("--out", default="out/benchmarks")
    args = p.parse_args(argv)
    entmax_cuda = common.import_entmax_cuda()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = PLANS["cuda" if device.startswith("cuda") else "cpu"]
    dtype = getattr(torch, plan["dtype"])
    reps = (2, 10, 1.0) if device == "cpu" else (5, 50, 0.3)
    rows = []
    if "varlen" in args.suites:
        for n, L in plan["varlen"]:
            for kind in ("equal", "ragged"):
                rows.append(varlen_case(entmax_cuda, kind, n, L, plan["heads"], plan["dim"], dtype, device, reps))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    if "decode" in args.suites:
        for B, Lcache in plan["decode"]:
            rows.append(decode_case(entmax_cuda, B, Lcache, device, dtype, reps))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if device.startswith("cuda") else "cpu"
    (out / f"bench_attention_sequences_{tag}.json").write_text(
        json.dumps({"meta": common.metadata(device), "rows": rows}, indent=1))
    (out / f"bench_attention_sequences_{tag}.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
