"""Nipype interfaces of the group level (thin wrappers over :mod:`dmriharmony.group` and
:mod:`dmriharmony.reports`; no science here).

- :class:`GroupHarmonize`: every chosen harmonizer and effect estimator side by side on the ROI
  table (:func:`dmriharmony.group.run_methods`): harmonized tables, effect tables, saved models,
  the evaluation table, in one output folder;
- :class:`GroupReport`: the self-contained ``report.html`` (:func:`dmriharmony.reports.report.
  build_report`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("NIPYPE_NO_ET", "1")  # no version check over the network

from nipype.interfaces.base import (  # noqa: E402
    BaseInterfaceInputSpec,
    Directory,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

__all__ = ["GroupHarmonize", "GroupReport", "RISHStudy",
           "TravelingMapsEvaluation", "VAEStudy"]


def _opt(value, default=None):
    return value if isdefined(value) else default


class _HarmonizeInputSpec(BaseInterfaceInputSpec):
    roi_table = File(exists=True, mandatory=True, desc="group roi_table.tsv")
    harmonizers = traits.List(traits.Str, mandatory=True,
                              desc="combat, covbat, gam, meta, mixed (in this order of output)")
    covariates = traits.List(traits.Str, ["age", "sex"], usedefault=True,
                             desc="biological covariates protected by the harmonizers")
    effect = traits.Str("dx", usedefault=True, desc="effect of interest, protected and scored")
    metrics = traits.List(traits.Str, ["fa", "md"], usedefault=True, desc="metrics to harmonize")
    rois = traits.List(traits.Str, desc="ROI columns (default: all)")
    site = traits.Str("site", usedefault=True, desc="site column")
    ref_site = traits.Str(desc="reference site (ComBat, ComBat-GAM)")
    seed = traits.Int(0, usedefault=True, desc="seed of the evaluation folds")
    evaluate = traits.Bool(True, usedefault=True, desc="write the evaluation table")
    apply_models_dir = Directory(exists=True,
                                 desc="apply the models saved here instead of fitting")
    rish_table = File(exists=True, desc="ROI table of the RISH-harmonized maps (RISHStudy)")
    vae_table = File(exists=True, desc="ROI table of the VAE-harmonized maps (VAEStudy)")
    publish_dirs = InputMultiObject(Directory(exists=True),
                                    desc="tables of the signal-level harmonizers to add")


class _HarmonizeOutputSpec(TraitedSpec):
    out_dir = Directory(exists=True, desc="folder holding every group output")
    evaluation_file = File(desc="evaluation.tsv (when evaluated)")
    summary_file = File(desc="evaluation_summary.tsv (when evaluated)")
    notes_file = File(exists=True, desc="notes.json: what could not be computed, and why")


class GroupHarmonize(SimpleInterface):
    """The harmonizers side by side on the ROI table (:func:`dmriharmony.group.run_methods`)."""

    input_spec = _HarmonizeInputSpec
    output_spec = _HarmonizeOutputSpec

    def _run_interface(self, runtime):
        from dmriharmony.group import load_group_tables, run_methods

        out_dir = Path(runtime.cwd) / "group"
        out_dir.mkdir(exist_ok=True)
        tables = load_group_tables(self.inputs.roi_table, covariates=self.inputs.covariates,
                                   effect=self.inputs.effect, metrics=self.inputs.metrics,
                                   site=self.inputs.site, rois=_opt(self.inputs.rois) or None)
        written = run_methods(self.inputs.harmonizers, tables, out_dir,
                              ref_site=_opt(self.inputs.ref_site) or None, seed=self.inputs.seed,
                              evaluate=self.inputs.evaluate,
                              apply_models_from=_opt(self.inputs.apply_models_dir),
                              precomputed={k: getattr(self.inputs, f"{k}_table")
                                           for k in ("rish", "vae")
                                           if isdefined(getattr(self.inputs, f"{k}_table"))}
                              or None)
        import shutil

        for folder in (self.inputs.publish_dirs if isdefined(self.inputs.publish_dirs) else []):
            for f in sorted(Path(folder).iterdir()):
                shutil.copy2(f, out_dir / f.name)
        notes = out_dir / "notes.json"
        notes.write_text(json.dumps(written["notes"], indent=1) + "\n")
        self._results["out_dir"] = str(out_dir)
        self._results["notes_file"] = str(notes)
        if "evaluation" in written:
            self._results["evaluation_file"] = str(written["evaluation"])
            self._results["summary_file"] = str(written["evaluation_summary"])
        return runtime


class _ReportInputSpec(BaseInterfaceInputSpec):
    group_dir = Directory(exists=True, mandatory=True, desc="GroupHarmonize's out_dir")
    roi_table = File(exists=True, desc="the raw group roi_table.tsv")
    deriv_dir = Directory(exists=True, desc="derivatives root (site table, per-run QC)")
    harmonizers = traits.List(traits.Str, mandatory=True)
    effect = traits.Str("dx", usedefault=True)
    notes_file = File(exists=True, desc="notes.json")
    options = traits.Dict(desc="options shown in the report")


class _ReportOutputSpec(TraitedSpec):
    out_report = File(exists=True, desc="report.html")


class GroupReport(SimpleInterface):
    """The self-contained HTML report of the group level."""

    input_spec = _ReportInputSpec
    output_spec = _ReportOutputSpec

    def _run_interface(self, runtime):
        from dmriharmony.reports.report import build_report

        notes = []
        if isdefined(self.inputs.notes_file):
            notes = json.loads(Path(self.inputs.notes_file).read_text())
        out = build_report(self.inputs.group_dir,
                           _opt(self.inputs.deriv_dir, self.inputs.group_dir),
                           Path(runtime.cwd) / "report.html",
                           harmonizers=self.inputs.harmonizers, effect=self.inputs.effect,
                           notes=notes, options=_opt(self.inputs.options),
                           roi_table=_opt(self.inputs.roi_table))
        self._results["out_report"] = str(out)
        return runtime


class _TravelingMapsInputSpec(BaseInterfaceInputSpec):
    before_files = InputMultiObject(File(exists=True), mandatory=True,
                                    desc="traveling subjects' maps before harmonization")
    after_files = InputMultiObject(File(exists=True), mandatory=True,
                                   desc="the same maps harmonized, same order")
    subjects = traits.List(traits.Str, mandatory=True, desc="subject of each map")
    sites = traits.List(traits.Str, mandatory=True, desc="site of each map")
    mask_file = File(exists=True, mandatory=True, desc="voxels compared")
    metric = traits.Str(mandatory=True)


class _TravelingMapsOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="TSV: one row per traveling subject")


class TravelingMapsEvaluation(SimpleInterface):
    """Between-site voxelwise RMSE of each traveling subject before/after
    (:func:`dmriharmony.evaluation.traveling_maps.rmse_reduction`)."""

    input_spec = _TravelingMapsInputSpec
    output_spec = _TravelingMapsOutputSpec

    def _run_interface(self, runtime):
        import pandas as pd

        from dmriharmony.evaluation.traveling_maps import rmse_reduction

        inp = self.inputs
        n = len(inp.before_files)
        if not (len(inp.after_files) == len(inp.subjects) == len(inp.sites) == n):
            raise ValueError("before_files, after_files, subjects and sites differ in length")
        rows = []
        for sub in sorted(set(inp.subjects)):
            idx = [i for i in range(n) if inp.subjects[i] == sub]
            if len({inp.sites[i] for i in idx}) < 2:
                continue
            before = {inp.sites[i]: inp.before_files[i] for i in idx}
            after = {inp.sites[i]: inp.after_files[i] for i in idx}
            rows.append({"subject": sub, "metric": inp.metric, "n_sites": len(idx),
                         **rmse_reduction(before, after, inp.mask_file)})
        out = Path(runtime.cwd) / f"traveling_{inp.metric}.tsv"
        pd.DataFrame(rows).to_csv(out, sep="\t", index=False, na_rep="n/a",
                                  float_format="%.10g")
        self._results["out_file"] = str(out)
        return runtime


class _RISHInputSpec(BaseInterfaceInputSpec):
    bids_dir = Directory(exists=True, mandatory=True, desc="raw BIDS dataset (the DWI)")
    deriv_dir = Directory(exists=True, mandatory=True,
                          desc="participant derivatives (masks, FA, transforms, site table)")
    participants_tsv = File(exists=True, mandatory=True)
    reference_site = traits.Str(desc="reference site (default: the largest)")
    template_source = traits.Str("phantom", usedefault=True)
    template_dir = Directory(exists=True, desc="template folder (enigma/folder sources)")


class _RISHStudyInputSpec(_RISHInputSpec):
    covariates = traits.List(traits.Str, desc="participants.tsv columns the site templates "
                             "are adjusted for (empty: plain site means)")
    template_subjects = traits.Str(desc="COLUMN=VALUE[,VALUE]: only these participants build "
                                   "the site templates (e.g. dx=0: controls)")
    smoothing = traits.Enum("tissue", "mask", usedefault=True,
                            desc="smooth the scale maps within tissue and free-water-like "
                                 "voxels separately (tissue) or over the whole mask (mask)")
    resynthesis = traits.Enum("residual", "projection", usedefault=True,
                              desc="residual: the measured DWI plus the change of the fitted "
                                   "SH signal; projection: the scaled SH signal itself (as "
                                   "published)")
    bvalue_mapping = traits.Enum("none", "mono-exponential", usedefault=True,
                                 desc="map shells onto the reference site's b-values before "
                                      "RISH (mono-exponential rule) or leave it to the scaling")


class _RISHOutputSpec(TraitedSpec):
    roi_table = File(exists=True, desc="ROI table of the RISH-harmonized maps (TBSS)")
    maps_dir = Directory(exists=True, desc="harmonized maps, laid out like the derivatives")
    model_file = traits.Str(desc="RISH templates and scale maps (.npz) / VAE model folder")
    traveling_file = File(desc="traveling subjects' FA agreement before/after (TSV)")
    sites_file = File(exists=True, desc="white-matter FA per run before/after (TSV)")
    publish_dir = Directory(exists=True, desc="this method's group-level tables")
    notes_file = File(exists=True)


class RISHStudy(SimpleInterface):
    """RISH harmonization of every run of the study (:func:`dmriharmony.group.rish.rish_study`)
    and the ROI table of its harmonized maps."""

    input_spec = _RISHStudyInputSpec
    output_spec = _RISHOutputSpec
    method = "rish"

    def _study(self, deriv, write, roi_dir):
        from dmriharmony.group.rish import rish_study

        return rish_study(self.inputs.bids_dir, deriv,
                          reference_site=_opt(self.inputs.reference_site) or None,
                          covariates=list(_opt(self.inputs.covariates, [])),
                          template_subjects=_opt(self.inputs.template_subjects) or None,
                          template_source=_opt(self.inputs.template_source, "phantom"),
                          template_dir=_opt(self.inputs.template_dir), write=write,
                          tissue_aware_smoothing=self.inputs.smoothing == "tissue",
                          resynthesis=self.inputs.resynthesis,
                          bvalue_mapping=self.inputs.bvalue_mapping != "none",
                          roi_dir=roi_dir, progress=False)

    def _run_interface(self, runtime):
        import nibabel as nib

        from dmriharmony.group.harmonize import write_tsv
        from dmriharmony.tbss.roi import build_roi_table, write_table

        cwd = Path(runtime.cwd)
        deriv = Path(self.inputs.deriv_dir)
        maps_dir = cwd / "maps"

        def write(path: Path, img) -> None:
            dst = maps_dir / Path(path).relative_to(deriv)
            dst.parent.mkdir(parents=True, exist_ok=True)
            nib.save(img, str(dst))

        m = self.method
        res = self._study(deriv, write, cwd / "tbss")
        table = build_roi_table(res["roi_files"], self.inputs.participants_tsv,
                                deriv / "site_table.tsv")
        self._results["roi_table"] = str(write_table(table, cwd / f"roi_table_desc-{m}.tsv"))
        self._results["maps_dir"] = str(maps_dir)
        model_name = "rish_model.npz" if m == "rish" else "vae_model"  # VAE: a folder
        self._results["model_file"] = str(res["model"].save(cwd / model_name))
        publish = cwd / "publish"  # the group outputs of this method (GroupHarmonize adds them)
        publish.mkdir(exist_ok=True)
        self._results["publish_dir"] = str(publish)
        self._results["sites_file"] = str(write_tsv(res["runs"], publish / f"{m}_runs.tsv"))
        if len(res["traveling"]):
            self._results["traveling_file"] = str(write_tsv(
                res["traveling"], publish / f"evaluation_desc-{m}.tsv"))
        if res.get("latent"):
            latent = publish / "vae_latent_site_accuracy.json"
            latent.write_text(json.dumps(res["latent"], indent=1) + "\n")
        notes = cwd / f"{m}_notes.json"
        notes.write_text(json.dumps(sorted(set(res["notes"])), indent=1) + "\n")
        self._results["notes_file"] = str(notes)
        return runtime


class _VAEInputSpec(_RISHInputSpec):
    target_site = traits.Str(desc="decode with this site's code (default: site average)")
    seed = traits.Int(0, usedefault=True)
    voxels_per_run = traits.Int(4000, usedefault=True, desc="training voxels per run")
    device = traits.Str("cpu", usedefault=True, desc="cpu, cuda, auto")
    mode = traits.Enum("site_adversary", "moyer", usedefault=True,
                       desc="moyer: MI bound + decoder adversary (Moyer et al. 2020); "
                            "site_adversary: plus a latent site classifier the encoder defeats")
    conversion = traits.Enum("decode", "residual", usedefault=True,
                             desc="decode: D(z, target) (Moyer et al.); residual: "
                                  "x + D(z, target) - D(z, source)")
    vae_resynthesis = traits.Enum("projection", "residual", usedefault=True,
                                  desc="residual conversions: write the harmonized SH signal "
                                       "(projection) or the measured shell plus its change")


class VAEStudy(RISHStudy):
    """Site-adversarial VAE harmonization of every run (:func:`dmriharmony.group.vae.vae_study`)
    and the ROI table of its harmonized maps."""

    input_spec = _VAEInputSpec
    method = "vae"

    def _study(self, deriv, write, roi_dir):
        from dmriharmony.group.vae import vae_study
        from dmriharmony.harmonizers._vae_config import small_config

        return vae_study(self.inputs.bids_dir, deriv,
                         target_site=_opt(self.inputs.target_site) or None,
                         template_source=_opt(self.inputs.template_source, "phantom"),
                         template_dir=_opt(self.inputs.template_dir), seed=self.inputs.seed,
                         voxels_per_run=self.inputs.voxels_per_run, device=self.inputs.device,
                         config=small_config(seed=self.inputs.seed, mode=self.inputs.mode),
                         conversion=self.inputs.conversion,
                         resynthesis=self.inputs.vae_resynthesis,
                         write=write, roi_dir=roi_dir, progress=False)
