"""Vectorised inverse-variance pooling of effect sizes (fixed and random effects).

All estimators work on ``(k, p)`` arrays: ``k`` studies/sites along axis 0 and ``p`` features
(ROIs, skeleton voxels) along axis 1, with NaN marking a site that is missing for a feature. Every
feature is estimated at once; the iterative estimators (ML, REML, PM) update only the features that
have not converged yet.

The formulas follow Viechtbauer (2005, J Educ Behav Stat 30:261) and the R package metafor
(Viechtbauer 2010, J Stat Softw 36(3)), whose results on ``dat.bcg`` the tests reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from ..errors import HarmonizationError

TAU2_METHODS = ("FE", "DL", "HE", "SJ", "PM", "ML", "REML")


@dataclass
class PoolResult:
    """Pooled estimate(s) of a meta-analysis.

    Scalars for a 1-D input, arrays of length ``p`` for a ``(k, p)`` input.

    Attributes
    ----------
    estimate, se : pooled effect and its standard error.
    ci_low, ci_high : confidence interval at ``level``.
    z : Wald statistic (a t statistic with ``df`` degrees of freedom when Knapp-Hartung is used).
    p : two-sided p-value of ``z``.
    tau2 : between-site variance (0 for the fixed-effect model).
    I2 : percentage of total variability due to heterogeneity (Higgins & Thompson 2002).
    H2 : ratio of total to sampling variability.
    Q, Q_p : Cochran's heterogeneity statistic and its chi-square p-value (k - 1 df).
    k : number of sites contributing to the estimate.
    pi_low, pi_high : prediction interval for the effect in a new site.
    df : degrees of freedom of the test (``inf`` for the normal distribution).
    method : tau^2 estimator; knha : whether the Knapp-Hartung adjustment was applied.
    """

    estimate: Any
    se: Any
    ci_low: Any
    ci_high: Any
    z: Any
    p: Any
    tau2: Any
    I2: Any
    H2: Any
    Q: Any
    Q_p: Any
    k: Any
    pi_low: Any
    pi_high: Any
    df: Any
    method: str = "REML"
    knha: bool = False
    level: float = 0.95

    _ARRAY_FIELDS = (
        "estimate", "se", "ci_low", "ci_high", "z", "p", "tau2", "I2", "H2", "Q", "Q_p", "k",
        "pi_low", "pi_high", "df",
    )

    def to_frame(self, index: Any = None) -> pd.DataFrame:
        """One row per feature with every statistic as a column."""
        data = {name: np.atleast_1d(getattr(self, name)) for name in self._ARRAY_FIELDS}
        frame = pd.DataFrame(data, index=index)
        frame["method"] = self.method
        frame["knha"] = self.knha
        return frame

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dictionary."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)


def _as_2d(
    yi: Any, vi: Any, weights: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, bool]:
    y = np.asarray(yi, dtype=float)
    v = np.asarray(vi, dtype=float)
    if y.shape != v.shape:
        raise HarmonizationError(f"yi has shape {y.shape} but vi has shape {v.shape}")
    if y.ndim not in (1, 2):
        raise HarmonizationError(
            f"yi must be 1-D (sites,) or 2-D (sites, features), got {y.ndim}-D"
        )
    scalar = y.ndim == 1
    if scalar:
        y, v = y[:, None], v[:, None]
    w = None
    if weights is not None:
        w = np.asarray(weights, dtype=float)
        if w.ndim == 1 and w.shape[0] == y.shape[0]:
            w = np.broadcast_to(w[:, None], y.shape)
        if w.shape != y.shape:
            raise HarmonizationError(
                f"weights have shape {np.shape(weights)}; expected {y.shape[:1]} or {y.shape}"
            )
    return y, v, w, scalar


def _col(m: Any, idx: np.ndarray) -> Any:
    """Columns ``idx`` of the observation mask (a scalar 1.0 when nothing is missing)."""
    return m if np.ndim(m) == 0 else m[:, idx]


def _sums(w: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean and sum of weights along axis 0."""
    sw = w.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu = (w * y).sum(axis=0) / sw
    return mu, sw


def _tau2_dl(y, v, m, k):
    """DerSimonian & Laird (1986) method-of-moments estimator, truncated at 0."""
    w = m / v
    mu, sw = _sums(w, y)
    q = (w * (y - mu) ** 2).sum(axis=0)
    c = sw - (w**2).sum(axis=0) / sw
    with np.errstate(invalid="ignore", divide="ignore"):
        tau2 = (q - (k - 1)) / c
    return np.where(k > 1, np.maximum(tau2, 0.0), 0.0)


