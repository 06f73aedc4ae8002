"""Nipype workflows of the ENIGMA-style TBSS step (nipreps-style ``init_*_wf`` factories).

* :func:`init_tbss_wf` -- one DWI run: template preparation, registration, MD/AD/RD carried
  with the FA transforms, skeleton projection, ROI row, QC. Embeddable: connect native-space
  ``fa``/``md``/``ad``/``rd`` and the entity ``prefix`` to its ``inputnode``.
* :func:`init_tbss_group_wf` -- group ``roi_table.tsv`` (joined with participants.tsv and the
  site table) and 4-D skeletonised images.
* :func:`init_study_template_wf` -- the study-specific template from the cohort's FA (a
  JoinNode when ``joinsource`` is given), for the ``study`` template source.
* :func:`init_study_tbss_wf` -- the whole study-template route on lists of runs: template, then
  every run through TBSS (MapNode), then the group table.
"""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from dmriharmony.interfaces.tbss import (
    MergeSkeletons,
    PrepareTemplate,
    ROITable,
    StudyTemplate,
    TBSSRun,
)

RUN_OUTPUTS = ["warped_fa", "warped_md", "warped_ad", "warped_rd", "skeleton_fa",
               "skeleton_md", "skeleton_ad", "skeleton_rd", "roi_tsv", "qc_tsv", "qc_png",
               "affine", "warp"]


def _set_registration(node: pe.Node, registration: dict | None) -> None:
    for key, value in (registration or {}).items():
        setattr(node.inputs, key, value)


def init_tbss_wf(
    name: str = "tbss_wf",
    template_source: str = "phantom",
    template_dir: str | None = None,
    registration: dict | None = None,
    omp_nthreads: int = 1,
) -> pe.Workflow:
    """TBSS for one run.

    Parameters
    ----------
    name : str
    template_source : str
        ``phantom``, ``enigma`` (with ``template_dir``) or ``folder``. For the ``study`` source
        connect the study template folder to ``inputnode.template_dir`` and use ``folder``.
    template_dir : str, optional
        ENIGMA or dmriharmony template folder.
    registration : dict, optional
        RegistrationConfig fields (``affine_iters``, ``affine_factors``, ``affine_sigmas``,
        ``syn_iters``, ``seed``).

    Inputs (``inputnode``)
    ----------------------
    fa, md, ad, rd : native-space maps (md/ad/rd optional); prefix : BIDS entity prefix;
    subject, session, run : labels; template_dir : overrides the factory's.

    Outputs (``outputnode``)
    ------------------------
    warped_* , skeleton_*, roi_tsv, qc_tsv, qc_png, affine, warp, template_dir.
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(
        fields=["fa", "md", "ad", "rd", "prefix", "subject", "session", "run",
                "template_dir"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=RUN_OUTPUTS + ["template_dir"]),
                         name="outputnode")
    prepare = pe.Node(PrepareTemplate(source=template_source), name="prepare_template")
    if template_dir is not None:
        inputnode.inputs.template_dir = str(template_dir)
    run = pe.Node(TBSSRun(omp_nthreads=omp_nthreads), name="tbss_run", n_procs=omp_nthreads)
    _set_registration(run, registration)
    wf.connect([
        (inputnode, prepare, [("template_dir", "template_dir")]),
        (prepare, run, [("template_dir", "template_dir")]),
        (inputnode, run, [("fa", "fa"), ("md", "md"), ("ad", "ad"), ("rd", "rd"),
                          ("prefix", "prefix"), ("subject", "subject"),
                          ("session", "session"), ("run", "run")]),
        (run, outputnode, [(k, k) for k in RUN_OUTPUTS]),
        (prepare, outputnode, [("template_dir", "template_dir")]),
    ])
    return wf


def init_tbss_group_wf(name: str = "tbss_group_wf") -> pe.Workflow:
    """Group step: ``roi_table.tsv`` and the 4-D skeletonised FA.

    Inputs: ``roi_files`` (list), ``skeleton_fa`` (list), ``participants_tsv``, ``site_table``.
    Outputs: ``roi_table``, ``all_fa_skeletonised``.
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(
        fields=["roi_files", "skeleton_fa", "participants_tsv", "site_table"]),
        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["roi_table", "all_fa_skeletonised"]),
                         name="outputnode")
    table = pe.Node(ROITable(), name="roi_table")
    merge = pe.Node(MergeSkeletons(), name="merge_skeletons")
    wf.connect([
        (inputnode, table, [("roi_files", "roi_files"), ("participants_tsv", "participants_tsv"),
                            ("site_table", "site_table")]),
        (inputnode, merge, [("skeleton_fa", "in_files")]),
        (table, outputnode, [("roi_table", "roi_table")]),
        (merge, outputnode, [("out_file", "all_fa_skeletonised")]),
    ])
    return wf


