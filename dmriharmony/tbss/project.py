"""Projection of a subject's aligned FA (and MD/AD/RD) onto the mean-FA skeleton.

TBSS search rule (Smith SM et al., NeuroImage 31:1487-1505, 2006, section "Projecting individual
subjects' FA onto the skeleton"; re-implemented from the paper, no FSL code):

* every skeleton voxel searches its subject's FA along the tract-perpendicular line found on the
  *template* (mean) FA (see :func:`dmriharmony.tbss.skeleton.perpendicular_directions`), on both
  sides of the skeleton;
* the search of a skeleton section stays closer to that section than to any other: moving away
  from the skeleton it stops as soon as the skeleton distance map stops increasing (the map is the
  distance to the nearest skeleton or non-brain voxel, so it peaks half-way between two sections
  and falls to 0 outside the brain);
* a wide Gaussian (FWHM 20 mm) multiplies the FA during the search only, so that far maxima are
  down-weighted smoothly; the *unweighted* FA of the winning voxel goes onto the skeleton;
* extension: across a thin, tube-like tract (two strongly negative Hessian eigenvalues of the
  mean FA) the perpendicular is a plane; extra search lines spanning it
  (:func:`dmriharmony.tbss.skeleton.tube_directions`) follow the same rules;
* other maps (MD, AD, RD, ...) are sampled at the positions found by searching the FA (ENIGMA's
  ``tbss_non_FA`` step), never by searching those maps themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from dmriharmony.errors import TemplateError
from dmriharmony.tbss.skeleton import DIRECTIONS

LOGGER = logging.getLogger(__name__)

#: Full width at half maximum (mm) of TBSS's soft search limit (Smith et al. 2006).
SEARCH_FWHM_MM = 20.0


def search_positions(
    fa: np.ndarray,
    skeleton: np.ndarray,
    distance: np.ndarray,
    directions: np.ndarray | list[np.ndarray],
    voxel_size: tuple[float, float, float] | np.ndarray = (1.0, 1.0, 1.0),
    fwhm_mm: float | None = SEARCH_FWHM_MM,
    max_steps: int | None = None,
) -> np.ndarray:
    """Flat indices of the voxels whose FA each skeleton voxel takes (TBSS search rule).

    Parameters
    ----------
    fa : ndarray (X, Y, Z)
        The subject's FA, aligned to the template grid.
    skeleton : ndarray (X, Y, Z)
        Template skeleton (non-zero = skeleton voxel).
    distance : ndarray (X, Y, Z)
        Skeleton distance map (:func:`dmriharmony.tbss.skeleton.skeleton_distance_map`); 0 on
        the skeleton and outside the brain.
    directions : ndarray (X, Y, Z) of int, or a list of them
        Perpendicular line index (0-12 into :data:`~dmriharmony.tbss.skeleton.DIRECTIONS`) from
        the template FA; skeleton voxels with -1 search nothing and keep their own FA. A list
        adds further search lines (e.g. :func:`~dmriharmony.tbss.skeleton.tube_directions`, the
        second perpendicular of tube-like tracts); the best weighted FA over all lines wins.
    voxel_size : 3 floats
        Voxel size in mm (for the Gaussian weighting).
    fwhm_mm : float or None
        FWHM of the search's Gaussian distance weighting; None disables it.
    max_steps : int, optional
        Hard limit on the number of steps on each side; defaults to the distance map's maximum.

    Returns
    -------
    ndarray of int64, shape (n_skeleton,)
        Flat index (C order) of the chosen voxel for every skeleton voxel, in the order of
        ``np.flatnonzero(skeleton)``.
    """
    fa = np.asarray(fa, dtype=np.float32)
    shape = fa.shape
    dir_maps = list(directions) if isinstance(directions, (list, tuple)) else [directions]
    for name, arr in [("skeleton", skeleton), ("distance map", distance)] + [
            ("directions", d) for d in dir_maps]:
        if np.shape(arr)[:3] != shape:
            raise TemplateError(f"projection: {name} grid {np.shape(arr)} differs from FA {shape}")
    fa = np.where(np.isfinite(fa), fa, 0.0).astype(np.float32)
    dist_flat = np.asarray(distance, dtype=np.float32).ravel()
    coords = np.argwhere(np.asarray(skeleton) != 0)
    n = len(coords)
    if n == 0:
        return np.zeros(0, np.int64)
    grid = np.array(shape)
    start_idx = np.ravel_multi_index(coords.T, shape).astype(np.int64)
    best_idx = start_idx.copy()
    fa_flat = fa.ravel()
    best_val = fa_flat[best_idx].copy()
    vox = np.asarray(voxel_size, dtype=np.float64).reshape(3)
    if max_steps is None:
        max_steps = int(np.ceil(float(dist_flat.max()))) + 1
    sigma = None if not fwhm_mm else fwhm_mm / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    for dmap in dir_maps:
        dir_idx = np.asarray(dmap)[tuple(coords.T)].astype(np.int64)
        has_dir = dir_idx >= 0
        if not has_dir.any():
            continue
        step = DIRECTIONS[np.clip(dir_idx, 0, None)]
        step[~has_dir] = 0
        step_mm = np.sqrt(((step * vox) ** 2).sum(axis=1))
        for sign in (1, -1):
            alive = has_dir.copy()
            prev = dist_flat[start_idx]
            for k in range(1, max_steps + 1):
                pos = coords + sign * k * step
                alive &= np.all((pos >= 0) & (pos < grid), axis=1)
                if not alive.any():
                    break
                idx = np.zeros(n, np.int64)
                idx[alive] = np.ravel_multi_index(pos[alive].T, shape)
                d_here = np.where(alive, dist_flat[idx], 0.0)
                # stay closer to this skeleton section than to any other, and inside the brain
                alive &= d_here > prev
                prev = d_here
                if not alive.any():
                    break
                value = fa_flat[idx]
                if sigma is not None:
                    value = value * np.exp(-0.5 * (k * step_mm / sigma) ** 2)
                better = alive & (value > best_val)
                best_val[better] = value[better]
                best_idx[better] = idx[better]
    return best_idx.astype(np.int64)


def project_onto_skeleton(
    fa: np.ndarray,
    skeleton: np.ndarray,
    distance: np.ndarray,
    directions: np.ndarray | list[np.ndarray],
    others: Mapping[str, np.ndarray] | None = None,
    voxel_size: tuple[float, float, float] | np.ndarray = (1.0, 1.0, 1.0),
    fwhm_mm: float | None = SEARCH_FWHM_MM,
) -> dict[str, np.ndarray]:
    """Skeletonise a subject's FA and any other maps with the TBSS search rule.

    Parameters
    ----------
    fa, skeleton, distance, directions, voxel_size, fwhm_mm
        See :func:`search_positions`.
    others : mapping name -> ndarray, optional
        Further maps on the same grid (MD, AD, RD, ...), sampled at the FA-chosen positions.

    Returns
    -------
    dict
        ``"FA"`` and each name of ``others`` -> skeletonised image (zero off the skeleton),
        plus ``"source_index"``: the flat index each skeleton voxel took its values from.
    """
    others = dict(others or {})
    positions = search_positions(fa, skeleton, distance, directions, voxel_size, fwhm_mm)
    skel = np.asarray(skeleton) != 0
    out: dict[str, np.ndarray] = {}
    maps = {"FA": np.asarray(fa, dtype=np.float32), **{k.upper(): v for k, v in others.items()}}
    for name, arr in maps.items():
        arr = np.asarray(arr, dtype=np.float32)
        if arr.shape[:3] != skel.shape:
            raise TemplateError(f"projection: {name} grid {arr.shape} differs from {skel.shape}")
        arr = np.where(np.isfinite(arr), arr, 0.0)
        res = np.zeros(skel.shape, np.float32)
        res[skel] = arr.ravel()[positions]
        out[name] = res
    out["source_index"] = positions
    moved = positions != np.flatnonzero(skel)
    LOGGER.info("projected %d skeleton voxels (%.1f%% took a value off the skeleton)",
                int(skel.sum()), 100.0 * float(moved.mean()) if moved.size else 0.0)
    return out
