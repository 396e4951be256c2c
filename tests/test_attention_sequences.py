"""Fused entmax attention beyond one padded batch: ALiBi slopes and sliding windows, packed
sequences (varlen_entmax) and decoding against a KV cache (entmax_with_kvcache).

The reference is a materialised float64 composite written from the definitions (the
visible keys of each (query, key) pair, the ALiBi bias, entmax_cuda.entmax on the score
matrix), never the kernels' geometry code. Every case runs on the CPU kernel and on the
CUDA kernels' source under the emulation (tests/cuda_emulation), SIMT and tensor cores.
"""

from __future__ import annotations

import sys

import pytest
import torch

import entmax_cuda
from entmax_cuda import attention_ops
from testing import REPO_ROOT, acc_dtype

sys.path.insert(0, str(REPO_ROOT / "tests" / "cuda_emulation"))
from route_attention_ops import _EmulatedAttention, emulated_decode_op  # noqa: E402

# Output: absolute; gradients: relative to the largest entry (tests/test_attention.py's).
FWD_ATOL = {torch.float64: 1e-11, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
GRAD_RTOL = {torch.float64: 1e-9, torch.float32: 5e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


class _OnCuda(torch.autograd.Function):
    """forward_op's signature on CPU tensors, computed by the CUDA ops on the GPU (inputs copied there,
    results back), so that the same test bodies check the CUDA kernels on a GPU machine."""

    @staticmethod
    def forward(ctx, *args):
        moved = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
        out, stats, block_map = _OnCuda.forward_op(*moved)
        ctx.save_for_backward(*[a for a in moved if isinstance(a, torch.Tensor)], stats, block_map)
        ctx.args = [("t", None) if isinstance(a, torch.Tensor) else ("v", a) for a in moved]
        ctx.mark_non_differentiable(stats, block_map)
        return out.cpu(), stats.cpu(), block_map.cpu()

    @staticmethod
    def backward(ctx, grad_out, _grad_stats, _grad_block_map):
        *tensors, stats, block_map = ctx.saved_tensors
        it = iter(tensors)
        q, k, v, alpha, mask, causal, scale, *geometry = [next(it) if kind == "t" else x for kind, x in ctx.args]
        grads = _OnCuda.backward_op(grad_out.cuda(), q, k, v, alpha, mask, causal, scale, stats, block_map,
                                    ctx.needs_input_grad[3], *geometry)
        return tuple(g.cpu() if n else None for g, n in zip(grads, ctx.needs_input_grad[:4])) + (None,) * (
            len(ctx.needs_input_grad) - 4)


def _decode_on_cuda(q, k, v, alpha, scale, *rest):
    """decode_op's signature on CPU tensors, computed by the CUDA decode op on the GPU."""
    moved = [a.cuda() if isinstance(a, torch.Tensor) else a for a in (q, k, v, alpha, scale, *rest)]
    return tuple(t.cpu() for t in _decode_on_cuda.op(*moved))


@pytest.fixture(params=["cpu-kernel", "emulated-simt", "emulated-tensor-cores",
                        pytest.param("cuda", marks=pytest.mark.cuda)])
def kernels(request, monkeypatch):
    """Which kernels compute the op: the CPU kernel, the CUDA kernels' source run on the CPU, or
    (on a GPU machine) the CUDA kernels themselves."""
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no GPU")
        _OnCuda.forward_op, _OnCuda.backward_op = attention_ops.forward_op, attention_ops.backward_op
        _decode_on_cuda.op = attention_ops.decode_op
        monkeypatch.setattr(attention_ops, "forward_op", _OnCuda.apply)
        monkeypatch.setattr(attention_ops, "decode_op", _decode_on_cuda)
    elif request.param != "cpu-kernel":
        if not sys.platform.startswith("linux"):
            pytest.skip("the emulator uses glibc's ucontext")
        monkeypatch.setenv("ENTMAX_ATTENTION_PATH", "simt" if request.param == "emulated-simt" else "auto")
        monkeypatch.setattr(_EmulatedAttention, "ops", request.getfixturevalue("emulation"))
        monkeypatch.setattr(attention_ops, "forward_op", _EmulatedAttention.apply)
        monkeypatch.setattr(attention_ops, "decode_op", emulated_decode_op(request.getfixturevalue("emulation")))
    return request.param


def _dtype_for(kernels):
    # tensor cores serve the half types (on a GPU too); the CPU kernel and SIMT are checked in float64
    return torch.float16 if kernels in ("emulated-tensor-cores", "cuda") else torch.float64


# ---------------------------------------------------------------- the composite


def visible_keys(Lq: int, Lk: int, causal: str | None, window=(-1, -1)) -> torch.Tensor:
    """(Lq, Lk) bool: key j visible to query i, from the definitions (flash-attn's alignment)."""
    i = torch.arange(Lq).unsqueeze(1)
    j = torch.arange(Lk).unsqueeze(0)
    keep = torch.ones(Lq, Lk, dtype=torch.bool)
    if causal == "upper_left":
        keep &= j <= i
    elif causal == "lower_right":
        keep &= j <= i + Lk - Lq
    left, right = window
    if left >= 0:
        keep &= j >= i + Lk - Lq - left
    if right >= 0:
        keep &= j <= i + Lk - Lq + right
    return keep


def composite(q, k, v, alpha, causal=None, window=(-1, -1), slopes=None, scale=None):
    """One batch entry: q (Hq, Lq, D), k/v (Hkv, Lk, *), alpha a float or (Hq, Lq, 1), slopes (Hq,)."""
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    Lq, Lk = q.shape[1], k.shape[1]
    s = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if slopes is not None:
        distance = (torch.arange(Lq).unsqueeze(1) + Lk - Lq - torch.arange(Lk).unsqueeze(0)).abs()
        s = s - slopes.reshape(-1, 1, 1) * distance.to(s.dtype)
    keep = visible_keys(Lq, Lk, causal, window).to(s.device)
    empty = ~keep.any(-1, keepdim=True)  # rows that see no key: zero output
    s = s.masked_fill(~keep, float("-inf")).masked_fill(empty, 0.0)
    if Lk == 0:
        return q.new_zeros(q.shape[0], Lq, v.shape[-1])
    p = entmax_cuda.entmax(s, alpha, dim=-1).masked_fill(empty, 0.0)
    return p @ v


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _max_rel(got, want):
    want = want.detach().double()
    return ((got.detach().double() - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()


def _close(got, want, dtype, what):
    err = (got.detach().double() - want.detach().double()).abs().max().item() if got.numel() else 0.0
    assert err <= FWD_ATOL[dtype], f"{what} off by {err}"


def _grads_close(got, want, dtype, names):
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape, f"grad {name}: shape {tuple(g.shape)} vs {tuple(w.shape)}"
        if w.numel() and w.abs().max() > 0:
            assert _max_rel(g, w) <= GRAD_RTOL[dtype], f"grad {name} off by {_max_rel(g, w)}"
        else:
            assert g.abs().max().item() == 0 if g.numel() else True, f"grad {name} should be zero"


# ---------------------------------------------------------------- ALiBi and windows (padded batches)

WINDOWS = [(-1, -1), (3, 0), (0, 3), (70, -1), (-1, 5), (0, 0)]
LENGTHS = [(5, 7), (70, 130), (130, 70), (65, 65)]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("lengths", LENGTHS)
def test_windows_and_alibi_match_the_composite(kernels, window, lengths):
    Lq, Lk = lengths
    dtype = _dtype_for(kernels)
    B, Hq, Hkv, D = 2, 4, 2, 16
    q = (torch.randn(B, Hq, Lq, D, dtype=torch.float64) * 1.5).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, Lk, D, dtype=torch.float64).to(dtype)
    alpha = (1 + torch.rand(Hq, dtype=torch.float64) * 1.6).to(acc_dtype(dtype))  # per head, up to 2.6
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float32)
    causal = "upper_left" if window == (0, 3) else None  # a window combined with causality
    grad_out = torch.randn(B, Hq, Lq, D, dtype=torch.float64).to(dtype)

    leaves = _leaves(q, k, v, alpha)
    out = entmax_cuda.scaled_dot_product_entmax(*leaves, is_causal=causal is not None, enable_gqa=True,
                                                alibi_slopes=slopes, window_size=window)
    grads = torch.autograd.grad(out, leaves, grad_out)
    wide = _leaves(*(t.double() for t in (q, k, v, alpha)))
    want = torch.stack([composite(wide[0][b], wide[1][b], wide[2][b], wide[3].reshape(-1, 1, 1), causal, window,
                                  slopes.double()) for b in range(B)])
    want_grads = torch.autograd.grad(want, wide, grad_out.double())
    _close(out, want, dtype, "output")
    _grads_close(grads, want_grads, dtype, ["q", "k", "v", "alpha"])


def test_alibi_per_batch_entry_and_lower_right_causal(kernels):
    dtype = _dtype_for(kernels)
    B, H, Lq, Lk, D = 3, 2, 9, 80, 8
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64).to(dtype) for L in (Lq, Lk, Lk))
    slopes = torch.rand(B, H, dtype=torch.float32)
    mask = torch.nn.attention.bias.causal_lower_right(Lq, Lk)
    out = entmax_cuda.scaled_dot_product_entmax(q, k, v, 1.5, attn_mask=mask, alibi_slopes=slopes)
    want = torch.stack([composite(q[b].double(), k[b].double(), v[b].double(), 1.5, "lower_right",
                                  slopes=slopes[b].double()) for b in range(B)])
    _close(out, want, dtype, "output")


