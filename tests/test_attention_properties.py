"""Property-based tests (hypothesis) of scaled_dot_product_entmax's threshold passes.

Random shapes (B, heads with GQA, Lq and Lk in 1..200 across the 64-tile edges, head dims),
alpha in [1, 5] (a float, per head, per query row; alpha > 2 included), score spreads from 1e-3
to ~100 (the queries scaled), causal (upper-left and lower-right) or not, bool and additive masks
(with fully masked rows: the docs define a zero output row and zero gradients there), float32 and
float64, against a materialised float64 composite written here, independent of the library:
scores = q k^T scale + mask -> a float64 bisection entmax per row -> @ v, with the entmax's
gradients (scores and alpha) by the implicit function theorem. The same cases run a few times
through the CUDA kernels' own source on the CPU (tests/cuda_emulation), when it builds.

Tolerances are tests/test_attention.py's (FWD_ATOL, GRAD_RTOL, ALPHA_GRAD_RTOL). Its float32
output bound (1e-5) is stated for scores of |s| ~ 10 ("scores of |s| ~ 10 carry ~1e-6 of
rounding"): a float32 score carries rounding proportional to |s|, so the output bound here is
FWD_ATOL * max(1, max|s| / 10). Hypothesis profiles (example counts) are tests/conftest.py's.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch.nn.attention.bias import causal_lower_right

import entmax_cuda
from entmax_cuda import attention, attention_ops
from testing import REPO_ROOT, acc_dtype

sys.path.insert(0, str(REPO_ROOT / "tests" / "cuda_emulation"))
from route_attention_ops import _EmulatedAttention  # noqa: E402

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Lower right causal bias")  # torch's: SDPA gives NaN rows there, we zeros

# tests/test_attention.py's tolerances (output: absolute; gradients: relative to the largest entry)
FWD_ATOL = {torch.float64: 1e-11, torch.float32: 1e-5}
GRAD_RTOL = {torch.float64: 1e-9, torch.float32: 5e-5}
ALPHA_GRAD_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}
# Per example: cases are drawn from a seed, not element by element (hypothesis shrinks shapes,
# alpha, spread, masks and the seed); the profile decides how many examples run.
PROPERTY_SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.data_too_large])


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the reference's bisection is many small ops (as conftest does for test_entmax*)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- the float64 reference (not the library's)

BISECTION_STEPS = 80  # the bracket [0, ln d] or narrower halves to below float64's resolution by ~60


def _series_dl_deps(a, x):
    """d/d eps of log1p(eps a)/eps = (x/(1+x) - log1p(x))/eps^2, x = eps a, as a^2 sum_{n>=2} (-1)^(n-1)
    (n-1)/n x^(n-2): no cancellation for small x (exact at eps = 0: -a^2/2)."""
    total = torch.zeros_like(x)
    power = torch.ones_like(x)
    for n in range(2, 24):
        total = total + (-1) ** (n - 1) * (n - 1) / n * power
        power = power * x
    return a * a * total


class _BisectEntmax(torch.autograd.Function):
    """alpha-entmax of each row of s (R, L) (float64, -inf = masked) with alpha (R, 1) >= 1.

    p_j = (1 + eps (u_j - t))_+^(1/eps) with eps = alpha - 1, u = s - max s, t in [0, (1 - d^-eps)/eps]
    (d unmasked keys; ln d at eps = 0) found by bisection, then p normalised. A row with no unmasked
    key gives p = 0 and zero gradients. Backward: with g = p / z = p^(2 - alpha) on the support,
    ds = g (dp - sum(g dp) / sum g); d alpha = sum_j dp_j (p_j r_j - g_j sum(p r) / sum g) with
    r_j = d/d eps of ln p_j at fixed t (implicit differentiation of sum p = 1)."""

    @staticmethod
    def forward(ctx, s, alpha):
        eps = alpha - 1
        m = s.amax(-1, keepdim=True)
        empty = m == float("-inf")
        u = torch.where(empty, torch.full_like(s, float("-inf")), s - torch.where(empty, 0.0, m))
        d = torch.isfinite(u).sum(-1, keepdim=True).clamp(min=1).double()
        soft = eps == 0
        safe_eps = torch.where(soft, 1.0, eps)
        upper = torch.where(soft, d.log(), -torch.expm1(-eps * d.log()) / safe_eps)

        def mass(t):
            a = u - t
            x = eps * a
            live = (1 + x > 0) & torch.isfinite(a)
            safe_x = torch.where(live, x, 0.0)
            p_entmax = torch.exp(torch.log1p(safe_x) / safe_eps)
            p_soft = torch.exp(torch.where(torch.isfinite(a), a, -math.inf))
            return torch.where(soft, p_soft, torch.where(live, p_entmax, 0.0))

        lo, hi = torch.zeros_like(upper), upper
        for _ in range(BISECTION_STEPS):
            mid = (lo + hi) / 2
            above = mass(mid).sum(-1, keepdim=True) > 1  # threshold too low
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        t = (lo + hi) / 2
        p = mass(t)
        total = p.sum(-1, keepdim=True)
        p = torch.where(empty, 0.0, p / torch.where(empty, 1.0, total))
        a = torch.where(p > 0, u - t, 0.0)
        ctx.save_for_backward(p, a, eps)
        return p

    @staticmethod
    def backward(ctx, dp):
        p, a, eps = ctx.saved_tensors
        on = p > 0
        z = 1 + eps * a
        g = torch.where(on, p / torch.where(on, z, 1.0), 0.0)
        G = g.sum(-1, keepdim=True)
        safe_G = torch.where(G > 0, G, 1.0)
        ds = g * (dp - (g * dp).sum(-1, keepdim=True) / safe_G)
        dalpha = None
        if ctx.needs_input_grad[1]:
            x = eps * a
            safe_eps = torch.where(eps == 0, 1.0, eps)
            direct = (x / torch.where(on, z, 1.0) - torch.log1p(torch.where(on, x, 0.0))) / safe_eps**2
            r = torch.where(on, torch.where(x.abs() < 0.1, _series_dl_deps(a, x), direct), 0.0)
            c = (p * r).sum(-1, keepdim=True) / safe_G
            dalpha = (dp * (p * r - g * c)).sum(-1, keepdim=True)
        return ds, dalpha


def bisect_entmax(s: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """_BisectEntmax over the last dim of s (..., L), alpha broadcastable to (..., 1)."""
    alpha = alpha.expand(s.shape[:-1] + (1,))
    return _BisectEntmax.apply(s.reshape(-1, s.shape[-1]), alpha.reshape(-1, 1)).reshape(s.shape)


def reference(q, k, v, alpha_rows, keep, bias, scale):
    """float64 entmax(q k^T scale + mask, alpha) @ v: q (B, Hq, Lq, E), k/v (B, Hkv, Lk, *) (heads repeated
    for GQA), alpha_rows broadcastable to (B, Hq, Lq, 1), keep a bool (True = attend) and bias an additive
    mask broadcastable to the scores, or None."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-2, -1) * scale
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    if bias is not None:
        s = s + bias
    return bisect_entmax(s, alpha_rows) @ v, s


