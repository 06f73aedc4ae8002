"""The BIDS-App command line: ``dmriharmony bids_dir output_dir participant [options]``.

Exit codes follow the BIDS-Apps execution conventions: 0 success, 16 the input is not a
valid BIDS dataset (missing ``dataset_description.json``, missing ``.bval``/``.bvec``), 17
unknown analysis level, 18 the participant/session filters matched no data; otherwise the BSD
``sysexits.h`` codes: 64 usage error (never argparse's 2), 65 bad data in a DWI run (wrong
counts, no b=0, bad b-vectors, NaN, unreadable NIfTI, ...), 70 internal failure of a workflow
node, 73 an output folder cannot be created, 74 other I/O error. Failures print one line
``dmriharmony: error: <file>: <what is wrong>`` on stderr.
"""

from __future__ import annotations

import os

os.environ.setdefault("NIPYPE_NO_ET", "1")  # no version check over the network

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from dmriharmony import __version__  # noqa: E402
from dmriharmony.cli.group import (  # noqa: E402
    GroupInputError,
    GroupUsageError,
    add_group_arguments,
    run_group,
)
from dmriharmony.errors import BIDSInputError, DmriHarmonyError, TemplateError  # noqa: E402

EX_OK = 0
EX_INVALID_DATASET = 16
EX_UNKNOWN_LEVEL = 17
EX_NO_MATCH = 18
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_IOERR = 74

ANALYSIS_LEVELS = ("participant", "group")
PIPELINE_DIR = "dmriharmony"
LOGGER = logging.getLogger("dmriharmony")


