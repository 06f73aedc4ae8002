"""Empirical-Bayes estimators of ComBat's site parameters (Johnson, Li & Rabinovic 2007).

All functions work on one site at a time and are vectorised over features. They take each
feature's sufficient statistics at that site instead of the raw standardised data:
``n`` (number of observed values), ``mean`` and ``ss`` (sum of squared deviations from the
mean), so missing values are handled per feature.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from dmriharmony.errors import HarmonizationError

__all__ = ["gamma_prior", "delta_prior", "parametric_eb", "nonparametric_eb"]

log = logging.getLogger(__name__)

_LOG_2PI = float(np.log(2.0 * np.pi))


def gamma_prior(gamma_hat: np.ndarray) -> tuple[float, float]:
    """Normal prior of the additive site effects: ``gamma_bar`` and ``tau^2``.

    Method-of-moments estimates across features (Johnson et al. 2007, section 2.3): the mean and
    the sample variance (ddof=1) of ``gamma_hat``.
    """
    return float(np.mean(gamma_hat)), float(np.var(gamma_hat, ddof=1))


def delta_prior(delta_hat: np.ndarray) -> tuple[float, float]:
    """Inverse-gamma prior of the multiplicative site effects: ``(a, b)``.

    Method of moments (Johnson et al. 2007, section 2.3; sva ``aprior``/``bprior``):
    ``a = (2 s^2 + m^2) / s^2`` and ``b = (m s^2 + m^3) / s^2`` with ``m``, ``s^2`` the mean and
    sample variance of ``delta_hat`` across features.
    """
    m = float(np.mean(delta_hat))
    s2 = float(np.var(delta_hat, ddof=1))
    if not s2 > 0:
        raise HarmonizationError(
            "the site variances (delta_hat) are identical across features, so the inverse-gamma"
            " prior is undefined; use eb=False or mean_only=True"
        )
    return (2.0 * s2 + m * m) / s2, (m * s2 + m**3) / s2


def parametric_eb(
    n: np.ndarray,
    mean: np.ndarray,
    ss: np.ndarray,
    gamma_hat: np.ndarray,
    delta_hat: np.ndarray,
    gamma_bar: float,
    t2: float,
    a: float,
    b: float,
    conv: float = 1e-4,
    max_iter: int = 100_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Parametric EB posterior of (gamma, delta) by sva's fixed-point iteration ``it.sol``.

    Iterates (Johnson et al. 2007, eqs. 3.1-3.2)

    ``gamma* = (n t2 gamma_hat + delta* gamma_bar) / (n t2 + delta*)``,
    ``delta* = (b + sum_i (x_i - gamma*)^2 / 2) / (n / 2 + a - 1)``

    jointly over all features until ``max(|new - old| / old) <= conv`` over both parameters and
    all features -- sva's (and neuroCombat's) rule, including its sign convention (no absolute
    value in the denominator), so results equal theirs. ``sum_i (x_i - g)^2`` is computed from the
    sufficient statistics as ``ss + n (mean - g)^2``.
    """
    g_old = gamma_hat.astype(float).copy()
    d_old = delta_hat.astype(float).copy()
    for _ in range(max_iter):
        g_new = (t2 * n * gamma_hat + d_old * gamma_bar) / (t2 * n + d_old)
        sum2 = ss + n * (mean - g_new) ** 2
        d_new = (0.5 * sum2 + b) / (n / 2.0 + a - 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            change = max(np.max(np.abs(g_new - g_old) / g_old), np.max(np.abs(d_new - d_old) / d_old))
        g_old, d_old = g_new, d_new
        if not change > conv:  # NaN stops as in neuroCombat (`while change > conv`)
            return g_new, d_new
    warnings.warn(
        f"parametric empirical Bayes did not converge in {max_iter} iterations", stacklevel=3
    )
    return g_old, d_old


def nonparametric_eb(
    n: np.ndarray,
    mean: np.ndarray,
    ss: np.ndarray,
    gamma_hat: np.ndarray,
    delta_hat: np.ndarray,
    *,
    chunk: int = 256,
    block: int = 2048,
    log_cut: float = 60.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Non-parametric EB posterior means of (gamma, delta), computed in log space.

    sva's ``int.eprior`` (Johnson et al. 2007, section 3.2): for feature ``i`` the empirical
    prior puts mass on the other features' estimates ``(g_l, d_l)``, ``l != i``, with weights
    ``w_il`` = likelihood of feature ``i``'s data under ``N(g_l, d_l)``;
    ``gamma*_i = sum_l w_il g_l / sum_l w_il`` and likewise ``delta*_i``.

    The log-likelihood needs only feature ``i``'s sufficient statistics:

    ``log w_il = -n_i/2 log(2 pi d_l) - (ss_i + n_i (mean_i - g_l)^2) / (2 d_l)``,

    so the cost is O(features^2) instead of sva/neuroCombat's O(features^2 * subjects), and the
    weights are normalised by the running maximum (streaming log-sum-exp), so they never
    underflow whatever the site size (neuroCombat's product of densities underflows to 0/0 once a
    site has more than ~525 subjects). Features are sorted by ``g``; blocks of ``l`` whose
    rigorous upper bound on ``log w_il`` lies more than ``log_cut`` below the running maximum for
    every ``i`` of a chunk are skipped (their total relative weight is below
    ``features * exp(-log_cut)``, i.e. < 1e-20 for the default), which makes sharply peaked
    posteriors (large sites) cheap without changing the result.
    """
    F = gamma_hat.shape[0]
    if F < 2:
        raise HarmonizationError(
            "non-parametric empirical Bayes needs at least 2 adjustable features"
        )
    order = np.argsort(gamma_hat, kind="stable")
    g = gamma_hat[order].astype(float)
    d = delta_hat[order].astype(float)
    ni = n[order].astype(float)
    mi = mean[order].astype(float)
    si = np.maximum(ss[order].astype(float), 0.0)
    # log w_il = ni * u_l + S1_i * v_l + S2_i * w_l  (bilinear in sufficient statistics) -- but
    # evaluated in the centred form for accuracy:  -ni/2 * (log 2 pi d_l) - (si + ni (mi-g_l)^2)/(2 d_l)
    half_log = 0.5 * (_LOG_2PI + np.log(d))
    inv2d = 0.5 / d
    vals = np.column_stack([np.ones(F), g, d])

    n_blocks = -(-F // block)
    b_lo = np.arange(n_blocks) * block
    b_hi = np.minimum(b_lo + block, F)
    g_min = g[b_lo]
    g_max = g[b_hi - 1]
    d_min = np.minimum.reduceat(d, b_lo)
    d_max = np.maximum.reduceat(d, b_lo)

    g_star = np.empty(F)
    d_star = np.empty(F)
    skipped = 0
    for i0 in range(0, F, chunk):
        i1 = min(i0 + chunk, F)
        n_c, m_c, s_c = ni[i0:i1, None], mi[i0:i1, None], si[i0:i1, None]
        # upper bound of log w over each block: best d in [d_min, d_max], nearest g in range
        d_opt = np.clip(s_c / n_c, d_min[None, :], d_max[None, :])
        a_max = -n_c * 0.5 * (_LOG_2PI + np.log(d_opt)) - s_c * 0.5 / d_opt
        dist = np.maximum(0.0, np.maximum(g_min[None, :] - m_c, m_c - g_max[None, :]))
        upper = a_max - n_c * dist**2 * 0.5 / d_max[None, :]
        run_max = np.full(i1 - i0, -np.inf)
        acc = np.zeros((i1 - i0, 3))
        for bi in np.argsort(-upper.max(axis=0), kind="stable"):
            if np.all(upper[:, bi] < run_max - log_cut):
                skipped += 1
                continue
            l0, l1 = b_lo[bi], b_hi[bi]
            diff = m_c - g[None, l0:l1]
            logw = diff * diff
            logw *= n_c
            logw += s_c
            logw *= -inv2d[None, l0:l1]
            logw -= n_c * half_log[None, l0:l1]
            lo, hi = max(i0, l0), min(i1, l1)
            if lo < hi:  # exclude l == i (sva's g.hat[-i])
                idx = np.arange(lo, hi)
                logw[idx - i0, idx - l0] = -np.inf
            blk_max = logw.max(axis=1)
            new_max = np.maximum(run_max, blk_max)
            finite = np.isfinite(new_max)
            scale = np.where(finite, np.exp(np.where(finite, run_max - new_max, 0.0)), 1.0)
            acc *= scale[:, None]
            logw -= np.where(finite, new_max, 0.0)[:, None]
            np.exp(logw, out=logw)
            acc += logw @ vals[l0:l1]
            run_max = new_max
        g_star[i0:i1] = acc[:, 1] / acc[:, 0]
        d_star[i0:i1] = acc[:, 2] / acc[:, 0]
    if skipped:
        log.debug("non-parametric EB: skipped %d negligible feature blocks", skipped)
    out_g = np.empty(F)
    out_d = np.empty(F)
    out_g[order] = g_star
    out_d[order] = d_star
    return out_g, out_d
