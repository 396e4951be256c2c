"""The split-K decoding design of docs/attention.md ("Decoding: keys split across CTAs"),
checked in float64: its per-split summaries, the merge that fixes the threshold, and the
output merge give entmax(s, alpha) @ v of the whole row.

This checks the design's math (written here in numpy from the document), not a kernel: the
CUDA decode kernels are to follow it, and their tests will compare with the same oracle.
"""

from __future__ import annotations

import numpy as np
import pytest

from oracles import entmax_oracle

K = 16  # candidates kept per split and after the merge (the kernels' kCandidates)


def p_of(u, t, eps):
    """[1 + eps (u - t)]_+^(1/eps), exp(u - t) at eps = 0 (u = s - m)."""
    if eps == 0:
        return np.exp(u - t)
    z = 1 + eps * (u - t)
    return np.where(z > 0, np.maximum(z, 0) ** (1 / eps), 0.0)


def p_over_z(u, t, eps):
    """p / z = p^(1 - eps): the entry's share of -F'(t)."""
    if eps == 0:
        return np.exp(u - t)
    z = 1 + eps * (u - t)
    return np.where(z > 0, np.maximum(z, 0) ** (1 / eps - 1), 0.0)


def split_summary(s):
    """Kernel A of one split: its max, finite count, K largest scores and the largest not kept."""
    finite = s[np.isfinite(s)]
    top = np.sort(finite)[::-1]
    return dict(m=top[0] if top.size else -np.inf, n=top.size, cand=top[:K],
                rejected=top[K] if top.size > K else -np.inf)


def merge_summaries(parts):
    """Merge 1: the row's max and count, the K largest candidates of all splits, the largest
    score known not to be among them (a kept candidate of a split that lost, or a split's own)."""
    m = max(p["m"] for p in parts)
    n = sum(p["n"] for p in parts)
    pool = np.sort(np.concatenate([p["cand"] for p in parts]))[::-1]
    rejected = max([p["rejected"] for p in parts] + ([pool[K]] if pool.size > K else [-np.inf]))
    return m, n, pool[:K], rejected


def root(F, lo, hi, iters=200):
    """Bisection for F(t) = 1 on [lo, hi], F decreasing (float64 to the last bit)."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if F(mid) >= 1:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def split_k_entmax_attention(s, v, alpha, n_splits):
    """The design end to end for one query row: scores s (N,), values v (N, Dv)."""
    eps = alpha - 1
    chunks = np.array_split(np.arange(s.size), n_splits)
    parts = [split_summary(s[c]) for c in chunks]
    m, n, cand, rejected = merge_summaries(parts)
    if eps == 0:  # softmax: flash-decoding's merge, one launch
        ell = [np.exp(s[c] - m).sum() for c in chunks]
        O = [np.exp(s[c] - m) @ v[c] for c in chunks]
        return sum(O) / sum(ell), 0.0, "softmax"
    u_cand = cand - m
    upper = (1 - n ** (-eps)) / eps  # every p <= 1 at t = upper: F(upper) <= 1
    lo = root(lambda t: p_of(u_cand, t, eps).sum(), -1e-300, upper)
    if not (1 + eps * (rejected - m - lo) > 0):  # everything left out is zero at lo: lo is the threshold
        tau, route = lo, "candidates"
    else:  # threshold passes: each sums F_s(t) per split, the merge adds them
        tau, route = root(lambda t: sum(p_of(s[c] - m, t, eps).sum() for c in chunks), lo, upper), "passes"
    P = [p_of(s[c] - m, tau, eps).sum() for c in chunks]
    O = [p_of(s[c] - m, tau, eps) @ v[c] for c in chunks]
    return sum(O) / sum(P), tau, route


@pytest.mark.parametrize("alpha", [1.0, 1.2, 1.5, 2.0, 3.0])
@pytest.mark.parametrize("n_splits", [1, 7, 64])
@pytest.mark.parametrize("N, spread", [(1000, 1.0), (4096, 5.0), (32768, 0.3)])
def test_split_k_design_equals_the_whole_row(alpha, n_splits, N, spread):
    rng = np.random.default_rng(N + n_splits)
    s = rng.standard_normal(N) * spread
    s[rng.integers(0, N, 5)] += 3 * spread  # a few large scores, as attention rows have
    v = rng.standard_normal((N, 8))
    out, tau, route = split_k_entmax_attention(s, v, alpha, n_splits)
    want = entmax_oracle(s, alpha) @ v
    assert np.abs(out - want).max() <= 1e-12, (route, np.abs(out - want).max())


@pytest.mark.parametrize("alpha", [1.5, 2.0, 2.5])
def test_merged_candidates_give_a_lower_bound_and_often_the_threshold(alpha):
    """The merged candidates' threshold never exceeds the row's (F of a subset <= F of the row),
    and for sparse rows (few keys near the top) it is the row's: no threshold pass is needed."""
    rng = np.random.default_rng(0)
    eps = alpha - 1
    exact = 0
    for trial in range(200):
        s = rng.standard_normal(4096) * (0.5 if trial % 2 else 8.0)
        m, n, cand, rejected = merge_summaries([split_summary(c) for c in np.array_split(s, 16)])
        upper = (1 - n ** (-eps)) / eps
        lo = root(lambda t: p_of(cand - m, t, eps).sum(), -1e-300, upper)
        tau = root(lambda t: p_of(s - m, t, eps).sum(), -1e-300, upper)
        assert lo <= tau * (1 + 1e-14) + 1e-300
        if not (1 + eps * (rejected - m - lo) > 0):
            exact += 1
            assert abs(lo - tau) <= 1e-13 * max(1.0, abs(tau))
    assert exact >= 50  # the spread-out half of the rows stops at the merge


def test_row_sums_of_the_split_outputs_make_the_normaliser():
    """sum_s P_s is the row's sum p (1 up to the threshold's rounding): the output merge needs
    no other statistic, and F'(tau) = -sum_s G_s checks the final evaluation as the kernels do."""
    rng = np.random.default_rng(1)
    s, eps = rng.standard_normal(5000) * 2, 0.5
    m = s.max()
    upper = (1 - s.size ** (-eps)) / eps
    tau = root(lambda t: p_of(s - m, t, eps).sum(), -1e-300, upper)
    chunks = np.array_split(s, 9)
    assert abs(sum(p_of(c - m, tau, eps).sum() for c in chunks) - 1) <= 1e-13
    G = sum(p_over_z(c - m, tau, eps).sum() for c in chunks)
    h = 1e-7
    dF = (p_of(s - m, tau + h, eps).sum() - p_of(s - m, tau - h, eps).sum()) / (2 * h)
    assert abs(-G - dF) <= 1e-6 * G
