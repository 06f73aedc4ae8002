"""Subject-to-template geometry: random affine, smooth deformation, head pose; I/O.

A point ``x`` in a scan's scanner (world, RAS mm) coordinates lies at template point::

    y = A @ [x, 1]            (A = anatomy affine @ head pose of this session)
    T(x) = y + d(y)           (d: smooth displacement field, trilinear on a coarse grid)

``A`` is written as a 4x4 text matrix (``..._desc-affine_xfm.txt``), ``d`` as a 4-D NIfTI
(``..._desc-warp_xfm.nii.gz``: x, y, z, component; mm; on its own coarse grid in template mm).
:func:`scanner_to_template` evaluates ``T`` exactly as the simulator did, so any map in a scan's
space can be compared with the template-grid ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates
from scipy.spatial.transform import Rotation

from dmriharmony.simulate.anatomy import TEMPLATE_SHAPE, TEMPLATE_SPACING

#: Spacing (mm) of the control grid of the deformation.
WARP_SPACING = 8.0


@dataclass
class Warp:
    """Displacement field ``d`` (mm) on a coarse grid: ``field`` (nx, ny, nz, 3), ``affine``."""

    field: np.ndarray
    affine: np.ndarray

    def __call__(self, y: np.ndarray) -> np.ndarray:
        """Displacement at template points ``y`` (n, 3); zero-flux outside the grid."""
        ijk = (np.linalg.inv(self.affine) @ np.c_[y, np.ones(len(y))].T)[:3]
        return np.stack([map_coordinates(self.field[..., c], ijk, order=1, mode="nearest")
                         for c in range(3)], axis=1)

    def to_image(self) -> nib.Nifti1Image:
        img = nib.Nifti1Image(self.field[:, :, :, None, :].astype(np.float32), self.affine)
        img.header.set_intent("vector", (), "displacement_mm")
        img.header.set_xyzt_units("mm")
        return img

    @classmethod
    def from_image(cls, img: nib.Nifti1Image) -> Warp:
        data = np.asarray(img.dataobj, dtype=np.float64)
        return cls(data.reshape(data.shape[:3] + (3,)), img.affine.copy())


def identity_warp() -> Warp:
    shape, aff = _warp_grid()
    return Warp(np.zeros(shape + (3,)), aff)


def _warp_grid() -> tuple[tuple[int, int, int], np.ndarray]:
    extent = np.array(TEMPLATE_SHAPE) * TEMPLATE_SPACING
    n = tuple(int(np.ceil(e / WARP_SPACING)) + 3 for e in extent)
    aff = np.diag([WARP_SPACING] * 3 + [1.0])
    aff[:3, 3] = -(np.array(n) - 1) * WARP_SPACING / 2.0
    return n, aff


def random_warp(rng: np.random.Generator, amplitude_mm: float = 1.5) -> Warp:
    """A smooth random displacement field with RMS ``amplitude_mm`` per component.

    White noise on the control grid smoothed with a Gaussian of 1.5 control spacings; with the
    default amplitude the displacement gradients stay well below 1, so ``T`` is invertible
    (Jacobian determinant > 0).
    """
    shape, aff = _warp_grid()
    if amplitude_mm <= 0:
        return Warp(np.zeros(shape + (3,)), aff)
    f = rng.normal(size=shape + (3,))
    f = np.stack([gaussian_filter(f[..., c], 1.5, mode="constant") for c in range(3)], axis=-1)
    f *= amplitude_mm / max(float(f.std()), 1e-12)
    # the simulation uses exactly the float32 values that are written to the warp file
    return Warp(f.astype(np.float32).astype(np.float64), aff)


def random_anatomy_affine(rng: np.random.Generator, *, rotation_deg: float = 5.0,
                          scale_sd: float = 0.04, shear_sd: float = 0.02,
                          translation_mm: float = 3.0) -> np.ndarray:
    """Random subject-anatomy -> template affine (rotation, anisotropic scale, shear, shift)."""
    rot = Rotation.from_euler("xyz", rng.uniform(-rotation_deg, rotation_deg, 3),
                              degrees=True).as_matrix()
    scale = np.diag(1.0 + np.clip(rng.normal(0.0, scale_sd, 3), -3 * scale_sd, 3 * scale_sd))
    shear = np.eye(3)
    shear[0, 1], shear[0, 2], shear[1, 2] = rng.normal(0.0, shear_sd, 3)
    out = np.eye(4)
    out[:3, :3] = rot @ shear @ scale
    out[:3, 3] = rng.uniform(-translation_mm, translation_mm, 3)
    return out


def random_head_pose(rng: np.random.Generator, *, rotation_deg: float = 6.0,
                     translation_mm: float = 6.0) -> np.ndarray:
    """Random rigid head position in the scanner (scanner mm -> subject anatomy mm)."""
    out = np.eye(4)
    out[:3, :3] = Rotation.from_euler("xyz", rng.uniform(-rotation_deg, rotation_deg, 3),
                                      degrees=True).as_matrix()
    out[:3, 3] = rng.uniform(-translation_mm, translation_mm, 3)
    return out


def scanner_to_template(points: np.ndarray, affine: np.ndarray, warp: Warp | None) -> np.ndarray:
    """Map scanner-space points (n, 3) mm to template mm: ``y = A x``, ``T = y + d(y)``."""
    pts = np.asarray(points, dtype=float)
    y = pts @ affine[:3, :3].T + affine[:3, 3]
    if warp is not None:
        y = y + warp(y)
    return y


def rotation_part(affine: np.ndarray) -> np.ndarray:
    """Rotation of the polar decomposition ``L = R S`` of the affine's linear part."""
    u, _, vt = np.linalg.svd(affine[:3, :3])
    r = u @ vt
    if np.linalg.det(r) < 0:  # not expected for simulated transforms
        u[:, -1] *= -1
        r = u @ vt
    return r


def resample_to_scan(template_img: nib.Nifti1Image, scan_img: nib.Nifti1Image,
                     affine: np.ndarray, warp: Warp | None, order: int = 1) -> np.ndarray:
    """Sample a template-grid image at the voxel centres of ``scan_img`` (3-D array back)."""
    shape = scan_img.shape[:3]
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = ijk @ scan_img.affine[:3, :3].T + scan_img.affine[:3, 3]
    t = scanner_to_template(xyz, affine, warp)
    vox = (np.linalg.inv(template_img.affine) @ np.c_[t, np.ones(len(t))].T)[:3]
    data = np.asarray(template_img.dataobj, dtype=np.float64)
    out = map_coordinates(data, vox, order=order, mode="constant", cval=0.0)
    return out.reshape(shape)


def read_affine(path: str | Path) -> np.ndarray:
    """Read a 4x4 text affine written by the simulator."""
    return np.loadtxt(path).reshape(4, 4)


def load_scan_transform(affine_path: str | Path,
                        warp_path: str | Path | None) -> tuple[np.ndarray, Warp | None]:
    """(A, warp) of one scan from its ``desc-affine`` text file and ``desc-warp`` image."""
    warp = Warp.from_image(nib.load(str(warp_path))) if warp_path is not None else None
    return read_affine(affine_path), warp
