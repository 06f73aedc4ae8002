"""File-level input/output for the DTI stage: validated loading and atomic NIfTI writing."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from dmriharmony._fs import set_default_mode
from dmriharmony.dti.gradients import check_gradients, read_bvals, read_bvecs
from dmriharmony.errors import BIDSInputError


@dataclass
class DWI:
    """A loaded, validated diffusion series."""

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    bvals: np.ndarray
    bvecs: np.ndarray
    path: Path


def _load_image(path: Path) -> nib.Nifti1Image:
    if not path.is_file():
        raise BIDSInputError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise BIDSInputError(f"{path}: unreadable NIfTI ({type(exc).__name__}: {exc})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise BIDSInputError(f"{path}: not a NIfTI image ({type(img).__name__})")
    return img


def check_dwi_header(path: str | Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Open a DWI NIfTI header and return (shape, zooms); raise if it is not a 4-D series."""
    path = Path(path)
    img = _load_image(path)
    shape = tuple(int(s) for s in img.shape)
    if len(shape) != 4 or shape[3] < 2:
        raise BIDSInputError(f"{path}: DWI must be a 4-D series of volumes, got shape {shape}")
    return shape, tuple(float(z) for z in img.header.get_zooms()[:3])


def check_finite(img: nib.Nifti1Image, path: Path) -> None:
    """Raise if the image data hold NaN or Inf (read volume by volume to bound memory)."""
    try:
        for v in range(img.shape[3]):
            vol = np.asarray(img.dataobj[..., v])
            if not np.all(np.isfinite(vol)):
                raise BIDSInputError(f"{path}: NaN or Inf values in volume {v}")
    except BIDSInputError:
        raise
    except Exception as exc:
        raise BIDSInputError(
            f"{path}: unreadable NIfTI data ({type(exc).__name__}: {exc})"
        ) from None


def validate_dwi_files(
    dwi: str | Path,
    bval: str | Path | None,
    bvec: str | Path | None,
    *,
    check_values: bool = True,
    require_b0: bool = True,
) -> tuple[np.ndarray, np.ndarray, tuple[int, ...], tuple[float, ...]]:
    """Validate one DWI run and its gradient files; one clear error naming the faulty file.

    Checks: the gradient files exist and parse; the NIfTI is readable and 4-D; b-value and
    b-vector counts equal the number of volumes; there is a b=0 volume; diffusion-weighted
    volumes have unit b-vectors; and (``check_values``) the data hold no NaN/Inf.

    Returns
    -------
    bvals, bvecs, shape, zooms
    """
    dwi = Path(dwi)
    if bval is None:
        raise BIDSInputError(f"{dwi}: no .bval file found (next to it or inherited)")
    if bvec is None:
        raise BIDSInputError(f"{dwi}: no .bvec file found (next to it or inherited)")
    shape, zooms = check_dwi_header(dwi)
    bvals = read_bvals(bval)
    bvecs = read_bvecs(bvec, n_volumes=shape[3])
    check_gradients(bvals, bvecs, shape[3], bval_file=bval, bvec_file=bvec,
                    require_b0=require_b0)
    if check_values:
        check_finite(_load_image(dwi), dwi)
    return bvals, bvecs, shape, zooms


def load_dwi(dwi: str | Path, bval: str | Path, bvec: str | Path) -> DWI:
    """Validate and load a DWI run as float32 data with its gradients."""
    dwi = Path(dwi)
    bvals, bvecs, _, _ = validate_dwi_files(dwi, bval, bvec, check_values=False)
    img = _load_image(dwi)
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as exc:
        raise BIDSInputError(
            f"{dwi}: unreadable NIfTI data ({type(exc).__name__}: {exc})"
        ) from None
    if not np.all(np.isfinite(data)):
        raise BIDSInputError(f"{dwi}: NaN or Inf values in the data")
    return DWI(data, img.affine, img.header, bvals, bvecs, dwi)


def concat_dwi(
    dwis: list[str | Path], bvals: list[str | Path], bvecs: list[str | Path]
) -> DWI:
    """Load several runs of one acquisition (shells split across ``acq-`` runs) as one series.

    The runs must share the voxel grid (shape and affine); volumes, b-values and b-vectors are
    concatenated in the order given. The whole must have a b=0 and a diffusion-weighted volume.
    """
    if not dwis or not (len(dwis) == len(bvals) == len(bvecs)):
        raise ValueError("concat_dwi needs as many .bval/.bvec files as DWI runs")
    parts = []
    for d, bl, bc in zip(dwis, bvals, bvecs):
        bv, bg, _, _ = validate_dwi_files(d, bl, bc, check_values=False, require_b0=False)
        img = _load_image(Path(d))
        parts.append((Path(d), img, bv, bg))
    first = parts[0]
    for path, img, _, _ in parts[1:]:
        if img.shape[:3] != first[1].shape[:3] or not np.allclose(img.affine, first[1].affine,
                                                                     atol=1e-3):
            raise BIDSInputError(
                f"{path}: voxel grid {img.shape[:3]} differs from {first[0].name} "
                f"{first[1].shape[:3]}; cannot fit the runs together"
            )
    data = []
    for path, img, _, _ in parts:
        try:
            vol = np.asarray(img.get_fdata(dtype=np.float32))
        except Exception as exc:
            raise BIDSInputError(
                f"{path}: unreadable NIfTI data ({type(exc).__name__}: {exc})"
            ) from None
        if not np.all(np.isfinite(vol)):
            raise BIDSInputError(f"{path}: NaN or Inf values in the data")
        data.append(vol)
    all_bvals = np.concatenate([p[2] for p in parts])
    all_bvecs = np.concatenate([p[3] for p in parts])
    names = " + ".join(str(p[0]) for p in parts)
    check_gradients(all_bvals, all_bvecs, len(all_bvals), bval_file=names, bvec_file=names)
    return DWI(np.concatenate(data, axis=3), first[1].affine, first[1].header, all_bvals,
               all_bvecs, first[0])


def load_mask(path: str | Path, shape: tuple[int, ...]) -> np.ndarray:
    """Load a 3-D mask and check it matches the DWI grid ``shape``."""
    path = Path(path)
    img = _load_image(path)
    if tuple(img.shape[:3]) != tuple(shape[:3]) or len(img.shape) != 3:
        raise BIDSInputError(f"{path}: mask shape {img.shape} does not match DWI {shape[:3]}")
    return np.asarray(img.dataobj) > 0


def atomic_write_bytes(data: bytes, path: str | Path) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        set_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_nifti(
    data: np.ndarray,
    affine: np.ndarray,
    path: str | Path,
    *,
    header: nib.Nifti1Header | None = None,
    dtype: type = np.float32,
) -> Path:
    """Save an array as NIfTI atomically (temporary file in the same folder, then rename).

    The spatial header (qform/sform codes, zooms) of ``header`` is kept when given.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(data, dtype=dtype)
    hdr = None
    if header is not None:
        hdr = header.copy()
        hdr.set_data_dtype(dtype)
        hdr.set_data_shape(arr.shape)
        zooms = tuple(header.get_zooms()[:3]) + (1.0,) * (arr.ndim - 3)
        hdr.set_zooms(zooms[: arr.ndim])
        hdr["scl_slope"], hdr["scl_inter"] = 1.0, 0.0
    img = nib.Nifti1Image(arr, affine, header=hdr)
    if header is not None:
        img.set_qform(affine, code=int(header["qform_code"]) or 1)
        img.set_sform(affine, code=int(header["sform_code"]) or 1)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        nib.save(img, tmp)
        set_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
