"""One run through ENIGMA-style TBSS: register, carry maps, project, ROI row, QC.

The steps of the ENIGMA-DTI protocol (Jahanshad et al., NeuroImage 2013) on top of TBSS (Smith et
al., NeuroImage 2006), without FSL: FA -> template registration (:mod:`.register`), MD/AD/RD
warped with the FA transforms (``tbss_non_FA``), projection onto the template skeleton with the
search positions of the FA (:mod:`.project`), ROI means (:mod:`.roi`) and QC (:mod:`.qc`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from dmriharmony.errors import TemplateError
from dmriharmony.tbss.io import ImageLike, as_fraction, load_image, save_nifti
from dmriharmony.tbss.project import SEARCH_FWHM_MM, project_onto_skeleton
from dmriharmony.tbss.qc import qc_metrics, skeleton_overlay_png, write_qc_tsv
from dmriharmony.tbss.register import (
    Registration,
    RegistrationConfig,
    register_to_template,
    rotation_angle_deg,
)
from dmriharmony.tbss.roi import extract_rois, write_roi_row
from dmriharmony.tbss.templates import Template, load_template_dir

LOGGER = logging.getLogger(__name__)

METRICS = ("FA", "MD", "AD", "RD")


def output_names(prefix: str | os.PathLike, space: str) -> dict[str, str]:
    """BIDS-derivative style names of one run's TBSS outputs (``prefix`` = path + entities)."""
    p = str(prefix)
    names = {}
    for m in METRICS:
        low = m.lower()
        names[f"warped_{low}"] = f"{p}_space-{space}_model-tensor_param-{low}_dwimap.nii.gz"
        names[f"skeleton_{low}"] = (f"{p}_space-{space}_desc-skeleton_model-tensor_"
                                    f"param-{low}_dwimap.nii.gz")
    names.update(
        roi_tsv=f"{p}_space-{space}_desc-skeleton_roi.tsv",
        qc_tsv=f"{p}_space-{space}_desc-tbss_qc.tsv",
        qc_png=f"{p}_space-{space}_desc-skeleton_qc.png",
        affine=f"{p}_from-native_to-{space}_mode-image_desc-affine_xfm.txt",
        warp=f"{p}_from-native_to-{space}_mode-image_desc-syn_xfm.npz",
    )
    return names


def _load_map(image: ImageLike, what: str) -> nib.Nifti1Image:
    img = load_image(image, what=what)
    if img.ndim > 3 and img.shape[3] != 1:
        raise TemplateError(f"{what} must be a 3-D map, got shape {img.shape}")
    return img


