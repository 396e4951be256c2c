"""The fused attention as torch ops: opcheck (schemas, fake kernels, autograd
registration), torch.compile(fullgraph=True) of a transformer block using
EntmaxAttention, and memory that grows linearly in the sequence length."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import entmax_cuda
from entmax_cuda import attention, attention_ops
from testing import REPO_ROOT, acc_dtype, requires_cuda, subprocess_env

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _samples(device, dtype):
    """(q, k, v, alpha_rows, mask, causal, scale) argument tuples of the forward op."""
    acc = acc_dtype(dtype)
    grad = dtype in (torch.float32, torch.float64)

    def t(*shape):
        return torch.randn(*shape, device=device).to(dtype).requires_grad_(grad)

    def alpha(B, H, L):
        return (1 + torch.rand(B, H, L, device=device)).to(acc).requires_grad_(grad)

    yield t(2, 2, 5, 8), t(2, 2, 7, 8), t(2, 2, 7, 8), alpha(2, 2, 5), None, 0, 0.35
    yield t(1, 4, 70, 16), t(1, 2, 66, 16), t(1, 2, 66, 12), alpha(1, 4, 70), None, 1, 0.25  # GQA, causal, Ev != E
    keep = (torch.rand(1, 1, 1, 9, device=device) > 0.3).expand(1, 3, 4, 9)
    yield t(1, 3, 4, 8), t(1, 3, 9, 8), t(1, 3, 9, 8), alpha(1, 3, 4), keep, 2, 0.4  # key mask view, lower-right
    bias = torch.randn(4, 9, device=device).to(acc).expand(1, 3, 4, 9)
    strided = t(1, 4, 3, 8).detach().transpose(1, 2).requires_grad_(grad)  # (1, 3, 4, 8), non-contiguous
    scalar_alpha = torch.tensor(1.5, device=device).to(acc).expand(1, 3, 4)
    yield strided, t(1, 3, 9, 8), t(1, 3, 9, 8), scalar_alpha, bias, 0, 0.5


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_forward(device, dtype):
    for args in _samples(device, dtype):
        torch.library.opcheck(attention_ops.forward_op, args)


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_backward(device, dtype):
    for q, k, v, alpha, mask, causal, scale in _samples(device, dtype):
        q, k, v, alpha = (t.detach() for t in (q, k, v, alpha))
        out, stats, block_map = attention_ops.forward_op(q, k, v, alpha, mask, causal, scale)
        grad_out = torch.randn_like(out)
        for alpha_grad in (True, False):
            torch.library.opcheck(attention_ops.backward_op,
                                  (grad_out, q, k, v, alpha, mask, causal, scale, stats, block_map, alpha_grad))


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_decode(device, dtype):
    acc = acc_dtype(dtype)

    def t(*shape):
        return torch.randn(*shape, device=device).to(dtype)

    used = torch.tensor([300, 7], dtype=torch.int32, device=device)
    alpha = (1 + torch.rand(2, 4, 3, device=device)).to(acc)
    slopes = torch.rand(2, 4, device=device).to(acc)
    for splits in (0, 3):
        torch.library.opcheck(attention_ops.decode_op,
                              (t(2, 4, 3, 8), t(2, 2, 300, 8), t(2, 2, 300, 12), alpha, 0.3, slopes, 40, -1, used,
                               splits))
    strided = t(1, 5, 2, 8).transpose(1, 2)  # (1, 2, 5, 8), the layout entmax_with_kvcache passes
    torch.library.opcheck(attention_ops.decode_op, (strided, t(1, 1, 70, 8), t(1, 1, 70, 8),
                                                    torch.full((1, 2, 5), 1.5, device=device).to(acc), 0.5, None,
                                                    -1, -1, None, 2))


def test_decode_constants_match_the_compiled_op():
    q = torch.randn(1, 1, 1, 8)
    k = torch.randn(1, 1, 64, 8)
    alpha = torch.full((1, 1, 1), 1.5)
    attention_ops.decode_op(q, k, k, alpha, 0.3, None, -1, -1, None, attention_ops.MAX_DECODE_SPLITS)
    with pytest.raises(RuntimeError, match=f"num_splits must lie in \\[0, {attention_ops.MAX_DECODE_SPLITS}\\]"):
        attention_ops.decode_op(q, k, k, alpha, 0.3, None, -1, -1, None, attention_ops.MAX_DECODE_SPLITS + 1)


def test_block_grid_constants_match_the_compiled_op():
    q = torch.randn(1, 1, 130, 8)
    k = torch.randn(1, 1, 65, 8)
    _, stats, block_map = attention_ops.forward_op(q, k, k, torch.full((1, 1, 130), 1.5), None, 0, 0.3)
    assert block_map.shape == (1, 1, -(-130 // attention_ops.BLOCK_Q), -(-65 // attention_ops.BLOCK_K)) == (1, 1, 3, 2)
    assert stats.shape == (1, 1, 4, 130)
    with pytest.raises(RuntimeError, match=str(attention_ops.MAX_HEAD_DIM)):
        big = torch.randn(1, 1, 4, attention_ops.MAX_HEAD_DIM + 1)
        attention_ops.forward_op(big, big, big, torch.full((1, 1, 4), 1.5), None, 0, 0.1)


def test_op_rejects_inconsistent_arguments():
    q = torch.randn(1, 2, 4, 8)
    alpha = torch.full((1, 2, 4), 1.5)
    with pytest.raises(RuntimeError, match="alpha must have shape"):
        attention_ops.forward_op(q, q, q, torch.full((1, 2, 5), 1.5), None, 0, 0.3)
    with pytest.raises(RuntimeError, match="float32"):
        attention_ops.forward_op(q, q, q, alpha.double(), None, 0, 0.3)
    with pytest.raises(RuntimeError, match="mask must have shape"):
        attention_ops.forward_op(q, q, q, alpha, torch.ones(1, 2, 4, 5, dtype=torch.bool), 0, 0.3)
    with pytest.raises(RuntimeError, match="causal must be"):
        attention_ops.forward_op(q, q, q, alpha, None, 3, 0.3)
    out, stats, block_map = attention_ops.forward_op(q, q, q, alpha, None, 0, 0.3)
    with pytest.raises(RuntimeError, match="block_map"):
        attention_ops.backward_op(out, q, q, q, alpha, None, 0, 0.3, stats, block_map[..., :0], True)


# ---------------------------------------------------------------- torch.compile


class _Block(torch.nn.Module):
    """A pre-norm transformer block whose attention is EntmaxAttention (learnable alpha per head)."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))
        self.attn = entmax_cuda.EntmaxAttention(n_heads=heads, alpha_init=1.5)

    def forward(self, x, keep):
        B, L, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = self.attn(q, k, v, key_padding_mask=keep, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, C))
        return x + self.mlp(self.norm2(x))


