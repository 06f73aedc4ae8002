"""Participant-level Nipype workflows: DWI -> brain mask -> (denoise) -> tensor fit -> maps.

``init_participant_wf`` is the per-series processing graph (nipreps style: an ``inputnode`` and
an ``outputnode`` of IdentityInterfaces, so it embeds in other graphs);
``init_dti_derivatives_wf`` stores its outputs as BIDS derivatives. Workflows only wire
interfaces; the science is in :mod:`dmriharmony.dti`.
"""

from __future__ import annotations

import os

os.environ.setdefault("NIPYPE_NO_ET", "1")  # no version check over the network

from dataclasses import asdict, dataclass  # noqa: E402

from nipype.interfaces import utility as niu  # noqa: E402
from nipype.pipeline import engine as pe  # noqa: E402

from dmriharmony.interfaces.bids import DerivativesDataSink  # noqa: E402
from dmriharmony.interfaces.dti import BrainMask, FitTensor, PreprocessDWI  # noqa: E402

#: what ``init_participant_wf``'s outputnode carries.
OUTPUT_FIELDS = ["dwi_file", "bval_file", "bvec_file", "mask", "fa", "md", "ad", "rd", "v1",
                 "tensor", "qc_file", "fit_json", "fit_info"]
#: sidecar Description and Units of each tensor map (BEP016 ``param-`` labels).
MAP_DESCRIPTIONS = {
    "fa": ("Fractional anisotropy of the diffusion tensor (Basser & Pierpaoli 1996)",
           "arbitrary"),
    "md": ("Mean diffusivity, mean of the tensor eigenvalues", "mm^2/s"),
    "ad": ("Axial diffusivity, largest tensor eigenvalue", "mm^2/s"),
    "rd": ("Radial diffusivity, mean of the two smaller tensor eigenvalues", "mm^2/s"),
    "v1": ("Principal eigenvector of the diffusion tensor (unit vector, voxel axes)",
           "arbitrary"),
    "tensor": ("Diffusion tensor, 6 lower-triangular elements in DIPY order "
               "(Dxx, Dxy, Dyy, Dxz, Dyz, Dzz)", "mm^2/s"),
}


@dataclass(frozen=True)
class ParticipantOptions:
    """Options of the participant level (all recorded in every sidecar).

    Attributes
    ----------
    denoise
        ``"none"`` (default), ``"mppca"`` (Veraart et al. 2016) or ``"patch2self"``
        (Fadnavis et al. 2020).
    gibbs
        Remove Gibbs ringing (Kellner et al. 2016); off by default.
    bmax
        Largest rounded b-value used for DTI (s/mm^2).
    b_round
        b-values are rounded to multiples of this step to define shells.
    fit_method
        ``"wls"`` (default), ``"ols"``, ``"nlls"`` or ``"restore"``.
    omp_nthreads
        BLAS/OpenMP threads per node (does not change results).
    """

    denoise: str = "none"
    gibbs: bool = False
    bmax: float = 1500.0
    b_round: float = 50.0
    fit_method: str = "wls"
    omp_nthreads: int = 1

    def recorded(self) -> dict:
        """The options that change results (written to sidecars)."""
        out = asdict(self)
        out.pop("omp_nthreads")
        return out


def _sidecar_meta(fit_info: dict, options: dict, param: str, description: str,
                  units: str) -> dict:
    """Sidecar fields of a tensor map: how it was made (BEP016-style ``Model`` block)."""
    return {
        "Units": units,
        "Model": {
            "Description": "Diffusion tensor (Basser et al. 1994) fitted with DIPY TensorModel",
            "FitMethod": fit_info.get("FitMethod"),
            "Parameters": {"BValueMax": fit_info.get("BMax"),
                           "BValueRounding": fit_info.get("BValueRounding"),
                           "ShellsUsed": fit_info.get("ShellsUsed"),
                           "VolumesUsed": fit_info.get("VolumesUsed")},
        },
        "Param": param,
        "ParamDescription": description,
        "BrainMask": "DIPY median_otsu on the mean b=0 image",
        "Preprocessing": {"Denoising": options.get("denoise"),
                          "GibbsRemoval": bool(options.get("gibbs"))},
        "Options": options,
        "QC": fit_info.get("QC", {}),
    }


