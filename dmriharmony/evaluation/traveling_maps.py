"""Traveling subjects at the voxel level: the same brain's maps from different scanners.

The voxel-level counterpart of :mod:`dmriharmony.evaluation.traveling`: a traveling subject's
FA (or MD, ...) maps, one per site, on a common grid (template space, or the subject's own
space when the sessions were registered to each other), compared voxel by voxel inside a mask.

For sites ``a != b`` and mask voxels ``v``:

- pairwise RMSE ``sqrt(mean_v (y_av - y_bv)^2)`` and mean difference ``mean_v (y_av - y_bv)``
  (the between-site voxelwise error of traveling-subject studies, e.g. Mirzaalian et al.,
  *NeuroImage* 2016, Fig. 6; Moyer et al., *MRM* 2020, Table 2);
- the between-site RMSE about the subject's site mean ``sqrt(mean_{v,i} (y_iv - mean_i y_iv)^2)``,
  which is the voxelwise analogue of :func:`~dmriharmony.evaluation.traveling.traveling_agreement`.

:func:`rmse_reduction` gives the relative drop of these numbers after harmonization, the
quantity of issue 6's acceptance (at least 50 % for RISH and the VAE on the phantom).

:func:`scan_rescan_rmse` splits the between-site error with same-site rescans (sessions of one
site): what any rescan shows (noise, registration, head pose) against what the site adds.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import combinations

import nibabel as nib
import numpy as np
import pandas as pd

from dmriharmony.errors import HarmonizationError

__all__ = ["between_site_rmse", "rmse_reduction", "scan_rescan_rmse", "site_mean_rmse"]


def _as_array(value, what: str) -> np.ndarray:
    if isinstance(value, nib.spatialimages.SpatialImage):
        return np.asarray(value.dataobj, dtype=float)
    if isinstance(value, str) or hasattr(value, "__fspath__"):
        return np.asarray(nib.load(value).dataobj, dtype=float)
    return np.asarray(value, dtype=float)


def _stack(maps: Mapping[str, object], mask) -> tuple[list[str], np.ndarray]:
    """Sites (sorted) and their mask values, (n_sites, n_voxels)."""
    if len(maps) < 2:
        raise HarmonizationError(f"a traveling subject needs maps from >= 2 sites, got "
                                 f"{sorted(maps)}")
    m = _as_array(mask, "mask") > 0
    if not m.any():
        raise HarmonizationError("the traveling-subject mask is empty")
    sites = sorted(str(s) for s in maps)
    rows = []
    for site in sites:
        key = site if site in maps else next(k for k in maps if str(k) == site)
        arr = _as_array(maps[key], f"map of site {site}")
        if arr.shape != m.shape:
            raise HarmonizationError(f"map of site {site!r} has shape {arr.shape}, the mask "
                                     f"{m.shape}: the maps must share one grid")
        vals = arr[m]
        if not np.all(np.isfinite(vals)):
            raise HarmonizationError(f"map of site {site!r} has non-finite values in the mask")
        rows.append(vals)
    return sites, np.vstack(rows)


def between_site_rmse(maps: Mapping[str, object], mask) -> pd.DataFrame:
    """Pairwise between-site RMSE of one traveling subject's maps inside ``mask``.

    Parameters
    ----------
    maps : mapping site -> array, NIfTI image or path
        The same subject's map (e.g. FA) from each site, on one grid.
    mask : array, image or path
        Voxels to compare (non-zero).

    Returns
    -------
    DataFrame with one row per site pair: ``site_a``, ``site_b``, ``rmse``, ``mean_diff``
    (``a - b``), ``n_voxels``.
    """
    sites, Y = _stack(maps, mask)
    rows = []
    for i, j in combinations(range(len(sites)), 2):
        d = Y[i] - Y[j]
        rows.append({"site_a": sites[i], "site_b": sites[j],
                     "rmse": float(np.sqrt(np.mean(d ** 2))), "mean_diff": float(d.mean()),
                     "n_voxels": int(d.size)})
    return pd.DataFrame(rows)


def site_mean_rmse(maps: Mapping[str, object], mask) -> float:
    """RMSE of the maps about the subject's across-site mean, over sites and mask voxels."""
    _, Y = _stack(maps, mask)
    return float(np.sqrt(np.mean((Y - Y.mean(axis=0)) ** 2)))