def init_study_template_wf(
    name: str = "study_template_wf",
    space: str = "MNI152NLin6Asym",
    resolution: int = 2,
    n_iterations: int = 2,
    joinsource: str | None = None,
    registration: dict | None = None,
) -> pe.Workflow:
    """Study-specific FA template from the cohort (TBSS's study-target route).

    With ``joinsource`` (the name of an iterable node of the enclosing workflow) the template
    node is a JoinNode collecting ``inputnode.fa`` over that iterable; otherwise ``fa_files``
    takes a list. Output: ``template_dir`` (a dmriharmony template folder).
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["fa_files", "labels", "label_table"]),
                        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["template_dir"]), name="outputnode")
    iface = StudyTemplate(space=space, resolution=resolution, n_iterations=n_iterations)
    if joinsource is not None:
        node = pe.JoinNode(iface, joinsource=joinsource, joinfield=["fa_files"],
                           name="study_template")
    else:
        node = pe.Node(iface, name="study_template")
    _set_registration(node, registration)
    wf.connect([
        (inputnode, node, [("fa_files", "fa_files"), ("labels", "labels"),
                           ("label_table", "label_table")]),
        (node, outputnode, [("template_dir", "template_dir")]),
    ])
    return wf


def init_study_tbss_wf(
    name: str = "study_tbss_wf",
    space: str = "MNI152NLin6Asym",
    resolution: int = 2,
    n_iterations: int = 2,
    registration: dict | None = None,
) -> pe.Workflow:
    """Study-template route on lists of runs: template -> TBSS per run (MapNode) -> group.

    Inputs: ``fa``, ``md``, ``ad``, ``rd``, ``prefix``, ``subject``, ``session``, ``run``
    (lists of equal length; use ``""`` for absent session/run), ``labels``, ``label_table``,
    ``participants_tsv``, ``site_table``.
    Outputs: ``template_dir``, ``roi_table``, ``all_fa_skeletonised`` and the per-run lists.
    """
    wf = pe.Workflow(name=name)
    fields = ["fa", "md", "ad", "rd", "prefix", "subject", "session", "run"]
    inputnode = pe.Node(niu.IdentityInterface(
        fields=fields + ["labels", "label_table", "participants_tsv", "site_table"]),
        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(
        fields=["template_dir", "roi_table", "all_fa_skeletonised"] + RUN_OUTPUTS),
        name="outputnode")
    tpl = init_study_template_wf(space=space, resolution=resolution,
                                 n_iterations=n_iterations, registration=registration)
    runs = pe.MapNode(TBSSRun(), iterfield=fields, name="tbss_run")
    _set_registration(runs, registration)
    group = init_tbss_group_wf()
    wf.connect([
        (inputnode, tpl, [("fa", "inputnode.fa_files"), ("labels", "inputnode.labels"),
                          ("label_table", "inputnode.label_table")]),
        (tpl, runs, [("outputnode.template_dir", "template_dir")]),
        (inputnode, runs, [(f, f) for f in fields]),
        (runs, group, [("roi_tsv", "inputnode.roi_files"),
                       ("skeleton_fa", "inputnode.skeleton_fa")]),
        (inputnode, group, [("participants_tsv", "inputnode.participants_tsv"),
                            ("site_table", "inputnode.site_table")]),
        (tpl, outputnode, [("outputnode.template_dir", "template_dir")]),
        (group, outputnode, [("outputnode.roi_table", "roi_table"),
                             ("outputnode.all_fa_skeletonised", "all_fa_skeletonised")]),
        (runs, outputnode, [(k, k) for k in RUN_OUTPUTS]),
    ])
    return wf
