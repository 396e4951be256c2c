"""Independent oracles for alpha-entmax, written for the numerics tests only.

Nothing here calls entmax_cuda (neither its kernels nor entmax_cuda.reference): the oracles are
numpy (extended precision) and mpmath code written from the definition in
docs/entmax-math.md section 1-2:

    p_i = [1 + eps (u_i - t)]_+ ^ (1/eps),   u = x - max(x),   eps = alpha - 1,   sum p = 1

(alpha = 1 is softmax; -inf entries give 0 and do not count; an all -inf row gives zeros;
NaN in a row gives a NaN row).

* `entmax_oracle`: vectorised over rows, in numpy.longdouble (80-bit extended on x86-64:
  64-bit mantissa, eps 1.1e-19, so ~2000x below float64's rounding). Bisection on t in the
  bracket [0, (1 - d^-eps)/eps] (d = number of finite entries), then safeguarded Newton
  steps (f'(t) = -sum p^(2-alpha)), then p /= sum p. Only the entries that can be in the
  support for some t >= 0 (u_i > -1/eps) are iterated over. t converges to a few ulps of
  longdouble; for an entry p_i the error is ~1e-19 * p_i^(2-alpha) (the ill-conditioning of
  entries at the support edge for alpha > 2, which every implementation shares).
* `sparsemax_sorted`, `entmax15_sorted`: the exact sort-based closed forms (Martins &
  Astudillo 2016; Peters et al. 2019 as in the `entmax` library's entmax15), in longdouble.
* `entmax_mp`, `alpha_grad_mp`: mpmath (50 significant digits by default) for hard rows:
  safeguarded Newton/bisection on t until the bracket is below 10^-(dps-5) or a Newton
  step is below 10^-(dps-10); the
  alpha-gradient by central differences in alpha (h = 1e-20, error ~h^2), one-sided
  3-point differences at alpha = 1.
* `alpha_grad_oracle`: the alpha-gradient in longdouble by implicit differentiation of the
  definition (dp_i/deps from d(sum p)/deps = 0), in a cancellation-free arrangement; checked
  against `alpha_grad_mp` by test_entmax_regressions.py::test_oracles_agree_with_each_other.
* `dx_oracle`: the closed-form vector-Jacobian product J^T dy with J = diag(s) - s s^T / sum s,
  s_i = p_i^(2-alpha) on the support.
"""

from __future__ import annotations

import functools
import math

import mpmath
import numpy as np

LD = np.longdouble


# ----------------------------------------------------------------------------- helpers

def _as_rows(x, alpha):
    """x as an (R, n) longdouble array, alpha as an (R,) longdouble array."""
    x = np.asarray(x, dtype=np.float64) if not (isinstance(x, np.ndarray) and x.dtype == LD) else x
    shape = x.shape
    xr = np.array(x, dtype=LD).reshape(-1, shape[-1]) if x.ndim else np.array(x, dtype=LD).reshape(1, 1)
    a = np.asarray(alpha, dtype=np.float64) if not (isinstance(alpha, np.ndarray) and alpha.dtype == LD) else alpha
    a = np.array(a, dtype=LD)
    if a.ndim == len(shape) and a.ndim > 0 and a.shape[-1] == 1:
        a = a[..., 0]
    a = np.broadcast_to(a, shape[:-1]).reshape(-1)
    return xr, np.array(a, dtype=LD), shape


def _p_of_t(u, t, eps):
    """[1 + eps (u - t)]_+^(1/eps) for eps > 0 (u (R,K), t (R,1), eps (R,1)), with p=0 at -inf."""
    z = eps * (u - t)
    inside = z > -1
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        p = np.exp(np.log1p(np.where(inside, z, 0)) / eps)
    return np.where(inside, p, 0)


# ----------------------------------------------------------------------------- forward oracles

