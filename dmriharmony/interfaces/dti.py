"""Nipype interfaces over :mod:`dmriharmony.dti.pipeline` (thin wrappers, no science here)."""

from __future__ import annotations

import os

os.environ.setdefault("NIPYPE_NO_ET", "1")  # no version check over the network

from nipype.interfaces.base import (  # noqa: E402
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from dmriharmony.dti.pipeline import (  # noqa: E402
    fit_tensor_file,
    mask_file,
    preprocess_file,
)


def _thread_limit(n: int | None):
    """Context manager capping BLAS/OpenMP threads inside a node (``--omp-nthreads``)."""
    from contextlib import nullcontext

    if not n:
        return nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=int(n))


class _DWIInputSpec(BaseInterfaceInputSpec):
    dwi_file = File(exists=True, mandatory=True, desc="4-D DWI series")
    bval_file = File(exists=True, mandatory=True, desc="FSL-style b-values")
    bvec_file = File(exists=True, mandatory=True, desc="FSL-style b-vectors")
    omp_nthreads = traits.Int(1, usedefault=True, nohash=True,
                              desc="threads for BLAS/OpenMP (does not change results)")


class _BrainMaskOutputSpec(TraitedSpec):
    out_mask = File(exists=True, desc="binary brain mask")


class BrainMask(SimpleInterface):
    """Brain mask by median_otsu on the mean b0 (:func:`dmriharmony.dti.mask.brain_mask`)."""

    input_spec = _DWIInputSpec
    output_spec = _BrainMaskOutputSpec

    def _run_interface(self, runtime):
        with _thread_limit(self.inputs.omp_nthreads):
            out = mask_file(self.inputs.dwi_file, self.inputs.bval_file, self.inputs.bvec_file,
                            os.path.join(runtime.cwd, "brain_mask.nii.gz"))
        self._results["out_mask"] = str(out)
        return runtime


class _PreprocessInputSpec(BaseInterfaceInputSpec):
    dwi_files = InputMultiObject(File(exists=True), mandatory=True,
                                 desc="DWI run(s); several are concatenated (split shells)")
    bval_files = InputMultiObject(File(exists=True), mandatory=True)
    bvec_files = InputMultiObject(File(exists=True), mandatory=True)
    denoise = traits.Enum("none", "mppca", "patch2self", usedefault=True)
    gibbs = traits.Bool(False, usedefault=True, desc="remove Gibbs ringing")
    omp_nthreads = traits.Int(1, usedefault=True, nohash=True)


class _PreprocessOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="pre-processed DWI series (float32)")
    out_bval = File(exists=True)
    out_bvec = File(exists=True)


class PreprocessDWI(SimpleInterface):
    """Concatenation, MP-PCA/Patch2Self denoising, Gibbs removal (:mod:`dmriharmony.dti`)."""

    input_spec = _PreprocessInputSpec
    output_spec = _PreprocessOutputSpec

    def _run_interface(self, runtime):
        with _thread_limit(self.inputs.omp_nthreads):
            dwi, bval, bvec = preprocess_file(
                self.inputs.dwi_files, self.inputs.bval_files, self.inputs.bvec_files,
                runtime.cwd, denoise_method=self.inputs.denoise, gibbs=self.inputs.gibbs,
            )
        self._results.update(out_file=str(dwi), out_bval=str(bval), out_bvec=str(bvec))
        return runtime


class _FitInputSpec(_DWIInputSpec):
    mask_file = File(exists=True, mandatory=True, desc="brain mask")
    method = traits.Enum("wls", "ols", "nlls", "restore", usedefault=True)
    bmax = traits.Float(1500.0, usedefault=True, desc="largest shell used (s/mm^2)")
    b_round = traits.Float(50.0, usedefault=True, desc="b-value rounding step")


class _FitOutputSpec(TraitedSpec):
    fa = File(exists=True)
    md = File(exists=True)
    ad = File(exists=True)
    rd = File(exists=True)
    v1 = File(exists=True)
    tensor = File(exists=True)
    qc_file = File(exists=True, desc="one-row QC TSV")
    fit_json = File(exists=True, desc="fit description (method, shells, volumes, QC)")
    fit_info = traits.Dict(desc="the content of fit_json")
    out_mask = File(exists=True, desc="the mask that was fitted (pass-through, so that the "
                                      "mask is stored only once the fit succeeded)")


class FitTensor(SimpleInterface):
    """Shell selection and DIPY tensor fit (:func:`dmriharmony.dti.pipeline.fit_tensor_file`)."""

    input_spec = _FitInputSpec
    output_spec = _FitOutputSpec

    def _run_interface(self, runtime):
        with _thread_limit(self.inputs.omp_nthreads):
            out = fit_tensor_file(
                self.inputs.dwi_file, self.inputs.bval_file, self.inputs.bvec_file,
                self.inputs.mask_file, runtime.cwd, method=self.inputs.method,
                bmax=self.inputs.bmax, b_round=self.inputs.b_round,
            )
        for key in ("fa", "md", "ad", "rd", "v1", "tensor"):
            self._results[key] = str(out[key])
        self._results["qc_file"] = str(out["qc"])
        self._results["fit_json"] = str(out["fit_json"])
        self._results["fit_info"] = out["info"]
        self._results["out_mask"] = self.inputs.mask_file
        return runtime