@torch._inductor.config.patch(fx_graph_cache=False)  # compile afresh: a cached graph would not test the fake kernels
@torch._functorch.config.patch(enable_autograd_cache=False)
@pytest.mark.slow
def test_torch_compile_fullgraph_of_a_transformer_block_matches_eager(device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = _Block().to(device)
    x = torch.randn(2, 70, 32, device=device)
    keep = torch.ones(2, 70, dtype=torch.bool, device=device)
    keep[1, 50:] = False
    compiled = torch.compile(block, fullgraph=True)  # fullgraph: a graph break raises
    params = [p for p in block.parameters()]
    out_eager = block(x, keep)
    grads_eager = torch.autograd.grad(out_eager.square().sum(), params)
    out_compiled = compiled(x, keep)
    grads_compiled = torch.autograd.grad(out_compiled.square().sum(), params)
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    alpha_index = next(i for i, p in enumerate(params) if p is block.attn.entmax.alpha_logit)
    assert grads_eager[alpha_index].ne(0).all() and grads_compiled[alpha_index].ne(0).all()


@pytest.mark.slow
def test_torch_compile_sees_no_graph_break(device):
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 9, 8, device=device) for _ in range(3))
    alpha = torch.tensor([1.2, 1.7], device=device)

    def fn(q, k, v, alpha):
        return entmax_cuda.scaled_dot_product_entmax(q * 2, k, v, alpha, is_causal=True).sum(-1)

    explanation = torch._dynamo.explain(fn)(q, k, v, alpha)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


