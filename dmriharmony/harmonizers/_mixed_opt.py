"""Vectorised minimisers of the profiled deviance, one problem per feature, all at once.

- One variance ratio (random intercept): a grid over ``theta = sigma_site / sigma`` brackets the
  minimum, golden-section search (Kiefer 1953) refines it; ``theta = 0`` (no site variance) is a
  candidate, so boundary fits are exact, as lme4's bounded optimiser gives.
- Three parameters (correlated random intercept and slope, lme4's ``theta``): Nelder & Mead
  (1965) with the standard coefficients (reflection 1, expansion 2, contraction 1/2, shrink 1/2)
  and lme4's box constraint (diagonal of ``Lambda`` >= 0, by projection), restarted once from the
  best vertex, as recommended for Nelder-Mead (and as lme4's default optimiser checks).

Every feature follows its own path; only unconverged features are evaluated at each step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)

Objective = Callable[[np.ndarray, np.ndarray], np.ndarray]
_PHI = (np.sqrt(5.0) - 1.0) / 2.0


def golden_theta(
    fun: Objective, p: int, grid: np.ndarray | None = None, xtol: float = 1e-10,
    maxiter: int = 200,
) -> tuple[np.ndarray, np.ndarray]:
    """Minimise ``fun(theta, idx)`` over ``theta >= 0`` for ``p`` independent features.

    ``fun`` gets the trial values (len(idx),) of the features ``idx`` and returns their
    deviances. Returns the minimisers and the minimum values.
    """
    if grid is None:
        grid = np.concatenate([[0.0], np.logspace(-3, 3, 43)])
    all_idx = np.arange(p)
    values = np.stack([fun(np.full(p, g), all_idx) for g in grid])
    values = np.where(np.isfinite(values), values, np.inf)
    i = np.argmin(values, axis=0)
    best_x = grid[i].astype(float)
    best_f = values[i, all_idx]
    lo = grid[np.maximum(i - 1, 0)].astype(float)
    hi = grid[np.minimum(i + 1, grid.size - 1)].astype(float)
    c = hi - _PHI * (hi - lo)
    d = lo + _PHI * (hi - lo)
    fc = fun(c, all_idx)
    fd = fun(d, all_idx)
    idx = all_idx
    for _ in range(maxiter):
        if idx.size == 0:
            break
        left = fc[idx] < fd[idx]  # minimum in [lo, d]
        li, ri = idx[left], idx[~left]
        hi[li] = d[li]
        d[li], fd[li] = c[li], fc[li]
        c[li] = hi[li] - _PHI * (hi[li] - lo[li])
        lo[ri] = c[ri]
        c[ri], fc[ri] = d[ri], fd[ri]
        d[ri] = lo[ri] + _PHI * (hi[ri] - lo[ri])
        new = np.where(left, c[idx], d[idx])
        f_new = fun(new, idx)
        fc[li] = f_new[left]
        fd[ri] = f_new[~left]
        width = hi[idx] - lo[idx]
        idx = idx[width > xtol * (np.abs(c[idx]) + np.abs(d[idx])) + 1e-14]
    for x, f in ((c, fc), (d, fd)):
        better = f < best_f
        best_x = np.where(better, x, best_x)
        best_f = np.where(better, f, best_f)
    return best_x, best_f


def nelder_mead(
    fun: Objective, x0: np.ndarray, step: np.ndarray, lower: np.ndarray,
    ftol: float = 1e-11, xtol: float = 1e-9, maxiter: int = 5000,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nelder-Mead for ``p`` problems: ``x0`` (p, n), box ``x >= lower`` (n,), simplex ``step``.

    ``fun(x, idx)`` evaluates points x (len(idx), n) of the problems ``idx``. Returns the
    minimisers (p, n), minimum values (p,) and whether each problem converged (p,).
    """
    p, n = x0.shape
    sim = np.repeat(x0[:, None, :], n + 1, axis=1)
    for j in range(n):
        sim[:, j + 1, j] += step[..., j] if np.ndim(step) == 1 else step[:, j]
    sim = np.maximum(sim, lower)
    all_idx = np.arange(p)
    fs = np.stack([fun(sim[:, j], all_idx) for j in range(n + 1)], axis=1)
    fs = np.where(np.isfinite(fs), fs, np.inf)
    converged = np.zeros(p, dtype=bool)
    idx = all_idx

    def ev(x: np.ndarray, ids: np.ndarray) -> np.ndarray:
        f = fun(x, ids)
        return np.where(np.isfinite(f), f, np.inf)

    for _ in range(maxiter):
        if idx.size == 0:
            break
        s, f = sim[idx], fs[idx]
        order = np.argsort(f, axis=1)
        s = np.take_along_axis(s, order[:, :, None], axis=1)
        f = np.take_along_axis(f, order, axis=1)
        spread_f = f[:, -1] - f[:, 0]
        spread_x = np.abs(s[:, 1:] - s[:, :1]).max(axis=(1, 2))
        done = (spread_f <= ftol * (1.0 + np.abs(f[:, 0]))) & (spread_x <= xtol * (
            1.0 + np.abs(s[:, 0]).max(axis=1)))
        sim[idx], fs[idx] = s, f
        converged[idx[done]] = True
        keep = ~done
        idx, s, f = idx[keep], s[keep], f[keep]
        if idx.size == 0:
            break
        xc = s[:, :-1].mean(axis=1)
        xw = s[:, -1]
        xr = np.maximum(2.0 * xc - xw, lower)
        fr = ev(xr, idx)
        f_best, f_sw, f_w = f[:, 0], f[:, -2], f[:, -1]
        expand = fr < f_best
        outside = (fr >= f_sw) & (fr < f_w)
        inside = fr >= f_w
        second = expand | outside | inside
        x2 = np.where(
            expand[:, None], xc + 2.0 * (xr - xc),
            np.where(outside[:, None], xc + 0.5 * (xr - xc), xc + 0.5 * (xw - xc)),
        )
        x2 = np.maximum(x2, lower)
        f2 = np.full(idx.size, np.inf)
        if second.any():
            f2[second] = ev(x2[second], idx[second])
        new_x, new_f = xr.copy(), fr.copy()
        use2 = (expand & (f2 < fr)) | (outside & (f2 <= fr)) | (inside & (f2 < f_w))
        new_x[use2], new_f[use2] = x2[use2], f2[use2]
        shrink = (outside | inside) & ~use2
        accept = ~shrink
        s[accept, -1], f[accept, -1] = new_x[accept], new_f[accept]
        if shrink.any():
            sh = np.flatnonzero(shrink)
            pts = s[sh, :1] + 0.5 * (s[sh, 1:] - s[sh, :1])
            pts = np.maximum(pts, lower)
            s[sh, 1:] = pts
            for j in range(n):
                f[sh, j + 1] = ev(pts[:, j], idx[sh])
        sim[idx], fs[idx] = s, f
    best = np.argmin(fs, axis=1)
    x_best = sim[all_idx, best]
    if (~converged).any():
        log.warning("Nelder-Mead did not converge for %d of %d features", (~converged).sum(), p)
    return x_best, fs[all_idx, best], converged
