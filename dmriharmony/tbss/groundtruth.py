"""Accuracy of the TBSS step on simulated data with known anatomy (:mod:`dmriharmony.simulate`).

The simulator writes, per scan, the true scanner -> phantom-template transform
(``T(x) = A x + d(A x)``: a 4x4 affine and a displacement field) and the true FA/MD/AD/RD maps on
the template grid (``derivatives/groundtruth``). With them:

* **Dice** of the bundle labels: the template's label image pulled into the scan grid through
  our estimated transform vs through the true one (per bundle and pooled, Dice 1945);
* **ROI accuracy**: ENIGMA ROI means of the projected subject FA vs the same ROI means of the
  subject's *true* FA map projected onto the same skeleton (the quantity TBSS estimates), and
  vs the subject's *fitted* FA resampled with the true transform (registration error alone);
* **projection robustness**: ROI means after shifting the warped FA by a few voxels.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from dmriharmony.errors import TemplateError
from dmriharmony.tbss.project import project_onto_skeleton
from dmriharmony.tbss.roi import extract_rois
from dmriharmony.tbss.templates import Template


def dice_scores(estimate: np.ndarray, truth: np.ndarray,
                labels: list[int] | np.ndarray) -> dict[int | str, float]:
    """Per-label Dice ``2|A & B| / (|A| + |B|)`` and the pooled ``"all"`` (label must match)."""
    est = np.rint(np.asarray(estimate)).astype(np.int64)
    tru = np.rint(np.asarray(truth)).astype(np.int64)
    out: dict[int | str, float] = {}
    inter_all = size_all = 0
    for lab in labels:
        a = est == lab
        b = tru == lab
        inter = int(np.sum(a & b))
        size = int(a.sum() + b.sum())
        out[int(lab)] = 2.0 * inter / size if size else float("nan")
        inter_all += inter
        size_all += size
    out["all"] = 2.0 * inter_all / size_all if size_all else float("nan")
    return out


def read_true_transform(affine_path: str | os.PathLike, warp_path: str | os.PathLike | None):
    """The simulator's scanner -> template transform ``(A, warp)``."""
    from dmriharmony.simulate import load_scan_transform

    return load_scan_transform(affine_path, warp_path)


def true_labels_on_scan(template: Template, scan_img: nib.spatialimages.SpatialImage,
                        affine: np.ndarray, warp) -> np.ndarray:
    """Template labels sampled at the scan's voxel centres through the true transform."""
    from dmriharmony.simulate import resample_to_scan

    if template.labels is None:
        raise TemplateError(f"template {template.name} has no label image")
    return resample_to_scan(template.image(template.labels.astype(np.float32)), scan_img,
                            affine, warp, order=0)


def true_scan_to_template(native: np.ndarray, scan_affine: np.ndarray, template: Template,
                          affine: np.ndarray, warp, n_iter: int = 10) -> np.ndarray:
    """Resample a scan-space map onto the template grid through the *true* transform.

    The simulator's map goes scanner -> template, ``y = z + d(z)`` with ``z = A x``; for every
    template voxel ``y`` the scanner point is found by the fixed-point iteration
    ``z <- y - d(z)`` (``d`` is smooth and small, so it converges in a few steps), then
    ``x = A^-1 z``; the map is sampled there (trilinear).
    """
    shape = template.shape
    ijk = np.indices(shape).reshape(3, -1).T.astype(np.float64)
    y = ijk @ template.affine[:3, :3].T + template.affine[:3, 3]
    z = y.copy()
    if warp is not None:
        for _ in range(n_iter):
            z = y - warp(z)
    ainv = np.linalg.inv(affine)
    x = z @ ainv[:3, :3].T + ainv[:3, 3]
    vox = (np.linalg.inv(scan_affine) @ np.c_[x, np.ones(len(x))].T)[:3]
    out = ndi.map_coordinates(np.asarray(native, dtype=np.float64), vox, order=1,
                              mode="constant", cval=0.0)
    return out.reshape(shape)


def skeleton_rois(values: np.ndarray, template: Template,
                  others: dict[str, np.ndarray] | None = None) -> dict[str, pd.DataFrame]:
    """Project ``values`` (template grid) onto the template skeleton and take ENIGMA ROI means."""
    proj = project_onto_skeleton(values, template.skeleton, template.distance,
                                 template.search_directions, others,
                                 voxel_size=template.voxel_size)
    return {k: extract_rois(v, template.roi_mask, template.labels, template.label_table)
            for k, v in proj.items() if k != "source_index"}


def shift_robustness(warped_fa: np.ndarray, template: Template, shift_voxels: int = 2
                     ) -> pd.DataFrame:
    """Largest ROI-mean change when the warped FA is shifted by ``shift_voxels`` along each axis.

    Returns a table with one row per shift (``axis``, ``shift``) and columns ``max_change``
    (over ROIs), ``median_change``, ``averagefa_change`` (whole skeleton), ``worst_roi`` and
    ``unprojected_max_change`` / ``unprojected_median_change`` (same shift, sampling the
    skeleton without the search, for contrast).
    """
    base = skeleton_rois(warped_fa, template)["FA"]["Average"]
    raw0 = extract_rois(np.where(template.skeleton, warped_fa, 0), template.roi_mask,
                        template.labels, template.label_table)["Average"]
    rows = []
    for axis in range(3):
        for sign in (1, -1):
            offset = [0, 0, 0]
            offset[axis] = sign * shift_voxels
            moved = ndi.shift(warped_fa, offset, order=0, mode="constant", cval=0.0)
            got = skeleton_rois(moved, template)["FA"]["Average"]
            raw = extract_rois(np.where(template.skeleton, moved, 0), template.roi_mask,
                               template.labels, template.label_table)["Average"]
            diff = (got - base).abs().dropna()
            rdiff = (raw - raw0).abs().dropna()
            rows.append({"axis": "xyz"[axis], "shift": sign * shift_voxels,
                         "max_change": float(diff.max()), "median_change": float(diff.median()),
                         "averagefa_change": float(diff.get("AverageFA", np.nan)),
                         "worst_roi": str(diff.idxmax()),
                         "unprojected_max_change": float(rdiff.max()),
                         "unprojected_median_change": float(rdiff.median())})
    return pd.DataFrame(rows)


