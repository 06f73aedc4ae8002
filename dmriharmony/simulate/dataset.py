"""Build a multi-vendor BIDS dataset from the phantom, with its ground truth.

Layout (every subject has sessions named after the site that scanned it; a traveling subject
has one session per site, the way traveling-subject studies are shared, plus, with
``rescans=N``, N same-site rescans per site ``ses-<site>rescan<k>``, k = 1..N, whose
``sessions.tsv`` row names the site)::

    OUT/dataset_description.json  README  participants.tsv/.json  sessions.json
    OUT/sub-<site>NN/sub-<site>NN_sessions.tsv
    OUT/sub-<site>NN/ses-<site>/dwi/sub-<site>NN_ses-<site>_dwi.{nii.gz,bval,bvec,json}
    OUT/sub-travNN/ses-<site>/dwi/...                      (one session per site)
    OUT/sub-travNN/ses-<site>rescan<k>/dwi/...             (rescans=N: k = 1..N per site)
    OUT/derivatives/groundtruth/
        dataset_description.json  effects.tsv/.json  roi_groundtruth.tsv  subjects.tsv
        tpl-phantom/  (the template the space-phantom maps live on)
        sub-X/xfm/sub-X_from-anat_to-phantom_desc-warp_xfm.nii.gz   (per subject: d)
        sub-X/xfm/sub-X_from-anat_to-phantom_desc-affine_xfm.txt    (subject anatomy affine)
        sub-X/ses-Y/xfm/sub-X_ses-Y_from-scanner_to-anat_xfm.txt     (head pose of the session)
        sub-X/ses-Y/xfm/sub-X_ses-Y_from-scanner_to-phantom_desc-affine_xfm.txt/.json
                                                   (A = anatomy affine @ head pose)
        sub-X/ses-Y/dwi/sub-X_ses-Y_space-phantom_model-tensor_param-<fa|md|ad|rd>_dwimap.nii.gz
        sub-X/ses-Y/dwi/sub-X_ses-Y_model-tensor_param-<m>_dwimap.nii.gz  (native_groundtruth)

The transform of a scan maps scanner mm to template mm: ``y = A x``, ``T(x) = y + d(y)``
(:func:`dmriharmony.simulate.transforms.scanner_to_template`).

Random streams are keyed by (seed, subject, purpose), so a subject is the same whichever other
subjects or sites are simulated, and the same seed gives byte-identical files. A rescan is the
same subject (anatomy, warp, microstructure) with its own head pose and noise draw, keyed by
(seed, subject, site, "rescan", k); the first session's keys do not depend on ``rescans``, so
``rescans=0`` writes the same files as before rescans existed and adding rescans leaves the
other sessions unchanged.
"""

from __future__ import annotations

import logging
import math
import shutil
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from dmriharmony.errors import SimulationError
from dmriharmony.simulate import io
from dmriharmony.simulate.acquire import render_scan
from dmriharmony.simulate.anatomy import BUNDLE_NAMES, LABELS, build_phantom, template_affine
from dmriharmony.simulate.groundtruth import (
    METRICS,
    roi_means,
    site_weights,
    template_metrics,
    true_effects,
)
from dmriharmony.simulate.scanners import DEFAULT_SITES, Site, get_site, sidecar
from dmriharmony.simulate.subjects import EffectModel, Subject, draw_subject, subject_microstructure
from dmriharmony.simulate.template import template_arrays, write_phantom_template
from dmriharmony.simulate.transforms import (
    Warp,
    random_anatomy_affine,
    random_head_pose,
    random_warp,
)

log = logging.getLogger(__name__)

BIDS_VERSION = "1.9.0"
VERSION = "0.1.0"
TRAVELING_PREFIX = "trav"
#: Storage of the ground-truth maps: int16 with these scl_slope values (FA 1e-4, diffusivities
#: 1e-7 mm^2/s), which keeps the files small; the quantisation error is half a step.
GT_SLOPES = {"fa": 1e-4, "md": 1e-7, "ad": 1e-7, "rd": 1e-7}