def init_participant_wf(
    *,
    options: ParticipantOptions | None = None,
    concatenate: bool = False,
    name: str = "participant_wf",
) -> pe.Workflow:
    """Per-series DTI workflow: mask -> (concatenate / denoise / Gibbs) -> tensor fit.

    Parameters
    ----------
    options
        :class:`ParticipantOptions` (defaults: no denoising, no Gibbs removal, b <= 1500,
        rounding to 50, WLS).
    concatenate
        The inputs are lists of runs whose volumes are concatenated (shells split across
        ``acq-`` runs); otherwise single files.
    name
        Workflow name.

    Inputs (``inputnode``)
    ----------------------
    dwi_file, bval_file, bvec_file
        The DWI series and its gradients (lists when ``concatenate``).

    Outputs (``outputnode``)
    ------------------------
    dwi_file, bval_file, bvec_file
        The series that was fitted (pre-processed, or the input).
    mask
        Brain mask (median_otsu on the mean b0 of that series).
    fa, md, ad, rd, v1, tensor
        Tensor maps (native space).
    qc_file, fit_json, fit_info
        One-row QC TSV, fit description as a file and as a dict.
    """
    opts = options or ParticipantOptions()
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["dwi_file", "bval_file", "bvec_file"]),
                        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=OUTPUT_FIELDS), name="outputnode")

    preprocess = concatenate or opts.denoise != "none" or opts.gibbs
    if preprocess:
        prep = pe.Node(PreprocessDWI(denoise=opts.denoise, gibbs=opts.gibbs,
                                     omp_nthreads=opts.omp_nthreads), name="preprocess",
                       n_procs=opts.omp_nthreads)
        wf.connect([(inputnode, prep, [("dwi_file", "dwi_files"), ("bval_file", "bval_files"),
                                       ("bvec_file", "bvec_files")])])
        source, fields = prep, [("out_file", "dwi_file"), ("out_bval", "bval_file"),
                                ("out_bvec", "bvec_file")]
    else:
        source, fields = inputnode, [("dwi_file", "dwi_file"), ("bval_file", "bval_file"),
                                     ("bvec_file", "bvec_file")]

    mask = pe.Node(BrainMask(omp_nthreads=opts.omp_nthreads), name="brain_mask")
    fit = pe.Node(FitTensor(method=opts.fit_method, bmax=opts.bmax, b_round=opts.b_round,
                            omp_nthreads=opts.omp_nthreads), name="fit_tensor",
                  n_procs=opts.omp_nthreads)
    wf.connect([
        (source, mask, fields),
        (source, fit, fields),
        (source, outputnode, fields),
        (mask, fit, [("out_mask", "mask_file")]),
        # the mask leaves through the fit: a run's derivatives appear only if its fit succeeded
        (fit, outputnode, [("out_mask", "mask"), ("fa", "fa"), ("md", "md"), ("ad", "ad"),
                           ("rd", "rd"), ("v1", "v1"), ("tensor", "tensor"), ("qc_file", "qc_file"),
                           ("fit_json", "fit_json"), ("fit_info", "fit_info")]),
    ])
    return wf


