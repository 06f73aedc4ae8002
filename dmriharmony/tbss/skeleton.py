"""Mean-FA skeletonisation and the skeleton distance map (TBSS, Smith et al. 2006).

Re-implemented from the description in Smith SM et al., "Tract-based spatial statistics:
voxelwise analysis of multi-subject diffusion data", NeuroImage 31:1487-1505 (2006), section
"Skeletonisation of the mean FA image" -- no FSL code is used:

1. **Tract-perpendicular direction** at every voxel. Off the tract centre the local centre of
   gravity (COG) of FA in the 3x3x3 neighbourhood is displaced towards the centre, and the
   vector to it is perpendicular to the tract. At the centre (COG displacement below a
   threshold) the perpendicular is the direction of maximum FA "curvature": of the 13 lines
   through the 26-neighbourhood, the one along which FA falls off most on both sides
   (largest ``(2 FA(x) - FA(x+d) - FA(x-d)) / |d|^2``). Directions are kept as one of those 13
   discrete lines and regularised by a 3x3x3 mode filter.
2. **Non-maximum suppression**: a voxel is on the skeleton when its FA is a maximum along its
   perpendicular (strictly greater than the neighbour on the positive side, not smaller than
   the one on the negative side, so that flat two-voxel ridges give one voxel).
3. **Threshold** the skeleton at a mean-FA value (TBSS default 0.2).
4. Remaining three-voxel runs along a perpendicular (possible where neighbouring voxels chose
   different lines) are thinned by removing the middle voxel's neighbours with the lower FA, so
   the skeleton is one voxel thick along every perpendicular.

:func:`skeleton_distance_map` is TBSS's search-limiting map: the Euclidean distance (in voxels) of
every brain voxel to the nearest skeleton voxel or non-brain voxel. For the ENIGMA template it
reproduces ``ENIGMA_DTI_FA_skeleton_mask_dst`` to ~5e-7.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage as ndi

from dmriharmony.errors import TemplateError

LOGGER = logging.getLogger(__name__)

#: The 13 lines through a voxel's 26-neighbourhood (first non-zero component positive).
DIRECTIONS = np.array(
    [
        (i, j, k)
        for i in (-1, 0, 1)
        for j in (-1, 0, 1)
        for k in (-1, 0, 1)
        if (i, j, k) > (0, 0, 0)
    ],
    dtype=np.int64,
)
_UNIT = DIRECTIONS / np.linalg.norm(DIRECTIONS, axis=1, keepdims=True)
_SQNORM = (DIRECTIONS**2).sum(axis=1).astype(np.float32)


def _shifted(padded: np.ndarray, offset: np.ndarray | tuple[int, int, int]) -> np.ndarray:
    """View of ``a[x + offset]`` for a 1-voxel zero-padded array ``padded``."""
    i, j, k = (int(o) for o in offset)
    nx, ny, nz = (s - 2 for s in padded.shape)
    return padded[1 + i:1 + i + nx, 1 + j:1 + j + ny, 1 + k:1 + k + nz]


def _prepare(fa: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    fa = np.asarray(fa, dtype=np.float32)
    if fa.ndim != 3:
        raise TemplateError(f"mean FA must be a 3-D image, got shape {fa.shape}")
    fa = np.where(np.isfinite(fa), fa, 0).astype(np.float32)
    if mask is None:
        mask = fa > 0
    else:
        mask = np.asarray(mask) != 0
        if mask.shape != fa.shape:
            raise TemplateError(f"mask shape {mask.shape} differs from mean FA {fa.shape}")
    return np.where(mask, fa, 0).astype(np.float32), mask


def perpendicular_directions(
    mean_fa: np.ndarray,
    mask: np.ndarray | None = None,
    cog_threshold: float = 0.2,
    mode_filter: bool = True,
) -> np.ndarray:
    """Index (0-12 into :data:`DIRECTIONS`) of the tract-perpendicular line at every voxel.

    Parameters
    ----------
    mean_fa : ndarray (X, Y, Z)
        Mean FA (fraction).
    mask : ndarray, optional
        Brain mask; defaults to ``mean_fa > 0``.
    cog_threshold : float
        COG displacement (voxels) above which the COG direction is used (Smith et al. 2006);
        below it the maximum-curvature direction.
    mode_filter : bool
        Regularise the direction field with a 3x3x3 mode filter inside the mask.

    Returns
    -------
    ndarray of int8
        Direction index per voxel; -1 outside the mask.
    """
    fa, mask = _prepare(mean_fa, mask)
    offsets = np.array([(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)])
    total = ndi.uniform_filter(fa, size=3, mode="constant") * 27.0
    cog = np.zeros((3,) + fa.shape, np.float32)
    for axis in range(3):
        kernel = np.zeros((3, 3, 3), np.float32)
        for o in offsets:
            kernel[tuple(o + 1)] = o[axis]
        cog[axis] = ndi.correlate(fa, kernel, mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        cog /= np.where(total > 0, total, 1.0)
    cog_norm = np.sqrt((cog**2).sum(axis=0))

    # Maximum-curvature direction.
    padded = np.pad(fa, 1)
    best = np.full(fa.shape, -np.inf, np.float32)
    curv_dir = np.zeros(fa.shape, np.int8)
    for n, d in enumerate(DIRECTIONS):
        c = (2.0 * fa - _shifted(padded, d) - _shifted(padded, -d)) / _SQNORM[n]
        better = c > best
        best[better] = c[better]
        curv_dir[better] = n

    # COG direction: the discrete line best aligned with the COG vector.
    align = np.abs(np.tensordot(_UNIT.astype(np.float32), cog, axes=(1, 0)))  # (13, X, Y, Z)
    cog_dir = np.argmax(align, axis=0).astype(np.int8)
    del align
    direction = np.where(cog_norm > cog_threshold, cog_dir, curv_dir).astype(np.int8)
    direction[~mask] = -1
    if mode_filter:
        direction = _mode_filter(direction, mask)
    return direction


def _mode_filter(direction: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """3x3x3 mode filter of a label field (ties: the voxel's own label, then the lower index)."""
    best_count = np.zeros(direction.shape, np.float32)
    out = direction.copy()
    for n in range(len(DIRECTIONS)):
        onehot = (direction == n).astype(np.float32)
        # own label gets a half vote so ties keep it
        count = ndi.uniform_filter(onehot, size=3, mode="constant") * 27.0 + 0.5 * onehot
        better = count > best_count
        best_count[better] = count[better]
        out[better] = n
    out[~mask] = -1
    return out


def non_maximum_suppression(mean_fa: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Voxels whose FA is a maximum along their perpendicular line (Smith et al. 2006)."""
    fa = np.asarray(mean_fa, dtype=np.float32)
    padded = np.pad(fa, 1)
    keep = np.zeros(fa.shape, bool)
    for n, d in enumerate(DIRECTIONS):
        sel = direction == n
        if not sel.any():
            continue
        plus = _shifted(padded, d)[sel]
        minus = _shifted(padded, -d)[sel]
        v = fa[sel]
        keep[sel] = (v > plus) & (v >= minus)
    return keep & (fa > 0)


def thick_voxels(skeleton: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Skeleton voxels with skeleton neighbours on *both* sides along their perpendicular."""
    skel = np.asarray(skeleton) != 0
    padded = np.pad(skel, 1)
    thick = np.zeros(skel.shape, bool)
    for n, d in enumerate(DIRECTIONS):
        sel = skel & (direction == n)
        if sel.any():
            thick |= sel & _shifted(padded, d) & _shifted(padded, -d)
    return thick


def _thin(skeleton: np.ndarray, direction: np.ndarray, fa: np.ndarray,
          max_iter: int = 10) -> np.ndarray:
    """Remove, for every thick voxel, its lower-FA perpendicular neighbour until one voxel thick."""
    skel = skeleton.copy()
    for _ in range(max_iter):
        thick = thick_voxels(skel, direction)
        if not thick.any():
            return skel
        coords = np.argwhere(thick)
        d = DIRECTIONS[direction[thick]]
        plus = coords + d
        minus = coords - d
        fa_plus = fa[tuple(plus.T)]
        fa_minus = fa[tuple(minus.T)]
        drop = np.where((fa_plus <= fa_minus)[:, None], plus, minus)
        skel[tuple(drop.T)] = False
    # Last resort: drop the remaining thick voxels themselves.
    skel[thick_voxels(skel, direction)] = False
    return skel


def skeletonise(
    mean_fa: np.ndarray,
    mask: np.ndarray | None = None,
    threshold: float = 0.2,
    cog_threshold: float = 0.2,
    mode_filter: bool = True,
    return_directions: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """TBSS skeleton of a mean FA image (Smith et al. 2006).

    Parameters
    ----------
    mean_fa : ndarray (X, Y, Z)
        Mean FA as a fraction (use :func:`dmriharmony.tbss.io.as_fraction` for FA x 10^4 files).
    mask : ndarray, optional
        Brain mask; defaults to ``mean_fa > 0``.
    threshold : float
        Mean-FA threshold of the skeleton (TBSS's ``tbss_4_prestats`` default 0.2).
    cog_threshold, mode_filter
        See :func:`perpendicular_directions`.
    return_directions : bool
        Also return the perpendicular direction index map.

    Returns
    -------
    skeleton : ndarray of bool
    directions : ndarray of int8, only with ``return_directions``
    """
    fa, mask = _prepare(mean_fa, mask)
    if not 0 <= threshold < 1:
        raise TemplateError(f"skeleton threshold must be an FA in [0, 1), got {threshold}")
    if fa.max() > 2:
        raise TemplateError("mean FA exceeds 2: rescale FA x 10^4 images with as_fraction()")
    direction = perpendicular_directions(fa, mask, cog_threshold, mode_filter)
    skel = non_maximum_suppression(fa, direction) & mask & (fa > threshold)
    skel = _thin(skel, direction, fa)
    LOGGER.info("skeleton: %d voxels at threshold %.3g", int(skel.sum()), threshold)
    if return_directions:
        return skel, direction
    return skel


def skeleton_distance_map(mask: np.ndarray, skeleton: np.ndarray) -> np.ndarray:
    """TBSS search-limit map: distance (voxels) of each brain voxel to skeleton or non-brain.

    Equals FSL's ``distancemap`` of ``(1 - mask) + skeleton`` as used by ``tbss_4_prestats``;
    zero on the skeleton and outside the brain. Checked against ENIGMA's
    ``ENIGMA_DTI_FA_skeleton_mask_dst`` (max difference ~5e-7).
    """
    mask = np.asarray(mask) != 0
    skel = np.asarray(skeleton) != 0
    if mask.shape != skel.shape:
        raise TemplateError(f"mask {mask.shape} and skeleton {skel.shape} grids differ")
    return ndi.distance_transform_edt(mask & ~skel).astype(np.float32)


def tube_directions(skeleton: np.ndarray, direction: np.ndarray,
                    max_neighbours: int = 3) -> np.ndarray:
    """Second search line for skeleton voxels that lie on a 1-D curve (tube-like tracts).

    A sheet-like skeleton has one perpendicular, which :func:`perpendicular_directions` finds.
    Where a tract is a thin tube, TBSS's skeleton is a curve and the tract has *two*
    perpendiculars; a single search line then misses misalignment along the other one. For
    skeleton voxels with at most ``max_neighbours`` skeleton neighbours (a curve: 1-2), the curve
    tangent ``t`` is the principal axis of the neighbour offsets and the second line is the one of
    :data:`DIRECTIONS` best aligned with ``t x d1``. This is an extension of Smith et al. (2006),
    used by :func:`dmriharmony.tbss.project.search_positions` with the same distance-map rule.

    Returns
    -------
    ndarray of int8
        Line index per voxel; -1 where there is no second line (sheets, off the skeleton).
    """
    skel = np.asarray(skeleton) != 0
    out = np.full(skel.shape, -1, np.int8)
    coords = np.argwhere(skel)
    if not len(coords):
        return out
    padded = np.pad(skel, 1)
    offsets = np.array([(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)
                        if (i, j, k) != (0, 0, 0)])
    present = np.stack([padded[tuple((coords + 1 + o).T)] for o in offsets], axis=1)
    count = present.sum(axis=1)
    line = (count >= 1) & (count <= max_neighbours) & (np.asarray(direction)[skel] >= 0)
    if not line.any():
        return out
    unit = offsets / np.linalg.norm(offsets, axis=1, keepdims=True)
    scatter = np.einsum("ni,ij,ik->njk", present[line].astype(float), unit, unit)
    _, vecs = np.linalg.eigh(scatter)
    tangent = vecs[:, :, -1]
    d1 = _UNIT[np.asarray(direction)[skel][line].astype(int)]
    d2 = np.cross(tangent, d1)
    norm = np.linalg.norm(d2, axis=1)
    ok = norm > 0.5  # tangent not parallel to the first perpendicular
    d2 = d2 / np.where(norm > 0, norm, 1)[:, None]
    best = np.argmax(np.abs(d2 @ _UNIT.T), axis=1).astype(np.int8)
    first = np.asarray(direction)[skel][line]
    best[(best == first) | ~ok] = -1
    idx = coords[line]
    out[tuple(idx.T)] = best
    return out