def rng_for(seed: int, *keys: object) -> np.random.Generator:
    """A generator keyed by the dataset seed and string keys (stable across runs/platforms)."""
    entropy = [int(seed) & 0xFFFFFFFF] + [zlib.crc32(str(k).encode()) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(entropy))


RESCAN_INFIX = "rescan"


@dataclass
class _Planned:
    subject: Subject
    sites: list[Site]
    anatomy: np.ndarray
    warp: Warp
    #: extra same-site sessions per site (traveling subjects only)
    rescans: int = 0

    def sessions(self) -> list[tuple[Site, int]]:
        """(site, k) of every session in order: k = 0 the first scan, k >= 1 rescan k."""
        return [(site, k) for site in self.sites for k in range(self.rescans + 1)]


def _session_label(site: Site, k: int) -> str:
    """``ses-<site>`` for the first scan, ``ses-<site>rescan<k>`` for rescan ``k``."""
    return f"ses-{site.name}" if k == 0 else f"ses-{site.name}{RESCAN_INFIX}{k}"


def _resolve_sites(sites, voxel_size, snr, snr_scale) -> list[Site]:
    specs = list(DEFAULT_SITES) if sites is None else list(sites)
    if not specs:
        raise SimulationError("sites: at least one site is needed")
    out = []
    for s in specs:
        site = get_site(s)
        if voxel_size is not None:
            vs = (tuple(float(v) for v in voxel_size) if isinstance(voxel_size, Sequence)
                  else (float(voxel_size),) * 3)
            site = replace(site, voxel_size=vs)
        if snr is None or (isinstance(snr, (int, float)) and math.isinf(snr)):
            site = replace(site, snr=None)
        elif snr != "site":
            site = replace(site, snr=float(snr))
        if site.snr is not None and snr_scale != 1.0:
            site = replace(site, snr=site.snr * float(snr_scale))
        out.append(site)
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise SimulationError(f"sites: duplicate site names {names}")
    if any(n.startswith(TRAVELING_PREFIX) for n in names):
        raise SimulationError(f"sites: names may not start with {TRAVELING_PREFIX!r}")
    return out


def _plan(seed: int, sites: list[Site], subjects_per_site, traveling: int,
          effects: EffectModel, rescans: int = 0) -> list[_Planned]:
    plan = []
    for site in sites:
        n = subjects_per_site.get(site.name, 0) if isinstance(subjects_per_site, dict) \
            else int(subjects_per_site)
        if n < 0:
            raise SimulationError(f"site {site.name!r}: subjects_per_site must be >= 0")
        rng = rng_for(seed, "site", site.name, "dx")
        dx = rng.permutation(np.arange(n) % 2)
        for k in range(n):
            label = f"{site.name}{k + 1:02d}"
            r = rng_for(seed, "subject", label)
            age = float(np.round(r.uniform(*site.age_range), 1))
            sex = "M" if r.random() < 0.5 else "F"
            subj = draw_subject(label, site.name, r, age=age, sex=sex, dx=int(dx[k]),
                                effects=effects)
            g = rng_for(seed, "anatomy", label)
            plan.append(_Planned(subj, [site], random_anatomy_affine(g), random_warp(g)))
    if traveling < 0:
        raise SimulationError("traveling_subjects must be >= 0")
    for k in range(traveling):
        label = f"{TRAVELING_PREFIX}{k + 1:02d}"
        r = rng_for(seed, "subject", label)
        age = float(np.round(r.uniform(25.0, 45.0), 1))
        sex = "M" if r.random() < 0.5 else "F"
        subj = draw_subject(label, None, r, age=age, sex=sex, dx=0, effects=effects)
        g = rng_for(seed, "anatomy", label)
        plan.append(_Planned(subj, list(sites), random_anatomy_affine(g), random_warp(g),
                             rescans=rescans))
    if not plan:
        raise SimulationError("nothing to simulate: no subjects and no traveling subjects")
    return plan