def _tau2_he(y, v, m, k):
    """Hedges (1983) / Hedges & Olkin (1985) unweighted method-of-moments estimator."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ybar = (m * y).sum(axis=0) / k
        ss = (m * (y - ybar) ** 2).sum(axis=0)
        tau2 = ss / (k - 1) - (m * v).sum(axis=0) / k
    return np.where(k > 1, np.maximum(tau2, 0.0), 0.0)


def _tau2_sj(y, v, m, k):
    """Sidik & Jonkman (2005) estimator, started (as metafor) at tau0 = sum((y - ybar)^2) / k."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ybar = (m * y).sum(axis=0) / k
        tau0 = (m * (y - ybar) ** 2).sum(axis=0) / k
        w = m / (v + tau0)
        mu, _ = _sums(w, y)
        tau2 = tau0 * (w * (y - mu) ** 2).sum(axis=0) / (k - 1)
    return np.where((k > 1) & (tau0 > 0), tau2, 0.0)


def _gen_q(y, v, m, tau2):
    """Generalised Q statistic and its derivative with respect to tau^2."""
    w = m / (v + tau2)
    mu, _ = _sums(w, y)
    r2 = (y - mu) ** 2
    return (w * r2).sum(axis=0), -(w**2 * r2).sum(axis=0)


_EPS = np.finfo(float).eps
#: metafor's ``uniroot`` tolerance for Paule-Mandel (R's default ``.Machine$double.eps^0.25``).
PM_TOL_METAFOR = _EPS**0.25
#: metafor's default upper end of the tau^2 search interval (``control$tau2.max``).
PM_TAU2_MAX = 100.0


def _zeroin(f, a: np.ndarray, b: np.ndarray, tol: float, maxiter: int) -> np.ndarray:
    """Brent's (1973) root finder, vectorised: an element-wise port of R's ``zeroin`` (uniroot).

    ``f(t, idx)`` evaluates the function for the elements ``idx`` at ``t``; ``f(a)`` and ``f(b)``
    must have opposite signs. Every element follows exactly the path R's ``uniroot`` would, so
    results equal R's to rounding error at the same tolerance.
    """
    n = a.size
    a = a.astype(float).copy()
    b = b.astype(float).copy()
    all_idx = np.arange(n)
    fa = f(a, all_idx)
    fb = f(b, all_idx)
    c, fc = a.copy(), fa.copy()
    root = np.full(n, np.nan)
    root[fa == 0] = a[fa == 0]
    root[(fb == 0) & (fa != 0)] = b[(fb == 0) & (fa != 0)]
    idx = np.flatnonzero((fa != 0) & (fb != 0))
    for _ in range(maxiter + 1):
        if idx.size == 0:
            break
        A, B, C, FA, FB, FC = a[idx], b[idx], c[idx], fa[idx], fb[idx], fc[idx]
        prev = B - A
        swap = np.abs(FC) < np.abs(FB)
        A = np.where(swap, B, A)
        B = np.where(swap, C, B)
        C = np.where(swap, A, C)
        FA = np.where(swap, FB, FA)
        FB = np.where(swap, FC, FB)
        FC = np.where(swap, FA, FC)
        tol_act = 2 * _EPS * np.abs(B) + tol / 2
        new = (C - B) / 2
        done = (np.abs(new) <= tol_act) | (FB == 0)
        root[idx[done]] = B[done]
        with np.errstate(invalid="ignore", divide="ignore"):
            cb = C - B
            secant = A == C
            t1s = FB / FA
            ps, qs = cb * t1s, 1.0 - t1s
            q0, t1, t2 = FA / FC, FB / FC, FB / FA
            pi_ = t2 * (cb * q0 * (q0 - t1) - (B - A) * (t1 - 1.0))
            qi = (q0 - 1.0) * (t1 - 1.0) * (t2 - 1.0)
            p = np.where(secant, ps, pi_)
            q = np.where(secant, qs, qi)
            q = np.where(p > 0, -q, q)
            p = np.abs(p)
            interp = (np.abs(prev) >= tol_act) & (np.abs(FA) > np.abs(FB))
            accept = interp & (p < 0.75 * cb * q - np.abs(tol_act * q) / 2) & (
                p < np.abs(prev * q / 2)
            )
            new = np.where(accept, p / q, new)
        new = np.where(np.abs(new) < tol_act, np.where(new > 0, tol_act, -tol_act), new)
        A, FA = B, FB
        B = B + new
        keep = ~done
        FB = FB.copy()
        if keep.any():
            FB[keep] = f(B[keep], idx[keep])
        same = ((FB > 0) & (FC > 0)) | ((FB < 0) & (FC < 0))
        C = np.where(same, A, C)
        FC = np.where(same, FA, FC)
        a[idx], b[idx], c[idx], fa[idx], fb[idx], fc[idx] = A, B, C, FA, FB, FC
        idx = idx[keep]
    if idx.size:
        root[idx] = b[idx]
    return root