def run_tbss(
    fa: ImageLike,
    template: Template | str | os.PathLike,
    out_prefix: str | os.PathLike,
    others: Mapping[str, ImageLike | None] | None = None,
    subject: str = "",
    session: str | None = None,
    run: str | None = None,
    config: RegistrationConfig | None = None,
    fwhm_mm: float | None = SEARCH_FWHM_MM,
    transforms: tuple[str | os.PathLike, str | os.PathLike | None] | None = None,
) -> dict[str, str]:
    """Run TBSS for one DWI run and write every output.

    Parameters
    ----------
    fa : path or image
        Native-space FA (fraction, or FA x 10^4).
    template : Template or folder
        Target template (:mod:`dmriharmony.tbss.templates`).
    out_prefix : path
        Output folder plus BIDS entity prefix, e.g. ``out/sub-01/ses-A/dwi/sub-01_ses-A``.
    others : mapping, optional
        ``{"MD": path, "AD": path, "RD": path}`` native-space maps on the FA grid (None skipped).
    subject, session, run : str
        Identifiers written into the ROI and QC rows (``subject`` defaults to the prefix's).
    config : RegistrationConfig, optional
    fwhm_mm : float or None
        Gaussian distance weighting of the projection search.
    transforms : (affine path, warp path or None), optional
        Reuse saved transforms instead of registering.

    Returns
    -------
    dict
        Output name -> written path (keys of :func:`output_names` that were produced), plus
        ``"fa_template_corr"`` (as text) for quick logging.
    """
    t0 = time.perf_counter()
    tpl = template if isinstance(template, Template) else load_template_dir(template)
    names = output_names(out_prefix, tpl.name)
    Path(names["roi_tsv"]).parent.mkdir(parents=True, exist_ok=True)
    if not subject:
        stem = Path(str(out_prefix)).name
        subject = stem.split("_")[0].removeprefix("sub-")
    fa_img = _load_map(fa, "FA map")
    fa_data = as_fraction(np.asanyarray(fa_img.dataobj).reshape(fa_img.shape[:3]),
                          what=str(fa))
    maps = {}
    for key, image in (others or {}).items():
        if image is None:
            continue
        img = _load_map(image, f"{key} map")
        if tuple(img.shape[:3]) != tuple(fa_img.shape[:3]):
            raise TemplateError(f"{key} map {image} is not on the FA grid {fa_img.shape[:3]}")
        maps[key.upper()] = np.asanyarray(img.dataobj).reshape(img.shape[:3]).astype(np.float64)

    if transforms is not None:
        reg = Registration.load(transforms[0], transforms[1], static_img=tpl.image(tpl.fa),
                                moving_img=fa_img)
    else:
        LOGGER.info("TBSS sub-%s: registering FA to template %s", subject, tpl.name)
        reg = register_to_template(fa_data, fa_img.affine, tpl.fa, tpl.affine, config,
                                   static_mask=tpl.mask)
    out: dict[str, str] = {}
    for p in reg.save(names["affine"], names["warp"] if reg.syn is not None else None):
        out["warp" if str(p).endswith(".npz") else "affine"] = str(p)

    warped = {"FA": np.clip(reg.transform(fa_data), 0, 1).astype(np.float32)}
    for key, arr in maps.items():
        warped[key] = np.clip(reg.transform(arr), 0, None).astype(np.float32)
    for key, arr in warped.items():
        arr = np.where(tpl.mask, arr, 0).astype(np.float32)
        warped[key] = arr
        name = f"warped_{key.lower()}"
        if name in names:
            out[name] = str(save_nifti(arr, tpl.affine, names[name]))

    LOGGER.info("TBSS sub-%s: projecting onto the %s skeleton", subject, tpl.name)
    proj = project_onto_skeleton(warped["FA"], tpl.skeleton, tpl.distance,
                                 tpl.search_directions,
                                 {k: v for k, v in warped.items() if k != "FA"},
                                 voxel_size=tpl.voxel_size, fwhm_mm=fwhm_mm)
    for key in warped:
        name = f"skeleton_{key.lower()}"
        if name in names:
            out[name] = str(save_nifti(proj[key], tpl.affine, names[name]))

    if tpl.labels is not None:
        tables = {key: extract_rois(proj[key], tpl.roi_mask, tpl.labels, tpl.label_table)
                  for key in warped}
    else:  # no ROI atlas: whole-skeleton means only
        tables = {key: _whole_skeleton(proj[key], tpl.roi_mask) for key in warped}
    out["roi_tsv"] = str(write_roi_row(tables, names["roi_tsv"], subject, session, run))

    qc = qc_metrics(warped["FA"], tpl.fa, tpl.mask, tpl.skeleton, proj["FA"])
    qc["rotation_deg"] = rotation_angle_deg(reg.affine)
    qc["linear_pyramid"] = str(reg.metrics.get("linear_pyramid", "n/a"))
    qc["registration_s"] = float(reg.metrics.get("total_s", float("nan")))
    qc["total_s"] = time.perf_counter() - t0
    out["qc_tsv"] = str(write_qc_tsv(qc, names["qc_tsv"], subject=subject,
                                     session=session or "n/a", run=run or "n/a",
                                     template=tpl.name))
    title = f"sub-{subject} on {tpl.name}: r(FA, template) = {qc['fa_template_corr']:.3f}"
    out["qc_png"] = str(skeleton_overlay_png(warped["FA"], tpl.skeleton, names["qc_png"],
                                             title, tpl.voxel_size))
    out["fa_template_corr"] = f"{qc['fa_template_corr']:.6f}"
    LOGGER.info("TBSS sub-%s done in %.1f s (r = %.3f)", subject, qc["total_s"],
                qc["fa_template_corr"])
    return out


def _whole_skeleton(values: np.ndarray, skeleton: np.ndarray) -> pd.DataFrame:
    v = np.asarray(values, dtype=np.float64)[(np.asarray(skeleton) != 0)]
    v = v[(v != 0) & np.isfinite(v)]
    return pd.DataFrame({"Average": [float(v.mean()) if v.size else np.nan],
                         "nVoxels": [int(v.size)]},
                        index=pd.Index(["AverageFA"], name="Tract"))
