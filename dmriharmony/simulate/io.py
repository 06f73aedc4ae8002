"""Deterministic, atomic file writers (same content -> same bytes; nothing half-written).

NIfTI files are gzipped with ``mtime=0`` and no file name in the gzip header (nibabel's own
writer stamps the current time), so a dataset regenerated from the same seed is byte-identical.
Every file is written to a temporary name in its destination folder and moved into place with
:func:`os.replace`.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from io import BytesIO
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from dmriharmony._fs import set_default_mode


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def write_bytes(data: bytes, path: str | Path) -> Path:
    """Write ``data`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)
        set_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text(text: str, path: str | Path) -> Path:
    return write_bytes(text.encode("utf-8"), path)


def write_json(obj: dict, path: str | Path) -> Path:
    return write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", path)


def write_tsv(df: pd.DataFrame, path: str | Path, float_format: str = "%.6g") -> Path:
    """TSV with ``n/a`` for missing values (BIDS), LF line endings."""
    text = df.to_csv(sep="\t", index=False, na_rep="n/a", float_format=float_format,
                     lineterminator="\n")
    return write_text(text, path)


def make_image(data: np.ndarray, affine: np.ndarray, *, slope: float | None = None,
               dtype=None, xyzt_units: str = "mm") -> nib.Nifti1Image:
    """A NIfTI-1 image with qform = sform = ``affine`` (code 1, scanner) and fixed header.

    With ``slope`` the data are stored as ``round(data / slope)`` in ``dtype`` with
    ``scl_slope = slope``.
    """
    arr = np.asarray(data)
    if slope is not None:
        dtype = dtype or np.int16
        info = np.iinfo(dtype)
        arr = np.clip(np.rint(arr / slope), info.min, info.max).astype(dtype)
    elif dtype is not None:
        arr = arr.astype(dtype)
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units(xyzt_units, "sec")
    if slope is not None:
        img.header.set_slope_inter(float(slope), 0.0)
    else:
        img.header.set_slope_inter(1.0, 0.0)
    return img


def write_nifti(img: nib.Nifti1Image, path: str | Path) -> Path:
    """Write ``img`` to ``path`` (``.nii.gz`` gzipped deterministically, or ``.nii``).

    The header's ``scl_slope``/``scl_inter`` are kept as set (nibabel's array writer would
    reset them for integer data that it does not scale itself).
    """
    path = Path(path)
    slope, inter = img.header["scl_slope"].item(), img.header["scl_inter"].item()
    raw = img.to_bytes()
    hdr = nib.Nifti1Header.from_fileobj(BytesIO(raw))
    if np.isfinite(slope) and slope not in (0.0, 1.0):
        hdr["scl_slope"] = slope
        hdr["scl_inter"] = inter if np.isfinite(inter) else 0.0
        raw = hdr.binaryblock + raw[hdr.sizeof_hdr:]
    if path.name.endswith(".gz"):
        raw = gzip.compress(raw, compresslevel=6, mtime=0)
    return write_bytes(raw, path)


def format_bvals(bvals: np.ndarray) -> str:
    return " ".join(f"{b:g}" for b in np.asarray(bvals, dtype=float)) + "\n"


def format_bvecs(bvecs: np.ndarray) -> str:
    """Three rows (x, y, z) of N values, FSL layout."""
    rows = []
    for c in range(3):
        vals = np.round(np.asarray(bvecs)[:, c], 6) + 0.0  # + 0.0 turns -0 into 0
        rows.append(" ".join(f"{v:.6f}" for v in vals))
    return "\n".join(rows) + "\n"