def _tau2_pm(y, v, m, k, tol: float | None, maxiter: int):
    """Paule & Mandel (1982): root of the generalised Q(tau^2) = k - 1.

    Solved, as metafor does, by Brent's method (R's ``uniroot``) on [0, 100] with tolerance
    ``tol`` (default: R's ``.Machine$double.eps^0.25``, which is what metafor reproduces); the
    upper end is widened to ``sum((y - ybar)^2) / (k - 1)``, where Q(tau^2) < k - 1 always holds,
    when 100 does not bracket the root. Q(0) <= k - 1 gives tau^2 = 0.
    """
    tol = PM_TOL_METAFOR if tol is None else tol
    p = y.shape[1]
    tau2 = np.zeros(p)
    q0, _ = _gen_q(y, v, m, 0.0)
    active = np.flatnonzero((k > 1) & (q0 > k - 1))
    if active.size == 0:
        return tau2
    ya, va, ma, ka = y[:, active], v[:, active], _col(m, active), k[active]

    def g(t, idx):
        return _gen_q(ya[:, idx], va[:, idx], _col(ma, idx), t)[0] - (ka[idx] - 1)

    ybar = (ma * ya).sum(axis=0) / ka
    bound = 1.01 * (ma * (ya - ybar) ** 2).sum(axis=0) / (ka - 1)
    hi = np.full(active.size, PM_TAU2_MAX)
    all_idx = np.arange(active.size)
    hi = np.where(g(hi, all_idx) > 0, np.maximum(bound, PM_TAU2_MAX), hi)
    tau2[active] = _zeroin(g, np.zeros(active.size), hi, tol, maxiter)
    return tau2


def _score(y, v, m, t, reml: bool):
    """Score U(tau^2) of the (restricted) log-likelihood (x2) and its derivative dU/dtau^2.

    ML: ``U = sum w^2 r^2 - sum w``; REML: ``U = sum w^2 r^2 - tr(P)`` with ``tr(P) = sum w -
    sum w^2 / sum w`` (Viechtbauer 2005, eqs. 9-12), ``w = 1 / (v + tau^2)``, ``r = y - mu``.
    """
    w = m / (v + t)
    mu, sw = _sums(w, y)
    r = y - mu
    w2 = w * w
    w3 = w2 * w
    sw2, sw3 = w2.sum(axis=0), w3.sum(axis=0)
    s2r2 = (w2 * r * r).sum(axis=0)
    s3r2 = (w3 * r * r).sum(axis=0)
    s2r = (w2 * r).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        du = -2.0 * s3r2 + 2.0 * s2r**2 / sw + sw2
        if reml:
            u = s2r2 - sw + sw2 / sw
            du = du - 2.0 * sw3 / sw + (sw2 / sw) ** 2
        else:
            u = s2r2 - sw
    return u, du


def _neg2ll(y, v, m, t, reml: bool):
    """-2 (restricted) log-likelihood of the random-effects model, up to a constant.

    ``sum w (y - mu)^2`` is expanded as ``sum w y^2 - (sum w y)^2 / sum w`` (fewer passes over
    the data); callers centre ``y`` per feature first so that no precision is lost.
    """
    s = v + t
    w = m / s
    logv = np.log(s)
    wy = w * y
    sw, swy = w.sum(axis=0), wy.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (logv if np.ndim(m) == 0 else m * logv).sum(axis=0) + (wy * y).sum(axis=0)
        out = out - swy**2 / sw
        return out + np.log(sw) if reml else out