def init_dti_derivatives_wf(
    *,
    output_dir: str,
    bids_dir: str,
    prefix: str,
    entities: dict,
    source_files: list[str],
    options: ParticipantOptions | None = None,
    name: str = "dti_derivatives_wf",
) -> pe.Workflow:
    """Store the outputs of :func:`init_participant_wf` as BIDS derivatives.

    ``<prefix>_model-tensor_param-<fa|md|ad|rd|v1|tensor>_dwimap.nii.gz`` (BEP016 naming),
    ``<prefix>_desc-brain_mask.nii.gz`` and ``<prefix>_model-tensor_qc.tsv``, each with a JSON
    sidecar (sources, software versions, options, fit details) in
    ``output_dir/sub-X[/ses-Y]/dwi/``.

    Inputs (``inputnode``): mask, fa, md, ad, rd, v1, tensor, qc_file, fit_info.
    Outputs (``outputnode``): the stored paths under the same names.
    """
    opts = options or ParticipantOptions()
    fields = ["mask", "fa", "md", "ad", "rd", "v1", "tensor", "qc_file"]
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=fields + ["fit_info"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=fields), name="outputnode")
    common = {"base_directory": str(output_dir), "prefix": prefix, "entities": dict(entities),
              "source_files": [str(s) for s in source_files], "bids_root": str(bids_dir)}
    for param, (description, units) in MAP_DESCRIPTIONS.items():
        meta = pe.Node(niu.Function(input_names=["fit_info", "options", "param", "description",
                                                 "units"], output_names=["meta"],
                                    function=_sidecar_meta), name=f"meta_{param}")
        meta.inputs.options = opts.recorded()
        meta.inputs.param = param
        meta.inputs.description = description
        meta.inputs.units = units
        sink = pe.Node(DerivativesDataSink(suffix="dwimap", model="tensor", param=param,
                                           description=description, **common),
                       name=f"ds_{param}", run_without_submitting=True)
        wf.connect([
            (inputnode, meta, [("fit_info", "fit_info")]),
            (meta, sink, [("meta", "metadata")]),
            (inputnode, sink, [(param, "in_file")]),
            (sink, outputnode, [("out_file", param)]),
        ])
    ds_mask = pe.Node(DerivativesDataSink(
        suffix="mask", desc="brain", description="Brain mask: DIPY median_otsu on the mean b=0",
        metadata={"Type": "Brain", "Options": opts.recorded()}, **common),
        name="ds_mask", run_without_submitting=True)
    ds_qc = pe.Node(DerivativesDataSink(
        suffix="qc", model="tensor", extension=".tsv",
        description="Quality control of the tensor fit (one row)",
        metadata=QC_SIDECAR, **common), name="ds_qc", run_without_submitting=True)
    wf.connect([
        (inputnode, ds_mask, [("mask", "in_file")]),
        (inputnode, ds_qc, [("qc_file", "in_file")]),
        (ds_mask, outputnode, [("out_file", "mask")]),
        (ds_qc, outputnode, [("out_file", "qc_file")]),
    ])
    return wf


#: column descriptions of the QC TSV (BIDS tabular-file sidecar style).
QC_SIDECAR = {
    "n_voxels": {"Description": "voxels in the brain mask (fitted)"},
    "n_volumes": {"Description": "volumes used by the fit (after shell selection)"},
    "shells": {"Description": "rounded b-values used (s/mm^2)"},
    "fit_method": {"Description": "DIPY TensorModel fit method"},
    "sigma": {"Description": "noise standard deviation (signal units)"},
    "sigma_method": {"Description": "b0-repeats: SD across b=0 repeats; wls-residuals: "
                                    "median residual SD of a WLS fit"},
    "snr": {"Description": "median b=0 signal over the mask divided by sigma"},
    "residual_rmse": {"Description": "median over voxels of the RMS fit residual / mean b=0"},
    "outlier_fraction": {"Description": "fraction of diffusion-weighted measurements with a "
                                        "residual above 3 sigma (RESTORE criterion)"},
    "fa_mean": {"Description": "mean FA over the mask"},
    "md_mean": {"Description": "mean MD over the mask", "Units": "mm^2/s"},
    "nonpositive_eigen_fraction": {"Description": "fraction of voxels with an eigenvalue <= 0"},
}