def entmax_oracle(x, alpha, *, bisect_steps: int = 40, newton_steps: int = 8, out_dtype=np.float64):
    """alpha-entmax of every row (last axis) of x, as float64 (or out_dtype=np.longdouble).

    alpha: a scalar or an array broadcastable to x.shape[:-1] (or x.shape[:-1] + (1,)).
    """
    xr, a, shape = _as_rows(x, alpha)
    R, n = xr.shape
    out = np.zeros((R, n), dtype=LD)
    if n == 0 or R == 0:
        return out.reshape(shape).astype(out_dtype)
    nan_rows = np.isnan(xr).any(axis=1) | np.isnan(a) | (a < 1)
    finite = xr != -np.inf
    dcount = finite.sum(axis=1)
    ok = ~nan_rows & (dcount > 0)
    pos_inf = (xr == np.inf).any(axis=1) & ok
    if pos_inf.any():  # +inf entries share the mass (the limit of x_i -> +inf); not used by the tests
        nan_rows |= pos_inf
        ok &= ~pos_inf
    soft = ok & (a == 1)
    if soft.any():
        xs = xr[soft]
        u = xs - xs.max(axis=1, keepdims=True)
        e = np.exp(u)
        out[soft] = e / e.sum(axis=1, keepdims=True)
    ent = ok & (a > 1)
    if ent.any():
        out[ent] = _entmax_rows(xr[ent], a[ent], dcount[ent], bisect_steps, newton_steps)
    out[nan_rows] = np.nan
    return out.reshape(shape).astype(out_dtype)


def _entmax_rows(x, alpha, d, bisect_steps, newton_steps):
    R, n = x.shape
    eps = (alpha - 1).reshape(R, 1)
    m = x.max(axis=1, keepdims=True)
    u = x - m  # -inf stays -inf
    # entries with u <= -1/eps are 0 for every t >= 0: iterate over the sorted candidates only
    order = np.argsort(-u, axis=1, kind="stable")
    us = np.take_along_axis(u, order, axis=1)
    cand = us > -1 / eps
    K = max(1, int(cand.sum(axis=1).max()))
    uk = np.where(cand[:, :K], us[:, :K], -np.inf)
    lo = np.zeros((R, 1), dtype=LD)
    dd = d.astype(LD).reshape(R, 1)
    hi = -np.expm1(-eps * np.log(dd)) / eps
    hi = hi * (1 + 1e-15) + 1e-300  # keep the root strictly inside
    for _ in range(bisect_steps):
        mid = (lo + hi) / 2
        f = _p_of_t(uk, mid, eps).sum(axis=1, keepdims=True) - 1
        up = f >= 0
        lo = np.where(up, mid, lo)
        hi = np.where(up, hi, mid)
    t = (lo + hi) / 2
    for _ in range(newton_steps):
        p = _p_of_t(uk, t, eps)
        f = p.sum(axis=1, keepdims=True) - 1
        up = f >= 0
        lo = np.where(up, t, lo)
        hi = np.where(up, hi, t)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            s = np.where(p > 0, p ** (1 - eps), 0).sum(axis=1, keepdims=True)
            tn = t + f / s
        inside = (tn >= lo) & (tn <= hi) & np.isfinite(tn)
        t = np.where(inside, tn, (lo + hi) / 2)
    pk = _p_of_t(uk, t, eps)
    pk = pk / pk.sum(axis=1, keepdims=True)
    ps = np.zeros((R, n), dtype=LD)
    ps[:, :K] = pk
    out = np.zeros((R, n), dtype=LD)
    np.put_along_axis(out, order, ps, axis=1)
    return out


def entmax_threshold_oracle(x, alpha):
    """t* of each row (the threshold in the u = x - max(x) parametrisation), longdouble; alpha > 1."""
    p = entmax_oracle(x, alpha, out_dtype=LD)
    xr, a, shape = _as_rows(x, alpha)
    pr = p.reshape(xr.shape)
    eps = (a - 1)[:, None]
    u = xr - xr.max(axis=1, keepdims=True)
    i = pr.argmax(axis=1)
    pm = pr[np.arange(len(i)), i][:, None]
    um = u[np.arange(len(i)), i][:, None]
    return (um - (pm ** eps - 1) / eps)[:, 0].reshape(shape[:-1])


def sparsemax_sorted(x):
    """Exact sparsemax (alpha = 2) of every row by sorting, longdouble -> float64."""
    xr = np.array(np.asarray(x, dtype=np.float64), dtype=LD)
    shape = xr.shape
    xr = xr.reshape(-1, shape[-1])
    out = np.zeros_like(xr)
    for r, row in enumerate(xr):
        fin = row[row != -np.inf]
        if fin.size == 0:
            continue
        z = np.sort(fin)[::-1]
        k = np.arange(1, z.size + 1, dtype=LD)
        cs = np.cumsum(z)
        kmax = int(np.nonzero(1 + k * z > cs)[0].max()) + 1
        tau = (cs[kmax - 1] - 1) / kmax
        out[r] = np.where(row != -np.inf, np.maximum(row - tau, 0), 0)
    return out.reshape(shape).astype(np.float64)


