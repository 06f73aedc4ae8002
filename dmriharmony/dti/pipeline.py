"""File-level DTI steps (path in, path out): what the Nipype interfaces call.

Each step writes its outputs atomically to a given folder and returns their paths, so the
steps can also be chained from a script without Nipype.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from dmriharmony.dti.denoise import denoise, remove_gibbs
from dmriharmony.dti.fit import fit_tensor
from dmriharmony.dti.gradients import B0_THRESHOLD, make_gtab, select_shells
from dmriharmony.dti.io import (
    atomic_write_bytes,
    concat_dwi,
    load_dwi,
    load_mask,
    save_nifti,
    validate_dwi_files,
)
from dmriharmony.dti.mask import brain_mask
from dmriharmony.errors import BIDSInputError

#: tensor-derived maps written by :func:`fit_tensor_file` (BIDS ``param-`` labels).
TENSOR_PARAMS = ("fa", "md", "ad", "rd", "v1", "tensor")
QC_COLUMNS = (
    "n_voxels", "n_volumes", "shells", "fit_method", "sigma", "sigma_method", "snr",
    "residual_rmse", "outlier_fraction", "fa_mean", "md_mean", "nonpositive_eigen_fraction",
)


def mask_file(dwi_file: str | Path, bval_file: str | Path, bvec_file: str | Path,
              out_file: str | Path) -> Path:
    """Brain mask (median_otsu on the mean b0, :func:`dmriharmony.dti.mask.brain_mask`).

    Only the b=0 volumes are read (usually the first ones: a partial read of a gzipped file).
    """
    bvals, _, _, _ = validate_dwi_files(dwi_file, bval_file, bvec_file, check_values=False)
    idx = np.flatnonzero(bvals <= B0_THRESHOLD)
    img = nib.load(str(dwi_file))
    try:
        b0 = np.stack([np.asarray(img.dataobj[..., int(i)], np.float32) for i in idx], axis=-1)
    except Exception as exc:  # nibabel raises many types for corrupt data
        raise BIDSInputError(
            f"{dwi_file}: unreadable NIfTI data ({type(exc).__name__}: {exc})") from None
    if not np.all(np.isfinite(b0)):
        raise BIDSInputError(f"{dwi_file}: NaN or Inf values in the b=0 volumes")
    mask = brain_mask(b0, np.zeros(len(idx)))
    return save_nifti(mask.astype(np.uint8), img.affine, out_file, header=img.header,
                      dtype=np.uint8)


def preprocess_file(
    dwi_files: str | Path | list[str | Path],
    bval_files: str | Path | list[str | Path],
    bvec_files: str | Path | list[str | Path],
    out_dir: str | Path,
    *,
    denoise_method: str = "none",
    gibbs: bool = False,
    prefix: str = "dwi_preproc",
) -> tuple[Path, Path, Path]:
    """Concatenate runs (shells split across ``acq-``), denoise, remove Gibbs ringing.

    Several runs are concatenated along volumes (:func:`dmriharmony.dti.io.concat_dwi`);
    then optional MP-PCA or Patch2Self denoising (:func:`dmriharmony.dti.denoise.denoise`)
    and Gibbs-ringing removal (:func:`dmriharmony.dti.denoise.remove_gibbs`). Gibbs removal
    follows denoising, the order recommended by Kellner et al. (MRM 2016) and used by MRtrix3
    (``dwidenoise`` then ``mrdegibbs``): noise estimation assumes untouched noise.

    Returns
    -------
    (dwi, bval, bvec)
        Paths of the float32 series ``<prefix>.nii.gz`` and its gradient files.
    """
    def as_list(x):
        return [x] if isinstance(x, str | Path) else list(x)

    dwis, bvals, bvecs = as_list(dwi_files), as_list(bval_files), as_list(bvec_files)
    dwi = load_dwi(dwis[0], bvals[0], bvecs[0]) if len(dwis) == 1 else concat_dwi(
        dwis, bvals, bvecs)
    data = denoise(dwi.data, dwi.bvals, denoise_method)
    if gibbs:
        data = remove_gibbs(data)
    out_dir = Path(out_dir)
    out = save_nifti(data, dwi.affine, out_dir / f"{prefix}.nii.gz", header=dwi.header)
    bval = atomic_write_bytes((" ".join(f"{b:.6g}" for b in dwi.bvals) + "\n").encode(),
                              out_dir / f"{prefix}.bval")
    rows = "\n".join(" ".join(f"{v:.8f}" for v in np.nan_to_num(dwi.bvecs[:, i]))
                     for i in range(3))
    bvec = atomic_write_bytes((rows + "\n").encode(), out_dir / f"{prefix}.bvec")
    return out, bval, bvec


def fit_tensor_file(
    dwi_file: str | Path,
    bval_file: str | Path,
    bvec_file: str | Path,
    mask: str | Path,
    out_dir: str | Path,
    *,
    method: str = "wls",
    bmax: float = 1500.0,
    b_round: float = 50.0,
    prefix: str = "dti",
) -> dict[str, Path | dict]:
    """Select shells (b <= ``bmax``), fit the tensor and write the maps and QC.

    Writes ``<prefix>_<param>.nii.gz`` for each of :data:`TENSOR_PARAMS`, ``<prefix>_qc.tsv``
    (one row, :data:`QC_COLUMNS`) and ``<prefix>_fit.json`` (method, shells, volumes used).

    Returns
    -------
    dict
        ``{param: path}`` plus ``"qc"`` (TSV path), ``"fit_json"`` and ``"info"`` (the dict).
    """
    out_dir = Path(out_dir)
    dwi = load_dwi(dwi_file, bval_file, bvec_file)
    m = load_mask(mask, dwi.data.shape)
    try:
        sel = select_shells(dwi.bvals, dwi.bvecs, bmax=bmax, step=b_round)
    except BIDSInputError as exc:
        raise BIDSInputError(f"{bval_file}: {exc}") from None
    # fancy indexing copies: skip it when every volume is kept
    data = dwi.data if len(sel.index) == dwi.data.shape[3] else dwi.data[..., sel.index]
    gtab = make_gtab(sel.bvals, sel.bvecs)
    try:
        maps = fit_tensor(data, gtab, m, method=method)
    except ValueError as exc:
        raise BIDSInputError(f"{dwi_file}: tensor fit impossible ({exc})") from None
    out: dict[str, Path | dict] = {}
    for param in TENSOR_PARAMS:
        out[param] = save_nifti(getattr(maps, param), dwi.affine,
                                out_dir / f"{prefix}_{param}.nii.gz", header=dwi.header)
    qc = dict(maps.qc, shells=" ".join(str(s) for s in sel.shells))
    header = "\t".join(QC_COLUMNS)
    row = "\t".join(_fmt(qc.get(c)) for c in QC_COLUMNS)
    out["qc"] = atomic_write_bytes(f"{header}\n{row}\n".encode(), out_dir / f"{prefix}_qc.tsv")
    info = {
        "FitMethod": method.lower(),
        "ShellsUsed": sel.shells,
        "BMax": bmax,
        "BValueRounding": b_round,
        "VolumesUsed": [int(i) for i in sel.index],
        "NVolumesInput": int(dwi.data.shape[3]),
        "TensorComponentOrder": ["xx", "xy", "yy", "xz", "yz", "zz"],
        "QC": {k: qc[k] for k in QC_COLUMNS},
    }
    out["fit_json"] = atomic_write_bytes(json.dumps(info, indent=2, default=_json_default).encode(),
                                         out_dir / f"{prefix}_fit.json")
    out["info"] = info
    return out


def _fmt(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if not np.isfinite(value) else f"{value:.6g}"
    return str(value)


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
