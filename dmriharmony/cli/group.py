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

DEFAULT_HARMONIZERS = "combat,covbat,gam,meta,mixed"


class GroupUsageError(Exception):
    """A group-level option is wrong (exit 64)."""


class GroupInputError(Exception):
    """The participant derivatives the group level needs are missing (exit 66)."""


def add_group_arguments(p: argparse.ArgumentParser) -> None:
    """The group-level options."""
    g = p.add_argument_group("group level (harmonization side by side, evaluation, report)")
    g.add_argument("--harmonizers", default=DEFAULT_HARMONIZERS,
                   help="comma-separated methods: combat, covbat, gam (data harmonizers) and "
                        f"meta, mixed (effect estimators); default {DEFAULT_HARMONIZERS}")
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
    g.add_argument("--level", choices=["roi"], default="roi",
                   help="what is harmonized: the ENIGMA ROI table (roi)")
    g.add_argument("--apply-model", type=Path, default=None, metavar="GROUP_DIR",
                   help="harmonize these participants with the models saved by an earlier "
                        "group run (its group/ folder, or its models/ folder) instead of "
                        "fitting new ones")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the evaluation's cross-validation folds (default 0)")
    g.add_argument("--no-report", action="store_true", help="do not write report.html")


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


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
            "ApplyModel": str(args.apply_model) if args.apply_model else None}


def _install(staging: Path, group_dir: Path) -> list[Path]:
    """Move every file of ``staging`` to the same place under ``group_dir`` (atomic renames)."""
    moved = []
    for src in sorted(p for p in staging.rglob("*") if p.is_file()):
        dst = group_dir / src.relative_to(staging)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        moved.append(dst)
    return moved


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


def run_group(args: argparse.Namespace, *, plugin: str, plugin_args: dict,
              configure_execution) -> tuple[int, str]:
    """Build and run the group workflow; install its outputs. Returns (0, message)."""
    from dmriharmony.errors import HarmonizationError
    from dmriharmony.group.harmonize import check_harmonizers
    from dmriharmony.workflows.group import init_group_wf

    bids_dir = args.bids_dir.resolve()
    output_dir = args.output_dir.resolve()
    deriv = output_dir / "dmriharmony"
    work_dir = (args.work_dir or output_dir / "work").resolve()
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
    wf = init_group_wf(harmonizers=names, covariates=covariates, effect=args.effect,
                       metrics=features, ref_site=args.reference_site, seed=args.seed,
                       evaluate=models is None, report=not args.no_report,
                       options=options, name="dmriharmony_group_wf")
    wf.base_dir = str(work_dir)
    wf.inputs.inputnode.roi_files = [str(p) for p in rows]
    wf.inputs.inputnode.participants_tsv = str(participants)
    wf.inputs.inputnode.site_table = str(site_table)
    wf.inputs.inputnode.deriv_dir = str(deriv)
    if models is not None:
        wf.inputs.inputnode.apply_models_dir = str(models)
    if args.rois:
        wf.get_node("harmonize").inputs.rois = _split(args.rois)
    configure_execution(wf)
    t0 = time.perf_counter()
    graph = wf.run(plugin=plugin, plugin_args=plugin_args)
    results = {n.name: n.result.outputs for n in graph.nodes()}
    LOGGER.info("group workflow ran in %.1f s", time.perf_counter() - t0)

    group_dir = deriv / "group"
    group_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".group-", dir=deriv))
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
        _sidecars(staging, options, [str(participants), str(site_table),
                                     f"{len(rows)} ROI rows under {deriv}"])
        _install(staging, group_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for n in notes:
        LOGGER.warning("%s", n)
    msg = f"dmriharmony: group level done: outputs in {group_dir}"
    if "report" in results:
        msg += f"\ndmriharmony: report: {group_dir / 'report.html'}"
    return 0, msg