def test_window_tiles_outside_every_row_are_never_visited():
    """The block map marks the key tiles a query tile visited and used: with a window of 16 keys,
    a 64-query tile can touch at most two key tiles, whatever alpha (softmax uses every visited block)."""
    L, D = 640, 8
    q, k, v = (torch.randn(1, 1, L, D, dtype=torch.float64) for _ in range(3))
    alpha = torch.ones(1, 1, L, dtype=torch.float64)
    _, _, block_map = attention_ops.forward_op(q, k, v, alpha, None, attention_ops.CAUSAL_UPPER_LEFT, D ** -0.5,
                                               None, 16, 0)
    qt, kt = torch.meshgrid(torch.arange(block_map.shape[2]), torch.arange(block_map.shape[3]), indexing="ij")
    reachable = (kt <= qt) & (kt >= qt - 1)
    assert block_map[0, 0][~reachable].sum() == 0
    assert block_map[0, 0][reachable & (kt == qt)].all()


def test_alibi_keeps_block_skipping_exact():
    """Strong ALiBi slopes make far key tiles zero for alpha > 1: they are skipped (block map 0) and
    the result still equals the composite, which skips nothing."""
    L, D = 512, 8
    q, k, v = (torch.randn(1, 2, L, D, dtype=torch.float64) for _ in range(3))
    slopes = torch.tensor([1.0, 0.5])
    alpha = torch.full((1, 2, L), 1.5, dtype=torch.float64)
    out, _, block_map = attention_ops.forward_op(q, k, v, alpha, None, 0, D ** -0.5, slopes.double().expand(1, 2))
    assert block_map.float().mean() < 0.5
    want = composite(q[0], k[0], v[0], 1.5, slopes=slopes.double())
    _close(out[0], want, torch.float64, "output")


