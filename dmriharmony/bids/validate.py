"""Validation of the DWI runs a participant-level analysis will process (before any output)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dmriharmony.bids.exceptions import InvalidDatasetError
from dmriharmony.bids.runs import DTIInput, DWIRun
from dmriharmony.dti.gradients import B0_THRESHOLD, read_bvals, select_shells
from dmriharmony.dti.io import concat_dwi, validate_dwi_files
from dmriharmony.errors import BIDSInputError

LOGGER = logging.getLogger("dmriharmony.bids")


def validate_run(run: DWIRun, *, check_values: bool = True, require_b0: bool = True) -> None:
    """Check one run; the first problem raises an error naming the file at fault.

    A run needs a ``.bval`` and ``.bvec`` (own or inherited; their absence makes the dataset
    invalid BIDS: :class:`InvalidDatasetError`), a readable 4-D NIfTI, gradient counts equal to
    the 4th dimension, a b=0 volume (``require_b0``), unit b-vectors on diffusion-weighted
    volumes and (``check_values``) finite data. Sidecar fields such as PhaseEncodingDirection
    or TotalReadoutTime (absent from Philips exports) are not required: DTI does not need them.

    Raises
    ------
    InvalidDatasetError
        A gradient file is missing.
    dmriharmony.errors.BIDSInputError
        Any other problem, naming the file at fault.
    """
    if run.bval is None:
        raise InvalidDatasetError(f"{run.dwi}: no .bval file (next to it or inherited)")
    if run.bvec is None:
        raise InvalidDatasetError(f"{run.dwi}: no .bvec file (next to it or inherited)")
    validate_dwi_files(run.dwi, run.bval, run.bvec, check_values=check_values,
                       require_b0=require_b0)


def validate_inputs(inputs: list[DTIInput], *, check_values: bool = True,
                    bmax: float = 1500.0, b_round: float = 50.0) -> None:
    """Check every tensor-fit input before anything is written (see :func:`validate_run`).

    For inputs merged from ``acq-`` runs each part is checked alone except for the b=0
    requirement, which applies to the concatenated series. Each input must also keep at least
    6 diffusion-weighted volumes at rounded b <= ``bmax`` (a tensor has 6 unknowns besides S0).
    """
    # progress only on a terminal (disable=None) and for more than a handful of runs
    for item in tqdm(inputs, desc="validating DWI runs", unit="input",
                     disable=True if len(inputs) < 5 else None,
                     leave=False):
        if not item.merged:
            LOGGER.debug("validating %s", item.runs[0].dwi)
            validate_run(item.runs[0], check_values=check_values)
            _check_shells(item, bmax, b_round)
            continue
        for run in item.runs:
            validate_run(run, check_values=False, require_b0=False)
        if check_values:
            concat_dwi([r.dwi for r in item.runs], [r.bval for r in item.runs],
                       [r.bvec for r in item.runs])
        else:
            bvals = np.concatenate([read_bvals(r.bval) for r in item.runs])
            names = " + ".join(str(r.bval) for r in item.runs)
            if not np.any(bvals <= B0_THRESHOLD) or np.all(bvals <= B0_THRESHOLD):
                raise BIDSInputError(
                    f"{names}: together these runs need a b=0 and a diffusion-weighted volume"
                )
        _check_shells(item, bmax, b_round)


def _check_shells(item: DTIInput, bmax: float, b_round: float) -> None:
    for run in item.runs:
        if run.bval is None:
            raise InvalidDatasetError(f"{run.dwi}: no .bval file (next to it or inherited)")
        if run.bvec is None:
            raise InvalidDatasetError(f"{run.dwi}: no .bvec file (next to it or inherited)")
    bvals = np.concatenate([read_bvals(r.bval) for r in item.runs])
    try:
        select_shells(bvals, np.ones((len(bvals), 3)), bmax=bmax, step=b_round)
    except BIDSInputError as exc:
        names = " + ".join(str(r.bval) for r in item.runs)
        raise BIDSInputError(f"{names}: {exc}") from None


def validate_runs(runs: list[DWIRun], *, check_values: bool = True) -> None:
    """Check runs one by one (each must stand alone: own b=0 volume)."""
    for run in runs:
        validate_run(run, check_values=check_values)


def bids_validator_errors(path: str | Path, *, timeout: float = 300.0) -> list[dict]:
    """Errors (not warnings) the official BIDS validator reports for the dataset at ``path``.

    Runs ``bids-validator-deno`` (PyPI package of the same name, the validator compiled with
    Deno; works offline with its bundled schema) with ``--format json``.

    Raises
    ------
    FileNotFoundError
        If ``bids-validator-deno`` is not installed.
    RuntimeError
        If its output cannot be read.
    """
    exe = Path(sys.executable).parent / "bids-validator-deno"
    found = str(exe) if exe.exists() else shutil.which("bids-validator-deno")
    if not found:
        raise FileNotFoundError("bids-validator-deno not found (pip install bids-validator-deno)")
    proc = subprocess.run([found, str(path), "--format", "json"], capture_output=True,
                          text=True, timeout=timeout, check=False)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"{path}: unreadable validator output "
                           f"({proc.stdout[:300]!r} {proc.stderr[:300]!r})") from None
    return [i for i in report["issues"]["issues"] if i.get("severity") == "error"]