def simulate_dataset(out_dir: str | Path, *, seed: int = 0, subjects_per_site: int | dict = 3,
                     traveling_subjects: int = 1, sites: Sequence | None = None,
                     voxel_size: float | Sequence[float] | None = None,
                     snr: float | str | None = "site", snr_scale: float = 1.0,
                     effects: EffectModel | None = None, native_groundtruth: bool = False,
                     rescans: int = 0, overwrite: bool = False, progress: bool = True) -> Path:
    """Simulate a multi-vendor DWI dataset in BIDS with its ground truth.

    Parameters
    ----------
    out_dir
        Dataset root to create (must be empty or absent unless ``overwrite``).
    seed
        Master seed: same seed -> byte-identical files.
    subjects_per_site
        Regular subjects per site (int, or dict site name -> int).
    traveling_subjects
        Subjects scanned at every site (one BIDS subject, one session per site).
    sites
        Preset names (see :data:`dmriharmony.simulate.scanners.PRESETS`), :class:`Site`
        objects or dicts of Site fields (``preset`` key to start from a preset); default
        ``("ge", "siemens", "philips")``.
    voxel_size
        Override every site's voxel size (mm; scalar = isotropic).
    snr
        ``"site"``: each site's SNR; a number: that b0 WM SNR everywhere; ``None`` or ``inf``:
        noise-free (stored as float32).
    snr_scale
        Multiply every site's SNR.
    effects
        True biological effects (:class:`EffectModel`; default values when None).
    native_groundtruth
        Also write each scan's b -> 0 FA/MD/AD/RD on its own acquisition grid.
    rescans
        Same-site rescans of every traveling subject at every site (default 0): extra BIDS
        sessions ``ses-<site>rescan<k>``, k = 1..``rescans``, each with its own head pose and
        noise draw (same anatomy and biology), ``site=<site>`` in ``sub-<label>_sessions.tsv``
        and ground truth like any session. They give the noise floor of traveling-subject
        evaluation (:func:`dmriharmony.evaluation.traveling_maps.scan_rescan_rmse`). Single-site
        subjects are scanned once.
    overwrite
        Remove an existing ``out_dir`` first.
    progress
        Show a progress bar.

    Returns
    -------
    pathlib.Path
        The dataset root.
    """
    out = Path(out_dir)
    rescans = _check_rescans(rescans)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SimulationError(f"{out}: output folder exists and is not empty "
                                  "(use overwrite=True / --overwrite)")
        shutil.rmtree(out)
    effects = effects or EffectModel()
    site_list = _resolve_sites(sites, voxel_size, snr, snr_scale)
    _check_session_labels(site_list, rescans)
    plan = _plan(int(seed), site_list, subjects_per_site, int(traveling_subjects), effects,
                 rescans)
    if rescans and not any(p.rescans for p in plan):
        log.warning("rescans=%d has no effect: there are no traveling subjects", rescans)
    phantom = build_phantom()
    tpl = template_arrays()
    labels = tpl["labels"]
    gt_root = out / "derivatives" / "groundtruth"
    aff_t = template_affine()
    roi_rows, subj_rows, part_rows = [], [], []
    n_scans = sum(len(p.sessions()) for p in plan)
    bar = tqdm(total=n_scans, desc="simulate", unit="scan", disable=not progress)
    for item in plan:
        subj = item.subject
        sub = f"sub-{subj.label}"
        ms = subject_microstructure(phantom, subj, effects)
        io.write_nifti(item.warp.to_image(),
                       gt_root / sub / "xfm" / f"{sub}_from-anat_to-phantom_desc-warp_xfm.nii.gz")
        io.write_text(_matrix_text(item.anatomy),
                      gt_root / sub / "xfm" / f"{sub}_from-anat_to-phantom_desc-affine_xfm.txt")
        sessions = []
        for site, k in item.sessions():
            ses = _session_label(site, k)
            stem = f"{sub}_{ses}"
            # k = 0 keeps the keys of the datasets simulated before rescans existed
            extra = () if k == 0 else (RESCAN_INFIX, k)
            pose = random_head_pose(rng_for(seed, "pose", subj.label, site.name, *extra))
            scan_affine = item.anatomy @ pose
            scan = render_scan(phantom, ms, site, scan_affine, item.warp,
                               rng_for(seed, "noise", subj.label, site.name, *extra),
                               native_truth=native_groundtruth)
            _write_dwi(out / sub / ses / "dwi", stem, scan, site)
            xdir = gt_root / sub / ses / "xfm"
            io.write_text(_matrix_text(scan_affine),
                          xdir / f"{stem}_from-scanner_to-phantom_desc-affine_xfm.txt")
            io.write_json(_xfm_description(sub), xdir /
                          f"{stem}_from-scanner_to-phantom_desc-affine_xfm.json")
            io.write_text(_matrix_text(pose), xdir / f"{stem}_from-scanner_to-anat_xfm.txt")
            maps = template_metrics(ms, site_weights(site))
            ddir = gt_root / sub / ses / "dwi"
            for m in METRICS:
                img = io.make_image(maps[m], aff_t, slope=GT_SLOPES[m], dtype=np.int16)
                io.write_nifti(img, ddir / f"{stem}_space-phantom_model-tensor_param-{m}"
                                          "_dwimap.nii.gz")
            if native_groundtruth and scan.native_truth is not None:
                for m in METRICS:
                    img = io.make_image(scan.native_truth[m], scan.affine, slope=GT_SLOPES[m],
                                        dtype=np.int16)
                    io.write_nifti(img, ddir / f"{stem}_model-tensor_param-{m}_dwimap.nii.gz")
            rm = roi_means(maps, labels)
            for _, row in rm.iterrows():
                for m in METRICS:
                    roi_rows.append({"participant_id": sub, "session_id": ses,
                                     "site": site.name, "metric": m, "roi": row["roi"],
                                     "value": row[m]})
            sessions.append({"session_id": ses, "site": site.name, "age": subj.age})
            bar.update(1)
        io.write_tsv(pd.DataFrame(sessions), out / sub / f"{sub}_sessions.tsv")
        part_rows.append({"participant_id": sub, "site": subj.site or "n/a", "age": subj.age,
                          "sex": subj.sex, "dx": subj.dx,
                          "traveling": "yes" if subj.traveling else "no"})
        subj_rows.append({"participant_id": sub, "site": subj.site or "n/a", "age": subj.age,
                          "sex": subj.sex, "dx": subj.dx, "offset_global": subj.offset_global,
                          **{f"offset_{n}": v for n, v in zip(BUNDLE_NAMES,
                                                              subj.offset_bundle)}})
    bar.close()
    participants = pd.DataFrame(part_rows).sort_values("participant_id")
    io.write_tsv(participants, out / "participants.tsv")
    _write_top_level(out, seed, site_list, effects, plan)
    # ground truth tables
    write_phantom_template(gt_root / "tpl-phantom")
    io.write_tsv(pd.DataFrame(roi_rows), gt_root / "roi_groundtruth.tsv")
    io.write_tsv(pd.DataFrame(subj_rows).sort_values("participant_id"),
                 gt_root / "subjects.tsv")
    eff = true_effects(phantom, labels, effects, site_list)
    io.write_tsv(eff, gt_root / "effects.tsv")
    io.write_json(_effects_description(effects, site_list), gt_root / "effects.json")
    io.write_json(_derivative_description(seed), gt_root / "dataset_description.json")
    log.info("simulated %d scans of %d subjects in %s", n_scans, len(plan), out)
    return out