# ---------------------------------------------------------------- packed sequences

SEQ_Q = [0, 1, 70, 5, 130]
SEQ_K = [3, 1, 70, 64, 100]


def _cu(lengths):
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)


def _packed(lengths, H, D, dtype, spread=1.0):
    """Random rows of packed sequences (total, H, D); values, hence outputs, of order 1 as the
    half types' output tolerances assume."""
    return (torch.randn(sum(lengths), H, D, dtype=torch.float64) * spread).to(dtype)


@pytest.mark.parametrize("alpha_form", ["float", "per-head", "per-sequence", "per-token"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_varlen_equals_each_sequence_alone(kernels, alpha_form, is_causal):
    """varlen_entmax on packed sequences equals scaled_dot_product_entmax on each sequence alone,
    gradients of q, k, v and alpha included (alpha's in its own shape)."""
    dtype = _dtype_for(kernels)
    Hq, Hkv, D = 4, 2, 16
    n = len(SEQ_Q)
    q, k, v = _packed(SEQ_Q, Hq, D, dtype, 1.5), _packed(SEQ_K, Hkv, D, dtype), _packed(SEQ_K, Hkv, D, dtype)
    acc = acc_dtype(dtype)
    alpha = {"float": 1.6, "per-head": 1 + torch.rand(Hq, dtype=acc),
             "per-sequence": 1 + 1.5 * torch.rand(n, Hq, dtype=acc),
             "per-token": 1 + torch.rand(sum(SEQ_Q), Hq, dtype=acc)}[alpha_form]
    cu_q, cu_k = _cu(SEQ_Q), _cu(SEQ_K)
    grad_out = torch.randn(sum(SEQ_Q), Hq, D, dtype=torch.float64).to(dtype)
    tensors = [q, k, v] + ([alpha] if torch.is_tensor(alpha) else [])
    leaves = _leaves(*tensors)
    a = leaves[3] if torch.is_tensor(alpha) else alpha
    out = entmax_cuda.varlen_entmax(*leaves[:3], cu_q, cu_k, max(SEQ_Q), max(SEQ_K), alpha=a, is_causal=is_causal)
    assert out.shape == (sum(SEQ_Q), Hq, D) and out.dtype == dtype
    grads = torch.autograd.grad(out, leaves, grad_out)

    # the reference: each sequence through the float64 composite (bottom-right causal)
    wide = _leaves(*(t.double() for t in tensors))
    pieces = []
    for s in range(n):
        qs, ks, vs = (t[c[s]:c[s + 1]].transpose(0, 1) for t, c in zip(wide[:3], (cu_q, cu_k, cu_k)))
        if alpha_form == "float":
            a_s = alpha
        elif alpha_form == "per-head":
            a_s = wide[3].reshape(-1, 1, 1)
        elif alpha_form == "per-sequence":
            a_s = wide[3][s].reshape(-1, 1, 1)
        else:
            a_s = wide[3][cu_q[s]:cu_q[s + 1]].t().unsqueeze(-1)
        pieces.append(composite(qs, ks, vs, a_s, "lower_right" if is_causal else None).transpose(0, 1))
    want = torch.cat(pieces)
    want_grads = torch.autograd.grad(want, wide, grad_out.double(), allow_unused=True)
    want_grads = [torch.zeros_like(w) if g is None else g for g, w in zip(want_grads, wide)]
    _close(out, want, dtype, "output")
    _grads_close(grads, want_grads, dtype, ["q", "k", "v", "alpha"][:len(tensors)])


def test_varlen_matches_the_padded_op_bit_for_bit():
    """A sequence's tiles start at its first row, so the packed call computes each sequence exactly
    as scaled_dot_product_entmax does on it alone (same tiles, same order of sums)."""
    Hq, D = 2, 8
    q, k, v = _packed(SEQ_Q, Hq, D, torch.float32), _packed(SEQ_K, Hq, D, torch.float32), _packed(SEQ_K, Hq, D,
                                                                                                  torch.float32)
    cu_q, cu_k = _cu(SEQ_Q), _cu(SEQ_K)
    out = entmax_cuda.varlen_entmax(q, k, v, cu_q, cu_k, 130, 100, alpha=1.7, is_causal=True,
                                    window_size=(40, -1), alibi_slopes=torch.tensor([0.1, 0.3]))
    for s in range(len(SEQ_Q)):
        qs, ks, vs = (t[c[s]:c[s + 1]].transpose(0, 1) for t, c in zip((q, k, v), (cu_q, cu_k, cu_k)))
        alone = entmax_cuda.scaled_dot_product_entmax(
            qs, ks, vs, 1.7, attn_mask=torch.nn.attention.bias.causal_lower_right(qs.shape[1], ks.shape[1]),
            window_size=(40, -1), alibi_slopes=torch.tensor([0.1, 0.3])) if ks.shape[1] else None
        if alone is not None:
            assert torch.equal(out[cu_q[s]:cu_q[s + 1]], alone.transpose(0, 1))


def test_varlen_with_windows_and_alibi_per_sequence(kernels):
    dtype = _dtype_for(kernels)
    H, D = 2, 8
    lq, lk = [40, 3, 100], [40, 90, 100]
    q, k, v = _packed(lq, H, D, dtype), _packed(lk, H, D, dtype), _packed(lk, H, D, dtype)
    slopes = torch.rand(3, H)
    out = entmax_cuda.varlen_entmax(q, k, v, _cu(lq), _cu(lk), 100, 100, alpha=2.3, window_size=(7, 2),
                                    alibi_slopes=slopes)
    cu_q, cu_k = _cu(lq), _cu(lk)
    want = torch.cat([composite(q[cu_q[s]:cu_q[s + 1]].transpose(0, 1).double(),
                                k[cu_k[s]:cu_k[s + 1]].transpose(0, 1).double(),
                                v[cu_k[s]:cu_k[s + 1]].transpose(0, 1).double(), 2.3, None, (7, 2),
                                slopes[s].double()).transpose(0, 1) for s in range(3)])
    _close(out, want, dtype, "output")


def test_window_sides_wider_than_the_sequence_mean_unbounded():
    """A window side of any size, sys.maxsize included, is clipped to the sequence: no overflow."""
    q, k, v = (torch.randn(1, 2, 130, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for wide, unbounded in (((sys.maxsize, 0), (-1, 0)), ((-1, sys.maxsize), (-1, -1)), ((130, 129), (-1, -1))):
        outs = [entmax_cuda.scaled_dot_product_entmax(q, k, v, 1.5, window_size=w) for w in (wide, unbounded)]
        grads = [torch.autograd.grad(o.sum(), (q, k, v)) for o in outs]
        assert torch.equal(outs[0], outs[1])
        for a, b in zip(*grads):
            assert torch.equal(a, b)


def test_varlen_alpha_per_sequence_when_total_equals_the_sequence_count():
    """cu_seqlens [0, 0, 2]: two sequences, two tokens; an alpha of shape (2, H) is per sequence."""
    q, k, v = (torch.randn(2, 1, 4, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, 0, 2], dtype=torch.int32)
    out = entmax_cuda.varlen_entmax(q, k, v, cu, cu, 2, 2, alpha=torch.tensor([[1.5], [2.0]], dtype=torch.float64))
    want = entmax_cuda.varlen_entmax(q, k, v, cu, cu, 2, 2, alpha=2.0)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.slow
def test_varlen_compiles_with_fullgraph():
    H, D = 2, 8
    q, k, v = _packed(SEQ_Q, H, D, torch.float32), _packed(SEQ_K, H, D, torch.float32), _packed(SEQ_K, H, D,
                                                                                                torch.float32)
    cu_q, cu_k = _cu(SEQ_Q), _cu(SEQ_K)

    def f(q, k, v):
        return entmax_cuda.varlen_entmax(q, k, v, cu_q, cu_k, 130, 100, alpha=1.5, is_causal=True)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v), rtol=0, atol=0)


@pytest.mark.slow
def test_kvcache_and_windowed_attention_compile_with_fullgraph():
    """A decode step (cache write included) and a module with ALiBi and a window, under torch.compile."""
    B, H, D, L = 2, 2, 8, 40
    k_cache, v_cache = torch.randn(B, L, H, D), torch.randn(B, L, H, D)
    q, k_new, v_new = torch.randn(B, 1, H, D), torch.randn(B, 1, H, D), torch.randn(B, 1, H, D)
    seqlens = torch.tensor([5, 30], dtype=torch.int32)

    def step(q, k_cache, v_cache, k_new, v_new):
        return entmax_cuda.entmax_with_kvcache(q, k_cache, v_cache, seqlens, alpha=1.5, k=k_new, v=v_new)

    want = step(q, k_cache.clone(), v_cache.clone(), k_new, v_new)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k_cache, v_cache, k_new, v_new)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(k_cache[1, 30], k_new[1, 0])

    attn = entmax_cuda.EntmaxAttention(n_heads=H)
    x = torch.randn(B, H, 70, D)
    slopes = torch.tensor([0.3, 0.1])

    def block(x):
        return attn(x, x, x, is_causal=True, alibi_slopes=slopes, window_size=(16, 0))

    torch.testing.assert_close(torch.compile(block, fullgraph=True, backend="aot_eager")(x), block(x), rtol=0,
                               atol=0)


def test_varlen_opcheck():
    H, D = 2, 8
    q = _packed([3, 70], H, D, torch.float64).permute(1, 0, 2).unsqueeze(0)
    k = _packed([5, 66], H, D, torch.float64).permute(1, 0, 2).unsqueeze(0)
    alpha = torch.full((1, H, 73), 1.5, dtype=torch.float64)
    args = (q, k, k, alpha, None, 2, 0.3, torch.tensor([[0.1, 0.2]] * 2, dtype=torch.float64), 4, 1,
            _cu([3, 70]), _cu([5, 66]), None, 70, 66)
    torch.library.opcheck(attention_ops.forward_op, args)
    out, stats, block_map = attention_ops.forward_op(*args)
    back = (torch.randn_like(out), q, k, k, alpha, None, 2, 0.3, stats, block_map, True) + args[7:]
    torch.library.opcheck(attention_ops.backward_op, back)


# ---------------------------------------------------------------- KV-cache decoding


def _full_causal_last_rows(q, k_all, v_all, used, alpha_rows, slopes=None, window=(-1, -1)):
    """The last Lq rows of the full causal computation over each entry's used keys (float64)."""
    B, Lq = q.shape[:2]
    outs = []
    for b in range(B):
        L = int(used[b])
        qb = q[b].transpose(0, 1).double()
        kb, vb = k_all[b, :L].transpose(0, 1).double(), v_all[b, :L].transpose(0, 1).double()
        a = alpha_rows if not torch.is_tensor(alpha_rows) else alpha_rows[b].reshape(-1, 1, 1).double()
        outs.append(composite(qb, kb, vb, a, "lower_right", window,
                              None if slopes is None else slopes[b].double()).transpose(0, 1))
    return torch.stack(outs)


@pytest.mark.parametrize("Lq", [1, 3, 20])  # 20: more rows than a decoding work item, the tiled kernel
def test_kvcache_equals_the_last_rows_of_full_causal_attention(kernels, Lq):
    dtype = _dtype_for(kernels)
    B, Hq, Hkv, D, Lcache, Lnew = 3, 4, 2, 16, 200, 2
    k_cache = torch.randn(B, Lcache, Hkv, D, dtype=torch.float64).to(dtype)
    v_cache = torch.randn(B, Lcache, Hkv, D, dtype=torch.float64).to(dtype)
    cache_seqlens = torch.tensor([0, 63, 150], dtype=torch.int32)
    k_new = torch.randn(B, Lnew, Hkv, D, dtype=torch.float64).to(dtype)
    v_new = torch.randn(B, Lnew, Hkv, D, dtype=torch.float64).to(dtype)
    q = torch.randn(B, Lq, Hq, D, dtype=torch.float64).to(dtype)
    alpha = (1 + torch.rand(B, Hq, dtype=torch.float64) * 1.5).to(acc_dtype(dtype))
    before = k_cache.clone()
    out = entmax_cuda.entmax_with_kvcache(q, k_cache, v_cache, cache_seqlens, alpha=alpha, k=k_new, v=v_new)
    assert out.shape == (B, Lq, Hq, D)
    for b in range(B):  # the new keys were written in place, nothing else changed
        s = int(cache_seqlens[b])
        assert torch.equal(k_cache[b, s:s + Lnew], k_new[b]) and torch.equal(v_cache[b, s:s + Lnew], v_new[b])
        assert torch.equal(k_cache[b, :s], before[b, :s]) and torch.equal(k_cache[b, s + Lnew:], before[b, s + Lnew:])
    want = _full_causal_last_rows(q, k_cache, v_cache, cache_seqlens + Lnew, alpha)
    _close(out, want, dtype, "output")


def test_kvcache_with_alibi_window_and_no_new_keys(kernels):
    dtype = _dtype_for(kernels)
    B, H, D, Lcache = 2, 2, 8, 150
    k_cache, v_cache = (torch.randn(B, Lcache, H, D, dtype=torch.float64).to(dtype) for _ in range(2))
    q = torch.randn(B, 2, H, D, dtype=torch.float64).to(dtype)
    slopes = torch.tensor([0.2, 0.05])
    cache_seqlens = torch.tensor([130, 5], dtype=torch.int32)
    out = entmax_cuda.entmax_with_kvcache(q, k_cache, v_cache, cache_seqlens, alpha=1.5, alibi_slopes=slopes,
                                          window_size=(70, 0))
    want = _full_causal_last_rows(q, k_cache, v_cache, cache_seqlens, 1.5, slopes.expand(B, H), (70, 0))
    _close(out, want, dtype, "output")


def test_kvcache_decoding_loop_matches_one_full_forward():
    """Token-by-token decoding (each step writes its key and value) gives the rows of one causal forward."""
    B, H, D, L = 2, 2, 8, 12
    q, k, v = (torch.randn(B, L, H, D, dtype=torch.float64) for _ in range(3))
    k_cache, v_cache = torch.zeros(B, L, H, D, dtype=torch.float64), torch.zeros(B, L, H, D, dtype=torch.float64)
    steps = [entmax_cuda.entmax_with_kvcache(q[:, t:t + 1], k_cache, v_cache, t, alpha=1.8, k=k[:, t:t + 1],
                                             v=v[:, t:t + 1]) for t in range(L)]
    full = entmax_cuda.scaled_dot_product_entmax(*(x.transpose(1, 2) for x in (q, k, v)), 1.8, is_causal=True)
    torch.testing.assert_close(torch.cat(steps, 1), full.transpose(1, 2), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- decoding with split keys


def _decode_case(dtype, B=3, Hq=8, Hkv=2, Lq=1, D=24, Dv=40, Lcache=700, used=(700, 333, 0), seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, Hq, D, generator=g, dtype=torch.float64).to(dtype)
    k_cache = torch.randn(B, Lcache, Hkv, D, generator=g, dtype=torch.float64).to(dtype)
    v_cache = torch.randn(B, Lcache, Hkv, Dv, generator=g, dtype=torch.float64).to(dtype)
    return q, k_cache, v_cache, torch.tensor(used, dtype=torch.int32)


@pytest.mark.parametrize("num_splits", [0, 1, 3, 11])
@pytest.mark.parametrize("alpha", [1.0, 1.25, 1.5, 2.0, 3.0])
def test_split_decode_equals_the_composite(kernels, num_splits, alpha):
    """Keys split across work items (each a few rows of one kv head's group): every split count
    gives the composite's rows, GQA groups of 4 over 2 row chunks (Lq 5), an empty cache entry included."""
    dtype = _dtype_for(kernels)
    q, k_cache, v_cache, used = _decode_case(dtype, Lq=5)
    out = entmax_cuda.entmax_with_kvcache(q, k_cache, v_cache, used, alpha=alpha, num_splits=num_splits)
    _close(out, _full_causal_last_rows(q, k_cache, v_cache, used, alpha), dtype, "output")


@pytest.mark.parametrize("num_splits", [1, 4])
def test_split_decode_with_alibi_window_and_alpha_per_head(kernels, num_splits):
    dtype = _dtype_for(kernels)
    B, Hq = 3, 8
    q, k_cache, v_cache, used = _decode_case(dtype, Lq=2, used=(700, 90, 1), seed=1)
    slopes = torch.rand(B, Hq, generator=torch.Generator().manual_seed(2)) * 0.05
    alpha = torch.linspace(1.0, 2.5, Hq, dtype=acc_dtype(dtype))
    window = (250, 0)
    out = entmax_cuda.entmax_with_kvcache(q, k_cache, v_cache, used, alpha=alpha, alibi_slopes=slopes,
                                          window_size=window, num_splits=num_splits)
    want = _full_causal_last_rows(q, k_cache, v_cache, used, alpha.expand(B, Hq), slopes, window)
    _close(out, want, dtype, "output")


def _decode_ops(q, k_cache, v_cache, used, alpha, num_splits):
    rows = (q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2))
    B, Lq, Hq, D = q.shape
    alpha_rows = torch.full((B, Hq, Lq), alpha, dtype=acc_dtype(q.dtype))
    return rows, alpha_rows, D ** -0.5


def test_split_decode_twins_agree_and_schedules_do_not_matter(emulation):
    """The CPU twin and the emulated CUDA kernels run the same passes and merges: float64
    outputs and thresholds to rounding, the same number of evaluations per row; and the
    emulated kernels give bitwise the same results when warps run in random orders."""
    from route_attention_ops import DECODE_TARGET_ITEMS

    q, k_cache, v_cache, used = _decode_case(torch.float64, Lq=3, used=(700, 333, 64))
    for alpha in (1.1, 1.5, 2.5):
        rows, alpha_rows, scale = _decode_ops(q, k_cache, v_cache, used, alpha, 0)
        for splits in (1, 5):
            out, stats = attention_ops.decode_op(*rows, alpha_rows, scale, None, -1, -1, used, splits)
            emu = [emulation.attention_decode(*rows, alpha_rows, scale, None, -1, -1, used, splits,
                                              DECODE_TARGET_ITEMS, schedule) for schedule in (0, 7)]
            torch.testing.assert_close(emu[0][0], out, rtol=0, atol=1e-13)
            torch.testing.assert_close(emu[0][1][:, :, :3], stats[:, :, :3], rtol=0, atol=1e-13)
            assert torch.equal(emu[0][1][:, :, 3], stats[:, :, 3]), "evaluations per row differ"
            assert torch.equal(emu[0][0], emu[1][0]) and torch.equal(emu[0][1], emu[1][1]), "schedule-dependent"


def test_split_decode_statistics_equal_the_single_pass_forward():
    """Row max, threshold and normalisation equal the tiled forward's on the same rows."""
    q, k_cache, v_cache, used = _decode_case(torch.float64, Lq=2, Lcache=3000, used=(3000, 1500, 70))
    for alpha in (1.05, 1.5, 4.0):
        rows, alpha_rows, scale = _decode_ops(q, k_cache, v_cache, used, alpha, 0)
        out, stats = attention_ops.decode_op(*rows, alpha_rows, scale, None, -1, -1, used, 7)
        ref, ref_stats, _ = attention_ops.forward_op(*rows, alpha_rows, None, attention_ops.CAUSAL_LOWER_RIGHT,
                                                     scale, None, -1, -1, None, None, used, 0, 0)
        # two summation orders over 3000 keys: the suite's float64 bound, not bitwise
        torch.testing.assert_close(out, ref, rtol=0, atol=FWD_ATOL[torch.float64])
        torch.testing.assert_close(stats[:, :, :3], ref_stats[:, :, :3], rtol=1e-11, atol=FWD_ATOL[torch.float64])


def test_split_decode_on_long_dense_rows():
    """32k keys at alpha near 1 (dense rows: the candidates hold little of the mass, so the splits
    go through threshold passes) and at alpha 1.5, 64 splits, float32 and float64."""
    for dtype in (torch.float64, torch.float32):
        q, k_cache, v_cache, used = _decode_case(dtype, B=1, Hq=2, Hkv=1, D=16, Dv=16, Lcache=32768,
                                                 used=(32768,), seed=3)
        for alpha in (1.05, 1.5):
            out = entmax_cuda.entmax_with_kvcache(q, k_cache, v_cache, used, alpha=alpha, num_splits=64)
            _close(out, _full_causal_last_rows(q, k_cache, v_cache, used, alpha), dtype, "output")


def test_split_decode_bad_rows_are_nan_and_others_are_not(kernels):
    dtype = _dtype_for(kernels)
    q, k_cache, v_cache, used = _decode_case(dtype, B=2, Hq=2, Hkv=1, Lq=1, Lcache=300, used=(300, 200))
    k_cache[0, 17, 0, 3] = float("nan")  # every row of entry 0 sees key 17
    out = entmax_cuda.entmax_with_kvcache(q, k_cache, v_cache, used, alpha=1.5, num_splits=3)
    assert out[0].isnan().all() and not out[1].isnan().any()
    _close(out[1:], _full_causal_last_rows(q[1:], k_cache[1:], v_cache[1:], used[1:], 1.5), dtype, "output")


def test_split_decode_never_reads_the_cache_past_the_keys_in_use(kernels):
    """Cache rows past cache_seqlens may hold anything (torch.empty, stale bits): NaN there must not
    reach the output, whether in keys or values, inside the last loaded tile or beyond it."""
    dtype = _dtype_for(kernels)
    q, k_cache, v_cache, used = _decode_case(dtype, B=2, Hq=4, Hkv=2, Lq=2, Lcache=200, used=(40, 130))
    for b, n in enumerate(used.tolist()):
        k_cache[b, n:] = float("nan")
        v_cache[b, n:] = float("inf")
    out = entmax_cuda.entmax_with_kvcache(q, k_cache, v_cache, used, alpha=1.5, num_splits=2)
    assert out.isfinite().all()
    _close(out, _full_causal_last_rows(q, k_cache, v_cache, used, 1.5), dtype, "output")


def test_split_decode_values_outside_the_support_do_not_reach_the_output(kernels):
    """The decode op adds p v only where p > 0: a NaN value vector at a visible key whose entmax
    probability is exactly zero leaves the output finite (and equal to the composite)."""
    dtype = _dtype_for(kernels)
    q, k_cache, v_cache, used = _decode_case(dtype, B=1, Hq=2, Hkv=1, Lq=1, Lcache=300, used=(300,))
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k_cache.double())[0, :, 0]  # (Hq, keys)
    j = int(scores.sum(0).argmin())  # the lowest-scoring key for both heads: outside a sparse support
    want = _full_causal_last_rows(q, k_cache, v_cache, used, 2.0)
    v_cache[0, j] = float("nan")
    out = entmax_cuda.entmax_with_kvcache(q, k_cache, v_cache, used, alpha=2.0, num_splits=3)
    _close(out, want, dtype, "output")


