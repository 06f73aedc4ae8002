"""Accuracy of fitted tensor maps against simulator ground truth (native acquisition grid).

The simulator (:mod:`dmriharmony.simulate`) can write, next to each scan, the b -> 0 FA/MD/AD/
RD of every acquisition voxel (``derivatives/groundtruth/sub-X/ses-Y/dwi/
sub-X_ses-Y_model-tensor_param-<m>_dwimap.nii.gz``): the exact target of a noise-free DTI fit.
White matter is taken as ground-truth FA >= 0.2, the usual FA threshold for white matter
(e.g. the TBSS skeleton threshold, Smith et al., NeuroImage 2006).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

#: ground-truth FA at or above which a voxel counts as white matter.
WM_FA_THRESHOLD = 0.2


def map_error(fitted: np.ndarray, truth: np.ndarray, region: np.ndarray) -> dict:
    """Median absolute error, median signed error (bias) and voxel count over ``region``."""
    region = np.asarray(region, bool)
    if fitted.shape != truth.shape or region.shape != truth.shape:
        raise ValueError(f"shapes differ: fitted {fitted.shape}, truth {truth.shape}, "
                         f"region {region.shape}")
    diff = np.asarray(fitted, float)[region] - np.asarray(truth, float)[region]
    if diff.size == 0:
        return {"n_voxels": 0, "median_abs_error": float("nan"), "bias": float("nan")}
    return {"n_voxels": int(diff.size), "median_abs_error": float(np.median(np.abs(diff))),
            "bias": float(np.median(diff))}


def groundtruth_errors(bids_dir: str | Path, deriv_dir: str | Path, *, metric: str = "fa",
                       wm_threshold: float = WM_FA_THRESHOLD) -> pd.DataFrame:
    """Per run: error of our ``metric`` map against the native ground truth over WM.

    Parameters
    ----------
    bids_dir
        The simulated dataset (with ``derivatives/groundtruth`` written with native truth).
    deriv_dir
        Our derivatives (``<out>/dmriharmony``) with ``site_table.tsv``.

    Returns
    -------
    pandas.DataFrame
        One row per fitted run: subject, session, site, vendor, snr (our QC estimate),
        n_voxels (WM voxels), wm_in_mask (fraction of truth-WM voxels inside our brain mask),
        median_abs_error, bias. Runs without native ground truth are skipped.
    """
    bids_dir, deriv_dir = Path(bids_dir), Path(deriv_dir)
    gt_root = bids_dir / "derivatives" / "groundtruth"
    table = pd.read_csv(deriv_dir / "site_table.tsv", sep="\t", dtype=str,
                        keep_default_na=False)
    rows = []
    for fitted in sorted(deriv_dir.glob(f"sub-*/**/*_model-tensor_param-{metric}_dwimap.nii.gz")):
        if "_space-" in fitted.name:  # template-space maps (TBSS): no native truth to match
            continue
        prefix = fitted.name.split("_model-tensor")[0]
        rel = fitted.parent.relative_to(deriv_dir)
        truth_file = gt_root / rel / fitted.name
        fa_truth_file = gt_root / rel / f"{prefix}_model-tensor_param-fa_dwimap.nii.gz"
        if not truth_file.is_file() or not fa_truth_file.is_file():
            continue
        ours = np.asarray(nib.load(str(fitted)).dataobj, float)
        truth = nib.load(str(truth_file)).get_fdata()
        wm = nib.load(str(fa_truth_file)).get_fdata() >= wm_threshold
        mask_file = fitted.with_name(f"{prefix}_desc-brain_mask.nii.gz")
        mask = np.asarray(nib.load(str(mask_file)).dataobj) > 0
        ents = dict(p.split("-", 1) for p in prefix.split("_"))
        sub, ses = ents.get("sub"), ents.get("ses", "n/a")
        meta = table[(table["subject"] == sub) & (table["session"] == ses)]
        qc = pd.read_csv(fitted.with_name(f"{prefix}_model-tensor_qc.tsv"), sep="\t")
        err = map_error(ours, truth, wm & mask)
        rows.append({"subject": sub, "session": ses,
                     "site": meta["site"].iloc[0] if len(meta) else "n/a",
                     "vendor": meta["vendor"].iloc[0] if len(meta) else "n/a",
                     "snr": float(qc["snr"].iloc[0]),
                     "wm_in_mask": float((wm & mask).sum() / max(wm.sum(), 1)), **err})
    return pd.DataFrame(rows, columns=["subject", "session", "site", "vendor", "snr",
                                       "wm_in_mask", "n_voxels", "median_abs_error", "bias"])


def summarize_errors(errors: pd.DataFrame, by: str | list[str] = "site") -> pd.DataFrame:
    """Median over runs of each run's error, per ``by`` group (site, vendor, ...)."""
    return (errors.groupby(by)
            .agg(runs=("subject", "size"), snr=("snr", "median"),
                 median_abs_error=("median_abs_error", "median"), bias=("bias", "median"),
                 worst_run=("median_abs_error", "max"))
            .reset_index())