def _tau2_likelihood(y, v, m, k, reml: bool, tol: float, maxiter: int):
    """(Restricted) maximum likelihood: global maximiser of the likelihood on tau^2 >= 0.

    A grid over ``[0, upper]`` (0 and 20 log-spaced points; the score is negative beyond ``upper``)
    locates the global maximum, which can be away from the one Fisher scoring started at the
    Hedges estimate finds when the likelihood is bimodal; then the estimating equation of
    Viechtbauer (2005, eqs. 9-12) is solved in the bracketing grid interval by safeguarded Newton
    steps (Newton-Raphson inside a shrinking bracket, bisection when a step leaves it; Press et
    al., Numerical Recipes ``rtsafe``). Quadratic convergence where Fisher scoring, metafor's
    algorithm, is linear; the same root where the likelihood is unimodal (dat.bcg). Only
    features that have not converged are updated.
    """
    p = y.shape[1]
    tau2 = np.zeros(p)
    idx = np.flatnonzero(k > 1)
    if idx.size == 0:
        return tau2
    ya, va, ma, ka = y[:, idx], v[:, idx], _col(m, idx), k[idx]
    ya = ya - (ma * ya).sum(axis=0) / ka  # centred: tau^2 does not depend on a shift
    ya = ya * ma
    # Upper end: the score is negative for large tau^2; double until it is.
    ybar = (ma * ya).sum(axis=0) / ka
    top = np.maximum(2.0 * (ma * (ya - ybar) ** 2).sum(axis=0) / np.maximum(ka - 1, 1), 1e-8)
    for _ in range(200):
        u_top, _ = _score(ya, va, ma, top, reml)
        if not (u_top > 0).any():
            break
        top = np.where(u_top > 0, 2.0 * top, top)
    fractions = np.concatenate([[0.0], np.logspace(-4, 0, 20)])
    ll = np.stack([_neg2ll(ya, va, ma, f * top, reml) for f in fractions])
    best = np.argmin(np.where(np.isfinite(ll), ll, np.inf), axis=0)
    lo = fractions[np.maximum(best - 1, 0)] * top
    hi = fractions[np.minimum(best + 1, fractions.size - 1)] * top
    t = fractions[best] * top
    u0, _ = _score(ya, va, ma, 0.0, reml)
    sub = np.flatnonzero(~((best == 0) & (u0 <= 0)))  # else the maximum is at tau^2 = 0
    t[~np.isin(np.arange(idx.size), sub)] = 0.0
    t[sub] = np.where(best[sub] == 0, 0.5 * hi[sub], t[sub])
    for _ in range(maxiter):
        if sub.size == 0:
            break
        u, du = _score(ya[:, sub], va[:, sub], _col(ma, sub), t[sub], reml)
        pos = u > 0
        lo[sub] = np.where(pos, t[sub], lo[sub])
        hi[sub] = np.where(pos, hi[sub], t[sub])
        with np.errstate(invalid="ignore", divide="ignore"):
            newton = t[sub] - u / du
        ok = (du < 0) & (newton >= lo[sub]) & (newton <= hi[sub])
        new = np.where(ok, newton, 0.5 * (lo[sub] + hi[sub]))
        new = np.where(u == 0, t[sub], new)
        done = (np.abs(new - t[sub]) <= tol * (1.0 + new)) | (
            hi[sub] - lo[sub] <= tol * (1.0 + new)
        )
        t[sub] = new
        sub = sub[~done]
    # the boundary tau^2 = 0 wins where its likelihood is higher (a maximum at the boundary)
    at0 = _neg2ll(ya, va, ma, 0.0, reml) <= _neg2ll(ya, va, ma, t, reml)
    tau2[idx] = np.where(at0, 0.0, t)
    return tau2


_BLOCK = 4096


def tau2_estimate(
    y: np.ndarray, v: np.ndarray, m: np.ndarray, k: np.ndarray, method: str,
    tol: float | None = None, maxiter: int = 1000,
) -> np.ndarray:
    """Between-site variance by the named estimator for (k, p) arrays with mask ``m``."""
    if method == "FE":
        return np.zeros(y.shape[1])
    if method == "DL":
        return _tau2_dl(y, v, m, k)
    if method == "HE":
        return _tau2_he(y, v, m, k)
    if method == "SJ":
        return _tau2_sj(y, v, m, k)
    if method in ("PM", "ML", "REML"):
        # Iterative estimators run on blocks of features small enough to stay in the CPU cache.
        out = np.empty(y.shape[1])
        for i in range(0, y.shape[1], _BLOCK):
            sl = slice(i, i + _BLOCK)
            args = (y[:, sl], v[:, sl], m if np.ndim(m) == 0 else m[:, sl], k[sl])
            if method == "PM":
                out[sl] = _tau2_pm(*args, tol, maxiter)
            else:
                tol_l = 1e-12 if tol is None else tol
                out[sl] = _tau2_likelihood(*args, method == "REML", tol_l, maxiter)
        return out
    raise HarmonizationError(f"unknown method {method!r}; choose one of {', '.join(TAU2_METHODS)}")


