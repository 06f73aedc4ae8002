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

__all__ = ["HarmonizedOutputs", "RISHRun", "collect_rish_runs", "parse_subject_selection",
           "rish_study", "template_covariates"]

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


def _scan_rescan(before: dict, after: dict, sites: dict, wm: np.ndarray,
                 labels: np.ndarray | None) -> dict:
    """Between-site error split into rescan noise and site effect, before/after
    (:func:`dmriharmony.evaluation.traveling_maps.scan_rescan_rmse`), voxelwise in WM and on
    the ROI means; ``site_reduction`` is the relative drop of the site-attributable RMSE."""
    from dmriharmony.evaluation.traveling_maps import scan_rescan_rmse

    out = {}
    levels = [("", lambda maps: maps, wm)]
    if labels is not None:
        n_roi = len([i for i in np.unique(labels[wm]) if i > 0])
        levels.append(("roi_", lambda maps: {k: _label_means(v, labels, wm)
                                             for k, v in maps.items()},
                       np.ones(n_roi, bool)))
    for prefix, reduce, mask in levels:
        for when, maps in (("before", before), ("after", after)):
            r = scan_rescan_rmse(reduce(maps), sites, mask)
            for key in ("between_rmse", "within_rmse", "site_rmse"):
                out[f"{prefix}{key}_{when}"] = r[key]
        b, a = out[f"{prefix}site_rmse_before"], out[f"{prefix}site_rmse_after"]
        out[f"{prefix}site_reduction"] = float(1 - a / b) if b > 0 else float("nan")
    out["n_rescan_pairs"] = r["n_within_pairs"]
    return out


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
        # traveling subjects: map -> subject -> session -> map, and session -> site
        self.before: dict[str, dict[str, dict[str, np.ndarray]]] = {"fa": {}, "md": {}}
        self.after: dict[str, dict[str, dict[str, np.ndarray]]] = {"fa": {}, "md": {}}
        self.session_site: dict[str, dict[str, str]] = {}

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
        def before(param: str) -> np.ndarray:
            return np.asarray(nib.load(str(
                run.folder / f"{run.prefix}_space-{run.space}_model-tensor_param-{param}_"
                "dwimap.nii.gz")).dataobj, float)

        before_fa = before("fa")
        for param in ("fa", "md"):
            native = getattr(tm, param).astype(np.float32)
            self.write(run.folder / f"{run.prefix}_model-tensor_param-{param}_desc-"
                       f"{self.name}_dwimap.nii.gz", nib.Nifti1Image(native, affine))
            warped = reg.transform(native).astype(np.float32)
            self.write(run.folder / f"{run.prefix}_space-{run.space}_model-tensor_param-"
                       f"{param}_desc-{self.name}_dwimap.nii.gz",
                       nib.Nifti1Image(warped, tpl.affine))
            if run.traveling:
                key = run.session or run.prefix
                self.before[param].setdefault(run.subject, {})[key] = \
                    before_fa if param == "fa" else before(param)
                self.after[param].setdefault(run.subject, {})[key] = warped
                self.session_site.setdefault(run.subject, {})[key] = run.site
            if param == "fa":
                self.rows.append({"prefix": run.prefix, "site": run.site,
                                  "traveling": run.traveling,
                                  "wm_fa_before": float(before_fa[self.wm].mean()),
                                  "wm_fa_after": float(warped[self.wm].mean())})

    def runs(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def traveling(self) -> pd.DataFrame:
        """One row per traveling subject and map (FA, MD in WM): between-site RMSE
        before/after on the first session of every site (sorted labels), and, when a site has
        rescans, the scan-rescan split of all sessions (``*_between_*``, ``*_within_*``,
        ``*site_rmse*``, ``*site_reduction``)."""
        from dmriharmony.evaluation.traveling_maps import rmse_reduction

        rows = []
        for param, sub in ((p, s) for p in ("fa", "md") for s in sorted(self.before[p])):
            site_of = self.session_site[sub]
            first: dict[str, str] = {}
            maps_before, maps_after = self.before[param][sub], self.after[param][sub]
            for ses in sorted(maps_before):
                first.setdefault(site_of[ses], ses)
            if len(first) < 2:
                continue
            before = {site: maps_before[ses] for site, ses in first.items()}
            after = {site: maps_after[ses] for site, ses in first.items()}
            row = {"subject": sub, "metric": param, "n_sites": len(first),
                   "n_sessions": len(site_of), **rmse_reduction(before, after, self.wm)}
            if self.template.labels is not None:
                row.update(_roi_agreement(before, after, self.template.labels, self.wm))
            if len(site_of) > len(first):
                row.update(_scan_rescan(maps_before, maps_after, site_of, self.wm,
                                        self.template.labels))
            rows.append(row)
        return pd.DataFrame(rows)


from dmriharmony.bids.sites import _MISSING  # noqa: E402  (the missing-value spellings of BIDS tables)


def parse_subject_selection(spec: str | None) -> tuple[str, list[str]] | None:
    """``"COLUMN=VALUE[,VALUE...]"`` (e.g. ``"dx=0"``) -> ``(column, [values])``; "" -> None."""
    if spec is None or not str(spec).strip():
        return None
    column, sep, values = str(spec).partition("=")
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not column.strip() or not vals:
        raise HarmonizationError(f"template subjects {spec!r}: expected COLUMN=VALUE[,VALUE...] "
                                 "(e.g. dx=0), a participants.tsv column and its values")
    return column.strip(), vals


def template_covariates(participants_tsv: str | Path, subjects: list[str],
                        covariates: list[str] | tuple[str, ...] = (),
                        selection: str | None = None,
                        ) -> tuple[np.ndarray, np.ndarray | None, list[str], list[str]]:
    """Which runs build the RISH site templates, and their covariate matrix.

    Parameters
    ----------
    participants_tsv : the dataset's participants table.
    subjects : subject label (without ``sub-``) of every candidate run.
    covariates : participants.tsv columns the templates are adjusted for (numeric columns as
        they are; a two-level column as 0/1, its first level in sorted order 0; more levels as
        indicators of all but the first). Columns constant over the selected runs (e.g. ``dx``
        when only controls are kept) are dropped with a note.
    selection : ``"COLUMN=VALUE[,VALUE...]"``: only these subjects build the templates
        (matched controls, e.g. ``"dx=0"``); None: all.

    Returns
    -------
    keep (bool per run), covariate matrix of the kept runs (None without covariates), the
    covariate column names, notes.
    """
    path = Path(participants_tsv)
    parts = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    if "participant_id" not in parts.columns:
        raise HarmonizationError(f"{path}: no participant_id column")
    ids = [p[4:] if p.startswith("sub-") else p for p in parts["participant_id"]]
    table = parts.assign(_id=ids).set_index("_id")
    missing = [s for s in subjects if s not in table.index]
    if missing:
        raise HarmonizationError(f"{path}: sub-{missing[0]} is not listed (needed for the RISH "
                                 "templates)")
    rows = table.loc[subjects]
    notes: list[str] = []
    keep = np.ones(len(subjects), bool)
    sel = parse_subject_selection(selection)
    if sel is not None:
        column, values = sel
        if column not in table.columns:
            raise HarmonizationError(f"{path}: no column {column!r} (RISH template subjects "
                                     f"{selection!r}); columns: {', '.join(parts.columns)}")
        keep = rows[column].str.strip().isin(values).to_numpy()
        if not keep.any():
            raise HarmonizationError(f"{path}: no subject has {column} in {values} (RISH "
                                     "template subjects)")
        notes.append(f"rish: site templates from the {int(keep.sum())} runs with {column} in "
                     f"{{{', '.join(values)}}} of {len(subjects)}")
    cols, names = [], []
    for cov in covariates:
        if cov not in table.columns:
            raise HarmonizationError(f"{path}: no column {cov!r} (RISH covariate); columns: "
                                     f"{', '.join(parts.columns)}")
        vals = rows[cov].str.strip()
        bad = [s for s, v, k in zip(subjects, vals, keep, strict=True)
               if k and v.lower() in _MISSING]
        if bad:
            raise HarmonizationError(f"{path}: sub-{bad[0]} has no {cov!r} (RISH covariate)")
        kept = vals[keep]
        num = pd.to_numeric(kept, errors="coerce")
        if num.notna().all():
            block, labels = num.to_numpy(float)[:, None], [cov]
        else:
            levels = sorted(kept.unique())
            block = np.stack([(kept == lv).to_numpy(float) for lv in levels[1:]], axis=1) \
                if len(levels) > 1 else np.zeros((len(kept), 0))
            labels = [cov if len(levels) == 2 else f"{cov}[{lv}]" for lv in levels[1:]]
        for j, label in enumerate(labels):
            if np.ptp(block[:, j]) == 0:
                notes.append(f"rish: covariate {label} is constant over the template runs; "
                             "not adjusted for")
                continue
            cols.append(block[:, j])
            names.append(label)
        if not labels:
            notes.append(f"rish: covariate {cov} is constant over the template runs; not "
                         "adjusted for")
    cov_matrix = np.stack(cols, axis=1) if cols else None
    return keep, cov_matrix, names, notes


def _reference_bvalues(runs: list[RISHRun]) -> list[float]:
    """The shells (mean b-values, rounded) of the reference site's template runs."""
    from dmriharmony.dti.gradients import read_bvals
    from dmriharmony.sh.fit import find_shells

    out: set[float] = set()
    for run in runs:
        out.update(round(float(b), 1) for b, _ in find_shells(read_bvals(run.bval)))
    return sorted(out)


def rish_study(bids_dir: str | Path, deriv_dir: str | Path, *, reference_site: str | None = None,
               covariates: list[str] | tuple[str, ...] = (), template_subjects: str | None = None,
               template_source: str = "phantom", template_dir: str | None = None,
               bmax: float = 1500.0, b_round: float = 50.0, fit_method: str = "wls",
               smoothing_fwhm: float = 4.0, sh_smooth: float = 0.0,
               tissue_aware_smoothing: bool = True, resynthesis: str = "residual",
               bvalue_mapping: bool = False,
               write: Callable[[Path, nib.Nifti1Image], None] | None = None,
               progress: bool = True,
               roi_dir: str | Path | None = None) -> dict:
    """Fit RISH on the study and harmonize every run (see the module docstring).

    ``write(path, image)`` stores an output (default :func:`nibabel.save` after creating the
    folder); the CLI passes a staging writer. With ``roi_dir`` the harmonized maps are also
    projected onto the template skeleton with the runs' own transforms (TBSS search rule) and
    their ENIGMA ROI rows written there (``roi_files``), so that RISH enters the ROI-level
    comparison with the other harmonizers.

    The site templates come from the non-traveling runs (``template_subjects``, e.g.
    ``"dx=0"``, keeps only those participants: matched controls, Mirzaalian et al. 2016), and
    are adjusted for the participants.tsv ``covariates`` (age, sex, diagnosis ...: site means
    at the pooled covariates, :meth:`RISHHarmonizer.fit`) so that sites whose participants
    differ in age or diagnosis are compared at equal biology; ``()`` (default) gives plain
    site means, as published. ``tissue_aware_smoothing`` smooths the scale maps within tissue
    and free-water-like voxels separately (:func:`dmriharmony.harmonizers.rish.signal_classes`);
    False smooths over the whole mask. ``resynthesis``: ``"residual"`` (default) writes the
    measured DWI plus the change of the fitted SH signal, ``"projection"`` the scaled SH signal
    itself, as published (:func:`dmriharmony.harmonizers.rish.harmonize_dwi`).
    ``bvalue_mapping``: map every shell matched to a reference shell of another b-value onto
    it (mono-exponential rule, :func:`dmriharmony.harmonizers.rish.map_shells`) before the
    features and the scaling; False (default) leaves the b-value difference to the scaling.
    Returns ``{"model": RISHHarmonizer, "runs":
    DataFrame, "traveling": DataFrame, "roi_files": [...], "notes": [...]}``.
    """
    from tqdm import tqdm

    from dmriharmony.harmonizers.rish import (
        RESYNTHESIS,
        RISHHarmonizer,
        harmonize_dwi,
        map_shells,
        rish_maps,
    )
    from dmriharmony.sh.fit import fit_shells
    from dmriharmony.tbss.templates import load_template

    def _save(path: Path, img: nib.Nifti1Image) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(path))

    if resynthesis not in RESYNTHESIS:
        raise HarmonizationError(f"RISH re-synthesis must be one of {', '.join(RESYNTHESIS)}, "
                                 f"got {resynthesis!r}")
    write = write or _save
    runs = collect_rish_runs(bids_dir, deriv_dir)
    template = load_template(template_source, template_dir)
    regs = {}
    feats, sites = [], []
    notes: list[str] = [f"rish: re-synthesis {resynthesis}"]
    template_runs = [r for r in runs if not r.traveling]
    keep, cov, cov_names, cov_notes = template_covariates(
        Path(bids_dir) / "participants.tsv", [r.subject for r in template_runs],
        list(covariates), template_subjects)
    notes.extend(cov_notes)
    template_runs = [r for r, k in zip(template_runs, keep, strict=True) if k]
    probe = RISHHarmonizer(reference_site, smoothing_fwhm=smoothing_fwhm,
                           tissue_aware=tissue_aware_smoothing)
    ref_b: list[float] = []
    if bvalue_mapping:
        # b-value mapping (Cetin Karayumak et al. 2019): every run's shells matched to a shell
        # of the reference site are mapped onto its b-value before the features and scaling
        ref_site = reference_site or probe.default_reference([r.site for r in template_runs])
        ref_b = _reference_bvalues([r for r in template_runs if r.site == ref_site])
        if not ref_b:
            raise HarmonizationError(f"RISH reference site {ref_site!r} has no template runs "
                                     f"(sites: {', '.join(sorted({r.site for r in runs}))})")

    def target_bvalue(b: float) -> float | None:
        near = min(ref_b, key=lambda r: abs(r - b))
        return near if abs(near - b) <= probe.bvalue_tol * near else None

    selected = {id(r) for r in template_runs}
    for run in tqdm(runs, desc="RISH features", disable=not progress):
        dwi, mask = _load(run)
        data, bvals, map_notes = (map_shells(dwi.data, dwi.bvals, mask, target_bvalue)
                                  if bvalue_mapping else (dwi.data, dwi.bvals, []))
        if map_notes and id(run) in selected:
            notes.extend(f"rish: {run.prefix}: {n}" for n in map_notes)
        fit = fit_shells(data, bvals, dwi.bvecs, mask, smooth=sh_smooth)
        reg = regs[run.prefix] = _registration(run, template)
        if id(run) in selected:
            maps = {b: np.stack([reg.transform(m[..., k]) for k in range(m.shape[-1])],
                                axis=-1) for b, m in rish_maps(fit).items()}
            feats.append(maps)
            sites.append(run.site)
    model = probe.fit(
        feats, sites, template.mask, voxel_size=np.abs(np.diag(template.affine)[:3]),
        covariates=cov, covariate_names=cov_names)
    if cov_names:
        notes.append(f"rish: site templates adjusted for {', '.join(cov_names)} (site means at "
                     "the pooled covariates)")
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
                                               model.match_bvalue, smooth=sh_smooth,
                                               resynthesis=resynthesis,
                                               bvalue_mapping=bvalue_mapping)
        notes.extend(f"rish: {run.prefix}: {n}" for n in run_notes)
        tm = _refit(data, bvals, dwi.bvecs, mask, bmax, b_round, fit_method)
        acc.add(run, tm, dwi.affine, reg)
    return {"model": model, "runs": acc.runs(), "traveling": acc.traveling(),
            "roi_files": acc.roi_files, "notes": notes}
