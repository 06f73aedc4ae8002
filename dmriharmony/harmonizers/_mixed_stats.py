"""Per-site sufficient statistics of a linear mixed model, for many features at once.

For ``y = X beta + Z b + e`` with site blocks, every likelihood quantity of the model only needs,
per site ``s``, the cross-products ``X_s'X_s``, ``Z_s'X_s``, ``Z_s'Z_s`` (shared by all features
that are observed on the same subjects) and ``X_s'y_s``, ``Z_s'y_s``, ``y_s'y_s`` (per feature).
Computing them once turns each likelihood evaluation into work on ``sites x q x q`` arrays per
feature, independent of the number of subjects.

Arrays carry a leading feature axis of length ``P`` (per feature) or 1 (shared by every feature of
the group: the features without missing values).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SiteStats:
    """Sufficient statistics; ``F`` is 1 (shared design) or ``P``.

    Attributes
    ----------
    n : (F, S) subjects per site.   nobs : (F,) subjects in all.
    xx : (F, q, q) ``X'X``.         zx : (F, S, r, q) ``Z_s'X_s``.   zz : (F, S, r, r) ``Z_s'Z_s``.
    xy : (P, q) ``X'y``.            zy : (P, S, r) ``Z_s'y_s``.      yy : (P,) ``y'y``.
    """

    n: np.ndarray
    nobs: np.ndarray
    xx: np.ndarray
    zx: np.ndarray
    zz: np.ndarray
    xy: np.ndarray
    zy: np.ndarray
    yy: np.ndarray

    @property
    def shared(self) -> bool:
        return self.xx.shape[0] == 1

    def take(self, idx: np.ndarray) -> SiteStats:
        """Statistics of the features ``idx`` (shared arrays are kept as they are)."""

        def sel(a: np.ndarray) -> np.ndarray:
            return a if a.shape[0] == 1 else a[idx]

        return SiteStats(
            sel(self.n), sel(self.nobs), sel(self.xx), sel(self.zx), sel(self.zz),
            self.xy[idx], self.zy[idx], self.yy[idx],
        )


def site_stats(
    x: np.ndarray, z: np.ndarray, y: np.ndarray, codes: np.ndarray, n_sites: int,
    mask: np.ndarray | None = None,
) -> SiteStats:
    """Cross-products per site for ``y`` (N, P) with design ``x`` (N, q) and ``z`` (N, r).

    ``mask`` (N, P) of 0/1 marks the observed values of each feature (missing ``y`` must be 0
    there); without it every feature shares the design statistics.
    """
    n_obs, p = y.shape
    q, r = x.shape[1], z.shape[1]
    onehot = np.zeros((n_obs, n_sites))
    onehot[np.arange(n_obs), codes] = 1.0
    if mask is None:
        n = onehot.sum(axis=0)[None]
        xx = (x.T @ x)[None]
        zx = np.stack([z[codes == s].T @ x[codes == s] for s in range(n_sites)])[None]
        zz = np.stack([z[codes == s].T @ z[codes == s] for s in range(n_sites)])[None]
        nobs = np.array([float(n_obs)])
    else:
        w = mask.astype(float)
        n = (onehot.T @ w).T
        nobs = w.sum(axis=0)
        xx = np.einsum("ni,nj,np->pij", x, x, w, optimize=True)
        zx = np.empty((p, n_sites, r, q))
        zz = np.empty((p, n_sites, r, r))
        for s in range(n_sites):
            sel = codes == s
            ws, xs, zs = w[sel], x[sel], z[sel]
            zx[:, s] = np.einsum("na,ni,np->pai", zs, xs, ws, optimize=True)
            zz[:, s] = np.einsum("na,nb,np->pab", zs, zs, ws, optimize=True)
    xy = (x.T @ y).T
    zy = np.empty((p, n_sites, r))
    for s in range(n_sites):
        sel = codes == s
        zy[:, s] = (z[sel].T @ y[sel]).T
    yy = (y**2).sum(axis=0)
    return SiteStats(n, nobs, xx, zx, zz, xy, zy, yy)


def chunks(p: int, size: int) -> list[np.ndarray]:
    """Index blocks of at most ``size`` features (bounds the memory of batched algebra)."""
    return [np.arange(i, min(i + size, p)) for i in range(0, p, size)]
