"""Nipype interfaces over :mod:`dmriharmony.tbss` (thin wrappers, no science here)."""

from __future__ import annotations

import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)


def _opt(value):
    return value if isdefined(value) and value not in ("", None) else None


def _reg_config(inputs):
    from dmriharmony.tbss.register import RegistrationConfig

    kwargs = {}
    for name in ("affine_iters", "affine_factors", "affine_sigmas", "syn_iters"):
        value = getattr(inputs, name)
        if isdefined(value):
            kwargs[name] = list(value)
    if isdefined(inputs.seed):
        kwargs["seed"] = int(inputs.seed)
    return RegistrationConfig(**kwargs)


class _PrepareTemplateInputSpec(BaseInterfaceInputSpec):
    source = traits.Str("phantom", usedefault=True,
                        desc="phantom, enigma, study or folder (see dmriharmony.tbss.templates)")
    template_dir = Directory(exists=True, desc="ENIGMA or dmriharmony template folder")
    threshold = traits.Float(0.2, usedefault=True, desc="skeleton threshold (phantom)")


class _PrepareTemplateOutputSpec(TraitedSpec):
    template_dir = Directory(exists=True, desc="dmriharmony template folder (with directions)")


class PrepareTemplate(SimpleInterface):
    """Load a template (:func:`~dmriharmony.tbss.templates.load_template`) and write it as a
    dmriharmony template folder, so that per-run nodes load it quickly."""

    input_spec = _PrepareTemplateInputSpec
    output_spec = _PrepareTemplateOutputSpec

    def _run_interface(self, runtime):
        from dmriharmony.tbss.templates import load_template

        tpl = load_template(self.inputs.source, _opt(self.inputs.template_dir),
                            self.inputs.threshold)
        out = tpl.save(os.path.join(runtime.cwd, "template"))
        self._results["template_dir"] = str(out)
        return runtime


class _TBSSRunInputSpec(BaseInterfaceInputSpec):
    fa = File(exists=True, mandatory=True, desc="native-space FA")
    md = File(exists=True, desc="native-space MD")
    ad = File(exists=True, desc="native-space AD")
    rd = File(exists=True, desc="native-space RD")
    template_dir = Directory(exists=True, mandatory=True, desc="template folder")
    prefix = traits.Str(mandatory=True, desc="BIDS entity prefix, e.g. sub-01_ses-A")
    subject = traits.Str(desc="subject label (default: from prefix)")
    session = traits.Str(desc="session label")
    run = traits.Str(desc="run label")
    affine_iters = traits.List(traits.Int, desc="affine pyramid iterations")
    affine_factors = traits.List(traits.Int, desc="affine pyramid factors")
    affine_sigmas = traits.List(traits.Float, desc="affine pyramid sigmas")
    syn_iters = traits.List(traits.Int, desc="SyN iterations per level (empty: affine only)")
    seed = traits.Int(0, usedefault=True, desc="seed of MI sampling")
    omp_nthreads = traits.Int(1, usedefault=True, nohash=True, desc="BLAS/OpenMP threads")


class _TBSSRunOutputSpec(TraitedSpec):
    warped_fa = File(exists=True)
    warped_md = File()
    warped_ad = File()
    warped_rd = File()
    skeleton_fa = File(exists=True)
    skeleton_md = File()
    skeleton_ad = File()
    skeleton_rd = File()
    roi_tsv = File(exists=True, desc="one ROI row per metric")
    qc_tsv = File(exists=True, desc="registration QC (correlation with template FA)")
    qc_png = File(exists=True, desc="warped FA with skeleton overlay")
    affine = File(exists=True, desc="affine transform (4x4 text)")
    warp = File(desc="SyN warp (.npz)")


class TBSSRun(SimpleInterface):
    """One run through TBSS (:func:`dmriharmony.tbss.pipeline.run_tbss`)."""

    input_spec = _TBSSRunInputSpec
    output_spec = _TBSSRunOutputSpec

    def _run_interface(self, runtime):
        from threadpoolctl import threadpool_limits

        from dmriharmony.tbss.pipeline import run_tbss

        others = {k.upper(): _opt(getattr(self.inputs, k)) for k in ("md", "ad", "rd")}
        with threadpool_limits(limits=int(self.inputs.omp_nthreads)):
            out = run_tbss(self.inputs.fa, self.inputs.template_dir,
                           os.path.join(runtime.cwd, self.inputs.prefix), others,
                           subject=_opt(self.inputs.subject) or "",
                           session=_opt(self.inputs.session), run=_opt(self.inputs.run),
                           config=_reg_config(self.inputs))
        for key in self.output_spec().copyable_trait_names():
            if key in out:
                self._results[key] = out[key]
        return runtime