def _check_rescans(rescans) -> int:
    if isinstance(rescans, bool) or not isinstance(rescans, (int, np.integer)):
        raise SimulationError(f"rescans must be a whole number >= 0, got {rescans!r}")
    if rescans < 0:
        raise SimulationError(f"rescans must be >= 0 (same-site rescans of each traveling "
                              f"subject per site), got {rescans}")
    return int(rescans)


def _check_session_labels(sites: list[Site], rescans: int) -> None:
    """A rescan session may not take the label of another site's session."""
    names = {s.name for s in sites}
    for site in sites:
        for k in range(1, rescans + 1):
            label = _session_label(site, k)[len("ses-"):]
            if label in names:
                raise SimulationError(f"site name {label!r} is also the label of rescan {k} of "
                                      f"site {site.name!r}; rename the site")


def _matrix_text(m: np.ndarray) -> str:
    return "\n".join(" ".join(f"{v:.10f}" for v in row) for row in np.asarray(m)) + "\n"


def _xfm_description(sub: str) -> dict:
    return {
        "Description": "Scanner (world RAS mm) -> phantom template mm: y = A @ [x, 1] with A the "
                       "4x4 matrix of this file, then T(x) = y + d(y) with d the displacement "
                       "field (mm, trilinear) of the subject's desc-warp image. "
                       "dmriharmony.simulate.transforms.scanner_to_template evaluates it.",
        "Warp": f"../../xfm/{sub}_from-anat_to-phantom_desc-warp_xfm.nii.gz",
        "FromSpace": "scanner",
        "ToSpace": "phantom",
    }


