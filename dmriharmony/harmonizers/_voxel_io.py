"""NIfTI <-> on-disk subjects x voxels matrix for out-of-core voxel ComBat.

A mask (template-space brain mask or TBSS skeleton) selects the voxels; its nonzero voxels in
C order (``numpy`` ravel order of the 3-D array) are the matrix columns. Maps must lie on the
mask's grid (same shape, affine equal to 1e-4 mm); anything else is an error naming the file.
The matrix is written subject by subject into a ``.npy`` by plain file writes (no memory map,
whose touched pages would count in the resident set), so memory stays at one volume whatever the
number of subjects. Files are written under a temporary name
in the destination folder and moved into place (:func:`os.replace`).

Missing values: NaN voxels of a map are kept as NaN in the matrix; ComBat then fits each voxel on
its observed subjects and leaves NaN as NaN in the harmonized map. Infinite values are an error.
Harmonized maps hold 0 outside the mask.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from dmriharmony._fs import set_default_mode
from dmriharmony.errors import HarmonizationError
from dmriharmony.harmonizers._voxel_steps import NpyMatrix, read_matrix

__all__ = ["build_voxel_matrix", "load_mask", "mask_info", "output_name", "write_maps"]

_AFFINE_TOL = 1e-4


def _load_img(path: str | os.PathLike, what: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise HarmonizationError(f"{what} {p} does not exist")
    try:
        return nib.load(str(p))
    except Exception as exc:  # nibabel raises several unrelated types
        raise HarmonizationError(f"cannot read {what} {p} as NIfTI: {exc}") from exc


def _volume(img: Any, path: str | os.PathLike, what: str) -> np.ndarray:
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise HarmonizationError(f"{what} {path} must be a 3-D volume, got shape {img.shape}")
    return np.asanyarray(img.dataobj).reshape(shape)


def load_mask(mask_file: str | os.PathLike) -> tuple[Any, np.ndarray]:
    """The mask image and its boolean 3-D array (nonzero, finite voxels)."""
    img = _load_img(mask_file, "mask")
    data = _volume(img, mask_file, "mask")
    mask = np.isfinite(data) & (data != 0)
    if not mask.any():
        raise HarmonizationError(f"mask {mask_file} has no nonzero voxel")
    return img, mask


def mask_info(mask_file: str | os.PathLike, n_voxels: int | None = None) -> dict[str, Any]:
    """Flat voxel indices, shape and affine of a mask (stored in a fitted model)."""
    img, mask = load_mask(mask_file)
    index = np.flatnonzero(mask.ravel())
    if n_voxels is not None and index.size != n_voxels:
        raise HarmonizationError(
            f"mask {mask_file} has {index.size} voxels but the voxel matrix has {n_voxels}"
        )
    return {"index": index.astype(np.int64), "shape": tuple(int(s) for s in mask.shape),
            "affine": np.asarray(img.affine, dtype=float).tolist()}


def _check_grid(img: Any, path: str | os.PathLike, shape: tuple[int, ...],
                affine: np.ndarray, mask_name: str) -> None:
    got = tuple(img.shape[:3]) if len(img.shape) >= 3 else tuple(img.shape)
    if got != tuple(shape) or (len(img.shape) == 4 and img.shape[3] != 1) or len(img.shape) > 4:
        raise HarmonizationError(
            f"map {path} has shape {img.shape}, not the grid of the mask {mask_name} {shape}"
        )
    if not np.allclose(img.affine, affine, atol=_AFFINE_TOL, rtol=0):
        raise HarmonizationError(
            f"map {path} has a different affine (voxel-to-world) than the mask {mask_name}:"
            f" {np.round(img.affine, 4).tolist()} vs {np.round(affine, 4).tolist()}"
        )


def _tmp_like(path: Path) -> Path:
    """A unique temporary name in ``path``'s folder with the same extension(s)."""
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def build_voxel_matrix(
    in_files: Sequence[str | os.PathLike],
    mask_file: str | os.PathLike,
    out_path: str | os.PathLike,
    dtype: Any = np.float32,
) -> Path:
    """Stack the mask voxels of NIfTI maps into an on-disk ``(n_subjects, n_voxels)`` ``.npy``.

    Written subject by subject with positioned writes (:class:`~._voxel_steps.NpyMatrix`; peak
    memory: one volume), to a temporary file then renamed. Row ``j`` is ``map_j[mask]`` (C order).

    Parameters
    ----------
    in_files : sequence of paths
        One 3-D map per subject, on the mask's grid.
    mask_file : path
        Template-space mask or skeleton (nonzero = voxel used).
    out_path : path
        Destination ``.npy``.
    dtype : numpy dtype
        Storage type (float32 halves the disk size; ComBat computes in float64).

    Returns
    -------
    Path of the matrix.
    """
    files = [Path(f) for f in in_files]
    if not files:
        raise HarmonizationError("no input maps given")
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise HarmonizationError(f"the voxel matrix dtype must be floating point, got {dtype}")
    mimg, mask = load_mask(mask_file)
    affine = np.asarray(mimg.affine, dtype=float)
    n_vox = int(mask.sum())
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_like(out)
    try:
        mm = NpyMatrix.create(tmp, (len(files), n_vox), dtype)
        for j, f in enumerate(files):
            img = _load_img(f, "map")
            _check_grid(img, f, mask.shape, affine, str(mask_file))
            values = np.asarray(_volume(img, f, "map")[mask], dtype=float)
            if np.isinf(values).any():
                raise HarmonizationError(
                    f"map {f} has {int(np.isinf(values).sum())} infinite value(s) inside the mask"
                )
            mm.write(j, values[None, :], rows=True)
        mm.flush()
        set_default_mode(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def output_name(in_file: str | os.PathLike, desc: str = "voxelcombat") -> str:
    """BIDS-style output name: ``desc-<desc>`` inserted before the suffix (replacing a ``desc-``
    entity), e.g. ``sub-1_space-T_param-fa_dwimap.nii.gz`` ->
    ``sub-1_space-T_param-fa_desc-voxelcombat_dwimap.nii.gz``."""
    name = Path(in_file).name
    ext = ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix
    stem = name[: len(name) - len(ext)] if ext else name
    parts = [p for p in stem.split("_") if not p.startswith("desc-")]
    if len(parts) > 1:
        parts.insert(len(parts) - 1, f"desc-{desc}")
    else:
        parts.append(f"desc-{desc}")
    return "_".join(parts) + (ext or ".nii.gz")


def write_maps(
    chunk_files: Sequence[str | os.PathLike],
    mask_file: str | os.PathLike,
    out_files: Sequence[str | os.PathLike],
    in_files: Sequence[str | os.PathLike] | None = None,
) -> list[Path]:
    """Write one NIfTI per subject from harmonized voxel blocks.

    Parameters
    ----------
    chunk_files : sequence of paths
        ``.npy`` blocks ``(n_subjects, w_c)`` in voxel order (the per-chunk outputs of
        :func:`~._voxel_steps.adjust_chunk`, or one full ``(n_subjects, n_voxels)`` matrix);
        one subject row read at a time (positioned reads, :class:`~._voxel_steps.NpyMatrix`).
    mask_file : path
    out_files : sequence of paths, one per subject
    in_files : sequence of paths, optional
        The input maps, whose headers (units, description) the outputs take; else the mask's.

    Returns
    -------
    list of Path (float32 NIfTI, 0 outside the mask, NaN where the input was NaN).
    """
    mimg, mask = load_mask(mask_file)
    blocks = [read_matrix(f) for f in chunk_files]
    if not blocks:
        raise HarmonizationError("no harmonized voxel blocks given")
    n = blocks[0].shape[0]
    width = sum(b.shape[1] for b in blocks)
    for b, f in zip(blocks, chunk_files):
        if b.ndim != 2 or b.shape[0] != n:
            raise HarmonizationError(f"voxel block {f} has shape {b.shape}; expected ({n}, w)")
    if width != int(mask.sum()):
        raise HarmonizationError(
            f"the harmonized blocks hold {width} voxels but mask {mask_file} has {int(mask.sum())}"
        )
    outs = [Path(f) for f in out_files]
    if len(outs) != n:
        raise HarmonizationError(f"{len(outs)} output names for {n} subjects")
    if len({str(o.resolve()) for o in outs}) != len(outs):
        dup = next(o for o in outs if sum(str(x.resolve()) == str(o.resolve()) for x in outs) > 1)
        raise HarmonizationError(f"two subjects would be written to the same file {dup}")
    if in_files is not None and len(in_files) != n:
        raise HarmonizationError(f"{len(in_files)} input maps for {n} subjects")
    written = []
    for j, out in enumerate(outs):
        row = np.concatenate([b.read(j, j + 1, rows=True)[0].astype(np.float32)
                              for b in blocks])
        vol = np.zeros(mask.shape, dtype=np.float32)
        vol[mask] = row
        header = (_load_img(in_files[j], "map").header if in_files is not None
                  else mimg.header).copy()
        img = nib.Nifti1Image(vol, mimg.affine, header=header)
        img.set_data_dtype(np.float32)
        img.header.set_slope_inter(1.0, 0.0)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_like(out)
        try:
            nib.save(img, str(tmp))
            set_default_mode(tmp)
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        written.append(out)
    return written
