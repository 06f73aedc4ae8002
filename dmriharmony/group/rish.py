"""RISH harmonization of a whole study from the participant level's outputs.

For every DWI run: SH fit per shell of the b0-normalised signal in native space
(:func:`dmriharmony.sh.fit_shells`), RISH maps, warped to the template with the run's own
participant-level transforms (affine + SyN, :class:`dmriharmony.tbss.register.Registration`).
The site templates and scale maps are fitted on the non-traveling runs
(:class:`dmriharmony.harmonizers.rish.RISHHarmonizer`); each run's scale maps are warped back to
its native grid, its SH coefficients scaled order by order, its DWI re-synthesised on its own
gradient table and the tensor refitted (same shells and fit as the participant level). The
reference site's runs go through the same SH fit and re-synthesis with unit scales, so that
every harmonized map has seen the same SH projection (Mirzaalian et al., *NeuroImage* 2016;
Cetin Karayumak et al., *NeuroImage* 2019).

Outputs per run (next to its maps): ``*_model-tensor_param-<fa|md>_desc-rish_dwimap.nii.gz``
(native) and ``*_space-<tpl>_model-tensor_param-<fa|md>_desc-rish_dwimap.nii.gz``; for the study:
the model (``rish_model.npz``) and the traveling subjects' between-site RMSE before/after.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from dmriharmony.errors import HarmonizationError

__all__ = ["HarmonizedOutputs", "RISHRun", "collect_rish_runs", "rish_study"]

LOGGER = logging.getLogger(__name__)


@dataclass
class RISHRun:
    """One DWI run with what RISH needs from the participant level."""

    prefix: str
    subject: str
    session: str | None
    site: str
    traveling: bool
    dwi: Path
    bval: Path
    bvec: Path
    folder: Path
    mask: Path
    fa: Path
    affine: Path
    warp: Path | None
    space: str


def collect_rish_runs(bids_dir: str | Path, deriv_dir: str | Path,
                      traveling_column: str = "traveling") -> list[RISHRun]:
    """The runs of ``site_table.tsv`` with their mask, FA and transforms (named when missing)."""
    from dmriharmony.group.table import _TRUE

    bids_dir, deriv_dir = Path(bids_dir), Path(deriv_dir)
    table = pd.read_csv(deriv_dir / "site_table.tsv", sep="\t", dtype=str,
                        keep_default_na=False)
    parts = pd.read_csv(bids_dir / "participants.tsv", sep="\t", dtype=str,
                        keep_default_na=False)
    trav_flag = {}
    if traveling_column in parts.columns:
        trav_flag = {p[4:] if p.startswith("sub-") else p: v.strip().lower() in _TRUE
                     for p, v in zip(parts["participant_id"], parts[traveling_column],
                                     strict=True)}
    n_sites = table.groupby("subject")["site"].nunique()
    runs = []
    for _, r in table.iterrows():
        dwi = bids_dir / r["dwi"]
        stem = dwi.name[:-len("_dwi.nii.gz")]
        folder = deriv_dir / Path(r["dwi"]).parent
        xfms = sorted(folder.glob(f"{stem}_from-native_to-*_mode-image_desc-affine_xfm.txt"))
        if not xfms:
            raise HarmonizationError(f"{folder}: no native-to-template transform of {stem}; run "
                                     "the participant level with --template first")
        space = xfms[0].name.split("_to-")[1].split("_")[0]
        warp = xfms[0].with_name(xfms[0].name.replace("desc-affine_xfm.txt", "desc-syn_xfm.npz"))
        mask = folder / f"{stem}_desc-brain_mask.nii.gz"
        fa = folder / f"{stem}_model-tensor_param-fa_dwimap.nii.gz"
        for f in (dwi, mask, fa):
            if not f.is_file():
                raise HarmonizationError(f"{f}: not found (needed by RISH)")
        ses = r["session"] if r["session"] not in ("", "n/a") else None
        runs.append(RISHRun(
            prefix=stem, subject=r["subject"], session=ses, site=r["site"],
            traveling=trav_flag.get(r["subject"], False) or n_sites[r["subject"]] > 1,
            dwi=dwi, bval=dwi.with_name(f"{stem}_dwi.bval"),
            bvec=dwi.with_name(f"{stem}_dwi.bvec"), folder=folder, mask=mask, fa=fa,
            affine=xfms[0], warp=warp if warp.is_file() else None, space=space))
    return runs


def _registration(run: RISHRun, template):
    from dmriharmony.tbss.register import Registration

    static = nib.Nifti1Image(template.fa.astype(np.float32), template.affine)
    return Registration.load(run.affine, run.warp, static_img=static,
                             moving_img=nib.load(str(run.fa)))


def _load(run: RISHRun):
    from dmriharmony.dti.io import load_dwi, load_mask

    dwi = load_dwi(run.dwi, run.bval, run.bvec)
    mask = load_mask(run.mask, dwi.data.shape[:3])
    return dwi, mask


def _refit(data, bvals, bvecs, mask, bmax: float, b_round: float, method: str):
    from dmriharmony.dti.fit import fit_tensor
    from dmriharmony.dti.gradients import make_gtab, select_shells

    sel = select_shells(bvals, bvecs, bmax=bmax, step=b_round)
    return fit_tensor(data[..., sel.index], make_gtab(sel.bvals, sel.bvecs), mask,
                      method=method)


def _label_means(fa: np.ndarray, labels: np.ndarray, wm: np.ndarray) -> np.ndarray:
    ids = [i for i in np.unique(labels[wm]) if i > 0]
    return np.array([fa[(labels == i) & wm].mean() for i in ids])


def _roi_agreement(before: dict, after: dict, labels: np.ndarray, wm: np.ndarray) -> dict:
    """Between-site RMSE of a traveling subject's ROI mean FA (template labels inside WM)
    about its across-site mean, before/after: the systematic part of the site effect, which
    the voxelwise RMSE hides under noise and registration error."""
    def rmse(maps):
        m = np.vstack([_label_means(maps[s], labels, wm) for s in sorted(maps)])
        return float(np.sqrt(np.mean((m - m.mean(axis=0)) ** 2)))

    b, a = rmse(before), rmse(after)
    return {"roi_rmse_before": b, "roi_rmse_after": a,
            "roi_reduction": float(1 - a / b) if b > 0 else float("nan")}


class HarmonizedOutputs:
    """What every signal-level harmonizer (RISH, the VAE) leaves per run after its DTI refit:
    native and template-space FA/MD (``desc-<name>``), the TBSS ROI row of the harmonized maps
    (with the run's own transforms), white-matter FA before/after, and the traveling subjects'
    between-site agreement."""

    def __init__(self, name: str, template, write, roi_dir: str | Path | None) -> None:
        self.name, self.template, self.write, self.roi_dir = name, template, write, roi_dir
        self.wm = template.mask & (template.fa >= 0.2)
        self.rows: list[dict] = []
        self.roi_files: list[str] = []
        self.before: dict[str, dict[str, np.ndarray]] = {}
        self.after: dict[str, dict[str, np.ndarray]] = {}

    def add(self, run: RISHRun, tm, affine: np.ndarray, reg) -> None:
        tpl = self.template
        if self.roi_dir is not None:  # TBSS projection of the harmonized maps: the ROI row
            from dmriharmony.tbss.pipeline import run_tbss

            res = run_tbss(nib.Nifti1Image(tm.fa.astype(np.float32), affine), tpl,
                           Path(self.roi_dir) / run.prefix,
                           others={p.upper(): nib.Nifti1Image(
                               getattr(tm, p).astype(np.float32), affine)
                               for p in ("md", "ad", "rd")},
                           subject=run.subject, session=run.session,
                           transforms=(str(run.affine), str(run.warp) if run.warp else None))
            self.roi_files.append(res["roi_tsv"])
        before_fa = np.asarray(nib.load(str(
            run.folder / f"{run.prefix}_space-{run.space}_model-tensor_param-fa_dwimap.nii.gz"
        )).dataobj, float)
        for param in ("fa", "md"):
            native = getattr(tm, param).astype(np.float32)
            self.write(run.folder / f"{run.prefix}_model-tensor_param-{param}_desc-"
                       f"{self.name}_dwimap.nii.gz", nib.Nifti1Image(native, affine))
            warped = reg.transform(native).astype(np.float32)
            self.write(run.folder / f"{run.prefix}_space-{run.space}_model-tensor_param-"
                       f"{param}_desc-{self.name}_dwimap.nii.gz",
                       nib.Nifti1Image(warped, tpl.affine))
            if param == "fa":
                if run.traveling:
                    self.before.setdefault(run.subject, {})[run.site] = before_fa
                    self.after.setdefault(run.subject, {})[run.site] = warped
                self.rows.append({"prefix": run.prefix, "site": run.site,
                                  "traveling": run.traveling,
                                  "wm_fa_before": float(before_fa[self.wm].mean()),
                                  "wm_fa_after": float(warped[self.wm].mean())})

    def runs(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def traveling(self) -> pd.DataFrame:
        from dmriharmony.evaluation.traveling_maps import rmse_reduction

        rows = []
        for sub in sorted(self.before):
            if len(self.before[sub]) < 2:
                continue
            row = {"subject": sub, "metric": "fa", "n_sites": len(self.before[sub]),
                   **rmse_reduction(self.before[sub], self.after[sub], self.wm)}
            if self.template.labels is not None:
                row.update(_roi_agreement(self.before[sub], self.after[sub],
                                          self.template.labels, self.wm))
            rows.append(row)
        return pd.DataFrame(rows)


def rish_study(bids_dir: str | Path, deriv_dir: str | Path, *, reference_site: str | None = None,
               template_source: str = "phantom", template_dir: str | None = None,
               bmax: float = 1500.0, b_round: float = 50.0, fit_method: str = "wls",
               smoothing_fwhm: float = 4.0, sh_smooth: float = 0.0,
               write: Callable[[Path, nib.Nifti1Image], None] | None = None,
               progress: bool = True,
               roi_dir: str | Path | None = None) -> dict:
    """Fit RISH on the study and harmonize every run (see the module docstring).

    ``write(path, image)`` stores an output (default :func:`nibabel.save` after creating the
    folder); the CLI passes a staging writer. With ``roi_dir`` the harmonized maps are also
    projected onto the template skeleton with the runs' own transforms (TBSS search rule) and
    their ENIGMA ROI rows written there (``roi_files``), so that RISH enters the ROI-level
    comparison with the other harmonizers. Returns ``{"model": RISHHarmonizer, "runs":
    DataFrame, "traveling": DataFrame, "roi_files": [...], "notes": [...]}``.
    """
    from tqdm import tqdm

    from dmriharmony.harmonizers.rish import RISHHarmonizer, harmonize_dwi, rish_maps
    from dmriharmony.tbss.templates import load_template

    def _save(path: Path, img: nib.Nifti1Image) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(path))

    write = write or _save
    runs = collect_rish_runs(bids_dir, deriv_dir)
    template = load_template(template_source, template_dir)
    regs = {}
    feats, sites = [], []
    notes: list[str] = []
    for run in tqdm(runs, desc="RISH features", disable=not progress):
        dwi, mask = _load(run)
        from dmriharmony.sh.fit import fit_shells

        fit = fit_shells(dwi.data, dwi.bvals, dwi.bvecs, mask, smooth=sh_smooth)
        reg = regs[run.prefix] = _registration(run, template)
        maps = {b: np.stack([reg.transform(m[..., k]) for k in range(m.shape[-1])], axis=-1)
                for b, m in rish_maps(fit).items()}
        if not run.traveling:
            feats.append(maps)
            sites.append(run.site)
    model = RISHHarmonizer(reference_site, smoothing_fwhm=smoothing_fwhm).fit(
        feats, sites, template.mask, voxel_size=np.abs(np.diag(template.affine)[:3]))
    for site, bs in model.unmatched_.items():
        notes.append(f"rish: site {site} shell(s) b={', '.join(f'{b:g}' for b in bs)} have no "
                     f"reference shell ({model.reference_site_}: "
                     f"{', '.join(f'{b:g}' for b in model.reference_bvalues_)}); left as is")
    acc = HarmonizedOutputs("rish", template, write, roi_dir)
    for run in tqdm(runs, desc="RISH harmonize", disable=not progress):
        dwi, mask = _load(run)
        reg = regs[run.prefix]
        scales = {b: np.stack([reg.transform_inverse(s[..., k], interpolation="linear")
                               for k in range(s.shape[-1])], axis=-1)
                  for b, s in model.scale_maps(run.site).items()}
        data, bvals, run_notes = harmonize_dwi(dwi.data, dwi.bvals, dwi.bvecs, mask, scales,
                                               model.match_bvalue, smooth=sh_smooth)
        notes.extend(f"rish: {run.prefix}: {n}" for n in run_notes)
        tm = _refit(data, bvals, dwi.bvecs, mask, bmax, b_round, fit_method)
        acc.add(run, tm, dwi.affine, reg)
    return {"model": model, "runs": acc.runs(), "traveling": acc.traveling(),
            "roi_files": acc.roi_files, "notes": notes}
