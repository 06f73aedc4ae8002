"""Known deformations and resampled templates, for tests and benchmarks of the TBSS step.

A "subject" with a known ground truth is made from a template FA by a known rigid motion plus a
smooth random displacement field (seeded): registration must undo it, and ROI means of the
projected subject must match those of the template.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from dmriharmony.errors import TemplateError
from dmriharmony.tbss.templates import Template, template_from_arrays


def rigid_matrix(rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0),
                 translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 world-space rigid transform: rotations about x, y, z (degrees) then translation."""
    rx, ry, rz = np.deg2rad(rotation_deg)
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = rot_z @ rot_y @ rot_x
    m[:3, 3] = translation_mm
    return m


def deform(
    data: np.ndarray,
    affine: np.ndarray,
    rigid: np.ndarray | None = None,
    warp_voxels: float = 0.0,
    smoothness_voxels: float = 4.0,
    seed: int = 0,
    order: int = 1,
) -> np.ndarray:
    """Apply a known motion to an image on its own grid.

    The subject's anatomy is the template's moved by ``rigid`` (world mm): the subject value at
    world point ``y`` is the template value at ``rigid^-1 y``, then displaced by a smooth random
    field of peak amplitude ``warp_voxels`` (Gaussian-smoothed white noise, ``seed``).

    Parameters
    ----------
    data : ndarray (X, Y, Z)
    affine : ndarray (4, 4)
    rigid : ndarray (4, 4), optional
    warp_voxels : float
        Peak displacement (voxels) of the non-linear part (0 = none).
    smoothness_voxels : float
        Gaussian sigma of the displacement field.
    seed : int
    order : int
        Interpolation order (0 for label images).
    """
    data = np.asarray(data, dtype=np.float64)
    if data.ndim != 3:
        raise TemplateError(f"deform needs a 3-D image, got {data.shape}")
    grid = np.indices(data.shape, dtype=np.float64).reshape(3, -1)
    coords = grid.copy()
    if warp_voxels:
        rng = np.random.default_rng(seed)
        for axis in range(3):
            field = ndi.gaussian_filter(rng.standard_normal(data.shape), smoothness_voxels)
            field *= warp_voxels / max(np.abs(field).max(), 1e-12)
            coords[axis] += field.reshape(-1)
    if rigid is not None:
        # voxel -> world -> rigid^-1 -> voxel
        world = affine[:3, :3] @ coords + affine[:3, 3:4]
        inv = np.linalg.inv(rigid)
        world = inv[:3, :3] @ world + inv[:3, 3:4]
        vinv = np.linalg.inv(affine)
        coords = vinv[:3, :3] @ world + vinv[:3, 3:4]
    out = ndi.map_coordinates(data, coords, order=order, mode="constant", cval=0.0)
    return out.reshape(data.shape)


def downsample_template(template: Template, factor: int, threshold: float = 0.2,
                        name: str | None = None) -> Template:
    """A coarser copy of a template (block-mean FA, centre-voxel labels), re-skeletonised.

    Used to run the ENIGMA template at 2-3 mm in fast tests: the skeleton is recomputed from the
    block-averaged FA by :func:`dmriharmony.tbss.skeleton.skeletonise`, since a 1 mm skeleton
    cannot be downsampled into a one-voxel-thick one.
    """
    if factor < 1:
        raise TemplateError(f"downsampling factor must be >= 1, got {factor}")
    f = int(factor)
    shape = tuple(s // f for s in template.shape)
    sl = tuple(slice(0, s * f) for s in shape)

    def _block_mean(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, dtype=np.float64)[sl]
        return a.reshape(shape[0], f, shape[1], f, shape[2], f).mean(axis=(1, 3, 5))

    fa = _block_mean(template.fa)
    mask = _block_mean(template.mask) >= 0.5
    affine = template.affine.copy()
    affine[:3, :3] *= f
    affine[:3, 3] += template.affine[:3, :3] @ np.full(3, (f - 1) / 2.0)
    labels = None
    if template.labels is not None:
        centre = f // 2
        labels = template.labels[sl][centre::f, centre::f, centre::f][: shape[0], : shape[1],
                                                                      : shape[2]]
    return template_from_arrays(np.where(mask, fa, 0), affine, mask, labels,
                                template.label_table, name=name or f"{template.name}{f}",
                                threshold=threshold, source=template.source)


def subject_like_fa(
    template: Template,
    seed: int = 0,
    variation: float = 0.08,
    smoothness_voxels: float = 6.0,
    noise_sd: float = 0.03,
) -> np.ndarray:
    """A subject-like FA on the template grid: the template FA with smooth anatomical variation
    and voxel noise (for projection tests on real anatomy, e.g. the ENIGMA template).

    ``fa = clip(template_fa * (1 + v) + e, 0, 1)`` inside the template mask, where ``v`` is
    Gaussian-smoothed white noise (sigma ``smoothness_voxels``) scaled so that its SD is
    ``variation`` and ``e`` is white noise of SD ``noise_sd``; 0 outside the mask.
    """
    rng = np.random.default_rng(seed)
    fa = np.asarray(template.fa, dtype=np.float64)
    field = ndi.gaussian_filter(rng.standard_normal(fa.shape), smoothness_voxels)
    field *= variation / max(float(field.std()), 1e-12)
    noisy = fa * (1.0 + field) + rng.normal(0.0, noise_sd, fa.shape)
    return np.clip(np.where(template.mask, noisy, 0.0), 0.0, 1.0)
