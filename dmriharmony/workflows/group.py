"""The group level as a Nipype graph (nipreps-style ``init_*_wf`` factory).

::

    inputnode(roi_files, participants_tsv, site_table, deriv_dir, apply_models_dir)
      -> roi_table (ROITable: the ROI rows joined with participants.tsv and the sites)
      -> harmonize (GroupHarmonize: harmonizers and effect estimators side by side, models,
                    evaluation)
      -> report (GroupReport: report.html)
      -> outputnode(roi_table, group_dir, evaluation_file, summary_file, notes_file, report)

``roi_files`` is a list: in the BIDS App it is every ROI row of the participant derivatives; in
a user's graph it is the output of a JoinNode over the participant iterable (see the README,
"Embedding"), e.g.::

    join = pe.JoinNode(niu.IdentityInterface(fields=["roi_files"]), joinsource="subjects",
                       joinfield=["roi_files"], name="join_rois")
    wf.connect(tbss_wf, "outputnode.roi_tsv", join, "roi_files")
    wf.connect(join, "roi_files", group_wf, "inputnode.roi_files")
"""

from __future__ import annotations

import os
from collections.abc import Sequence

os.environ.setdefault("NIPYPE_NO_ET", "1")  # no version check over the network

from nipype.interfaces import utility as niu  # noqa: E402
from nipype.pipeline import engine as pe  # noqa: E402

from dmriharmony.interfaces.group import GroupHarmonize, GroupReport  # noqa: E402
from dmriharmony.interfaces.tbss import ROITable  # noqa: E402

__all__ = ["GROUP_OUTPUTS", "init_group_maps_wf", "init_group_wf"]

GROUP_OUTPUTS = ["roi_table", "group_dir", "evaluation_file", "summary_file", "notes_file",
                 "report"]


def init_group_wf(
    *,
    harmonizers: Sequence[str] = ("combat", "covbat", "gam", "meta", "mixed"),
    covariates: Sequence[str] = ("age", "sex"),
    effect: str = "dx",
    metrics: Sequence[str] = ("fa", "md"),
    ref_site: str | None = None,
    seed: int = 0,
    evaluate: bool = True,
    report: bool = True,
    options: dict | None = None,
    vae_options: dict | None = None,
    rish_options: dict | None = None,
    name: str = "group_wf",
) -> pe.Workflow:
    """ROI-table group level: join the runs, harmonize side by side, evaluate, report.

    Parameters
    ----------
    harmonizers : sequence of str
        Data harmonizers (``combat``, ``covbat``, ``gam``) and effect estimators (``meta``,
        ``mixed``); see :mod:`dmriharmony.group.harmonize`.
    covariates, effect : biological covariates and the effect of interest (all protected).
    metrics : ROI-table metrics to harmonize (``fa``, ``md``, ``ad``, ``rd``).
    ref_site : optional reference site (ComBat, ComBat-GAM).
    seed : seed of the evaluation's cross-validation folds.
    evaluate, report : write the evaluation table / report.html.
    options : shown in the report's options table.
    vae_options : :class:`~dmriharmony.interfaces.group.VAEStudy` inputs (``target_site``,
        ``mode``, ``device``, ``voxels_per_run``, ``conversion``, ``vae_resynthesis``).
    rish_options : :class:`~dmriharmony.interfaces.group.RISHStudy` inputs (``covariates``:
        the columns the site templates are adjusted for, default none; ``template_subjects``:
        the subjects the templates are built from, e.g. ``dx=0``; ``smoothing``: ``tissue``
        (default, scale maps smoothed within tissue and free-water-like voxels separately) or
        ``mask`` (one smoothing over the brain mask); ``resynthesis``: ``residual`` (default)
        or ``projection``, :func:`dmriharmony.harmonizers.rish.harmonize_dwi`;
        ``bvalue_mapping``: ``none`` (default) or ``mono-exponential``).
    name : workflow name.

    Inputs (``inputnode``)
    ----------------------
    roi_files : per-run ROI TSVs; participants_tsv; site_table (optional); deriv_dir : the
    derivatives root (per-run QC for the report, optional); apply_models_dir : apply saved
    models instead of fitting (optional); bids_dir, template_source, template_dir : the raw
    DWI and the participant level's template, for ``rish`` and ``vae`` (they re-synthesise the
    DWI: nodes ``rish`` / ``vae``, :class:`~dmriharmony.interfaces.group.RISHStudy`,
    :class:`~dmriharmony.interfaces.group.VAEStudy`).

    Outputs (``outputnode``)
    ------------------------
    roi_table, group_dir (every group output), evaluation_file, summary_file, notes_file,
    report.
    """
    from dmriharmony.group.harmonize import check_harmonizers

    names = check_harmonizers(list(harmonizers))  # fail at graph-building time
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(
        fields=["roi_files", "participants_tsv", "site_table", "deriv_dir",
                "apply_models_dir", "bids_dir", "template_source", "template_dir"]),
        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=GROUP_OUTPUTS), name="outputnode")

    table = pe.Node(ROITable(), name="roi_table")
    harm = pe.Node(GroupHarmonize(harmonizers=names, covariates=list(covariates), effect=effect,
                                  metrics=list(metrics), seed=seed, evaluate=evaluate),
                   name="harmonize")
    if ref_site is not None:
        harm.inputs.ref_site = str(ref_site)
    wf.connect([
        (inputnode, table, [("roi_files", "roi_files"), ("participants_tsv", "participants_tsv"),
                            ("site_table", "site_table")]),
        (inputnode, harm, [("apply_models_dir", "apply_models_dir")]),
        (table, harm, [("roi_table", "roi_table")]),
        (table, outputnode, [("roi_table", "roi_table")]),
        (harm, outputnode, [("out_dir", "group_dir"), ("evaluation_file", "evaluation_file"),
                            ("summary_file", "summary_file"), ("notes_file", "notes_file")]),
    ])
    signal = [n for n in ("rish", "vae") if n in names]
    if signal:
        publish = pe.Node(niu.Merge(len(signal)), name="signal_tables")
        wf.connect(publish, "out", harm, "publish_dirs")
    if "rish" in names:
        from dmriharmony.interfaces.group import RISHStudy

        rish_inputs = dict(rish_options or {})
        rish = pe.Node(RISHStudy(**{k: v for k, v in rish_inputs.items() if v is not None}),
                       name="rish")
        if ref_site is not None:
            rish.inputs.reference_site = str(ref_site)
        wf.connect([
            (inputnode, rish, [("bids_dir", "bids_dir"), ("deriv_dir", "deriv_dir"),
                               ("participants_tsv", "participants_tsv"),
                               ("template_source", "template_source"),
                               ("template_dir", "template_dir")]),
            (rish, harm, [("roi_table", "rish_table")]),
            (rish, publish, [("publish_dir", f"in{signal.index('rish') + 1}")]),
        ])
    if "vae" in names:
        from dmriharmony.interfaces.group import VAEStudy

        vae = pe.Node(VAEStudy(seed=seed, **(vae_options or {})), name="vae")
        wf.connect([
            (inputnode, vae, [("bids_dir", "bids_dir"), ("deriv_dir", "deriv_dir"),
                              ("participants_tsv", "participants_tsv"),
                              ("template_source", "template_source"),
                              ("template_dir", "template_dir")]),
            (vae, harm, [("roi_table", "vae_table")]),
            (vae, publish, [("publish_dir", f"in{signal.index('vae') + 1}")]),
        ])
    if report:
        rep = pe.Node(GroupReport(harmonizers=names, effect=effect), name="report")
        if options:
            rep.inputs.options = {str(k): str(v) for k, v in options.items()}
        wf.connect([
            (harm, rep, [("out_dir", "group_dir"), ("notes_file", "notes_file")]),
            (table, rep, [("roi_table", "roi_table")]),
            (inputnode, rep, [("deriv_dir", "deriv_dir")]),
            (rep, outputnode, [("out_report", "report")]),
        ])
    return wf