def entmax15_sorted(x):
    """Exact 1.5-entmax of every row by sorting (the closed form of the `entmax` library's entmax15:
    X = (x - max)/2, tau from the running mean and variance of the sorted X, p = [X - tau]_+^2)."""
    xr = np.array(np.asarray(x, dtype=np.float64), dtype=LD)
    shape = xr.shape
    xr = xr.reshape(-1, shape[-1])
    out = np.zeros_like(xr)
    for r, row in enumerate(xr):
        fin = row != -np.inf
        if not fin.any():
            continue
        X = (row - row[fin].max()) / 2
        z = np.sort(X[fin])[::-1]
        rho = np.arange(1, z.size + 1, dtype=LD)
        mean = np.cumsum(z) / rho
        # sum of squared deviations, with the running (Welford) update: no mean_sq - mean^2 cancellation
        ss = np.empty_like(z)
        mu, acc = LD(0), LD(0)
        for j, v in enumerate(z):
            dlt = v - mu
            mu = mu + dlt / (j + 1)
            acc = acc + dlt * (v - mu)
            ss[j] = acc
        delta = (1 - ss) / rho
        tau = mean - np.sqrt(np.maximum(delta, 0))
        support = int((tau <= z).sum())
        t = tau[support - 1]
        out[r] = np.where(fin, np.maximum(X - t, 0) ** 2, 0)
    return out.reshape(shape).astype(np.float64)


# ----------------------------------------------------------------------------- backward oracles

def dx_oracle(p, dy, alpha):
    """J^T dy for the output p (any float array, rows on the last axis) at alpha, longdouble -> float64."""
    pr, a, shape = _as_rows(np.asarray(p, dtype=np.float64) if not isinstance(p, np.ndarray) or p.dtype != LD else p,
                            alpha)
    dyr = np.array(np.asarray(dy, dtype=np.float64), dtype=LD).reshape(pr.shape)
    eps = (a - 1)[:, None]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = np.where(pr > 0, pr ** (1 - eps), 0)
        ssum = s.sum(axis=1, keepdims=True)
        q = (s * dyr).sum(axis=1, keepdims=True) / np.where(ssum > 0, ssum, 1)  # a fully masked row: 0
    return (s * (dyr - q)).reshape(shape).astype(np.float64)


def _phi(y):
    """(expm1(y) - y) / y^2, accurately for all y (-> 1/2 at 0)."""
    y = np.asarray(y, dtype=LD)
    small = np.abs(y) < 1e-3
    ys = np.where(small, 1, y)
    series = 0.5 + y / 6 + y ** 2 / 24 + y ** 3 / 120 + y ** 4 / 720 + y ** 5 / 5040
    with np.errstate(over="ignore", invalid="ignore"):
        direct = (np.expm1(ys) - ys) / ys ** 2
    return np.where(small, series, direct)


def _dp_dalpha_parts(p, alpha):
    """The two terms of dp_i/deps = c_i - s_i C/S (dp_dalpha_oracle), as rows, and p's shape."""
    pr, a, shape = _as_rows(p, alpha)
    eps = (a - 1)[:, None]
    on = pr > 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ell = np.where(on, np.log(np.where(on, pr, 1)), 0)
        s = np.where(on, pr * np.exp(-eps * ell), 0)
        c = np.where(on, -pr * ell ** 2 * _phi(-eps * ell), 0)
    ssum = s.sum(axis=1, keepdims=True)
    return c, s * c.sum(axis=1, keepdims=True) / np.where(ssum > 0, ssum, 1), shape


