"""The BIDS App's group level: ``dmriharmony bids_dir output_dir group --harmonizers ...``.

Reads the participant derivatives in ``output_dir/dmriharmony`` (the per-run ROI rows, the site
table, per-run QC) and ``participants.tsv``, runs :func:`dmriharmony.workflows.group.
init_group_wf` in the work folder (finished nodes are reused on re-runs), and installs its
outputs into ``output_dir/dmriharmony/group/``: everything is first copied into a temporary
folder next to it, every TSV gets its provenance sidecar, then each file is moved into place
with :func:`os.replace` — a failed run leaves the previous outputs as they were.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

LOGGER = logging.getLogger("dmriharmony")

DEFAULT_HARMONIZERS = "combat,covbat,gam,meta,mixed"  # rish, vae on request: they redo the DWI


class GroupUsageError(Exception):
    """A group-level option is wrong (exit 64)."""


class GroupInputError(Exception):
    """The participant derivatives the group level needs are missing (exit 66)."""


def add_group_arguments(p: argparse.ArgumentParser) -> None:
    """The group-level options."""
    g = p.add_argument_group("group level (harmonization side by side, evaluation, report)")
    g.add_argument("--harmonizers", default=DEFAULT_HARMONIZERS,
                   help="comma-separated methods: combat, covbat, gam (data harmonizers), "
                        "meta, mixed (effect estimators), rish and vae (re-synthesise every "
                        f"run's DWI; need the raw data); default {DEFAULT_HARMONIZERS}")
    g.add_argument("--covariates", default="age,sex",
                   help="comma-separated participants.tsv columns protected by the "
                        "harmonizers (default age,sex; '' for none)")
    g.add_argument("--effect", default="dx",
                   help="effect of interest (participants.tsv column), protected and scored")
    g.add_argument("--reference-site", default=None,
                   help="reference site: its data are left unchanged (ComBat, ComBat-GAM)")
    g.add_argument("--features", "--metrics", dest="features", default="fa,md",
                   help="comma-separated maps to harmonize (fa, md, ad, rd; default fa,md)")
    g.add_argument("--rois", default=None,
                   help="comma-separated ROI columns (default: every ROI of the table)")
    g.add_argument("--level", choices=["roi", "skeleton", "voxel"], default="roi",
                   help="what is harmonized: the ENIGMA ROI table (roi, every method), the "
                        "TBSS skeleton voxels or every template-brain voxel (skeleton, voxel: "
                        "out-of-core voxel ComBat, chunked MapNodes; --harmonizers combat)")
    g.add_argument("--chunk-size", type=int, default=8192,
                   help="voxels per chunk of the voxel/skeleton ComBat (default 8192)")
    g.add_argument("--apply-model", type=Path, default=None, metavar="GROUP_DIR",
                   help="harmonize these participants with the models saved by an earlier "
                        "group run (its group/ folder, or its models/ folder) instead of "
                        "fitting new ones")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the evaluation's cross-validation folds (default 0)")
    g.add_argument("--no-report", action="store_true", help="do not write report.html")
    r = p.add_argument_group("RISH (--harmonizers rish; Mirzaalian et al. 2016)")
    r.add_argument("--rish-covariates", default="none",
                   help="participants.tsv columns the RISH site templates are adjusted for "
                        "(site means at the pooled covariates); 'group': --covariates and "
                        "--effect; default 'none': plain site means, as published (for "
                        "matched groups)")
    r.add_argument("--rish-template-subjects", default=None, metavar="COLUMN=VALUE[,VALUE]",
                   help="only these participants build the RISH site templates, e.g. dx=0 "
                        "(matched controls); default: every non-traveling participant")
    r.add_argument("--rish-smoothing", choices=["tissue", "mask"], default="tissue",
                   help="smooth the 4 mm scale maps within tissue and free-water-like voxels "
                        "separately (default 'tissue', so CSF scales do not leak into white "
                        "matter) or over the whole brain mask ('mask')")
    r.add_argument("--rish-resynthesis", choices=["residual", "projection"], default="residual",
                   help="how the scaled SH signal becomes DWI: 'residual' (default) adds the "
                        "change of the fitted signal to the measured DWI, so that what a "
                        "low-order fit of few directions cannot hold is kept; 'projection' "
                        "writes the scaled SH signal itself, as published")
    r.add_argument("--rish-bvalue-mapping", choices=["mono-exponential", "none"],
                   default="none",
                   help="'mono-exponential': map each shell matched to a reference shell of "
                        "another b-value (e.g. b=800 against 1000) onto it before the RISH "
                        "features and the scaling (Cetin Karayumak et al. 2019); 'none' "
                        "(default): the scaling alone takes the shell to the reference b-value")
    v = p.add_argument_group("VAE (--harmonizers vae; Moyer et al. 2020)")
    v.add_argument("--vae-target-site", default=None,
                   help="decode every run with this site's code (default: the site-average "
                        "code)")
    v.add_argument("--vae-mode", choices=["site_adversary", "moyer"], default="site_adversary",
                   help="moyer: mutual-information bound and decoder adversary as published; "
                        "site_adversary (default): plus a latent site classifier the encoder "
                        "is trained to defeat")
    v.add_argument("--vae-conversion", choices=["decode", "residual"], default="decode",
                   help="decode (default, Moyer et al.): write the decoded signal D(z, target); "
                        "residual: the measured signal plus the decoder's change of site, "
                        "x + D(z, target) - D(z, source), which keeps each scan's own detail")
    v.add_argument("--vae-resynthesis", choices=["projection", "residual"],
                   default="projection",
                   help="residual conversions: write the harmonized SH signal on the run's "
                        "directions (default 'projection': every run refitted from the same "
                        "common representation) or the measured shell plus the change of its "
                        "SH signal ('residual')")
    v.add_argument("--vae-voxels-per-run", type=int, default=4000,
                   help="training voxels sampled per run (default 4000)")
    v.add_argument("--device", default="cpu",
                   help="torch device of the VAE: cpu (default), cuda, cuda:N or auto")


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _rish_covariates(args: argparse.Namespace) -> list[str]:
    """``--rish-covariates``: 'none' (default) none; 'group': the protected covariates and
    the effect; else the columns given."""
    text = (args.rish_covariates or "none").strip().lower()
    if text in ("none", ""):
        return []
    if text == "group":
        return [c for c in _split(args.covariates) if c != args.effect] + [args.effect]
    return _split(args.rish_covariates)


def _models_dir(path: Path) -> Path:
    """``--apply-model``: a group folder (with ``models/``) or a models folder itself."""
    path = path.resolve()
    for cand in (path / "models", path / "dmriharmony" / "group" / "models", path):
        if cand.is_dir() and any(cand.glob("*/*_model.npz")):
            return cand
    raise GroupInputError(f"{path}: no saved models (<harmonizer>/<metric>_model.npz) here or "
                          "in its models/ folder; give the group/ folder of an earlier run")


def group_options(args: argparse.Namespace) -> dict:
    """The options recorded in the sidecars and shown in the report."""
    return {"Harmonizers": _split(args.harmonizers), "Covariates": _split(args.covariates),
            "Effect": args.effect, "ReferenceSite": args.reference_site,
            "Features": _split(args.features), "ROIs": _split(args.rois) or "all",
            "Level": args.level, "Seed": args.seed,
            "ApplyModel": str(args.apply_model) if args.apply_model else None,
            **({"RISH": {"Covariates": _rish_covariates(args),
                         "TemplateSubjects": args.rish_template_subjects or "all",
                         "Smoothing": args.rish_smoothing,
                         "Resynthesis": args.rish_resynthesis,
                         "BValueMapping": args.rish_bvalue_mapping}}
               if "rish" in _split(args.harmonizers) else {}),
            **({"VAE": {"Mode": args.vae_mode, "TargetSite": args.vae_target_site or
                        "site average", "VoxelsPerRun": args.vae_voxels_per_run,
                        "Conversion": args.vae_conversion,
                        "Resynthesis": args.vae_resynthesis,
                        "Device": args.device}}
               if "vae" in _split(args.harmonizers) else {})}


def _install(staging: Path, group_dir: Path) -> list[Path]:
    """Move every file of ``staging`` to the same place under ``group_dir`` (atomic renames)."""
    moved = []
    for src in sorted(p for p in staging.rglob("*") if p.is_file()):
        dst = group_dir / src.relative_to(staging)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        moved.append(dst)
    return moved


#: ROI-level group outputs that a new ROI-level run replaces (others, e.g. the voxel level's,
#: stay): a method run before but not now must not look current.
_ROI_LEVEL_OUTPUTS = ("roi_table_desc-*", "effects_desc-*", "site_effects_desc-*",
                      "evaluation.*", "evaluation_summary.*", "evaluation_desc-rish.*",
                      "evaluation_desc-vae.*", "rish_runs.*", "vae_runs.*",
                      "vae_latent_site_accuracy.*", "report.*")


def _remove_stale(group_dir: Path, staging: Path) -> None:
    """Delete ROI-level outputs of earlier runs that this run does not write, and the ROI-level
    model folders (this run's are installed next)."""
    for pattern in _ROI_LEVEL_OUTPUTS:
        for f in group_dir.glob(pattern):
            if f.is_file() and not (staging / f.name).exists():
                f.unlink()
    models = group_dir / "models"
    if models.is_dir():
        for sub in models.iterdir():  # replaced or dropped; the voxel/skeleton levels' stay
            if sub.is_dir() and sub.name in ("combat", "covbat", "gam", "rish", "vae"):
                shutil.rmtree(sub)


def _sidecars(staging: Path, options: dict, sources: list[str]) -> None:
    """A provenance JSON next to every table and model of the group outputs."""
    from dmriharmony import __version__
    from dmriharmony.bids.derivatives import tool_versions

    descriptions = {
        "roi_table": "ROI table of all runs (participant level), joined with participants.tsv "
                     "and the site table",
        "evaluation": "evaluation of every method (site prediction, effect sizes, "
                      "traveling-subject agreement), one row per measure",
        "evaluation_summary": "evaluation summary: one row per method and map",
        "site_effects_desc-meta": "per-site effect sizes (Cohen's d) of the meta-analysis",
    }
    for f in sorted(staging.rglob("*")):
        if f.suffix not in (".tsv", ".html", ".npz"):
            continue
        stem = f.name.split(".")[0]
        if stem.startswith("roi_table_desc-"):
            desc = f"ROI table harmonized with {stem.split('-', 1)[1]}"
        elif stem.startswith("effects_desc-"):
            desc = f"effect estimates per ROI, method {stem.split('-', 1)[1]}"
        elif f.suffix == ".npz":
            desc = f"saved {f.parent.name} model for {stem.split('_')[0]}"
        elif f.suffix == ".html":
            desc = "group report"
        else:
            desc = descriptions.get(stem, stem)
        meta = {"Description": desc, "Sources": sources,
                "GeneratedBy": {"Name": "dmriharmony", "Version": __version__,
                                "AnalysisLevel": "group"},
                "ToolVersions": tool_versions(), "Options": options}
        side = f.with_name(f"{stem}.json") if f.suffix != ".npz" else \
            f.with_name(f"{stem}_provenance.json")
        if side.exists() and f.suffix == ".npz":
            continue
        side.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")


_SIGNAL_HARMONIZERS = {"rish": "RISH (Mirzaalian et al. 2016)",
                       "vae": "site-adversarial conditional VAE (Moyer et al. 2020)"}


def _stage_map(src: Path, final: Path, staging_root: Path, options: dict,
               method: str) -> None:
    """Copy a harmonized per-run map into the staging tree (same place as ``final`` under the
    derivatives root) with its provenance sidecar."""
    from dmriharmony.bids.derivatives import provenance

    rel = final.relative_to(staging_root.parent)  # the staging folder is in the derivatives
    dst = staging_root / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)
    meta = provenance(sources=[str(final).replace(f"_desc-{method}", "")],
                      description=f"map refitted after {method.upper()} harmonization of the DWI",
                      extra={"Options": options, "Harmonizer": _SIGNAL_HARMONIZERS[method]})
    dst.with_name(dst.name.replace(".nii.gz", ".json")).write_text(
        json.dumps(meta, indent=2) + "\n")


