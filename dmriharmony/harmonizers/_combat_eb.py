"""Empirical-Bayes estimators of ComBat's site parameters (Johnson, Li & Rabinovic 2007).

All functions work on one site at a time and are vectorised over features. They take each
feature's sufficient statistics at that site instead of the raw standardised data:
``n`` (number of observed values), ``mean`` and ``ss`` (sum of squared deviations from the
mean), so missing values are handled per feature and no function ever touches an
``(features, subjects)`` array.
"""

from __future__ import annotations

import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from dmriharmony.errors import HarmonizationError

__all__ = ["gamma_prior", "delta_prior", "parametric_eb", "mean_only_eb", "nonparametric_eb"]

log = logging.getLogger(__name__)

_LOG_2PI = float(np.log(2.0 * np.pi))
_PROGRESS_MIN_PAIRS = 10_000**2


def gamma_prior(gamma_hat: np.ndarray) -> tuple[float, float]:
    """Normal prior of the additive site effects: ``gamma_bar`` and ``tau^2``.

    Method-of-moments estimates across features (Johnson et al. 2007, section 3.1; sva
    ``gamma.bar <- rowMeans(gamma.hat)``, ``t2 <- rowVars(gamma.hat)``): the mean and the sample
    variance (ddof=1) of ``gamma_hat``.
    """
    if gamma_hat.shape[0] < 2:
        raise HarmonizationError(
            "empirical Bayes needs at least 2 adjustable features to estimate its priors;"
            " use eb=False"
        )
    return float(np.mean(gamma_hat)), float(np.var(gamma_hat, ddof=1))