def dp_dalpha_oracle(p, alpha):
    """dp_i/dalpha of each row from the exact output p (longdouble in, longdouble out).

    Implicit differentiation of p_i = [1 + eps (u_i - t)]^(1/eps) with sum p = 1:
        dp_i/deps = c_i - s_i * (sum_j c_j) / (sum_j s_j),
        c_i = -p_i l_i^2 phi(-eps l_i),  s_i = p_i^(1-eps),  l_i = ln p_i,  phi(y) = (e^y - 1 - y)/y^2
    (c_i = -p_i l_i / eps + (p_i - s_i) / eps^2 rearranged without cancellation).
    """
    c, shared, shape = _dp_dalpha_parts(p, alpha)
    return (c - shared).reshape(shape)


def dp_dalpha_terms(p, alpha):
    """|c_i| + |s_i C/S| of dp_dalpha_oracle: the size of the terms its difference cancels."""
    c, shared, shape = _dp_dalpha_parts(p, alpha)
    return (np.abs(c) + np.abs(shared)).reshape(shape)


def resolves(x, alpha, z_min=1e-13):
    """Per row: whether the longdouble oracle resolves it. An entry on the support with
    z = p^(alpha-1) = 1 + eps (u - t) below z_min keeps fewer than 6 of longdouble's 19 digits
    of z (for alpha ~ 5 and scores 1e-3 apart the oracle's edge entry was 1.8e-4 where mpmath
    gives 2.4e-6): such rows need mpmath (the curated hard rows)."""
    p = entmax_oracle(x, alpha, out_dtype=LD)
    pr, a, shape = _as_rows(p, alpha)
    eps = (a - 1)[:, None]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        z = np.where(pr > 0, np.exp(eps * np.log(np.where(pr > 0, pr, 1))), 1)
    return ~((z < z_min) & (eps > 0)).any(axis=1).reshape(shape[:-1])


def alpha_grad_oracle(x, alpha, dy, with_error=False):
    """dL/dalpha per row for L = sum(dy * entmax(x, alpha)), longdouble -> float64, shape x.shape[:-1].

    with_error: also a bound on the oracle's own rounding, per row. dp_i/deps = c_i - s_i C/S is a
    difference of terms that grow like p_i^(1-eps) (for alpha = 5 on a constant row of 4096: 3e9
    each, equal), so longdouble leaves ~eps_ld * sum_i |dy_i| (|c_i| + |s_i C/S|) of error in the
    sum, the bound returned (x 16)."""
    p = entmax_oracle(x, alpha, out_dtype=LD)
    dpa = dp_dalpha_oracle(p, alpha)
    dyl = np.array(np.asarray(dy, dtype=np.float64), dtype=LD).reshape(p.shape)
    value = (dyl * dpa).sum(axis=-1).astype(np.float64)
    if not with_error:
        return value
    terms = dp_dalpha_terms(p, alpha)
    scale = (np.abs(dyl) * terms).sum(axis=-1)
    return value, (16 * np.finfo(LD).eps * scale).astype(np.float64)


# ----------------------------------------------------------------------------- mpmath oracle

def _mp_row(row):
    vals = []
    for v in row:
        v = float(v)
        vals.append(None if v == -math.inf else mpmath.mpf(v))
    return vals


def _mp_p(u, t, eps):
    if eps == 0:
        return [mpmath.exp(v - t) if v is not None else mpmath.mpf(0) for v in u]
    out = []
    for v in u:
        if v is None:
            out.append(mpmath.mpf(0))
            continue
        z = eps * (v - t)
        out.append(mpmath.exp(mpmath.log1p(z) / eps) if z > -1 else mpmath.mpf(0))
    return out