def rmse_reduction(before: Mapping[str, object], after: Mapping[str, object], mask) -> dict:
    """Relative drop of the between-site error after harmonization.

    Returns a dict with the mean pairwise RMSE before/after, the site-mean RMSE before/after and
    ``reduction = 1 - after / before`` of the mean pairwise RMSE (0.5 = halved).
    """
    if sorted(map(str, before)) != sorted(map(str, after)):
        raise HarmonizationError(f"sites before {sorted(map(str, before))} != after "
                                 f"{sorted(map(str, after))}")
    pb = between_site_rmse(before, mask)["rmse"].mean()
    pa = between_site_rmse(after, mask)["rmse"].mean()
    return {"pairwise_rmse_before": float(pb), "pairwise_rmse_after": float(pa),
            "site_mean_rmse_before": site_mean_rmse(before, mask),
            "site_mean_rmse_after": site_mean_rmse(after, mask),
            "reduction": float(1.0 - pa / pb) if pb > 0 else float("nan")}


def _masked(value, m: np.ndarray, what: str) -> np.ndarray:
    """Values of one map inside the mask ``m``, checked (shape, finite)."""
    arr = _as_array(value, what)
    if arr.shape != m.shape:
        raise HarmonizationError(f"{what} has shape {arr.shape}, the mask {m.shape}: the maps "
                                 "must share one grid")
    vals = arr[m]
    if not np.all(np.isfinite(vals)):
        raise HarmonizationError(f"{what} has non-finite values in the mask")
    return vals


def scan_rescan_rmse(maps: Mapping[str, object], sites: Mapping[str, str], mask) -> dict:
    """Split one traveling subject's between-site error into rescan noise and site effect.

    With sessions ``a, b`` of the same subject on one grid, mask voxels ``v`` and the pairwise
    mean squared error ``MSE_ab = mean_v (y_av - y_bv)^2``:

    - ``between_rmse = sqrt(mean_{(a, b): site(a) != site(b)} MSE_ab)``, over all pairs of
      sessions at different sites;
    - ``within_rmse = sqrt(mean_{(a, b): site(a) == site(b)} MSE_ab)``, over all pairs of
      sessions at the same site (scan-rescan pairs): the error any rescan shows (noise, head
      pose, registration, interpolation);
    - ``site_rmse = sqrt(max(between_rmse^2 - within_rmse^2, 0))``: the site-attributable part.

    The means are of squared errors (not of per-pair RMSEs), so the subtraction is one of mean
    squared errors: for a site offset ``d`` and independent noise of SD ``s`` in every session,
    ``between_rmse^2 = d^2 + 2 s^2``, ``within_rmse^2 = 2 s^2`` and ``site_rmse = |d|``. Every
    pair has the same weight, so a site with more sessions weighs more.

    Parameters
    ----------
    maps : mapping session label -> array, NIfTI image or path
        The same subject's map (e.g. FA) from each session, on one grid.
    sites : mapping session label -> site
        The site of every session in ``maps`` (extra entries are ignored).
    mask : array, image or path
        Voxels to compare (non-zero).

    Returns
    -------
    dict
        ``between_rmse``, ``within_rmse`` (NaN when no site has two sessions), ``site_rmse``
        (NaN when ``within_rmse`` is), ``n_between_pairs``, ``n_within_pairs``, ``n_voxels``.

    Raises
    ------
    HarmonizationError
        A session without a site, fewer than two sites, an empty mask, or maps that are not on
        the mask's grid or not finite inside it.
    """
    site_of = {str(k): str(v) for k, v in sites.items()}
    labels = sorted(str(k) for k in maps)
    missing = [lab for lab in labels if lab not in site_of]
    if missing:
        raise HarmonizationError(f"session(s) {missing} of the maps have no site in `sites` "
                                 f"(has {sorted(site_of)})")
    n_sites = len({site_of[lab] for lab in labels})
    if n_sites < 2:
        raise HarmonizationError(f"scan-rescan decomposition needs sessions from >= 2 sites, "
                                 f"got sessions {labels} at {n_sites} site(s)")
    m = _as_array(mask, "mask") > 0
    if not m.any():
        raise HarmonizationError("the traveling-subject mask is empty")
    keys = {str(k): k for k in maps}
    Y = np.vstack([_masked(maps[keys[lab]], m, f"map of session {lab!r} "
                           f"(site {site_of[lab]!r})") for lab in labels])
    between, within = [], []
    for i, j in combinations(range(len(labels)), 2):
        mse = float(np.mean((Y[i] - Y[j]) ** 2))
        (within if site_of[labels[i]] == site_of[labels[j]] else between).append(mse)
    b2 = float(np.mean(between))
    w2 = float(np.mean(within)) if within else float("nan")
    return {"between_rmse": float(np.sqrt(b2)),
            "within_rmse": float(np.sqrt(w2)),
            "site_rmse": float(np.sqrt(max(b2 - w2, 0.0))) if within else float("nan"),
            "n_between_pairs": len(between), "n_within_pairs": len(within),
            "n_voxels": int(m.sum())}