def groundtruth_paths(bids_root: str | os.PathLike, subject: str, session: str) -> dict[str, Path]:
    """Files of the simulator's ground truth for one scan (subject/session without prefixes)."""
    gt = Path(bids_root) / "derivatives" / "groundtruth" / f"sub-{subject}"
    ses = gt / f"ses-{session}"
    prefix = f"sub-{subject}_ses-{session}"
    paths = {
        "affine": ses / "xfm" / f"{prefix}_from-scanner_to-phantom_desc-affine_xfm.txt",
        "warp": gt / "xfm" / f"sub-{subject}_from-anat_to-phantom_desc-warp_xfm.nii.gz",
    }
    for m in ("fa", "md", "ad", "rd"):
        paths[m] = ses / "dwi" / f"{prefix}_space-phantom_model-tensor_param-{m}_dwimap.nii.gz"
    for key, p in paths.items():
        if not p.is_file():
            raise TemplateError(f"ground-truth {key} file missing: {p}")
    return paths


def evaluate_simulated_scan(
    bids_root: str | os.PathLike,
    subject: str,
    session: str,
    work_dir: str | os.PathLike,
    template: Template,
    config=None,
) -> dict:
    """Fit DTI on one simulated scan, run TBSS on the phantom template, score it vs the truth.

    Returns
    -------
    dict
        ``dice`` (per label + ``all``), ``rois`` (DataFrame: ours, truth = true FA map
        projected, oracle = fitted FA with the true transform, and their differences),
        ``shift`` (:func:`shift_robustness`), ``qc`` (the run's QC row), ``outputs``.
    """
    from dmriharmony.dti.pipeline import fit_tensor_file, mask_file
    from dmriharmony.tbss.pipeline import run_tbss
    from dmriharmony.tbss.register import Registration

    root = Path(bids_root)
    prefix = f"sub-{subject}_ses-{session}"
    dwi_dir = root / f"sub-{subject}" / f"ses-{session}" / "dwi"
    dwi = dwi_dir / f"{prefix}_dwi.nii.gz"
    bval, bvec = dwi_dir / f"{prefix}_dwi.bval", dwi_dir / f"{prefix}_dwi.bvec"
    work = Path(work_dir) / prefix
    work.mkdir(parents=True, exist_ok=True)
    mask = mask_file(dwi, bval, bvec, work / f"{prefix}_mask.nii.gz")
    maps = fit_tensor_file(dwi, bval, bvec, mask, work, prefix=prefix)
    out = run_tbss(maps["fa"], template, work / prefix,
                   {"MD": maps["md"], "AD": maps["ad"], "RD": maps["rd"]},
                   subject=subject, session=session, config=config)
    gt = groundtruth_paths(root, subject, session)
    affine, warp = read_true_transform(gt["affine"], gt["warp"])
    scan_img = nib.load(str(maps["fa"]))
    reg = Registration.load(out["affine"], out.get("warp"), static_img=template.image(template.fa),
                            moving_img=scan_img)
    est_labels = reg.transform_inverse(template.labels.astype(np.float64), interpolation="nearest")
    true_labels = true_labels_on_scan(template, scan_img, affine, warp)
    dice = dice_scores(est_labels, true_labels, list(template.label_table["index"]))

    fa_native = np.asanyarray(scan_img.dataobj).astype(np.float64)
    oracle_fa = np.where(template.mask, np.clip(
        true_scan_to_template(fa_native, scan_img.affine, template, affine, warp), 0, 1), 0)
    true_fa = np.asanyarray(nib.load(str(gt["fa"])).dataobj).astype(np.float64)
    ours = pd.read_csv(out["roi_tsv"], sep="\t").set_index("metric").loc["FA"]
    truth = skeleton_rois(true_fa, template)["FA"]["Average"]
    oracle = skeleton_rois(oracle_fa, template)["FA"]["Average"]
    rois = pd.DataFrame({"ours": ours[truth.index].astype(float), "truth": truth,
                         "oracle": oracle})
    rois["error_vs_truth"] = rois["ours"] - rois["truth"]
    rois["error_vs_oracle"] = rois["ours"] - rois["oracle"]
    rois["oracle_vs_truth"] = rois["oracle"] - rois["truth"]
    warped = np.asanyarray(nib.load(out["warped_fa"]).dataobj).astype(np.float64)
    qc = pd.read_csv(out["qc_tsv"], sep="\t").iloc[0].to_dict()
    return {"dice": dice, "rois": rois, "shift": shift_robustness(warped, template), "qc": qc,
            "outputs": out}