def init_group_maps_wf(
    *,
    covariates: Sequence[str],
    traveling: bool = False,
    chunk_size: int = 8192,
    ref_site: str | None = None,
    name: str = "group_maps_wf",
) -> pe.Workflow:
    """Voxel or skeleton ComBat of one metric's template-space maps (out of core, chunked).

    ::

        inputnode -> voxel_combat_wf (MapNodes over voxel chunks) -> outputnode.train_files
                                     -> apply_traveling (ApplyVoxelComBat) -> traveling_files
                                     -> traveling_eval (TravelingMapsEvaluation) -> evaluation

    Parameters
    ----------
    covariates : columns of the covariates TSVs protected by ComBat (the effect included).
    traveling : whether traveling subjects' maps are given (harmonized with the fitted model
        and scored by their between-site RMSE).
    chunk_size : voxels per MapNode iteration.
    ref_site : optional ComBat reference site.

    Inputs (``inputnode``)
    ----------------------
    train_files, train_sites, train_covariates_tsv : the fit set; mask_file;
    trav_files, trav_sites, trav_subjects, trav_covariates_tsv : traveling subjects' maps.

    Outputs (``outputnode``)
    ------------------------
    train_files, traveling_files (harmonized), model_file, evaluation (traveling TSV).
    """
    from dmriharmony.interfaces.group import TravelingMapsEvaluation
    from dmriharmony.interfaces.voxel_combat import ApplyVoxelComBat
    from dmriharmony.workflows.voxel_combat import init_voxel_combat_wf

    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=[
        "train_files", "train_sites", "train_covariates_tsv", "mask_file", "trav_files",
        "trav_sites", "trav_subjects", "trav_covariates_tsv", "metric"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=[
        "train_files", "traveling_files", "model_file", "evaluation"]), name="outputnode")
    combat = init_voxel_combat_wf(name="voxel_combat_wf", chunk_size=chunk_size,
                                  ref_site=ref_site)
    combat.inputs.inputnode.covariates = list(covariates)
    wf.connect([
        (inputnode, combat, [("train_files", "inputnode.in_files"),
                             ("train_sites", "inputnode.sites"),
                             ("train_covariates_tsv", "inputnode.covariates_tsv"),
                             ("mask_file", "inputnode.mask_file")]),
        (combat, outputnode, [("outputnode.out_files", "train_files"),
                              ("outputnode.model_file", "model_file")]),
    ])
    if traveling:
        apply = pe.Node(ApplyVoxelComBat(covariates=list(covariates)), name="apply_traveling")
        ev = pe.Node(TravelingMapsEvaluation(), name="traveling_eval")
        wf.connect([
            (combat, apply, [("outputnode.model_file", "model_file")]),
            (inputnode, apply, [("trav_files", "in_files"), ("trav_sites", "sites"),
                                ("trav_covariates_tsv", "covariates_file")]),
            (apply, outputnode, [("out_files", "traveling_files")]),
            (inputnode, ev, [("trav_files", "before_files"), ("trav_subjects", "subjects"),
                             ("trav_sites", "sites"), ("mask_file", "mask_file"),
                             ("metric", "metric")]),
            (apply, ev, [("out_files", "after_files")]),
            (ev, outputnode, [("out_file", "evaluation")]),
        ])
    return wf
