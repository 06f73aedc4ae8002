"""Brain masking of diffusion data."""

from __future__ import annotations

import numpy as np
from dipy.segment.mask import median_otsu


def mean_b0(data: np.ndarray, bvals: np.ndarray, b0_threshold: float = 50.0) -> np.ndarray:
    """Mean of the b=0 volumes of a 4-D series."""
    idx = np.flatnonzero(np.asarray(bvals) <= b0_threshold)
    if idx.size == 0:
        raise ValueError("no b=0 volume to average")
    return np.mean(np.asarray(data[..., idx], dtype=np.float64), axis=-1)


def brain_mask(
    data: np.ndarray,
    bvals: np.ndarray,
    *,
    median_radius: int = 2,
    numpass: int = 2,
    b0_threshold: float = 50.0,
) -> np.ndarray:
    """Brain mask by median filtering and Otsu thresholding of the mean b=0 image.

    DIPY's ``median_otsu`` (Garyfallidis et al., Front. Neuroinf. 2014): the mean b0 is
    smoothed ``numpass`` times by a median filter of radius ``median_radius`` and thresholded
    with Otsu's method (Otsu, IEEE SMC 1979); the largest connected component is kept.

    Parameters
    ----------
    data
        4-D DWI series (x, y, z, volumes).
    bvals
        b-values, one per volume.

    Returns
    -------
    numpy.ndarray
        Boolean 3-D mask. A mask that would be empty falls back to all voxels with a positive
        mean b0 (tiny field-of-view acquisitions).

    Notes
    -----
    Median filtering erodes objects a few voxels thick, so small volumes (smallest dimension
    under 32 voxels: phantoms, slabs) use radius 1 and, under 16 voxels, a single pass.
    """
    b0 = mean_b0(data, bvals, b0_threshold)
    smallest = min(b0.shape)
    radius, passes = median_radius, numpass
    if smallest < 32:
        radius = 1
    if smallest < 16:
        passes = 1
    _, mask = median_otsu(b0, median_radius=radius, numpass=passes)
    mask = np.asarray(mask, bool)
    if not mask.any():
        mask = b0 > 0
    return mask
