"""Validation of the DWI runs a participant-level analysis will process."""

from __future__ import annotations

import logging

from dmriharmony.bids.runs import DWIRun
from dmriharmony.dti.io import validate_dwi_files

LOGGER = logging.getLogger("dmriharmony.bids")


def validate_runs(runs: list[DWIRun], *, check_values: bool = True) -> None:
    """Check every run before anything is written; the first problem raises.

    Each run needs a readable 4-D NIfTI, a ``.bval`` and ``.bvec`` (own or inherited) whose
    counts match the 4th dimension, at least one b=0 volume, unit b-vectors on
    diffusion-weighted volumes and (``check_values``) finite data. Sidecar fields such as
    PhaseEncodingDirection or TotalReadoutTime are not required (DTI does not need them).

    Raises
    ------
    dmriharmony.errors.BIDSInputError
        Naming the file at fault.
    """
    for run in runs:
        LOGGER.debug("validating %s", run.dwi)
        validate_dwi_files(run.dwi, run.bval, run.bvec, check_values=check_values)
