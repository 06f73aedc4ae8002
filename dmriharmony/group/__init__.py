"""The group level without Nipype: ROI tables in; harmonized tables, effects, models, evaluation.

- :mod:`~dmriharmony.group.table`: read ``group/roi_table.tsv``, one checked table per metric,
  traveling subjects held out of the fits;
- :mod:`~dmriharmony.group.harmonize`: the harmonizers and effect estimators side by side,
  saved models, :func:`~dmriharmony.group.harmonize.apply_saved_models` for later batches,
  the evaluation table.

The HTML report is :mod:`dmriharmony.reports`; the Nipype graph is
:func:`dmriharmony.workflows.group.init_group_wf`.
"""

from dmriharmony.group.harmonize import (
    DATA_HARMONIZERS,
    ESTIMATORS,
    KNOWN_HARMONIZERS,
    apply_saved_models,
    check_harmonizers,
    effects_table,
    evaluate_methods,
    harmonize_table,
    run_methods,
)
from dmriharmony.group.table import GroupTable, load_group_tables, read_roi_table

__all__ = ["DATA_HARMONIZERS", "ESTIMATORS", "KNOWN_HARMONIZERS", "GroupTable",
           "apply_saved_models", "check_harmonizers", "effects_table", "evaluate_methods",
           "harmonize_table", "load_group_tables", "read_roi_table", "run_methods"]
