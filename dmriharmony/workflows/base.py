"""Top-level participant graph: one sub-workflow per DTI input, each storing derivatives.

Built to be extended: :func:`init_single_input_wf` returns the per-input workflow whose
``outputnode`` carries the native-space ``fa``/``md``/``ad``/``rd``/``mask`` (and the stored
derivative paths as ``ds_*``), so later stages (template registration, TBSS projection)
connect to it without touching the DTI graph.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

os.environ.setdefault("NIPYPE_NO_ET", "1")  # no version check over the network

from pathlib import Path  # noqa: E402

from nipype.interfaces import utility as niu  # noqa: E402
from nipype.pipeline import engine as pe  # noqa: E402

from dmriharmony.bids.runs import DTIInput  # noqa: E402
from dmriharmony.interfaces.bids import DerivativesDataSink  # noqa: E402
from dmriharmony.workflows.participant import (  # noqa: E402
    ParticipantOptions,
    init_dti_derivatives_wf,
    init_participant_wf,
)

#: fields of the per-input ``outputnode``.
SINGLE_OUTPUTS = ["mask", "fa", "md", "ad", "rd", "v1", "tensor", "qc_file", "fit_info",
                  "ds_fa", "ds_md", "ds_ad", "ds_rd", "ds_mask", "ds_qc", "ds_roi"]

#: TBSS outputs stored as derivatives: outputnode field -> (suffix, extension, param, desc).
_TBSS_SINKS = {
    **{f"warped_{m}": ("dwimap", ".nii.gz", m, None) for m in ("fa", "md", "ad", "rd")},
    **{f"skeleton_{m}": ("dwimap", ".nii.gz", m, "skeleton") for m in ("fa", "md", "ad", "rd")},
    "roi_tsv": ("roi", ".tsv", None, "skeleton"),
    "qc_tsv": ("qc", ".tsv", None, "tbss"),
    "qc_png": ("qc", ".png", None, "skeleton"),
}


@dataclass(frozen=True)
class TBSSOptions:
    """The ENIGMA-style TBSS step of the participant level.

    Attributes
    ----------
    source : str
        ``phantom`` (bundled), ``enigma`` (``template_dir`` with the ENIGMA files) or
        ``folder`` (a dmriharmony template folder, e.g. a study template).
    template_dir : str, optional
    space : str
        The template's ``space-`` label (:attr:`dmriharmony.tbss.templates.Template.name`).
    registration : dict
        :class:`dmriharmony.tbss.register.RegistrationConfig` fields to override.
    """

    source: str = "phantom"
    template_dir: str | None = None
    space: str = "phantom"
    registration: dict = field(default_factory=dict)

    def recorded(self) -> dict:
        """Options as recorded in the sidecars."""
        return {"TemplateSource": self.source, "TemplateDir": self.template_dir,
                "Space": self.space, "Registration": dict(self.registration)}


def init_single_input_wf(
    item: DTIInput,
    *,
    bids_dir: str | Path,
    output_dir: str | Path,
    options: ParticipantOptions | None = None,
    tbss: TBSSOptions | None = None,
    name: str | None = None,
) -> pe.Workflow:
    """DTI of one input (one run, or ``acq-`` runs fitted together) and its derivatives.

    With ``tbss`` the native maps then go through :func:`dmriharmony.workflows.tbss.init_tbss_wf`
    (registration to the template, skeleton projection, ENIGMA ROI row, QC) and those outputs
    are stored too; ``outputnode.ds_roi`` is the stored ROI row.
    """
    opts = options or ParticipantOptions()
    wf = pe.Workflow(name=name or f"single_{item.name}")
    dti = init_participant_wf(options=opts, concatenate=item.merged)
    if item.merged:
        dti.inputs.inputnode.dwi_file = [str(r.dwi) for r in item.runs]
        dti.inputs.inputnode.bval_file = [str(r.bval) for r in item.runs]
        dti.inputs.inputnode.bvec_file = [str(r.bvec) for r in item.runs]
    else:
        run = item.runs[0]
        dti.inputs.inputnode.dwi_file = str(run.dwi)
        dti.inputs.inputnode.bval_file = str(run.bval)
        dti.inputs.inputnode.bvec_file = str(run.bvec)
    ders = init_dti_derivatives_wf(
        output_dir=str(output_dir), bids_dir=str(bids_dir), prefix=item.prefix,
        entities=item.entities, source_files=[str(r.dwi) for r in item.runs], options=opts,
    )
    outputnode = pe.Node(niu.IdentityInterface(fields=SINGLE_OUTPUTS), name="outputnode")
    maps = ["mask", "fa", "md", "ad", "rd", "v1", "tensor", "qc_file"]
    wf.connect([
        (dti, ders, [(f"outputnode.{f}", f"inputnode.{f}") for f in maps + ["fit_info"]]),
        (dti, outputnode, [(f"outputnode.{f}", f) for f in maps + ["fit_info"]]),
        (ders, outputnode, [(f"outputnode.{f}", f"ds_{f}")
                            for f in ("fa", "md", "ad", "rd", "mask")]
         + [("outputnode.qc_file", "ds_qc")]),
    ])
    if tbss is not None:
        _add_tbss(wf, dti, outputnode, item, bids_dir=bids_dir, output_dir=output_dir,
                  options=opts, tbss=tbss)
    return wf


def _add_tbss(wf: pe.Workflow, dti: pe.Workflow, outputnode: pe.Node, item: DTIInput, *,
              bids_dir: str | Path, output_dir: str | Path, options: ParticipantOptions,
              tbss: TBSSOptions) -> None:
    """Connect the TBSS sub-workflow after the DTI fit and store its outputs."""
    from dmriharmony.workflows.tbss import init_tbss_wf

    tw = init_tbss_wf(name="tbss_wf", template_source=tbss.source,
                      template_dir=tbss.template_dir, registration=dict(tbss.registration),
                      omp_nthreads=options.omp_nthreads)
    tw.inputs.inputnode.prefix = item.prefix
    tw.inputs.inputnode.subject = str(item.entities.get("subject", ""))
    tw.inputs.inputnode.session = str(item.entities.get("session") or "")
    tw.inputs.inputnode.run = str(item.entities.get("run") or "")
    wf.connect(dti, "outputnode.fa", tw, "inputnode.fa")
    for m in ("md", "ad", "rd"):
        wf.connect(dti, f"outputnode.{m}", tw, f"inputnode.{m}")
    common = {"base_directory": str(output_dir), "prefix": item.prefix,
              "entities": dict(item.entities), "bids_root": str(bids_dir),
              "source_files": [str(r.dwi) for r in item.runs]}
    meta = {"Template": tbss.recorded(), "Options": options.recorded()}
    for key, (suffix, ext, param, desc) in _TBSS_SINKS.items():
        kwargs = {"suffix": suffix, "extension": ext, "space": tbss.space}
        if param is not None:
            kwargs.update(model="tensor", param=param)
        if desc is not None:
            kwargs["desc"] = desc
        sink = pe.Node(DerivativesDataSink(
            description=f"TBSS ({key.replace('_', ' ')}) in space {tbss.space}",
            metadata=meta, write_sidecar=ext != ".png", **kwargs, **common),
            name=f"ds_{key}", run_without_submitting=True)
        wf.connect(tw, f"outputnode.{key}", sink, "in_file")
        if key == "roi_tsv":
            wf.connect(sink, "out_file", outputnode, "ds_roi")
    transforms = [("affine", "affine", ".txt")]
    if tbss.registration.get("syn_iters", True):  # empty list: affine only, no SyN warp
        transforms.append(("warp", "syn", ".npz"))
    for key, desc, ext in transforms:
        name = f"{item.prefix}_from-native_to-{tbss.space}_mode-image_desc-{desc}_xfm{ext}"
        sink = pe.Node(DerivativesDataSink(
            suffix="xfm", extension=ext, out_name=name, metadata=meta,
            description=f"native-to-{tbss.space} {desc} transform (DIPY)", **common),
            name=f"ds_{key}", run_without_submitting=True)
        wf.connect(tw, f"outputnode.{key}", sink, "in_file")


def init_dmriharmony_wf(
    inputs: list[DTIInput],
    *,
    bids_dir: str | Path,
    output_dir: str | Path,
    work_dir: str | Path | None = None,
    options: ParticipantOptions | None = None,
    tbss: TBSSOptions | None = None,
    name: str = "dmriharmony_participant_wf",
) -> pe.Workflow:
    """The participant level: one :func:`init_single_input_wf` per input, side by side.

    ``output_dir`` is the derivatives root (``<out>/dmriharmony``); ``work_dir`` the Nipype
    cache (re-running with the same one reuses finished nodes).
    """
    wf = pe.Workflow(name=name)
    if work_dir is not None:
        wf.base_dir = str(work_dir)
    for item in inputs:
        wf.add_nodes([init_single_input_wf(item, bids_dir=bids_dir, output_dir=output_dir,
                                           options=options, tbss=tbss)])
    return wf
