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
) -> dict[str, np.ndarray]:
    """Write a small BIDS DWI dataset; return ``{subject: true FA map}`` (labels under "labels").

    Every subject gets its own noise (seed ``seed + index``).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "synthetic tensor phantom", "BIDSVersion": "1.10.0", "DatasetType": "raw"}))
    (root / "participants.tsv").write_text(
        "participant_id\n" + "".join(f"sub-{s}\n" for s in subjects))
    (root / "README").write_text("Synthetic tensor-field DWI written by dmriharmony.\n")
    labels = tensor_phantom(shape)["labels"]
    bvals, bvecs = gradient_scheme(n_dirs, bvalues)
    affine = np.diag([voxel_size] * 3 + [1.0])
    meta = {"Manufacturer": "Siemens", "ManufacturersModelName": "Prisma ",
            "MagneticFieldStrength": 3, "EchoTime": 0.08, "RepetitionTime": 3.0}
    meta.update(sidecar or {})
    truth: dict[str, np.ndarray] = {"labels": labels}
    for i, sub in enumerate(subjects):
        data, fa = synth_dwi(labels, bvals, bvecs, snr=snr, seed=seed + i)
        d = root / f"sub-{sub}" / "dwi"
        d.mkdir(parents=True, exist_ok=True)
        base = d / f"sub-{sub}_dwi"
        img = nib.Nifti1Image(data, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
        nib.save(img, f"{base}.nii.gz")
        np.savetxt(f"{base}.bval", bvals[None], fmt="%g")
        np.savetxt(f"{base}.bvec", bvecs.T, fmt="%.6f")
        Path(f"{base}.json").write_text(json.dumps(meta, indent=2))
        truth[sub] = fa
    return truth