def _write_dwi(folder: Path, stem: str, scan, site: Site) -> None:
    gain = site.signal_scale / scan.ref_signal
    values = scan.data * gain
    if scan.sigma is None:  # noise-free: keep full precision
        img = io.make_image(values.astype(np.float32), scan.affine, dtype=np.float32)
    else:
        img = io.make_image(values, scan.affine, slope=site.scl_slope, dtype=np.int16)
    zooms = np.linalg.norm(scan.affine[:3, :3], axis=0)
    img.header.set_zooms(tuple(float(z) for z in zooms) + (site.tr_ms / 1000.0,))
    io.write_nifti(img, folder / f"{stem}_dwi.nii.gz")
    io.write_text(io.format_bvals(scan.protocol.bvals_written), folder / f"{stem}_dwi.bval")
    io.write_text(io.format_bvecs(scan.bvecs_written), folder / f"{stem}_dwi.bvec")
    # slices are along the image axis closest to the scanner z axis
    slice_axis = int(np.argmax(np.abs(scan.affine[2, :3]) / zooms))
    meta = sidecar(site, slice_thickness=float(zooms[slice_axis]),
                   n_slices=int(scan.data.shape[slice_axis]))
    io.write_json(meta, folder / f"{stem}_dwi.json")


def _write_top_level(out: Path, seed: int, sites: list[Site], effects: EffectModel,
                     plan: list[_Planned]) -> None:
    """dataset_description, participants/sessions sidecars, README, .bidsignore.

    Without rescans the texts are those of the datasets simulated before rescans existed
    (byte-identical output); with rescans they say so.
    """
    rescans = max((p.rescans for p in plan), default=0)
    generated = f"seed={seed}; sites={','.join(s.name for s in sites)}"
    if rescans:
        generated += f"; rescans={rescans}"
    io.write_json({
        "Name": "dmriharmony multi-vendor diffusion phantom",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["dmriharmony-simulate"],
        "GeneratedBy": [{"Name": "dmriharmony-simulate", "Version": VERSION,
                         "Description": generated}],
    }, out / "dataset_description.json")
    trav_sessions = "whose sessions are one per site" if not rescans else \
        f"whose sessions are one per site plus {rescans} same-site rescan(s) per site"
    io.write_json({
        "participant_id": {"Description": "Subject label"},
        "site": {"Description": "Scanner site of the subject ('n/a' for traveling subjects, "
                                f"{trav_sessions}; see sub-*_sessions.tsv)"},
        "age": {"Description": "Age at scan", "Units": "year"},
        "sex": {"Description": "Sex", "Levels": {"M": "male", "F": "female"}},
        "dx": {"Description": "Diagnosis", "Levels": {"0": "control", "1": "patient"}},
        "traveling": {"Description": "Scanned at every site",
                      "Levels": {"yes": "traveling subject", "no": "single site"}},
    }, out / "participants.json")
    ses_desc = "Session label (named after the site)" if not rescans else \
        "Session label (named after the site; ses-<site>rescan<k>: rescan k of a traveling " \
        "subject at that site)"
    io.write_json({
        "session_id": {"Description": ses_desc},
        "site": {"Description": "Scanner site of the session"},
        "age": {"Description": "Age at the session", "Units": "year"},
    }, out / "sessions.json")
    n_reg = sum(1 for p in plan if not p.subject.traveling)
    n_trav = len(plan) - n_reg
    lines = [
        "# dmriharmony multi-vendor diffusion phantom",
        "",
        "Simulated with `dmriharmony-simulate` (dmriharmony "
        f"{VERSION}), seed {seed}: {n_reg} single-site subjects and {n_trav} traveling "
        f"subject(s) scanned at {len(sites)} site(s). Site differences come from physics and "
        "acquisition (b-values, TE/TR and field strength, voxel size, SNR, vendor scaling and "
        "export conventions), not from offsets added to FA.",
        "",
        *([f"Every traveling subject was also rescanned {rescans} time(s) at every site "
           f"(session{'s' if rescans > 1 else ''} ses-<site>{RESCAN_INFIX}1"
           f"{f' ... ses-<site>{RESCAN_INFIX}{rescans}' if rescans > 1 else ''}: same brain, "
           "new head pose and noise; the site is in sub-*_sessions.tsv), the scan-rescan noise "
           "floor of traveling-subject evaluation.", ""] if rescans else []),
        "| site | vendor | model | field (T) | shells | directions | b0 | TE (ms) | voxel (mm) "
        "| SNR |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in sites:
        lines.append(
            f"| {s.name} | {s.vendor} | {s.model} | {s.field_strength:g} | "
            f"{'/'.join(f'{b:g}' for b in s.shells)} | {'/'.join(str(d) for d in s.directions)}"
            f" | {s.n_b0} | {s.te_ms:g} | {'x'.join(f'{v:g}' for v in s.voxel_size)} | "
            f"{'noise-free' if s.snr is None else f'{s.snr:g}'} |")
    lines += ["", "Ground truth (noise-free b -> 0 tensor maps on the phantom template, "
              "subject-to-template transforms, true effects) is in derivatives/groundtruth/.",
              ""]
    io.write_text("\n".join(lines), out / "README")
    io.write_text("derivatives/\n", out / ".bidsignore")


def _effects_description(effects: EffectModel, sites: list[Site]) -> dict:
    return {
        "Description": "True biological effects of the simulation. effects.tsv: counterfactual "
                       "change of each label's mean b -> 0 FA/MD/AD/RD on the template grid for "
                       "the template subject (no individual variation): term 'dx' = patient - "
                       "control, 'sex' = M - F, 'age' = per year; 'site' is the acquisition "
                       "(relaxation weighting) or 'tissue' (TE -> 0, TR -> infinity); "
                       "'baseline' is the control value at the reference age.",
        "Units": {"fa": "1", "md": "mm^2/s", "ad": "mm^2/s", "rd": "mm^2/s"},
        "EffectModel": effects.to_dict(),
        "CohensD_intra_fraction": {
            "Description": "Tissue-level standardized diagnosis effect in dx_rois: dx_f over the "
                           "between-subject SD of f_intra at fixed age and sex, "
                           "sqrt(sd_global^2 + sd_bundle^2) (scan noise not included).",
            "Value": effects.dx_f / float(np.hypot(effects.sd_global, effects.sd_bundle)),
        },
        "Sites": [s.to_dict() for s in sites],
        "Labels": {str(k): v[0] for k, v in sorted(LABELS.items())},
    }


def _derivative_description(seed: int) -> dict:
    return {
        "Name": "dmriharmony phantom ground truth",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "dmriharmony-simulate", "Version": VERSION,
                         "Description": f"seed={seed}"}],
    }