# ---------------------------------------------------------------- the reference checks itself


def test_reference_matches_closed_forms():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(50, 37, generator=g, dtype=torch.float64) * 3
    s[3] = float("-inf")
    s[4, 5:] = float("-inf")
    one = torch.ones(50, 1, dtype=torch.float64)
    soft = bisect_entmax(s, one)
    want = torch.softmax(s, -1).nan_to_num(0.0)
    torch.testing.assert_close(soft, want, rtol=0, atol=1e-15)
    # sparsemax by sorting (Martins & Astudillo): p = (s - tau)_+
    z = s.sort(-1, descending=True).values
    kk = torch.arange(1, 38, dtype=torch.float64)
    cums = z.nan_to_num(neginf=0).cumsum(-1)
    support = (1 + kk * z > cums) & torch.isfinite(z)
    k_max = support.sum(-1, keepdim=True)
    tau = (cums.gather(-1, (k_max - 1).clamp(min=0)) - 1) / k_max.clamp(min=1)
    sparse = torch.clamp(s - tau, min=0).nan_to_num(0.0)
    sparse[3] = 0
    torch.testing.assert_close(bisect_entmax(s, 2 * one), sparse, rtol=0, atol=1e-14)
    # 1.5-entmax: p = ((s/2 - tau)_+)^2, sum 1
    p15 = bisect_entmax(s, 1.5 * one)
    assert (p15.sum(-1)[torch.arange(50) != 3] - 1).abs().max() < 1e-14
    on = p15 > 0
    tau15 = s / 2 - p15.sqrt()
    spread = torch.where(on, tau15, -math.inf).amax(-1) - torch.where(on, tau15, math.inf).amin(-1)
    assert spread[torch.arange(50) != 3].max() < 1e-13  # one threshold for the row's support
    assert (torch.where(on, -math.inf, s / 2).amax(-1) <= torch.where(on, tau15, math.inf).amin(-1))[
        torch.arange(50) != 3].all()  # and the entries off it lie at or below it