@pytest.mark.parametrize("num_splits", [-1, 129, 2.0, True])
def test_split_decode_num_splits_must_be_valid(num_splits):
    q, k_cache, v_cache, used = _decode_case(torch.float32, B=1, used=(5,))
    with pytest.raises(ValueError, match="num_splits"):
        entmax_cuda.entmax_with_kvcache(q, k_cache, v_cache, used, num_splits=num_splits)


# ---------------------------------------------------------------- errors


def _varlen_args():
    q = torch.randn(8, 2, 4)
    return dict(q=q, k=q, v=q, cu_seqlens_q=_cu([3, 5]), cu_seqlens_k=_cu([3, 5]), max_seqlen_q=5, max_seqlen_k=5)


@pytest.mark.parametrize("change, error, match", [
    (dict(cu_seqlens_q=torch.tensor([0, 3, 8])), TypeError, "int32"),
    (dict(cu_seqlens_q=torch.tensor([1, 3, 8], dtype=torch.int32)), ValueError, "start at 0"),
    (dict(cu_seqlens_q=torch.tensor([0, 6, 5, 8], dtype=torch.int32),
          cu_seqlens_k=torch.tensor([0, 3, 5, 8], dtype=torch.int32)), ValueError, "nondecreasing"),
    (dict(cu_seqlens_k=torch.tensor([0, 3, 7], dtype=torch.int32)), ValueError, "end at the total length 8"),
    (dict(cu_seqlens_k=_cu([3])), ValueError, r"shape \(3,\)"),
    (dict(max_seqlen_q=4), ValueError, r"max_seqlen_q \(4\) is below"),
    (dict(max_seqlen_k=-1), TypeError, "max_seqlen_k"),
    (dict(window_size=(-2, 0)), ValueError, "window_size"),
    (dict(window_size=3), TypeError, "window_size"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes must have shape"),
    (dict(alibi_slopes=torch.ones(2, 2, requires_grad=True)), ValueError, "requires grad"),
    (dict(alpha=torch.ones(5, 2)), ValueError, "per token"),
    (dict(k=torch.randn(8, 3, 4), v=torch.randn(8, 3, 4)), ValueError, "multiple"),
    (dict(q=torch.randn(8, 2)), ValueError, "3-d"),
])
def test_varlen_bad_arguments_get_clear_errors(change, error, match):
    args = _varlen_args()
    args.update(change)
    with pytest.raises(error, match=match):
        entmax_cuda.varlen_entmax(**args)


@pytest.mark.parametrize("change, error, match", [
    (dict(cache_seqlens=torch.tensor([9, 0], dtype=torch.int32)), ValueError, "Lcache = 10"),
    (dict(cache_seqlens=torch.tensor([1, 0])), TypeError, "int32"),
    (dict(cache_seqlens=torch.tensor([-1, 0], dtype=torch.int32)), ValueError, "cache_seqlens"),
    (dict(k=torch.randn(2, 2, 1, 4)), ValueError, "both k and v"),
    (dict(alibi_slopes=torch.ones(2, 3)), ValueError, "alibi_slopes"),
    (dict(window_size=(0, -3)), ValueError, "window_size"),
    (dict(alpha=torch.ones(2, 2, 1)), ValueError, "per entry and head"),
])
def test_kvcache_bad_arguments_get_clear_errors(change, error, match):
    args = dict(q=torch.randn(2, 1, 2, 4), k_cache=torch.randn(2, 10, 1, 4), v_cache=torch.randn(2, 10, 1, 4),
                cache_seqlens=torch.tensor([8, 0], dtype=torch.int32), k=torch.randn(2, 2, 1, 4),
                v=torch.randn(2, 2, 1, 4))
    args.update(change)
    if "k" in change and "v" not in change:
        args.pop("v")
    with pytest.raises(error, match=match):
        entmax_cuda.entmax_with_kvcache(**args)


def test_padded_window_and_slopes_errors():
    q = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="window_size values"):
        entmax_cuda.scaled_dot_product_entmax(q, q, q, window_size=(0, -2))
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(Hq,\)"):
        entmax_cuda.scaled_dot_product_entmax(q, q, q, alibi_slopes=torch.ones(3))
