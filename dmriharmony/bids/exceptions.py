"""BIDS-input errors with the BIDS-App exit code each maps to."""

from __future__ import annotations

from dmriharmony.errors import BIDSInputError


class InvalidDatasetError(BIDSInputError):
    """The folder is not a usable BIDS dataset (BIDS execution spec exit code 16)."""

    exit_code = 16


class NoMatchingDataError(BIDSInputError):
    """Participant/session filters matched no DWI run (exit code 18)."""

    exit_code = 18