def pool(
    yi: Any,
    vi: Any,
    method: str = "REML",
    knha: bool = False,
    weights: Any = None,
    level: float = 0.95,
    pi_higgins: bool = False,
    tol: float | None = None,
    maxiter: int = 1000,
) -> PoolResult:
    """Pool per-site effect sizes by inverse-variance fixed- or random-effects meta-analysis.

    Parameters
    ----------
    yi, vi : array_like, shape (k,) or (k, p)
        Effect sizes and their sampling variances, sites along axis 0, features along axis 1.
        NaN in either marks a site missing for that feature.
    method : {"FE", "DL", "HE", "SJ", "PM", "ML", "REML"}
        Fixed effect, or the random-effects tau^2 estimator: DerSimonian-Laird (1986), Hedges
        (1983), Sidik-Jonkman (2005), Paule-Mandel (1982), maximum likelihood or restricted ML
        (Viechtbauer 2005).
    knha : bool
        Knapp & Hartung (2003) adjustment: SE scaled by the weighted residual variance and tests and
        intervals from a t distribution with k - 1 df (metafor ``test="knha"``, untruncated).
    weights : array_like, optional
        User weights, e.g. sample sizes, (k,) or (k, p). tau^2 is still estimated as usual; the
        pooled estimate is ``sum(a y) / sum(a)`` with variance ``sum(a^2 (v + tau2)) / sum(a)^2``
        (metafor ``rma(..., weights=)``).
    level : float
        Confidence level of the CI and the prediction interval.
    pi_higgins : bool
        Prediction interval with a t distribution on k - 2 df (Higgins, Thompson & Spiegelhalter
        2009) instead of metafor's normal quantile (t on k - 1 df with ``knha``).
    tol, maxiter : convergence control of the iterative estimators. ``tol=None`` uses 1e-12
        (relative change of tau^2) for ML/REML Fisher scoring and, for PM, the tolerance of R's
        ``uniroot`` that metafor uses (so PM equals metafor; pass e.g. ``tol=1e-12`` for the
        exact root).

    Returns
    -------
    PoolResult
        ``estimate, se, ci_low, ci_high, z, p, tau2, I2, H2, Q, Q_p, k, pi_low, pi_high, df``;
        floats for 1-D input, arrays of length p otherwise. ``I2`` is in percent as in metafor:
        ``max(0, (Q - (k-1)) / Q)`` for FE, ``tau2 / (tau2 + s2)`` with the typical sampling
        variance ``s2 = (k-1) / (sum w - sum w^2 / sum w)`` otherwise (Higgins & Thompson 2002).

    Notes
    -----
    Unlike statsmodels' ``combine_effects``, the DL estimate is truncated at 0, so a homogeneous
    set gives ``tau2 = 0`` and a finite SE. A feature with one site gets ``tau2 = 0`` and NaN
    heterogeneity statistics; a feature with no site gets NaN everywhere.
    """
    method = str(method).upper()
    if method not in TAU2_METHODS:
        raise HarmonizationError(
            f"unknown method {method!r}; choose one of {', '.join(TAU2_METHODS)}"
        )
    if not 0 < level < 1:
        raise HarmonizationError(f"level must be in (0, 1), got {level}")
    y, v, user_w, scalar = _as_2d(yi, vi, weights)
    if knha and user_w is not None:
        raise HarmonizationError("knha=True cannot be combined with user weights")
    m_bool = np.isfinite(y) & np.isfinite(v)
    if user_w is not None:
        m_bool &= np.isfinite(user_w)
    bad = m_bool & (v <= 0)
    if bad.any():
        site, feat = np.argwhere(bad)[0]
        raise HarmonizationError(
            f"sampling variance vi must be > 0: site index {site}, feature index {feat} has "
            f"vi={v[site, feat]}"
        )
    if user_w is not None:
        neg = m_bool & (user_w < 0)
        if neg.any():
            site, feat = np.argwhere(neg)[0]
            raise HarmonizationError(f"negative weight at site index {site}, feature {feat}")
    if m_bool.all():
        m: Any = 1.0
        k = np.full(y.shape[1], y.shape[0])
    else:
        m = m_bool.astype(float)
        y = np.where(m_bool, y, 0.0)
        v = np.where(m_bool, v, 1.0)
        k = m_bool.sum(axis=0)
    kf = k.astype(float)

    tau2 = tau2_estimate(y, v, m, kf, method, tol=tol, maxiter=maxiter)

    # Heterogeneity (always from the fixed-effect weights).
    w0 = m / v
    mu0, sw0 = _sums(w0, y)
    q = (w0 * (y - mu0) ** 2).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        q_p = np.where(k > 1, stats.chi2.sf(q, np.maximum(kf - 1, 1)), np.nan)
        if method == "FE":
            i2 = np.where(k > 1, 100.0 * np.maximum(0.0, (q - (kf - 1)) / q), np.nan)
            h2 = np.where(k > 1, q / (kf - 1), np.nan)
        else:
            s2 = (kf - 1) / (sw0 - (w0**2).sum(axis=0) / sw0)
            i2 = np.where(k > 1, 100.0 * tau2 / (s2 + tau2), np.nan)
            h2 = np.where(k > 1, (s2 + tau2) / s2, np.nan)

    # Pooled estimate.
    w = m / (v + tau2)
    with np.errstate(invalid="ignore", divide="ignore"):
        if user_w is None:
            est, sw = _sums(w, y)
            se = 1.0 / np.sqrt(sw)
        else:
            a = np.where(m_bool, user_w, 0.0)
            est, sa = _sums(a, y)
            se = np.sqrt((a**2 * (v + tau2)).sum(axis=0)) / sa
        if knha:
            s2_kh = (w * (y - est) ** 2).sum(axis=0) / (kf - 1)
            se = np.where(k > 1, se * np.sqrt(s2_kh), np.nan)
            df = np.where(k > 1, kf - 1, np.nan)
            crit = stats.t.ppf(0.5 + level / 2, df)
            zval = est / se
            pval = 2 * stats.t.sf(np.abs(zval), df)
        else:
            df = np.full(kf.shape, np.inf)
            crit = np.full(kf.shape, stats.norm.ppf(0.5 + level / 2))
            zval = est / se
            pval = 2 * stats.norm.sf(np.abs(zval))
        if pi_higgins:
            pi_crit = np.where(k > 2, stats.t.ppf(0.5 + level / 2, np.maximum(kf - 2, 1)), np.nan)
        else:
            pi_crit = crit
        pi_half = pi_crit * np.sqrt(se**2 + tau2)
    empty = k == 0
    tau2 = np.where(empty, np.nan, tau2)
    q = np.where(empty, np.nan, q)

    out = PoolResult(
        estimate=est, se=se, ci_low=est - crit * se, ci_high=est + crit * se, z=zval, p=pval,
        tau2=tau2, I2=i2, H2=h2, Q=q, Q_p=q_p, k=k, pi_low=est - pi_half, pi_high=est + pi_half,
        df=df, method=method, knha=bool(knha), level=level,
    )
    if scalar:
        for name in PoolResult._ARRAY_FIELDS:
            val = np.asarray(getattr(out, name))[0]
            setattr(out, name, int(val) if name == "k" else float(val))
    return out


def fdr(p: Any) -> np.ndarray:
    """Benjamini & Hochberg (1995) false-discovery-rate adjusted p-values (q-values).

    NaN p-values are ignored (and stay NaN); the adjustment uses the number of finite p-values.
    """
    arr = np.asarray(p, dtype=float)
    flat = arr.ravel()
    out = np.full(flat.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(flat))
    n = ok.size
    if n == 0:
        return out.reshape(arr.shape)
    pv = flat[ok]
    if (pv < 0).any() or (pv > 1).any():
        raise HarmonizationError("p-values must lie in [0, 1]")
    order = np.argsort(pv)
    ranked = pv[order] * n / np.arange(1, n + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    adj = np.empty(n)
    adj[order] = np.minimum(ranked, 1.0)
    out[ok] = adj
    return out.reshape(arr.shape)
