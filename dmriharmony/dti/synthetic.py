"""Small synthetic DWI datasets with a known tensor field (tests, benchmarks, smoke runs).

Not a scanner simulator (see :mod:`dmriharmony.simulate` for that): an ellipsoidal "brain" of
isotropic grey matter with a band of anisotropic white matter, signals from the tensor model
S = S0 exp(-b g^T D g) with Rician noise of SD S0/snr, written as a BIDS dataset.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from dipy.data import get_sphere

WM_EVALS = (1.7e-3, 0.3e-3, 0.3e-3)   # FA ~ 0.80
GM_EVALS = (0.9e-3, 0.75e-3, 0.7e-3)  # FA ~ 0.12


def tensor_fa(evals: tuple[float, float, float]) -> float:
    """Fractional anisotropy of eigenvalues (Basser & Pierpaoli 1996)."""
    ev = np.asarray(evals, float)
    return float(np.sqrt(1.5 * np.sum((ev - ev.mean()) ** 2) / np.sum(ev**2)))


def gradient_scheme(n_dirs: int = 30, bvalues: tuple[float, ...] = (1000.0,),
                    n_b0: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """b-values and unit b-vectors: ``n_b0`` b=0 then ``n_dirs`` directions per shell."""
    sphere = get_sphere(name="repulsion100")
    verts = sphere.vertices[np.argsort(sphere.vertices[:, 2])][-n_dirs:]
    bvals = [0.0] * n_b0
    bvecs = [np.zeros(3)] * n_b0
    for b in bvalues:
        bvals += [float(b)] * n_dirs
        bvecs += list(verts)
    return np.asarray(bvals), np.asarray(bvecs)


def tensor_phantom(shape: tuple[int, int, int] = (14, 14, 6)) -> dict[str, np.ndarray]:
    """Label maps: 0 background, 1 grey matter, 2 white matter (fibres along x)."""
    grid = np.indices(shape, dtype=float)
    centre = (np.asarray(shape, float) - 1) / 2
    radius = np.maximum(np.asarray(shape, float) / 2 - 1.5, 1.0)
    r = np.sqrt(sum(((grid[i] - centre[i]) / radius[i]) ** 2 for i in range(3)))
    labels = np.zeros(shape, np.uint8)
    labels[r <= 1.0] = 1
    band = np.abs(grid[1] - centre[1]) <= max(1.0, shape[1] / 7)
    labels[(r <= 0.8) & band] = 2
    return {"labels": labels}


def synth_dwi(labels: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray, *, snr: float = 50.0,
              s0: float = 1000.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Signals of the label map (1: GM tensor, 2: WM tensor along x) with Rician noise.

    Returns the 4-D data (float32) and the true FA map.
    """
    rng = np.random.default_rng(seed)
    fa = np.zeros(labels.shape, np.float32)
    data = np.zeros(labels.shape + (len(bvals),), np.float64)
    for lab, ev in ((1, GM_EVALS), (2, WM_EVALS)):
        d = np.diag(ev)
        adc = np.einsum("ni,ij,nj->n", bvecs, d, bvecs)
        data[labels == lab] = s0 * np.exp(-bvals * adc)
        fa[labels == lab] = tensor_fa(ev)
    sigma = s0 / snr
    noisy = np.sqrt((data + rng.normal(0, sigma, data.shape)) ** 2
                    + rng.normal(0, sigma, data.shape) ** 2)
    return noisy.astype(np.float32), fa


def _save_run(base: str, data: np.ndarray, affine: np.ndarray, bvals: np.ndarray,
              bvecs: np.ndarray, meta: dict | None) -> None:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, f"{base}.nii.gz")
    if bvals is not None:
        np.savetxt(f"{base}.bval", bvals[None], fmt="%g")
        np.savetxt(f"{base}.bvec", bvecs.T, fmt="%.6f")
    if meta is not None:
        Path(f"{base}.json").write_text(json.dumps(meta, indent=2))


