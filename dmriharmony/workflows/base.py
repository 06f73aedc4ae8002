"""Top-level participant graph: one sub-workflow per DTI input, each storing derivatives.

Built to be extended: :func:`init_single_input_wf` returns the per-input workflow whose
``outputnode`` carries the native-space ``fa``/``md``/``ad``/``rd``/``mask`` (and the stored
derivative paths as ``ds_*``), so later stages (template registration, TBSS projection)
connect to it without touching the DTI graph.
"""

from __future__ import annotations

import os

os.environ.setdefault("NIPYPE_NO_ET", "1")  # no version check over the network

from pathlib import Path  # noqa: E402

from nipype.interfaces import utility as niu  # noqa: E402
from nipype.pipeline import engine as pe  # noqa: E402

from dmriharmony.bids.runs import DTIInput  # noqa: E402
from dmriharmony.workflows.participant import (  # noqa: E402
    ParticipantOptions,
    init_dti_derivatives_wf,
    init_participant_wf,
)

#: fields of the per-input ``outputnode``.
SINGLE_OUTPUTS = ["mask", "fa", "md", "ad", "rd", "v1", "tensor", "qc_file", "fit_info",
                  "ds_fa", "ds_md", "ds_ad", "ds_rd", "ds_mask", "ds_qc"]


def init_single_input_wf(
    item: DTIInput,
    *,
    bids_dir: str | Path,
    output_dir: str | Path,
    options: ParticipantOptions | None = None,
    name: str | None = None,
) -> pe.Workflow:
    """DTI of one input (one run, or ``acq-`` runs fitted together) and its derivatives."""
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
    return wf


def init_dmriharmony_wf(
    inputs: list[DTIInput],
    *,
    bids_dir: str | Path,
    output_dir: str | Path,
    work_dir: str | Path | None = None,
    options: ParticipantOptions | None = None,
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
                                           options=options)])
    return wf
