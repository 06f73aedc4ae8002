"""BIDS input and output: pybids queries, DWI-run validation, site table, derivatives naming.

Imports pybids as ``bids`` with absolute imports only (this package is
``dmriharmony.bids``; ``from __future__ import annotations`` everywhere).
"""

from __future__ import annotations

from dmriharmony.bids.derivatives import (
    bids_uri,
    derivative_dir,
    derivative_name,
    provenance,
    write_dataset_description,
)
from dmriharmony.bids.exceptions import InvalidDatasetError, NoMatchingDataError
from dmriharmony.bids.layout import config_path, load_layout
from dmriharmony.bids.runs import DTIInput, DWIRun, collect_dwi_runs, group_dti_inputs
from dmriharmony.bids.sites import SITE_COLUMNS, normalize_vendor, scanner_key, site_table
from dmriharmony.bids.validate import validate_inputs, validate_run, validate_runs

__all__ = [
    "DTIInput", "DWIRun", "InvalidDatasetError", "NoMatchingDataError", "SITE_COLUMNS",
    "bids_uri", "collect_dwi_runs", "config_path", "derivative_dir", "derivative_name",
    "group_dti_inputs", "load_layout", "normalize_vendor", "provenance", "scanner_key",
    "site_table", "validate_inputs", "validate_run", "validate_runs", "write_dataset_description",
]