class _UsageError(Exception):
    pass


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises instead of exiting with code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (BIDS-App positional arguments, then options)."""
    p = _ArgumentParser(
        prog="dmriharmony",
        description="Multi-site diffusion MRI harmonization (BIDS App). The participant level "
                    "fits DTI with DIPY, writes FA/MD/AD/RD maps as BIDS derivatives and runs "
                    "an ENIGMA-style TBSS; the group level harmonizes the ROI tables with "
                    "several methods side by side and writes an evaluation and a report.",
        epilog="Exit codes: 16 invalid dataset, 17 unknown level, 18 no data match the "
               "filters, 64 usage, 65 bad DWI data, 70 internal error, 73/74 output errors.",
    )
    p.add_argument("bids_dir", type=Path, help="root of the input BIDS dataset")
    p.add_argument("output_dir", type=Path,
                   help="output folder; derivatives go to <output_dir>/dmriharmony")
    p.add_argument("analysis_level",
                   help="'participant' (DTI, TBSS, ROI rows per run) or 'group' (harmonizers "
                        "side by side on the participant derivatives, evaluation, report)")
    p.add_argument("--version", action="version", version=f"dmriharmony {__version__}")
    g = p.add_argument_group("selection")
    g.add_argument("--participant-label", "--participant_label", dest="participant_label",
                   nargs="+", metavar="LABEL", help="subjects to process (with or without sub-)")
    g.add_argument("--session-label", "--session_label", dest="session_label", nargs="+",
                   metavar="LABEL", help="sessions to process (with or without ses-)")
    g.add_argument("--site-column", default="site",
                   help="site column of participants.tsv / sessions.tsv (default: site)")
    g.add_argument("--bids-database-dir", type=Path,
                   help="pybids index folder (default: inside the work folder)")
    g.add_argument("--reset-database", action="store_true", help="re-index the dataset")
    g.add_argument("--no-data-check", action="store_true",
                   help="validate headers and gradients only before starting (NaN/Inf and "
                        "unreadable data are then reported by the node that reads them)")
    d = p.add_argument_group("DTI")
    d.add_argument("--denoise", choices=["none", "mppca", "patch2self"], default="none")
    d.add_argument("--gibbs", action="store_true", help="remove Gibbs ringing")
    d.add_argument("--bmax", type=float, default=1500.0,
                   help="largest b-value used for DTI (default 1500)")
    d.add_argument("--b-round", type=float, default=50.0,
                   help="b-value rounding step defining shells (default 50)")
    d.add_argument("--fit-method", choices=["wls", "ols", "nlls", "restore"], default="wls")
    t = p.add_argument_group("TBSS (ENIGMA-style skeleton and ROI table)")
    t.add_argument("--template", default=None, choices=["phantom", "enigma", "folder"],
                   help="run TBSS onto this template: the bundled phantom (for simulator "
                        "data), the ENIGMA-DTI template (--template-dir with "
                        "ENIGMA_DTI_FA.nii.gz ...) or a dmriharmony template folder (e.g. a "
                        "study template); implied by --template-dir. Without either, the "
                        "participant level stops at the DTI maps")
    t.add_argument("--template-dir", type=Path, default=None,
                   help="folder of the ENIGMA-DTI template (files from "
                        "github.com/ENIGMA-git/ENIGMA-DTI-TBSS-Protocol) or of a dmriharmony "
                        "template")
    t.add_argument("--syn-iters", type=int, nargs="+", default=None, metavar="N",
                   help="SyN iterations per level, coarse to fine (0 = affine only; "
                        "default 30 20 5)")
    add_group_arguments(p)
    r = p.add_argument_group("execution")
    r.add_argument("-w", "--work-dir", type=Path,
                   help="Nipype work folder (default <output_dir>/work); reused on re-runs")
    r.add_argument("--nprocs", "--nthreads", "--n_cpus", dest="nprocs", type=int, default=1,
                   help="parallel nodes (MultiProc)")
    r.add_argument("--omp-nthreads", type=int, default=1, help="threads within a node")
    r.add_argument("--plugin", default=None,
                   help="Nipype plugin (Linear, MultiProc, SLURM, SGE, ...); default Linear "
                        "with --nprocs 1, MultiProc otherwise")
    r.add_argument("--plugin-args", default=None,
                   help="plugin arguments as JSON text or a JSON file")
    r.add_argument("--stop-on-first-crash", action="store_true",
                   help="stop at the first failing node (default: process every other run, "
                        "then report the failures)")
    r.add_argument("-v", "--verbose", action="count", default=0)
    return p


def _plugin_args(text: str | None) -> dict:
    if not text:
        return {}
    path = Path(text)
    try:
        raw = path.read_text() if path.is_file() else text
        value = json.loads(raw)
    except (OSError, json.JSONDecodeError) as exc:
        raise _UsageError(f"--plugin-args: not JSON text or a JSON file ({exc})") from None
    if not isinstance(value, dict):
        raise _UsageError("--plugin-args: expected a JSON object")
    return value


def _crash_files(crash_dir: Path) -> set[Path]:
    """The crash files in ``crash_dir`` now (to tell the new ones after a run)."""
    return set(crash_dir.glob("crash-*")) if crash_dir.is_dir() else set()


def _new_crash_files(crash_dir: Path, before: set[Path]) -> list[Path]:
    return sorted(_crash_files(crash_dir) - before, key=lambda f: f.stat().st_mtime)


def _crash_line(crash_dir: Path, before: set[Path], exc: BaseException) -> tuple[str, bool]:
    """The root-cause line of a failed run (and whether it is a data error).

    Taken from the first Nipype crash file not in ``before``, else from the exception
    text (Nipype's Linear plugin raises the node's traceback as text).
    """
    files = _new_crash_files(crash_dir, before)
    text = files[0].read_text(errors="replace") if files else str(exc)
    where = f" (crash file {files[0]})" if files else ""
    if len(files) > 1:
        where = f" ({len(files)} nodes failed; first crash file {files[0]})"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error:" in ln or "Exception:" in ln:
            data = "BIDSInputError" in ln
            msg = ln.split("Error: ", 1)[-1] if "Error: " in ln else ln
            return f"{msg}{where}", data
    return f"a workflow node failed: {lines[-1] if lines else type(exc).__name__}{where}", False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (survives redirection in tests)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it
        pass


def _configure_logging(verbose: int) -> None:
    """dmriharmony logs at WARNING (-v INFO, -vv DEBUG); Nipype is quieter."""
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    LOGGER.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in LOGGER.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        LOGGER.addHandler(handler)
    LOGGER.propagate = False
    # Nipype's own console log: silent by default (failures are summarised in one line with
    # the crash file), warnings with -v, progress with -vv
    nipype_level = ("CRITICAL", "WARNING", "INFO")[min(verbose, 2)]
    nipype_config.update_config({"logging": {"workflow_level": nipype_level,
                                             "interface_level": nipype_level,
                                             "utils_level": nipype_level}})
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils"):
        for h in logging.getLogger(name).handlers:
            if isinstance(h, logging.StreamHandler) and h.stream is not None:
                h.setStream(sys.stdout)  # the current stdout (it may have been redirected)
    nipype_logging.update_logging(nipype_config)


def run_participant(args: argparse.Namespace) -> int:
    """Validate the inputs, build and run the participant workflow, write derivatives."""

    from dmriharmony.bids import (
        collect_dwi_runs,
        group_dti_inputs,
        load_layout,
        site_table,
        validate_inputs,
        write_dataset_description,
    )
    from dmriharmony.dti.io import atomic_write_bytes
    from dmriharmony.workflows.base import init_dmriharmony_wf
    from dmriharmony.workflows.participant import ParticipantOptions

    bids_dir = args.bids_dir.resolve()
    output_dir = args.output_dir.resolve()
    work_dir = (args.work_dir or output_dir / "work").resolve()
    if output_dir == bids_dir or bids_dir in output_dir.parents and not (
            output_dir.relative_to(bids_dir).parts[0] == "derivatives"):
        raise _UsageError(f"{output_dir}: the output folder must not be inside the BIDS "
                          "dataset (except under derivatives/)")
    if args.bmax <= 0 or args.b_round <= 0:
        raise _UsageError("--bmax and --b-round must be positive")
    plugin, plugin_args = _plugin(args)

    db_root = args.bids_database_dir or work_dir
    t0 = time.perf_counter()
    layout = load_layout(bids_dir, work_dir=db_root, reset_database=args.reset_database)
    LOGGER.info("indexed %s in %.2f s", bids_dir, time.perf_counter() - t0)
    runs = collect_dwi_runs(layout, args.participant_label, args.session_label)
    inputs = group_dti_inputs(runs)
    options = ParticipantOptions(denoise=args.denoise, gibbs=args.gibbs, bmax=args.bmax,
                                 b_round=args.b_round, fit_method=args.fit_method,
                                 omp_nthreads=args.omp_nthreads)
    validate_inputs(inputs, bmax=args.bmax, b_round=args.b_round,
                    check_values=not args.no_data_check)
    tbss = _tbss_options(args) if (args.template or args.template_dir) else None
    # the site table covers every run of the dataset, whatever the filters: parallel jobs
    # (one per participant) then write the same file
    all_runs = runs if not (args.participant_label or args.session_label) else \
        collect_dwi_runs(layout)
    table = site_table(all_runs, bids_dir, b_round=args.b_round, site_column=args.site_column)
    LOGGER.info("%d DWI run(s), %d DTI input(s), sites: %s", len(runs), len(inputs),
                ", ".join(sorted(set(table["site"]))))

    deriv = output_dir / PIPELINE_DIR
    try:
        deriv.mkdir(parents=True, exist_ok=True)
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return _fail(f"{exc.filename}: cannot create folder ({exc.strerror})", EX_CANTCREAT)
    write_dataset_description(deriv, source_dir=bids_dir)
    table_out = table.copy()
    table_out["dwi"] = [str(Path(p).relative_to(bids_dir)) for p in table_out["dwi"]]
    atomic_write_bytes(table_out.to_csv(sep="\t", index=False, na_rep="n/a").encode(),
                       deriv / "site_table.tsv")

    wf = init_dmriharmony_wf(inputs, bids_dir=bids_dir, output_dir=deriv, work_dir=work_dir,
                             options=options, tbss=tbss)
    crash_dir = work_dir / "crash"
    _configure_execution(wf, args, crash_dir)
    before = _crash_files(crash_dir)
    try:
        wf.run(plugin=plugin, plugin_args=plugin_args)
    except Exception as exc:  # noqa: BLE001 - Nipype wraps node errors in several types
        line, data_error = _crash_line(crash_dir, before, exc)
        return _fail(line, EX_DATAERR if data_error else EX_SOFTWARE)
    if tbss is not None:
        table_path = _write_group_roi_table(deriv, bids_dir, tbss.space)
        print(f"dmriharmony: ROI table of all runs so far: {table_path}")
    print(f"dmriharmony: participant level done: {len(inputs)} input(s); derivatives in {deriv}")
    return EX_OK


def _plugin(args: argparse.Namespace) -> tuple[str, dict]:
    """The Nipype plugin and its arguments (``--plugin``, ``--plugin-args``, ``--nprocs``)."""
    from nipype.pipeline import plugins as nipype_plugins

    if args.nprocs < 1 or args.omp_nthreads < 1:
        raise _UsageError("--nprocs and --omp-nthreads must be >= 1")
    plugin_args = _plugin_args(args.plugin_args)
    plugin = args.plugin or ("MultiProc" if args.nprocs > 1 else "Linear")
    if not hasattr(nipype_plugins, f"{plugin}Plugin"):
        known = sorted(n[:-6] for n in dir(nipype_plugins) if n.endswith("Plugin") and n[0] != "_")
        raise _UsageError(f"--plugin {plugin}: unknown Nipype plugin; one of {', '.join(known)}")
    args._plugin_args = plugin_args  # _configure_execution moves execution settings out
    if plugin == "MultiProc":
        plugin_args.setdefault("n_procs", args.nprocs)
        plugin_args.setdefault("raise_insufficient", False)
    if plugin in _BATCH_PLUGINS:
        # Nipype's batch plugins read $LOGNAME (absent in many containers and cron/CI jobs)
        import getpass

        try:
            os.environ.setdefault("LOGNAME", getpass.getuser())
        except (KeyError, OSError):  # no passwd entry for the uid (docker -u 12345)
            os.environ.setdefault("LOGNAME", str(os.getuid()))
    return plugin, plugin_args


#: Nipype plugins that submit each node to a batch system.
_BATCH_PLUGINS = {"SLURM", "SLURMGraph", "SGE", "SGEGraph", "PBS", "PBSGraph", "LSF", "OAR",
                  "Condor", "DAGMan"}


def _configure_execution(wf, args: argparse.Namespace, crash_dir: Path) -> None:
    """Nipype execution settings: crash files in the work folder, no network, keep outputs."""
    from nipype import config as nipype_config

    execution = {
        "crashdump_dir": str(crash_dir), "crashfile_format": "txt",
        "stop_on_first_crash": str(bool(args.stop_on_first_crash)).lower(),
        "check_version": "false",
        "remove_unnecessary_outputs": "false",
    }
    # how often a batch plugin polls the queue is an execution setting in Nipype, not a plugin
    # argument: accept it in --plugin-args (where users look for it) and move it
    poll = (getattr(args, "_plugin_args", None) or {}).pop("poll_sleep_duration", None)
    if poll is not None:
        execution["poll_sleep_duration"] = str(poll)
    nipype_config.update_config({"execution": execution, "monitoring": {"enabled": "false"}})
    if poll is not None:
        wf.config["execution"]["poll_sleep_duration"] = str(poll)
    # the workflow copied the global config when it was built: set what enters node hashes
    # (remove_unnecessary_outputs) there too, so that a re-run in the same or another process
    # finds the same hashes and reuses finished nodes
    wf.config["execution"].update({"crashdump_dir": str(crash_dir), "crashfile_format": "txt",
                                   "stop_on_first_crash": bool(args.stop_on_first_crash),
                                   "remove_unnecessary_outputs": False})


def run_group_level(args: argparse.Namespace) -> int:
    """The group level (:func:`dmriharmony.cli.group.run_group`) with this CLI's error handling."""
    output_dir = args.output_dir.resolve()
    work_dir = (args.work_dir or output_dir / "work").resolve()
    if not args.bids_dir.is_dir():
        from dmriharmony.bids.exceptions import InvalidDatasetError

        raise InvalidDatasetError(f"{args.bids_dir}: not a folder")
    plugin, plugin_args = _plugin(args)
    crash_dir = work_dir / "crash"
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return _fail(f"{exc.filename}: cannot create folder ({exc.strerror})", EX_CANTCREAT)
    before = _crash_files(crash_dir)
    try:
        code, message = run_group(args, plugin=plugin, plugin_args=plugin_args,
                                  configure_execution=lambda wf: _configure_execution(
                                      wf, args, crash_dir))
    except GroupUsageError as exc:
        return _fail(str(exc), EX_USAGE)
    except GroupInputError as exc:
        return _fail(str(exc), EX_NOINPUT)
    except (DmriHarmonyError, OSError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - Nipype wraps node errors in several types
        line, _ = _crash_line(crash_dir, before, exc)
        data = "HarmonizationError" in str(exc) or "HarmonizationError" in line or \
            _crash_mentions(crash_dir, before, "HarmonizationError")
        return _fail(line, EX_DATAERR if data else EX_SOFTWARE)
    print(message)
    return code


def _crash_mentions(crash_dir: Path, before: set[Path], text: str) -> bool:
    files = _new_crash_files(crash_dir, before)
    return any(text in f.read_text(errors="replace") for f in files)


def _tbss_options(args: argparse.Namespace):
    """TBSS options from the command line; loads the template once to fail early."""
    from dmriharmony.tbss.templates import is_enigma_dir, load_template
    from dmriharmony.workflows.base import TBSSOptions

    source = args.template
    template_dir = args.template_dir.resolve() if args.template_dir else None
    if source is None:
        source = "enigma" if is_enigma_dir(template_dir) else "folder"
    if source != "phantom" and template_dir is None:
        raise _UsageError(f"--template {source} needs --template-dir")
    if source == "phantom" and template_dir is not None:
        raise _UsageError("--template phantom takes no --template-dir")
    template = load_template(source, template_dir)
    registration = {}
    if args.syn_iters is not None:
        if any(n < 0 for n in args.syn_iters):
            raise _UsageError("--syn-iters must be >= 0")
        registration["syn_iters"] = [] if args.syn_iters == [0] else list(args.syn_iters)
    LOGGER.info("TBSS template %s (%s), grid %s", template.name, source,
                "x".join(map(str, template.fa.shape)))
    return TBSSOptions(source=source, template_dir=None if template_dir is None
                       else str(template_dir), space=template.name, registration=registration)


def _write_group_roi_table(deriv: Path, bids_dir: Path, space: str) -> Path:
    """``group/roi_table.tsv``: every stored ROI row joined with participants.tsv and the sites.

    Rebuilt from the ROI rows present in the derivatives, so that parallel per-participant
    jobs each leave a complete table of what has finished (written atomically).
    """
    import pandas as pd

    from dmriharmony.tbss.roi import build_roi_table, read_roi_rows, write_table

    rows = sorted(deriv.glob(f"sub-*/**/sub-*_space-{space}_desc-skeleton_roi.tsv"))
    participants = bids_dir / "participants.tsv"
    roi = read_roi_rows(rows)
    if participants.is_file():
        parts: Path | pd.DataFrame = participants
    else:  # covariates are optional: the table then only carries the site columns
        parts = pd.DataFrame({"participant_id": sorted({f"sub-{s}" for s in roi["subject"]})})
    table = build_roi_table(roi, parts, deriv / "site_table.tsv")
    return write_table(table, deriv / "group" / "roi_table.tsv")


def _fail(message: str, code: int) -> int:
    """Print the one-line error (newlines folded) and return ``code``."""
    text = " ".join(str(message).split())
    print(f"dmriharmony: error: {text}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dmriharmony`` command; returns the exit code."""
    from dmriharmony.bids.exceptions import InvalidDatasetError, NoMatchingDataError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        return _fail(f"{exc} (see dmriharmony --help)", EX_USAGE)
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)
    _configure_logging(args.verbose)
    if args.analysis_level not in ANALYSIS_LEVELS:
        return _fail(f"unknown analysis level {args.analysis_level!r}; available: "
                     f"{', '.join(ANALYSIS_LEVELS)}", EX_UNKNOWN_LEVEL)
    try:
        if args.analysis_level == "group":
            return run_group_level(args)
        return run_participant(args)
    except _UsageError as exc:
        return _fail(str(exc), EX_USAGE)
    except InvalidDatasetError as exc:
        return _fail(str(exc), EX_INVALID_DATASET)
    except NoMatchingDataError as exc:
        return _fail(str(exc), EX_NO_MATCH)
    except BIDSInputError as exc:
        return _fail(str(exc), EX_DATAERR)
    except TemplateError as exc:
        return _fail(str(exc), EX_NOINPUT)
    except DmriHarmonyError as exc:
        return _fail(str(exc), EX_DATAERR)
    except PermissionError as exc:
        return _fail(f"{exc.filename}: permission denied", EX_CANTCREAT)
    except OSError as exc:
        return _fail(f"{exc.filename or ''}: {exc.strerror or exc}", EX_IOERR)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