def write_bids_dataset(
    root: str | Path,
    subjects: tuple[str, ...] = ("01",),
    *,
    shape: tuple[int, int, int] = (14, 14, 6),
    snr: float = 50.0,
    n_dirs: int = 30,
    bvalues: tuple[float, ...] = (1000.0,),
    voxel_size: float = 2.0,
    seed: int = 0,
    sidecar: dict | None = None,
    sessions: tuple[str, ...] | None = None,
    sites: dict[str, str] | None = None,
    inherit: bool = False,
    split_shells: bool = False,
) -> dict[str, np.ndarray]:
    """Write a small BIDS DWI dataset; return ``{subject: true FA map}`` (labels under "labels").

    Every run gets its own noise (seed ``seed`` + run index).

    Parameters
    ----------
    sessions
        Session labels; each subject is scanned in every session.
    sites
        ``{subject: site}`` written as a ``site`` column of ``participants.tsv``.
    inherit
        Write one ``dwi.bval``/``dwi.bvec``/``dwi.json`` at the dataset root (BIDS
        inheritance) instead of one per run.
    split_shells
        Write the b=0 volumes plus the first shell as ``acq-lowb`` and the other shells as
        ``acq-highb`` (one acquisition exported as two series), on the same grid.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "synthetic tensor phantom", "BIDSVersion": "1.10.0", "DatasetType": "raw",
         "License": "CC0", "Authors": ["dmriharmony"]}, indent=2))
    lines = ["participant_id" + ("\tsite" if sites else "")]
    for sub in subjects:
        lines.append(f"sub-{sub}" + (f"\t{sites.get(sub, 'n/a')}" if sites else ""))
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")
    (root / "README").write_text(
        "Synthetic tensor-field DWI written by dmriharmony.dti.synthetic: an ellipsoidal brain\n"
        "of isotropic grey matter with a band of white matter, Rician noise. For tests only.\n")
    labels = tensor_phantom(shape)["labels"]
    bvals, bvecs = gradient_scheme(n_dirs, bvalues)
    affine = np.diag([voxel_size] * 3 + [1.0])
    meta = {"Manufacturer": "Siemens", "ManufacturersModelName": "Prisma ",
            "MagneticFieldStrength": 3, "EchoTime": 0.08, "RepetitionTime": 3.0,
            "PhaseEncodingDirection": "j-", "TotalReadoutTime": 0.05}
    meta.update(sidecar or {})
    meta = {k: v for k, v in meta.items() if v is not None}
    if split_shells and len(bvalues) < 2:
        raise ValueError("split_shells needs at least two b-values")
    parts = [("", np.arange(len(bvals)))]
    if split_shells:
        low = np.flatnonzero(bvals <= bvalues[0])
        parts = [("lowb", low), ("highb", np.flatnonzero(bvals > bvalues[0]))]
    if inherit:
        for acq, idx in parts:
            stem = root / (f"acq-{acq}_dwi" if acq else "dwi")
            np.savetxt(f"{stem}.bval", bvals[idx][None], fmt="%g")
            np.savetxt(f"{stem}.bvec", bvecs[idx].T, fmt="%.6f")
        (root / "dwi.json").write_text(json.dumps(meta, indent=2))
    truth: dict[str, np.ndarray] = {"labels": labels}
    k = 0
    for sub in subjects:
        for ses in sessions or (None,):
            data, fa = synth_dwi(labels, bvals, bvecs, snr=snr, seed=seed + k)
            k += 1
            d = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "dwi"
            d.mkdir(parents=True, exist_ok=True)
            stem = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
            for acq, idx in parts:
                base = d / (stem + (f"_acq-{acq}" if acq else "") + "_dwi")
                _save_run(str(base), data[..., idx], affine,
                          None if inherit else bvals[idx], bvecs[idx],
                          None if inherit else meta)
            truth[sub] = fa
    return truth
