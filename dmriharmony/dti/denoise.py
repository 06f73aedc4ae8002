"""Optional pre-processing before the tensor fit: denoising and Gibbs-ringing removal."""

from __future__ import annotations

import numpy as np

DENOISE_METHODS = ("none", "mppca", "patch2self")


def denoise(
    data: np.ndarray,
    bvals: np.ndarray,
    method: str = "none",
    *,
    mask: np.ndarray | None = None,
    patch_radius: int = 2,
) -> np.ndarray:
    """Denoise a 4-D DWI series.

    Parameters
    ----------
    method
        ``"none"`` (returns the data as float32), ``"mppca"`` -- Marchenko-Pastur PCA
        (Veraart et al., NeuroImage 2016; DIPY ``mppca``), or ``"patch2self"`` -- self-supervised
        regression across volumes (Fadnavis et al., NeurIPS 2020; DIPY ``patch2self``).
    patch_radius
        Local patch radius for MP-PCA (a 5x5x5 patch at 2).
    """
    if method not in DENOISE_METHODS:
        raise ValueError(f"unknown denoising method {method!r}; choose one of {DENOISE_METHODS}")
    data = np.asarray(data, dtype=np.float32)
    if method == "none":
        return data
    if method == "mppca":
        from dipy.denoise.localpca import mppca

        radius = max(1, min(patch_radius, (min(data.shape[:3]) - 1) // 2))
        out = mppca(data, mask=mask, patch_radius=radius, suppress_warning=True)
        # voxels outside the mask come back as 0/0: keep them as they were
        out = np.where(np.isfinite(out), out, data)
        return np.asarray(out, np.float32)
    from dipy.denoise.patch2self import patch2self

    return np.asarray(
        patch2self(data, np.asarray(bvals, float), model="ols", shift_intensity=True,
                   clip_negative_vals=False, verbose=False),
        np.float32,
    )


def remove_gibbs(data: np.ndarray, *, slice_axis: int = 2, n_points: int = 3) -> np.ndarray:
    """Suppress Gibbs ringing by local sub-voxel shifts (Kellner et al., MRM 2016; DIPY).

    Applied slice-wise in the acquisition plane (``slice_axis``, usually 2 for axial slices).
    """
    from dipy.denoise.gibbs import gibbs_removal

    data = np.array(data, dtype=np.float32)
    return np.asarray(
        gibbs_removal(data, slice_axis=slice_axis, n_points=n_points, inplace=False), np.float32
    )