def _mp_solve(row, alpha, t_guess=None):
    """(p as mpf list, t) of one row at the current mpmath precision; alpha an mpf."""
    vals = _mp_row(row)
    fin = [v for v in vals if v is not None]
    if not fin:
        return [mpmath.mpf(0)] * len(vals), None
    m = max(fin)
    u = [v - m if v is not None else None for v in vals]
    eps = alpha - 1
    if eps == 0:
        e = _mp_p(u, 0, eps)
        s = mpmath.fsum(e)
        return [v / s for v in e], mpmath.log(s)
    # candidates only (u > -1/eps): the others are 0 for every t >= 0
    cand = [v for v in u if v is not None and v > -1 / eps]
    d = len(fin)
    lo, hi = mpmath.mpf(0), -mpmath.expm1(-eps * mpmath.log(d)) / eps
    tol = mpmath.mpf(10) ** (-(mpmath.mp.dps - 5))

    def f_and_s(t):
        f, s = mpmath.mpf(-1), mpmath.mpf(0)
        for v in cand:
            z = eps * (v - t)
            if z > -1:
                lz = mpmath.log1p(z)
                f += mpmath.exp(lz / eps)
                s += mpmath.exp(lz * (1 - eps) / eps)  # p^(1-eps) = p^(2-alpha)
        return f, s

    t = t_guess if t_guess is not None and lo < t_guess < hi else (lo + hi) / 2
    for _ in range(2000):
        f, s = f_and_s(t)
        if f >= 0:
            lo = t
        else:
            hi = t
        if f == 0 or hi - lo < tol:
            break
        tn = t + f / s if s > 0 else None
        if tn is not None and lo <= tn <= hi and abs(tn - t) < (hi - lo):
            if abs(tn - t) < tol * mpmath.mpf(10) ** 5:  # Newton converged (below this, rounding noise)
                t = tn
                break
            t = tn
        else:
            t = (lo + hi) / 2
    p = _mp_p(u, t, eps)
    s = mpmath.fsum(p)
    return [v / s for v in p], t


def _t_guess(row, alpha):
    """The longdouble oracle's threshold as a starting point for mpmath's Newton steps (None at alpha = 1
    or for a fully masked row)."""
    if alpha <= 1 or all(v == -math.inf for v in row):
        return None
    return mpmath.mpf(float(entmax_threshold_oracle(np.array(row, dtype=np.float64), alpha)))


@functools.lru_cache(maxsize=512)
def _entmax_mp_cached(row, alpha, dps):
    with mpmath.workdps(dps):
        p, _ = _mp_solve(row, mpmath.mpf(alpha), _t_guess(row, alpha))
        return tuple(p)


def entmax_mp(row, alpha, dps: int = 50):
    """alpha-entmax of one row (a sequence of floats, -inf allowed) in mpmath; a tuple of mpf.
    alpha is a float (the exact binary value is used)."""
    return _entmax_mp_cached(tuple(float(v) for v in row), float(alpha), dps)


@functools.lru_cache(maxsize=512)
def _dp_dalpha_mp_cached(row, alpha, dps):
    with mpmath.workdps(dps + 20):
        a = mpmath.mpf(alpha)
        h = mpmath.mpf(10) ** -20
        p0, t0 = _mp_solve(row, a, _t_guess(row, alpha))
        if a == 1:  # one-sided, second order: (-3 p(1) + 4 p(1+h) - p(1+2h)) / 2h
            p1, _ = _mp_solve(row, a + h, t0)
            p2, _ = _mp_solve(row, a + 2 * h, t0)
            return tuple((-3 * u + 4 * v - w) / (2 * h) for u, v, w in zip(p0, p1, p2))
        pp, _ = _mp_solve(row, a + h, t0)
        pm, _ = _mp_solve(row, a - h, t0)
        return tuple((v - w) / (2 * h) for v, w in zip(pp, pm))


def dp_dalpha_mp(row, alpha, dps: int = 50):
    """dp_i/dalpha of one row by central differences in mpmath (tuple of mpf)."""
    return _dp_dalpha_mp_cached(tuple(float(v) for v in row), float(alpha), dps)


def alpha_grad_mp(row, alpha, dy, dps: int = 50) -> float:
    """dL/dalpha of one row for L = sum(dy * entmax(row, alpha)), by mpmath central differences."""
    dp = dp_dalpha_mp(row, alpha, dps)
    with mpmath.workdps(dps):
        return float(mpmath.fsum(mpmath.mpf(float(g)) * v for g, v in zip(dy, dp)))


def dx_mp(row, alpha, dy, dps: int = 50):
    """J^T dy of one row from the mpmath output (list of floats)."""
    p = entmax_mp(row, alpha, dps)
    with mpmath.workdps(dps):
        eps = mpmath.mpf(float(alpha)) - 1
        s = [v ** (1 - eps) if v > 0 else mpmath.mpf(0) for v in p]
        S = mpmath.fsum(s)
        q = mpmath.fsum(si * mpmath.mpf(float(g)) for si, g in zip(s, dy)) / S
        return [float(si * (mpmath.mpf(float(g)) - q)) for si, g in zip(s, dy)]