def delta_prior(delta_hat: np.ndarray) -> tuple[float, float]:
    """Inverse-gamma prior of the multiplicative site effects: ``(a, b)``.

    Method of moments (Johnson et al. 2007, section 3.1; sva ``aprior``/``bprior``):
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


def mean_only_eb(gamma_hat: np.ndarray, gamma_bar: float, t2: float) -> np.ndarray:
    """Parametric EB location estimate of the mean-only model, exactly as sva/neuroCombat.

    sva's ``postmean(gamma.hat, gamma.bar, 1, 1, t2)``: the posterior mean of eq. 3.1 of
    Johnson et al. (2007) evaluated with ``n = 1`` and ``delta = 1``.
    """
    return (t2 * gamma_hat + gamma_bar) / (t2 + 1.0)


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
    max_iter: int = 10_000,
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
            change = max(
                float(np.max(np.abs(g_new - g_old) / g_old)),
                float(np.max(np.abs(d_new - d_old) / d_old)),
            )
        g_old, d_old = g_new, d_new
        if not change > conv:  # a NaN change stops, as neuroCombat's `while change > conv`
            return g_new, d_new
    warnings.warn(
        f"parametric empirical Bayes did not converge in {max_iter} iterations"
        f" (last relative change {change:.3g} > {conv:g})",
        stacklevel=3,
    )
    return g_old, d_old


def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency, numpy is the fallback
        return None
    return torch


def nonparametric_eb(
    n: np.ndarray,
    mean: np.ndarray,
    ss: np.ndarray,
    gamma_hat: np.ndarray,
    delta_hat: np.ndarray,
    *,
    chunk: int | None = None,
    block: int = 1024,
    tol: float = 1e-15,
    engine: str = "auto",
    n_jobs: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Non-parametric EB posterior means of (gamma, delta), computed in log space.

    sva's ``int.eprior`` (Johnson et al. 2007, section 3.2): for feature ``i`` the empirical
    prior puts equal mass on the other features' estimates ``(g_l, d_l)``, ``l != i``; the
    posterior weights are the likelihoods of feature ``i``'s data under ``N(g_l, d_l)``:
    ``gamma*_i = sum_l w_il g_l / sum_l w_il`` and likewise ``delta*_i``.

    The log-likelihood needs only feature ``i``'s sufficient statistics and is bilinear,

    ``log w_il = -n_i/2 log(2 pi d_l) - (ss_i + n_i (mean_i - g_l)^2) / (2 d_l)
    = n_i a_l + S_i B_l + T_i C_l``

    with ``a_l = -log(2 pi d_l)/2 - g_l^2/(2 d_l)``, ``B_l = -1/(2 d_l)``, ``C_l = g_l / d_l``,
    ``S_i = ss_i + n_i mean_i^2``, ``T_i = n_i mean_i``. So a chunk of features costs one
    rank-3 matrix product, an ``exp`` and another rank-3 product: O(features^2) per site
    instead of sva/neuroCombat's O(features^2 * subjects), with memory bounded by
    ``chunk * block``. Each row is shifted by a rigorous upper bound of its log-weights (the
    likelihood maximised over ``g`` and over ``d`` in the observed range), so nothing
    overflows, and rows whose weights would all underflow (large sites: neuroCombat's product of
    densities gives 0/0 = NaN above ~525 subjects) are recomputed shifted by their exact maximum,
    so the result is finite at any site size. Features are sorted by ``g``; a block of ``l`` is
    skipped for a chunk when a rigorous bound puts its total weight below ``tol`` times the weight
    already accumulated for every row (a relative change of the result below ~1e-13).

    Parameters
    ----------
    n, mean, ss : ndarray, shape (F,)
        Per-feature number of observed values, their mean and their sum of squared deviations
        from that mean, at this site.
    gamma_hat, delta_hat : ndarray, shape (F,)
        Per-feature site estimates (the empirical prior's support points).
    chunk, block : int
        Rows and columns of the weight matrix computed at once (memory ``8 * chunk * block``
        per thread); ``chunk`` defaults to 128 rows on one thread, 256 on several.
    tol : float
        Relative weight below which a block is skipped.
    engine : {"auto", "numpy", "torch"}
        Array library for the pair loop ("auto": numpy, see the comment in the code).
    n_jobs : int, optional
        Threads over row chunks (default: the CPUs this process may use). The result is
        identical for any value.

    Returns
    -------
    gamma_star, delta_star : ndarray, shape (F,)
    """
    F = gamma_hat.shape[0]
    if F < 2:
        raise HarmonizationError(
            "non-parametric empirical Bayes needs at least 2 adjustable features"
        )
    # "auto" is numpy: 128-row chunks keep each product single-threaded and cache-resident
    # (measured 2.1 ns per pair on a shared 2-core machine, against 2.8 for torch with one
    # thread and 12-18 for multithreaded BLAS/torch, whose spinning threads collapse under load)
    if engine not in ("auto", "numpy", "torch"):
        raise HarmonizationError(f"engine must be 'auto', 'numpy' or 'torch', got {engine!r}")
    torch = _torch() if engine == "torch" else None
    if engine == "torch" and torch is None:
        raise HarmonizationError("engine='torch' requested but torch is not installed")

    order = np.argsort(gamma_hat, kind="stable")
    g = np.asarray(gamma_hat, dtype=float)[order]
    d = np.asarray(delta_hat, dtype=float)[order]
    ni = np.asarray(n, dtype=float)[order]
    mi = np.asarray(mean, dtype=float)[order]
    si = np.maximum(np.asarray(ss, dtype=float)[order], 0.0)

    # bilinear coefficients: log w = [n, S, T] @ [a; B; C]
    coef_l = np.vstack([-0.5 * (_LOG_2PI + np.log(d)) - 0.5 * g * g / d, -0.5 / d, g / d])
    coef_i = np.column_stack([ni, si + ni * mi * mi, ni * mi])
    vals = np.column_stack([np.ones(F), g, d])

    # rigorous per-row upper bound of log w over all l (max over g free, d in [dmin, dmax])
    dmin, dmax = float(d.min()), float(d.max())
    with np.errstate(divide="ignore", invalid="ignore"):
        d_opt = np.clip(si / ni, dmin, dmax)
    shift = -0.5 * ni * (_LOG_2PI + np.log(d_opt)) - 0.5 * si / d_opt

    n_blocks = -(-F // block)
    b_lo = np.arange(n_blocks) * block
    b_hi = np.minimum(b_lo + block, F)
    g_min, g_max = g[b_lo], g[b_hi - 1]
    d_min_b = np.minimum.reduceat(d, b_lo)
    d_max_b = np.maximum.reduceat(d, b_lo)

    # the row shift enters the product as a 4th term:
    # log w - shift = [n, S, T, -shift] @ [a; B; C; 1]
    coef_i4 = np.column_stack([coef_i, -shift])
    coef_l4 = np.vstack([coef_l, np.ones(F)])
    if torch is not None:
        t_coef_i4 = torch.from_numpy(np.ascontiguousarray(coef_i4))
        t_coef_l4 = torch.from_numpy(np.ascontiguousarray(coef_l4))
        t_vals = torch.from_numpy(np.ascontiguousarray(vals))

    def weighted_sums(i0: int) -> tuple[np.ndarray, int]:
        """Sums of w, w g, w d for the rows of one chunk (independent of every other chunk)."""
        i1 = min(i0 + chunk, F)
        rows = np.arange(i0, i1)
        n_c, m_c, s_c = ni[rows, None], mi[rows, None], si[rows, None]
        sh_c = shift[rows]
        # per (row, block) upper bound of log w - shift
        dob = np.clip(s_c / n_c, d_min_b[None, :], d_max_b[None, :])
        a_max = -0.5 * n_c * (_LOG_2PI + np.log(dob)) - 0.5 * s_c / dob
        dist = np.maximum(0.0, np.maximum(g_min[None, :] - m_c, m_c - g_max[None, :]))
        upper = a_max - 0.5 * n_c * dist**2 / d_max_b[None, :] - sh_c[:, None]
        upper += np.log(b_hi - b_lo)[None, :]
        acc = np.zeros((i1 - i0, 3))
        skipped = 0
        for bi in np.argsort(-upper.max(axis=0), kind="stable"):
            if acc[0, 0] > 0:
                with np.errstate(divide="ignore"):
                    if np.all(upper[:, bi] < np.log(acc[:, 0] * tol)):
                        skipped += 1
                        continue
            l0, l1 = int(b_lo[bi]), int(b_hi[bi])
            lo, hi = max(i0, l0), min(i1, l1)
            if torch is not None:
                logw = t_coef_i4[i0:i1] @ t_coef_l4[:, l0:l1]
                if lo < hi:  # exclude l == i (sva's g.hat[-i])
                    idx = torch.arange(lo, hi)
                    logw[idx - i0, idx - l0] = -float("inf")
                torch.exp_(logw)
                acc += (logw @ t_vals[l0:l1]).numpy()
            else:
                logw = coef_i4[i0:i1] @ coef_l4[:, l0:l1]
                if lo < hi:
                    idx = np.arange(lo, hi)
                    logw[idx - i0, idx - l0] = -np.inf
                np.exp(logw, out=logw)
                acc += logw @ vals[l0:l1]
        return acc, skipped

    acc_all = np.zeros((F, 3))
    skipped = 0
    workers = _n_workers(n_jobs, -(-F // 128))
    if chunk is None:
        chunk = 128 if workers == 1 else 256
    starts = list(range(0, F, chunk))
    show = F * F >= _PROGRESS_MIN_PAIRS
    # chunks are independent and each is computed in the same order whatever the number of
    # threads, so the result does not depend on n_jobs; numpy releases the GIL in the products
    # and exp, so threads scale across cores (measured 1.8x on 2 cores) once BLAS itself is
    # kept to one thread (its threads would compete with ours for these small products)
    with threadpool_limits(limits=1), ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(weighted_sums, starts) if workers > 1 else map(weighted_sums, starts)
        for i0, (acc, n_skip) in zip(starts, tqdm(
                results, total=len(starts), desc="non-parametric EB", unit="chunk",
                disable=None if show else True, leave=False)):
            acc_all[i0:i0 + acc.shape[0]] = acc
            skipped += n_skip

    # rows whose weights (nearly) all underflowed: recompute shifted by their exact maximum
    bad = np.flatnonzero(~(acc_all[:, 0] > 1e-200))
    if bad.size:
        log.debug("non-parametric EB: %d rows recomputed with their exact maximum", bad.size)
        for r0 in range(0, bad.size, chunk):
            rr = bad[r0 : r0 + chunk]
            acc_all[rr] = _exact_rows(rr, coef_i, coef_l, vals, block)
    if skipped:
        log.debug("non-parametric EB: skipped %d negligible (chunk, block) pairs", skipped)
    g_star = acc_all[:, 1] / acc_all[:, 0]
    d_star = acc_all[:, 2] / acc_all[:, 0]
    out_g = np.empty(F)
    out_d = np.empty(F)
    out_g[order] = g_star
    out_d[order] = d_star
    return out_g, out_d


def _n_workers(n_jobs: int | None, n_tasks: int) -> int:
    """Threads to use: ``n_jobs`` or the CPUs available to this process, at most ``n_tasks``."""
    if n_jobs is None:
        try:
            n_jobs = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            n_jobs = os.cpu_count() or 1
    if n_jobs < 1:
        raise HarmonizationError(f"n_jobs must be >= 1, got {n_jobs}")
    return max(1, min(int(n_jobs), n_tasks))


def _exact_rows(
    rows: np.ndarray, coef_i: np.ndarray, coef_l: np.ndarray, vals: np.ndarray, block: int
) -> np.ndarray:
    """Weighted sums for ``rows`` normalised by each row's exact maximum log-weight (two passes)."""
    F = coef_l.shape[1]
    P = coef_i[rows]
    row_max = np.full(rows.size, -np.inf)
    for l0 in range(0, F, block):
        logw = P @ coef_l[:, l0 : l0 + block]
        _mask_self(logw, rows, l0)
        row_max = np.maximum(row_max, logw.max(axis=1))
    acc = np.zeros((rows.size, 3))
    for l0 in range(0, F, block):
        logw = P @ coef_l[:, l0 : l0 + block]
        _mask_self(logw, rows, l0)
        logw -= row_max[:, None]
        np.exp(logw, out=logw)
        acc += logw @ vals[l0 : l0 + block]
    return acc


def _mask_self(logw: np.ndarray, rows: np.ndarray, l0: int) -> None:
    cols = rows - l0
    inside = (cols >= 0) & (cols < logw.shape[1])
    logw[np.flatnonzero(inside), cols[inside]] = -np.inf