@pytest.mark.parametrize("alpha", [1.0, 1.0001, 1.5, 2.5, 4.0])
def test_reference_gradients_by_finite_differences(alpha):
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(4, 9, generator=g, dtype=torch.float64) * 2).requires_grad_()
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[1, ::2] = False
    a = torch.full((4, 1), alpha, dtype=torch.float64, requires_grad=alpha > 1)

    def fn(s, a):
        return bisect_entmax(s.masked_fill(~mask, float("-inf")), a)

    assert torch.autograd.gradcheck(fn, (s, a), eps=1e-7, atol=1e-6, fast_mode=True)
    if alpha == 1.0:  # the one-sided alpha-derivative at 1: the limit of the difference quotient from above
        a1 = a.detach().requires_grad_()
        dp = torch.randn(4, 9, generator=g, dtype=torch.float64)
        (grad,) = torch.autograd.grad((fn(s.detach(), a1) * dp).sum(), a1)
        h = 1e-6
        quotient = ((fn(s.detach(), a1.detach() + h) - fn(s.detach(), a1.detach())) * dp).sum(-1, keepdim=True) / h
        torch.testing.assert_close(grad, quotient, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- cases

LENGTHS = st.one_of(st.integers(1, 12), st.sampled_from([63, 64, 65, 127, 128, 129, 191, 200]), st.integers(1, 200))
HEAD_DIMS = st.one_of(st.integers(1, 24), st.sampled_from([32, 33, 64, 65, 128]))
# alpha in [1, 2] in the properties held; alpha in (2, 5] in test_alpha_above_two (xfail: see
# KNOWN_COUNTEREXAMPLES; float32 alpha > 2 is documented as not held, docs/attention.md).
ALPHAS = st.one_of(st.sampled_from([1.0, 1.25, 1.5, 2.0]), st.floats(1.0, 2.0))
ALPHAS_ABOVE_TWO = st.one_of(st.sampled_from([2.5, 3.0, 5.0]), st.floats(2.0, 5.0))
SPREADS = st.sampled_from([1e-3, 0.1, 1.0, 3.0, 10.0, 30.0, 100.0])  # query scale: scores ~ N(0, spread^2)
# float32: up to 10 (the existing tests' |s| ~ 10); at 100 rows saturate and the gradients, relative to their
# (tiny) largest entry, miss: KNOWN_COUNTEREXAMPLES["float32 saturated softmax"].
SPREADS_FLOAT32 = st.sampled_from([1e-3, 0.1, 1.0, 3.0, 10.0])
MAX_SCORES = 400_000  # B * Hq * Lq * Lk per example: keeps the float64 bisection to ~1 s at worst


@st.composite
def cases(draw, dtypes=(torch.float32, torch.float64), spreads=SPREADS, alphas=None, lengths=LENGTHS, heads=3):
    dtype = draw(st.sampled_from(dtypes))
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, heads))
    group = draw(st.integers(1, heads))
    Hq = Hkv * group
    Lq, Lk = draw(lengths), draw(lengths)
    while B * Hq * Lq * Lk > MAX_SCORES:
        Lq = max(1, Lq // 2)
    E = draw(HEAD_DIMS)
    Ev = draw(st.one_of(st.just(E), HEAD_DIMS))
    alpha_kind = draw(st.sampled_from(["float", "per head", "per query"]))
    alphas = ALPHAS if alphas is None else alphas
    if alpha_kind == "float":
        alpha = draw(alphas)
    elif alpha_kind == "per head":
        alpha = torch.tensor(draw(st.lists(alphas, min_size=Hq, max_size=Hq)), dtype=torch.float64)
    else:
        lo, hi = sorted((draw(alphas), draw(alphas)))
        alpha = lo + (hi - lo) * torch.rand(B, Hq, Lq, 1, generator=torch.Generator().manual_seed(Lq),
                                            dtype=torch.float64)
    masking = draw(st.sampled_from(["none", "causal", "causal lower-right", "bool", "additive"]))
    mask_shape = draw(st.sampled_from(["scores", "keys", "pairs"]))  # (B, Hq, Lq, Lk), (B, 1, 1, Lk), (Lq, Lk)
    keep_prob = draw(st.sampled_from([0.05, 0.5, 0.95]))
    masked_rows = draw(st.booleans())  # some rows with every key masked (masks only)
    spread = draw(spreads if dtype == torch.float64 or spreads is not SPREADS else SPREADS_FLOAT32)
    seed = draw(st.integers(0, 2**16))
    return dict(dtype=dtype, B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, E=E, Ev=Ev, alpha=alpha, masking=masking,
                mask_shape=mask_shape, keep_prob=keep_prob, masked_rows=masked_rows, spread=spread, seed=seed)


def _describe(case):
    shown = dict(case)
    if torch.is_tensor(case["alpha"]):
        a = case["alpha"]
        shown["alpha"] = a.flatten().tolist() if a.numel() <= 9 else f"tensor {tuple(a.shape)} in [{a.min():.4g}, {a.max():.4g}]"
    return shown


def build(case, device):
    """(q, k, v, alpha, kwargs for the API, (keep, bias) for the reference, grad_out), inputs rounded to dtype."""
    g = torch.Generator().manual_seed(case["seed"])
    B, Hq, Hkv, Lq, Lk, E, Ev = (case[n] for n in ("B", "Hq", "Hkv", "Lq", "Lk", "E", "Ev"))
    dtype = case["dtype"]
    q = (torch.randn(B, Hq, Lq, E, generator=g, dtype=torch.float64) * case["spread"]).to(dtype)
    k = torch.randn(B, Hkv, Lk, E, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, Lk, Ev, generator=g, dtype=torch.float64).to(dtype)
    grad_out = torch.randn(B, Hq, Lq, Ev, generator=g, dtype=torch.float64).to(dtype)
    kwargs = {"enable_gqa": Hq != Hkv}
    keep = bias = None
    masking = case["masking"]
    if masking == "causal":
        kwargs["is_causal"] = True
        keep = torch.ones(Lq, Lk, dtype=torch.bool).tril(0)
    elif masking == "causal lower-right":
        kwargs["attn_mask"] = causal_lower_right(Lq, Lk)
        keep = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
    elif masking in ("bool", "additive"):
        shape = {"scores": (B, Hq, Lq, Lk), "keys": (B, 1, 1, Lk), "pairs": (Lq, Lk)}[case["mask_shape"]]
        attend = torch.rand(shape, generator=g) < case["keep_prob"]
        if case["masked_rows"]:
            attend[..., ::3, :] = False  # every third row (or, for a key mask, every batch: all rows) masked
        if masking == "bool":
            keep = attend
            kwargs["attn_mask"] = keep
        else:
            bias = torch.randn(shape, generator=g, dtype=torch.float64) * 2
            bias = bias.masked_fill(~attend, float("-inf")).to(acc_dtype(dtype))
            kwargs["attn_mask"] = bias
            bias = bias.double()
    alpha = case["alpha"]
    if torch.is_tensor(alpha):
        alpha_rows = alpha.to(acc_dtype(dtype)).double()  # what the kernel computes with
        alpha_rows = alpha_rows.reshape(1, Hq, 1, 1) if alpha.dim() == 1 else alpha_rows
    else:
        alpha_rows = torch.tensor(alpha, dtype=acc_dtype(dtype)).double().reshape(1, 1, 1, 1)
    kwargs = {n: (t.to(device) if torch.is_tensor(t) else t) for n, t in kwargs.items()}
    return q, k, v, alpha, alpha_rows, kwargs, (keep, bias), grad_out


def _rel(got, want) -> float:
    want = want.detach().cpu().double()
    return ((got.detach().cpu().double() - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()


def check_case(case, device, alpha_grad=None):
    """The fused op on `case` against the reference. alpha_grad: check a tensor alpha's gradient (default: float64
    only; the float32 alpha-gradient misses ALPHA_GRAD_RTOL by up to 1.9x, KNOWN_COUNTEREXAMPLES["float32 ..."])."""
    if alpha_grad is None:
        alpha_grad = case["dtype"] == torch.float64
    try:
        note(repr(_describe(case)))
    except hypothesis.errors.InvalidArgument:  # not inside a hypothesis test
        pass
    q, k, v, alpha, alpha_rows, kwargs, (keep, bias), grad_out = build(case, device)
    dtype = q.dtype
    leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
    alpha_leaf = alpha.detach().clone().to(device).requires_grad_() if torch.is_tensor(alpha) else alpha
    out = entmax_cuda.scaled_dot_product_entmax(*leaves, alpha_leaf, **kwargs)
    wrt = leaves + ([alpha_leaf] if torch.is_tensor(alpha) else [])
    grads = torch.autograd.grad(out, wrt, grad_out.to(device))

    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_alpha = alpha_rows.clone().requires_grad_()
    scale = case["E"] ** -0.5
    want, scores = reference(*ref_leaves, ref_alpha, keep, bias, scale)
    ref_grads = torch.autograd.grad(want, ref_leaves + [ref_alpha], grad_out.double())

    assert out.shape == want.shape and out.dtype == dtype
    finite = scores[torch.isfinite(scores)]
    s_max = finite.abs().max().item() if finite.numel() else 0.0
    atol = FWD_ATOL[dtype] * max(1.0, s_max / 10)
    err = (out.detach().cpu().double() - want).abs().max().item()
    assert err <= atol, f"output off by {err:.3g} (bound {atol:.3g}, max |score| {s_max:.3g})"
    if keep is not None or bias is not None:  # rows with every key masked: zero output and zero q-gradient
        dead = ~torch.isfinite(scores).any(-1)
        assert out.detach().cpu()[dead].eq(0).all() and grads[0].cpu()[dead].eq(0).all()
    for name, got, ref in zip("qkv", grads[:3], ref_grads[:3]):
        assert got.shape == ref.shape and got.dtype == dtype
        err = _rel(got, ref)
        assert err <= GRAD_RTOL[dtype], f"grad {name} off by {err:.3g} of its largest entry"
    if torch.is_tensor(alpha) and alpha_grad:
        ref_alpha_grad = ref_grads[3].reshape(alpha.shape)  # (1, Hq, 1, 1) per head, (B, Hq, Lq, 1) per query
        got = grads[3]
        assert got.shape == alpha.shape
        err = _rel(got, ref_alpha_grad)
        assert err <= ALPHA_GRAD_RTOL[dtype], f"grad alpha off by {err:.3g} of its largest entry"


# ---------------------------------------------------------------- properties

def _share(divisor):
    """A share of the profile's example count (tests/conftest.py: "short" 100, "long" 2000): keeps the short run
    of this module near 90 s on one core (~1 s per example here, ~2 s emulated)."""
    return settings(PROPERTY_SETTINGS, max_examples=max(1, settings.default.max_examples // divisor))


@_share(4)
@given(case=cases())
def test_output_and_gradients_match_the_float64_bisection_composite(device, case):
    check_case(case, device)


@_share(8)
@given(case=cases(spreads=st.sampled_from([1e-3, 1e-2])))
def test_nearly_flat_scores(device, case):
    """Scores within ~1e-3 of each other: every key in the support, the threshold near its bracket's top.
    (The float32 alpha-gradient is not checked: KNOWN_COUNTEREXAMPLES["float32 flat alpha 1"].)"""
    check_case(case, device)


@pytest.mark.xfail(reason="alpha > 2 misses the bounds: see KNOWN_COUNTEREXAMPLES (float64: off by ~2e-11 in the "
                          "output and up to ~2e-6 in the gradients)", strict=False)
@settings(_share(4), phases=[Phase.explicit, Phase.reuse, Phase.generate])  # an expected failure: no shrinking
@given(case=cases(alphas=ALPHAS_ABOVE_TWO))
def test_alpha_above_two(device, case):
    check_case(case, device)


# Minimal failing inputs the properties found (shrunk by hypothesis), beside what the float64 reference and the
# library's own entmax op give on the same scores. Strict xfail: a fix makes them pass, and then they belong in
# the properties above (widen ALPHAS, drop the alpha_grad exception).
_MINIMAL = dict(B=1, Hq=1, Hkv=1, Lq=1, Lk=63, E=1, Ev=1, masking="none", mask_shape="scores", keep_prob=0.05,
                masked_rows=False, spread=1e-3, seed=0)
KNOWN_COUNTEREXAMPLES = {
    # float32, alpha > 2 (documented as not held): z = p^(alpha-1) ~ 63^-4 is below float32's resolution of
    # 1 + eps (u - t). Output off by 2.6e-5 (bound 1e-5); the float32 composite through entmax_cuda.entmax 3e-8.
    "float32 alpha 5 flat": dict(_MINIMAL, dtype=torch.float32, alpha=5.0),
    # float32, alpha > 2, ordinary scores (6 x 100, D = 128, spread 1): output off by 6.0e-4 (bound 1e-5). The
    # threshold and entries are computed in float32, where an entry at the support edge (dp/du = p^(2 - alpha))
    # is ill-conditioned; the entmax op computes such rows in double. The decode path (entmax_with_kvcache)
    # shares the row math and the miss.
    "float32 alpha 5 random scores": dict(_MINIMAL, dtype=torch.float32, alpha=5.0, Lq=6, Lk=100, E=128, Ev=64,
                                          spread=1.0),
    # grad q off by 1.1e-4 of its largest entry (bound 5e-5); the float32 composite 3e-7.
    "float32 alpha 2.5 flat": dict(_MINIMAL, dtype=torch.float32, alpha=2.5),
    # alpha-gradient at alpha = 1 (a per-head tensor) off by 1.9e-4 (bound 1e-4): the gradient (6e-5) is the
    # small difference of summands ~ ln(63)^2 / 2; the float32 composite through entmax_cuda.entmax: 6.8e-4.
    "float32 flat alpha 1": dict(_MINIMAL, dtype=torch.float32, alpha=torch.tensor([1.0], dtype=torch.float64)),
    # float32 alpha-gradient, ordinary spreads: off by 1.31e-4 (causal, per-head alpha 1.625, Lq = Lk = 63, E = 33,
    # spread 0.1) and 1.08e-4 (alpha (1.0, 1.5), B = 2, GQA 2/1, L = 6, E = 14, spread 100; emulated CUDA kernels).
    "float32 alpha gradient causal": dict(_MINIMAL, dtype=torch.float32, alpha=torch.tensor([1.625], dtype=torch.float64),
                                          masking="causal", Lq=63, E=33, Ev=33, spread=0.1),
    # float32, alpha = 1, two keys, scores (17.65, 4.08): p = (1 - 1.3e-6, 1.3e-6). grad q -4.566e-8 against
    # -4.659e-8 (2% of the largest entry; bound 5e-5), dk not summing to zero: dS = p (dP - sum p dP) cancels in
    # float32 (the same formula as the float32 composite's; relative to the terms summed the error is ~ulp).
    "float32 saturated softmax": dict(_MINIMAL, dtype=torch.float32, alpha=1.0, Lk=2, spread=100.0, seed=1),
    # float32, alpha = 2, ordinary scores (Lq = Lk = 63, E = 128, spread 3, max |score| 13.6): output off by
    # 1.5e-5 (bound 1.36e-5). Found by the long profile. The float32 composite (float32 scores, entmax_cuda.entmax,
    # float32 P V) is off by 1.35e-5 too: the bound is about what rounding the scores to float32 at E = 128 costs.
    "float32 alpha 2 random scores": dict(_MINIMAL, dtype=torch.float32, alpha=2.0, Hq=2, Lq=63, E=128, Ev=128,
                                          spread=3.0, seed=4),
    # float32, alpha = 1.875, flat (Hq = 3, Lq = 63, Lk = 64, E = 1, spread 1e-2): grad q off by 6.6e-5 of its
    # largest entry (bound 5e-5). Found by the long profile: on a flat support near alpha = 2 the float32
    # entries carry relative errors up to ~1e-4 (1 + eps (u - t) cancels when p^(alpha-1) is small), as in the
    # entmax op (FLAT_SUPPORT_Z in test_entmax_properties.py).
    "float32 alpha 1.875 flat gradients": dict(_MINIMAL, dtype=torch.float32, alpha=1.875, Hq=3, Lq=63, Lk=64,
                                               spread=1e-2),
    # float64: output off by 2.2e-11 (bound 1e-11), row 19; entmax_cuda.entmax equals the reference there
    # exactly. The fused row took 1 evaluation (the start path: t = the candidates' subset threshold) and its
    # 1/sum p is 1 + 9.0e-12 (support of 3, smallest p 1.9e-3: z = p^3 ~ 7e-9).
    "float64 alpha 4 subset threshold": dict(_MINIMAL, dtype=torch.float64, alpha=4.0, Lq=63, spread=1.0),
    # float64, flat: output off by 1.7e-11, 1/sum p = 1 + 2.8e-12 after 1 evaluation; here entmax_cuda.entmax
    # is off by the same amount (the reference is unchanged by re-rounding the scores).
    "float64 alpha 5 flat": dict(_MINIMAL, dtype=torch.float64, alpha=5.0, Lk=5, E=65, Ev=65),
    # float64, flat: grad q off by 1.8e-6 of its largest entry (bound 1e-9).
    "float64 alpha 4.5 flat gradients": dict(_MINIMAL, dtype=torch.float64, alpha=4.5, Lq=8, Lk=8, E=32, Ev=32),
}


@pytest.mark.xfail(strict=True, raises=AssertionError)
@pytest.mark.parametrize("name", list(KNOWN_COUNTEREXAMPLES))
def test_known_counterexample(name):
    check_case(KNOWN_COUNTEREXAMPLES[name], "cpu", alpha_grad=True)


# ---------------------------------------------------------------- the CUDA kernels' source on the CPU


@_share(20)
@given(case=cases(dtypes=(torch.float64, torch.float32), spreads=st.sampled_from([1e-3, 0.1, 1.0, 10.0]),
                  lengths=st.one_of(st.integers(1, 8), st.sampled_from([63, 64, 65])), heads=2))
def test_emulated_cuda_kernels_match_the_float64_bisection_composite(emulation, case):
    """A few of the same cases through the CUDA kernels (SIMT: the float32 and float64 path) run on the CPU,
    called as the Python layer calls the op (tests/cuda_emulation/route_attention_ops.py's routing)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ENTMAX_ATTENTION_PATH", "simt")
        patch.setattr(_EmulatedAttention, "ops", emulation)
        patch.setattr(attention_ops, "forward_op", _EmulatedAttention.apply)
        check_case(case, "cpu")


# ---------------------------------------------------------------- decoding with the keys split


@st.composite
def decode_cases(draw, dtypes=(torch.float32, torch.float64), alphas=ALPHAS, max_cache=600):
    dtype = draw(st.sampled_from(dtypes))
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 2))
    Hq = Hkv * draw(st.integers(1, 4))
    Lq = draw(st.integers(1, 6))
    Lcache = draw(st.one_of(st.integers(1, 70), st.sampled_from([64, 65, 128, 129]), st.integers(1, max_cache)))
    used = [draw(st.integers(0, Lcache)) for _ in range(B)]
    E = draw(HEAD_DIMS)
    Ev = draw(st.one_of(st.just(E), HEAD_DIMS))
    per_head = draw(st.booleans())
    alpha = (torch.tensor(draw(st.lists(alphas, min_size=Hq, max_size=Hq)), dtype=torch.float64) if per_head
             else draw(alphas))
    slopes = draw(st.sampled_from([None, 0.01, 0.3]))
    window = (draw(st.sampled_from([-1, 0, 5, 100])), draw(st.sampled_from([-1, 0, 3])))
    spread = draw(SPREADS if dtype == torch.float64 else SPREADS_FLOAT32)
    num_splits = draw(st.sampled_from([0, 1, 2, 3, 7, 16]))
    seed = draw(st.integers(0, 2**16))
    return dict(dtype=dtype, B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lcache=Lcache, used=used, E=E, Ev=Ev, alpha=alpha,
                slopes=slopes, window=window, spread=spread, num_splits=num_splits, seed=seed)


def check_decode_case(case):
    """entmax_with_kvcache on `case` against the float64 bisection composite of the rows it computes: query i
    of Lq sees keys j <= i + L - Lq of the L in use, within the window, ALiBi added."""
    note(repr(_describe(case)))
    g = torch.Generator().manual_seed(case["seed"])
    B, Hq, Hkv, Lq, Lcache, E, Ev = (case[n] for n in ("B", "Hq", "Hkv", "Lq", "Lcache", "E", "Ev"))
    dtype = case["dtype"]
    q = (torch.randn(B, Lq, Hq, E, generator=g, dtype=torch.float64) * case["spread"]).to(dtype)
    k_cache = torch.randn(B, Lcache, Hkv, E, generator=g, dtype=torch.float64).to(dtype)
    v_cache = torch.randn(B, Lcache, Hkv, Ev, generator=g, dtype=torch.float64).to(dtype)
    used = torch.tensor(case["used"], dtype=torch.int32)
    alpha = case["alpha"]
    slopes = None if case["slopes"] is None else torch.full((Hq,), case["slopes"]) * torch.linspace(0.5, 1.0, Hq)
    out = entmax_cuda.entmax_with_kvcache(q, k_cache, v_cache, used,
                                          alpha=alpha.to(acc_dtype(dtype)) if torch.is_tensor(alpha) else alpha,
                                          alibi_slopes=slopes, window_size=case["window"],
                                          num_splits=case["num_splits"])
    assert out.shape == (B, Lq, Hq, Ev) and out.dtype == dtype
    scale = E ** -0.5
    left, right = case["window"]
    worst, s_max = 0.0, 0.0
    for b in range(B):
        L = int(used[b])
        qb = q[b].transpose(0, 1).double()  # (Hq, Lq, E)
        kb = k_cache[b, :L].transpose(0, 1).double().repeat_interleave(Hq // Hkv, 0)
        vb = v_cache[b, :L].transpose(0, 1).double().repeat_interleave(Hq // Hkv, 0)
        i = torch.arange(Lq).unsqueeze(1) + L - Lq  # the key each query row is aligned with
        j = torch.arange(L).unsqueeze(0)
        keep = j <= i
        if left >= 0:
            keep &= j >= i - left
        if right >= 0:
            keep &= j <= i + right
        s = qb @ kb.transpose(-2, -1) * scale
        if slopes is not None:
            s = s - slopes.double().reshape(-1, 1, 1) * (i - j).abs().double()
        s = s.masked_fill(~keep, float("-inf"))
        a = alpha.to(acc_dtype(dtype)).double().reshape(Hq, 1, 1) if torch.is_tensor(alpha) else torch.tensor(
            alpha, dtype=acc_dtype(dtype)).double().reshape(1, 1, 1)
        want = bisect_entmax(s, a.expand(Hq, Lq, 1)) @ vb if L else torch.zeros(Hq, Lq, Ev, dtype=torch.float64)
        finite = s[torch.isfinite(s)]
        s_max = max(s_max, finite.abs().max().item() if finite.numel() else 0.0)
        worst = max(worst, (out[b].transpose(0, 1).double() - want).abs().max().item())
    atol = FWD_ATOL[dtype] * max(1.0, s_max / 10)
    assert worst <= atol, f"output off by {worst:.3g} (bound {atol:.3g}, max |score| {s_max:.3g})"


@_share(4)
@given(case=decode_cases())
def test_split_decode_matches_the_float64_bisection_composite(case):
    """The decode path (the CPU twin of the split-K kernels): any split count, GQA, ragged caches (empty
    ones too), windows, ALiBi, alpha per head, against the float64 composite."""
    check_decode_case(case)


@_share(20)
@given(case=decode_cases(max_cache=200))
def test_emulated_split_decode_matches_the_float64_bisection_composite(emulation, case):
    """A few of the same cases through the CUDA decode kernels run on the CPU."""
    from route_attention_ops import emulated_decode_op

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention_ops, "decode_op", emulated_decode_op(emulation))
        check_decode_case(case)


@pytest.mark.xfail(reason="alpha > 2 misses the bounds as the tiled forward does (KNOWN_COUNTEREXAMPLES)",
                   strict=False)
@settings(_share(4), phases=[Phase.explicit, Phase.reuse, Phase.generate])  # an expected failure: no shrinking
@given(case=decode_cases(alphas=ALPHAS_ABOVE_TWO))
def test_split_decode_alpha_above_two(case):
    check_decode_case(case)
