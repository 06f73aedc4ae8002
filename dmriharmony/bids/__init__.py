"""BIDS input and output: pybids queries, DWI-run validation, site table, derivatives naming.

Imports pybids as ``bids`` with absolute imports only (this package is
``dmriharmony.bids``; ``from __future__ import annotations`` everywhere).
"""

from __future__ import annotations

from dmriharmony.bids.derivatives import (
    derivative_dir,
    derivative_name,
    provenance,
    write_dataset_description,
)
from dmriharmony.bids.exceptions import InvalidDatasetError, NoMatchingDataError
from dmriharmony.bids.layout import config_path, load_layout
from dmriharmony.bids.runs import DWIRun, collect_dwi_runs
from dmriharmony.bids.sites import SITE_COLUMNS, scanner_key, site_table
from dmriharmony.bids.validate import validate_runs

__all__ = [
    "DWIRun", "InvalidDatasetError", "NoMatchingDataError", "SITE_COLUMNS", "collect_dwi_runs",
    "config_path", "derivative_dir", "derivative_name", "load_layout", "provenance",
    "scanner_key", "site_table", "validate_runs", "write_dataset_description",
]