# ---------------------------------------------------------------- memory

_RSS_SCRIPT = textwrap.dedent("""
    import ctypes, gc, json, os, sys, torch
    sys.path.insert(0, sys.argv[1])
    import entmax_cuda
    from bench_attention import make_inputs
    torch.set_num_threads(1)
    L, E = int(sys.argv[2]), 64
    q, k, v = (t.requires_grad_() for t in make_inputs("local", 1, 1, L, E, torch.float32, "cpu", seed=0))
    grad_out = torch.randn(1, 1, L, E)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back to the system: the call cannot hide in it
    with open("/proc/self/statm") as f:
        resident_before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    out = entmax_cuda.scaled_dot_product_entmax(q, k, v, 2.0, is_causal=True)
    out.backward(grad_out)
    with open("/proc/self/status") as f:  # VmHWM: this process image's peak (ru_maxrss keeps the forked parent's)
        peak_after = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    print(json.dumps({"peak_growth_bytes": peak_after - resident_before, "finite": bool(torch.isfinite(q.grad).all())}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_cpu_memory_at_32k_tokens_stays_far_below_one_score_matrix():
    """Forward and backward at Lq = Lk = 32768, E = 64 in a fresh process: its peak RSS grows by
    about 60 MiB over the resident size before the call (the output and three gradients of 8 MiB
    each, float32 copies of k and v in tile layout, per-row statistics, the 512 x 512 block map);
    one float32 score matrix alone is 4 GiB, and the test allows 1/16 of that.
    (Linux: /proc, glibc's malloc_trim; the peak is /proc's VmHWM, not ru_maxrss, which Linux carries
    across exec from the forked test process: a pytest process of 300 MB would count as growth.)"""
    L = 32768
    benchmarks_dir = str(REPO_ROOT / "benchmarks")
    done = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, benchmarks_dir, str(L)], capture_output=True, text=True,
                          env=subprocess_env(), cwd=benchmarks_dir, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    score_matrix = L * L * 4
    assert result["finite"]
    assert result["peak_growth_bytes"] < score_matrix / 16, result  # < 256 MiB


@requires_cuda
def test_cuda_peak_memory_grows_linearly_in_the_sequence_length():
    peaks = []
    for L in (4096, 8192, 16384):
        q, k, v = (torch.randn(1, 8, L, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = entmax_cuda.scaled_dot_product_entmax(q, k, v, 1.5)
        out.backward(torch.ones_like(out))
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        del q, k, v, out
    assert peaks[1] < 2.3 * peaks[0] and peaks[2] < 2.3 * peaks[1], peaks  # quadratic would be 4x
    assert peaks[2] < 16384 * 16384 * 2 * 8 / 20  # far below one bf16 score matrix for 8 heads


@requires_cuda
def test_cuda_forward_and_backward_do_not_synchronize_the_host():
    q, k, v = (torch.randn(2, 4, 300, 64, device="cuda", requires_grad=True) for _ in range(3))
    alpha = torch.full((4,), 1.5, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = entmax_cuda.scaled_dot_product_entmax(q, k, v, alpha, is_causal=True)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert alpha.grad is not None


@requires_cuda
def test_cuda_launches_from_several_threads_with_different_shared_memory():
    """Host threads launching the attention with different head dims at once (so different shared-memory
    sizes, above 48 KB for the wider ones) all succeed and agree with single-threaded results: the
    kernels' shared-memory limit is raised once per kernel and device, never lowered under a launch."""
    import threading

    cases = [torch.randn(1, 2, 200, d, device="cuda", dtype=torch.float16) for d in (32, 128, 256)]
    want = [entmax_cuda.scaled_dot_product_entmax(x, x, x, 1.5) for x in cases]
    torch.cuda.synchronize()
    errors = []

    def work(i):
        try:
            with torch.cuda.stream(torch.cuda.Stream()):
                for _ in range(20):
                    got = entmax_cuda.scaled_dot_product_entmax(cases[i], cases[i], cases[i], 1.5)
                torch.cuda.synchronize()
                assert torch.equal(got, want[i])
        except Exception as e:  # noqa: BLE001  (reported below, with the thread's case)
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=work, args=(i % 3,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