def run_group(args: argparse.Namespace, *, plugin: str, plugin_args: dict,
              configure_execution) -> tuple[int, str]:
    """Build and run the group workflow; install its outputs. Returns (0, message)."""
    from dmriharmony.errors import HarmonizationError
    from dmriharmony.group.harmonize import check_harmonizers
    from dmriharmony.group.rish import parse_subject_selection
    from dmriharmony.workflows.group import init_group_wf

    bids_dir = args.bids_dir.resolve()
    output_dir = args.output_dir.resolve()
    deriv = output_dir / "dmriharmony"
    work_dir = (args.work_dir or output_dir / "work").resolve()
    if args.level != "roi":
        given = [h.lower() for h in _split(args.harmonizers)]
        if args.harmonizers == DEFAULT_HARMONIZERS:
            given = ["combat"]
        if given != ["combat"]:
            raise GroupUsageError(f"--level {args.level} harmonizes maps with the out-of-core "
                                  f"voxel ComBat only: use --harmonizers combat (got "
                                  f"{','.join(given)}); the other methods work on the ROI "
                                  "table (--level roi)")
        if args.apply_model is not None:
            raise GroupUsageError(f"--apply-model works at --level roi; at --level "
                                  f"{args.level} apply a saved map model with "
                                  "dmriharmony.harmonizers.VoxelComBat.load(...).transform_maps")
        return run_group_maps(args, plugin=plugin, plugin_args=plugin_args,
                              configure_execution=configure_execution)
    try:
        names = check_harmonizers(_split(args.harmonizers))
    except HarmonizationError as exc:
        raise GroupUsageError(f"--harmonizers: {exc}") from None
    features = [f.lower() for f in _split(args.features)]
    if not features:
        raise GroupUsageError("--features: give at least one map (fa, md, ad, rd)")
    if not args.effect:
        raise GroupUsageError("--effect: give the participants.tsv column of the effect")
    covariates = _split(args.covariates)
    if args.effect in covariates:
        covariates.remove(args.effect)
    models = _models_dir(args.apply_model) if args.apply_model is not None else None
    if models is not None:
        missing = [n for n in names if n in ("combat", "covbat", "gam")
                   and not (models / n).is_dir()]
        if missing:
            raise GroupInputError(f"{models}: no saved {missing[0]} model (has "
                                  f"{', '.join(sorted(p.name for p in models.iterdir()))})")

    site_table = deriv / "site_table.tsv"
    if not site_table.is_file():
        raise GroupInputError(f"{site_table}: not found; run the participant level into "
                              f"{output_dir} first")
    rows = sorted(deriv.glob("sub-*/**/sub-*_desc-skeleton_roi.tsv"))
    if not rows:
        raise GroupInputError(f"{deriv}: no ROI rows (*_desc-skeleton_roi.tsv); run the "
                              "participant level with --template/--template-dir (TBSS) first")
    spaces = sorted({p.name.split("_space-")[1].split("_")[0] for p in rows if "_space-" in p.name})
    if len(spaces) > 1:
        raise GroupInputError(f"{deriv}: ROI rows in several template spaces ({', '.join(spaces)})"
                              "; the group level pools one space")
    participants = bids_dir / "participants.tsv"
    if not participants.is_file():
        raise GroupInputError(f"{participants}: not found; the group level needs the "
                              f"covariates ({', '.join([*covariates, args.effect])}) and sites")
    options = group_options(args)
    LOGGER.info("group level: %d ROI row(s) in space %s; methods %s", len(rows), spaces[0],
                ", ".join(names))
    vae_options = {"mode": args.vae_mode, "device": args.device,
                   "conversion": args.vae_conversion,
                   "vae_resynthesis": args.vae_resynthesis,
                   "voxels_per_run": args.vae_voxels_per_run}
    if args.vae_target_site:
        vae_options["target_site"] = args.vae_target_site
    if "rish" in names:
        try:
            parse_subject_selection(args.rish_template_subjects)
        except HarmonizationError as exc:
            raise GroupUsageError(f"--rish-template-subjects: {exc}") from None
    rish_options = {"covariates": _rish_covariates(args),
                    "template_subjects": args.rish_template_subjects,
                    "smoothing": args.rish_smoothing,
                    "resynthesis": args.rish_resynthesis,
                    "bvalue_mapping": args.rish_bvalue_mapping}
    wf = init_group_wf(harmonizers=names, covariates=covariates, effect=args.effect,
                       metrics=features, ref_site=args.reference_site, seed=args.seed,
                       evaluate=models is None, report=not args.no_report,
                       options=options, vae_options=vae_options, rish_options=rish_options,
                       name="dmriharmony_group_wf")
    wf.base_dir = str(work_dir)
    wf.inputs.inputnode.roi_files = [str(p) for p in rows]
    wf.inputs.inputnode.participants_tsv = str(participants)
    wf.inputs.inputnode.site_table = str(site_table)
    wf.inputs.inputnode.deriv_dir = str(deriv)
    if models is not None:
        wf.inputs.inputnode.apply_models_dir = str(models)
    if "rish" in names or "vae" in names:
        if models is not None:
            raise GroupUsageError("--apply-model: RISH and VAE models are applied to new DWI "
                                  "runs by re-running the group level with them; drop rish/vae")
        side = rows[0].with_name(rows[0].name.replace(".tsv", ".json"))
        tpl = json.loads(side.read_text()).get("Template", {}) if side.is_file() else {}
        wf.inputs.inputnode.bids_dir = str(bids_dir)
        wf.inputs.inputnode.template_source = tpl.get("TemplateSource") or "phantom"
        if tpl.get("TemplateDir"):
            wf.inputs.inputnode.template_dir = tpl["TemplateDir"]
    if args.rois:
        wf.get_node("harmonize").inputs.rois = _split(args.rois)
    configure_execution(wf)
    t0 = time.perf_counter()
    graph = wf.run(plugin=plugin, plugin_args=plugin_args)
    results = {n.name: n.result.outputs for n in graph.nodes()}
    LOGGER.info("group workflow ran in %.1f s", time.perf_counter() - t0)

    group_dir = deriv / "group"
    group_dir.mkdir(parents=True, exist_ok=True)
    staging_root = Path(tempfile.mkdtemp(prefix=".group-", dir=deriv))
    staging = staging_root / "group"
    staging.mkdir()
    try:
        harm_dir = Path(results["harmonize"].out_dir)
        for f in sorted(p for p in harm_dir.rglob("*") if p.is_file() and p.name != "notes.json"):
            dst = staging / f.relative_to(harm_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst)
        shutil.copy2(results["roi_table"].roi_table, staging / "roi_table.tsv")
        if "report" in results:
            shutil.copy2(results["report"].out_report, staging / "report.html")
        notes = json.loads(Path(results["harmonize"].notes_file).read_text())
        for m in ("rish", "vae"):  # signal-level harmonizers: per-run maps, model, scores
            if m not in results:
                continue
            r = results[m]
            maps = Path(r.maps_dir)
            for f in sorted(p for p in maps.rglob("*.nii.gz")):
                _stage_map(f, deriv / f.relative_to(maps), staging_root, options, m)
            mdir = staging / "models" / m
            mdir.mkdir(parents=True, exist_ok=True)
            model = Path(r.model_file)
            if model.is_dir():
                shutil.copytree(model, mdir / model.name)
            else:
                shutil.copy2(model, mdir / model.name)
            notes = [*notes, *json.loads(Path(r.notes_file).read_text())]
        _sidecars(staging, options, [str(participants), str(site_table),
                                     f"{len(rows)} ROI rows under {deriv}"])
        _remove_stale(group_dir, staging)
        _install(staging_root, deriv)
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    for n in notes:
        LOGGER.warning("%s", n)
    msg = f"dmriharmony: group level done: outputs in {group_dir}"
    if "report" in results:
        msg += f"\ndmriharmony: report: {group_dir / 'report.html'}"
    return 0, msg