class _StudyTemplateInputSpec(BaseInterfaceInputSpec):
    fa_files = InputMultiObject(File(exists=True), mandatory=True, desc="cohort FA maps")
    space = traits.Str("MNI152NLin6Asym", usedefault=True, desc="TemplateFlow space")
    resolution = traits.Int(2, usedefault=True, desc="TemplateFlow resolution index")
    n_iterations = traits.Int(2, usedefault=True, desc="FA-to-mean iterations")
    labels = File(exists=True, desc="ROI labels in the TemplateFlow space")
    label_table = File(exists=True, desc="their look-up table")
    threshold = traits.Float(0.2, usedefault=True, desc="skeleton threshold")
    syn_iters = traits.List(traits.Int, desc="SyN iterations per level")
    affine_iters = traits.List(traits.Int, desc="affine pyramid iterations")
    affine_factors = traits.List(traits.Int, desc="affine pyramid factors")
    affine_sigmas = traits.List(traits.Float, desc="affine pyramid sigmas")
    seed = traits.Int(0, usedefault=True, desc="seed of MI sampling")


class _StudyTemplateOutputSpec(TraitedSpec):
    template_dir = Directory(exists=True, desc="study template folder")


class StudyTemplate(SimpleInterface):
    """Study-specific template (:func:`dmriharmony.tbss.study.build_study_template`)."""

    input_spec = _StudyTemplateInputSpec
    output_spec = _StudyTemplateOutputSpec

    def _run_interface(self, runtime):
        from dmriharmony.tbss.study import build_study_template

        out = os.path.join(runtime.cwd, "template")
        build_study_template(list(self.inputs.fa_files), out, space=self.inputs.space,
                             resolution=self.inputs.resolution,
                             n_iterations=self.inputs.n_iterations,
                             labels=_opt(self.inputs.labels),
                             label_table=_opt(self.inputs.label_table),
                             threshold=self.inputs.threshold, config=_reg_config(self.inputs))
        self._results["template_dir"] = out
        return runtime


class _ROITableInputSpec(BaseInterfaceInputSpec):
    roi_files = InputMultiObject(File(exists=True), mandatory=True, desc="per-run ROI TSVs")
    participants_tsv = File(exists=True, mandatory=True, desc="BIDS participants.tsv")
    site_table = File(exists=True, desc="site table TSV (one row per run)")
    out_file = traits.Str("roi_table.tsv", usedefault=True)


class _ROITableOutputSpec(TraitedSpec):
    roi_table = File(exists=True)


class ROITable(SimpleInterface):
    """Group ``roi_table.tsv`` (:func:`dmriharmony.tbss.roi.build_roi_table`)."""

    input_spec = _ROITableInputSpec
    output_spec = _ROITableOutputSpec

    def _run_interface(self, runtime):
        from dmriharmony.tbss.roi import build_roi_table, write_table

        table = build_roi_table(list(self.inputs.roi_files), self.inputs.participants_tsv,
                                _opt(self.inputs.site_table))
        out = write_table(table, os.path.join(runtime.cwd, self.inputs.out_file))
        self._results["roi_table"] = str(out)
        return runtime


class _MergeSkeletonsInputSpec(BaseInterfaceInputSpec):
    in_files = InputMultiObject(File(exists=True), mandatory=True, desc="skeletonised maps")
    out_file = traits.Str("all_FA_skeletonised.nii.gz", usedefault=True)


class _MergeSkeletonsOutputSpec(TraitedSpec):
    out_file = File(exists=True)


class MergeSkeletons(SimpleInterface):
    """4-D group image of skeletonised maps (TBSS's ``all_FA_skeletonised``)."""

    input_spec = _MergeSkeletonsInputSpec
    output_spec = _MergeSkeletonsOutputSpec

    def _run_interface(self, runtime):
        from dmriharmony.tbss.io import stack_images

        out = stack_images(list(self.inputs.in_files),
                           os.path.join(runtime.cwd, self.inputs.out_file))
        self._results["out_file"] = str(out)
        return runtime