def run_group_maps(args: argparse.Namespace, *, plugin: str, plugin_args: dict,
                   configure_execution) -> tuple[int, str]:
    """``--level voxel|skeleton``: voxel ComBat of the template-space maps, one sub-workflow
    per metric (:func:`dmriharmony.workflows.group.init_group_maps_wf`); harmonized maps go
    next to each run's maps (``desc-voxelcombat`` / ``desc-skeletoncombat``), the models to
    ``group/models/<level>combat/``, the traveling-subject RMSE to
    ``group/evaluation_desc-<level>.tsv``."""
    import pandas as pd
    from nipype.pipeline import engine as pe

    from dmriharmony.bids.derivatives import provenance
    from dmriharmony.group.maps import (
        OUTPUT_DESC,
        MissingMapsError,
        collect_maps,
        write_level_mask,
    )
    from dmriharmony.harmonizers._voxel_io import output_name
    from dmriharmony.workflows.group import init_group_maps_wf

    bids_dir = args.bids_dir.resolve()
    output_dir = args.output_dir.resolve()
    deriv = output_dir / "dmriharmony"
    work_dir = (args.work_dir or output_dir / "work").resolve()
    participants = bids_dir / "participants.tsv"
    if not (deriv / "site_table.tsv").is_file():
        raise GroupInputError(f"{deriv / 'site_table.tsv'}: not found; run the participant "
                              f"level into {output_dir} first")
    if not participants.is_file():
        raise GroupInputError(f"{participants}: not found; the group level needs the "
                              "covariates and sites")
    if args.chunk_size < 1:
        raise GroupUsageError("--chunk-size must be >= 1")
    covariates = [c for c in _split(args.covariates) if c != args.effect]
    covs = [*covariates, args.effect]
    features = [f.lower() for f in _split(args.features)]
    options = group_options(args)
    inputs_dir = work_dir / f"group_{args.level}_inputs"
    inputs_dir.mkdir(parents=True, exist_ok=True)
    wf = pe.Workflow(name=f"dmriharmony_group_{args.level}_wf", base_dir=str(work_dir))
    sets = {}
    for metric in features:
        try:
            maps = collect_maps(deriv, participants, metric=metric, level=args.level,
                                covariates=covariates, effect=args.effect)
        except MissingMapsError as exc:
            raise GroupInputError(str(exc)) from None
        if args.reference_site is not None and args.reference_site not in set(maps.train["site"]):
            raise GroupUsageError(f"--reference-site {args.reference_site!r} is not one of the "
                                  f"sites {', '.join(sorted(set(maps.train['site'])))}")
        sets[metric] = maps
        mask = write_level_mask(maps, inputs_dir / f"{args.level}_mask.nii.gz")
        train, trav = maps.train, maps.traveling
        train[covs].to_csv(inputs_dir / f"{metric}_train_covariates.tsv", sep="\t", index=False)
        sub = init_group_maps_wf(covariates=covs, traveling=len(trav) > 0,
                                 chunk_size=args.chunk_size, ref_site=args.reference_site,
                                 name=f"{metric}_wf")
        node = sub.get_node("inputnode")
        node.inputs.train_files = list(train["path"])
        node.inputs.train_sites = list(train["site"])
        node.inputs.train_covariates_tsv = str(inputs_dir / f"{metric}_train_covariates.tsv")
        node.inputs.mask_file = str(mask)
        node.inputs.metric = metric
        if len(trav):
            trav[covs].to_csv(inputs_dir / f"{metric}_trav_covariates.tsv", sep="\t",
                              index=False)
            node.inputs.trav_files = list(trav["path"])
            node.inputs.trav_sites = list(trav["site"])
            node.inputs.trav_subjects = list(trav["subject"])
            node.inputs.trav_covariates_tsv = str(inputs_dir / f"{metric}_trav_covariates.tsv")
        wf.add_nodes([sub])
    configure_execution(wf)
    t0 = time.perf_counter()
    graph = wf.run(plugin=plugin, plugin_args=plugin_args)
    LOGGER.info("group %s workflow ran in %.1f s", args.level, time.perf_counter() - t0)
    results = {}
    for n in graph.nodes():
        results[n.fullname.split(".", 1)[-1]] = n.result.outputs

    desc = OUTPUT_DESC[args.level]
    staging = Path(tempfile.mkdtemp(prefix=".group-", dir=deriv))
    evals = []
    try:
        for metric, maps in sets.items():
            written = results[f"{metric}_wf.voxel_combat_wf.write_maps"].out_files
            pairs = list(zip(maps.train["path"], written, strict=True))
            if len(maps.traveling):
                applied = results[f"{metric}_wf.apply_traveling"].out_files
                pairs += list(zip(maps.traveling["path"], applied, strict=True))
                evals.append(pd.read_csv(results[f"{metric}_wf.traveling_eval"].out_file,
                                         sep="\t"))
            for src, harm in pairs:
                dst = staging / Path(src).parent.relative_to(deriv) / output_name(src, desc)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(harm, dst)
                meta = provenance(sources=[src], description=f"{metric.upper()} map harmonized "
                                  f"with voxel ComBat ({args.level} level)",
                                  extra={"Options": options, "Harmonizer": "ComBat (voxelwise, "
                                         "out of core)", "Template": maps.template})
                dst.with_name(dst.name.replace(".nii.gz", ".json")).write_text(
                    json.dumps(meta, indent=2) + "\n")
            model = results[f"{metric}_wf.voxel_combat_wf.pool"].model_file
            mdst = staging / "group" / "models" / f"{args.level}combat" / \
                f"{metric}_model{''.join(Path(model).suffixes)}"
            mdst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(model, mdst)
            shutil.copy2(inputs_dir / f"{args.level}_mask.nii.gz",
                         mdst.parent / f"{args.level}_mask.nii.gz")
        if evals:
            from dmriharmony.group.harmonize import write_tsv

            write_tsv(pd.concat(evals, ignore_index=True),
                      staging / "group" / f"evaluation_desc-{args.level}.tsv")
        _sidecars(staging / "group", options, [str(participants),
                                                str(deriv / "site_table.tsv")])
        _install(staging, deriv)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    n = sum(len(m.table) for m in sets.values())
    msg = (f"dmriharmony: group level ({args.level}) done: {n} map(s) harmonized "
           f"(*_desc-{desc}_dwimap.nii.gz next to each run's maps); models in "
           f"{deriv / 'group' / 'models' / f'{args.level}combat'}")
    if evals:
        e = pd.concat(evals)
        msg += "\ndmriharmony: traveling subjects' between-site RMSE reduction: " + ", ".join(
            f"{m} {g['reduction'].mean():.0%}" for m, g in e.groupby("metric"))
    return 0, msg
