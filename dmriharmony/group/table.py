"""The group level's input: the ROI table of all runs, split by metric, checked, traveling apart.

``group/roi_table.tsv`` (written by the participant level, :func:`dmriharmony.tbss.roi.
build_roi_table`) holds one row per run and metric (``fa``, ``md``, ...): identifiers, the
participant covariates, the site-table columns (site, vendor, model, field, shells...) and one
column per ROI (ENIGMA abbreviations). The harmonizers want one subjects x ROIs table per metric,
every covariate present, and each subject once: a traveling subject (``traveling`` column of
participants.tsv = yes/true/1, or a subject scanned at several sites) would enter a ComBat fit
several times with the same biology, so traveling subjects are held out of every fit and used
only to measure between-site agreement (Fortin et al., *NeuroImage* 2017, sec. 2.6; the
traveling-subject design of Tax et al., *NeuroImage* 2019).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dmriharmony.errors import HarmonizationError

__all__ = ["GroupTable", "ID_COLUMNS", "NON_FEATURE_COLUMNS", "load_group_tables",
           "read_roi_table"]

ID_COLUMNS = ("subject", "session", "run", "metric")
#: site-table / participants columns that are never ROI features even when numeric.
NON_FEATURE_COLUMNS = {"age", "sex", "dx", "site", "traveling", "field", "field_strength",
                       "n_dirs", "n_directions", "n_volumes", "bmax", "b_values", "shells",
                       "vendor", "model", "manufacturer", "scanner", "dwi", "participant_id",
                       "voxel_size", "te", "tr", "EchoTime", "RepetitionTime"}
_TRUE = {"yes", "y", "true", "1", "t"}


@dataclass
class GroupTable:
    """One metric's table: training rows (one per subject) and the traveling subjects' rows.

    Attributes
    ----------
    metric : str
        ``fa``, ``md``, ...
    train : DataFrame
        Non-traveling runs: identifiers, ``site``, covariates, features.
    traveling : DataFrame or None
        Traveling subjects' runs, same columns: one per subject and site, or, with same-site
        rescans (``ses-ge``, ``ses-gerescan1``), one per subject, site and session. All are
        harmonized; the between-site agreement uses the first session per subject and site in
        sorted session order (:func:`dmriharmony.evaluation.traveling.traveling_agreement`).
    features : list of str
        ROI columns.
    covariates : list of str
        Covariates protected by the harmonizers (the effect included).
    effect : str
    """

    metric: str
    train: pd.DataFrame
    traveling: pd.DataFrame | None
    features: list[str]
    covariates: list[str]
    effect: str
    site: str = "site"
    dropped: list[str] = field(default_factory=list)

    @property
    def sites(self) -> list[str]:
        return sorted(map(str, self.train[self.site].unique()))

    def all_rows(self) -> pd.DataFrame:
        """Training rows then traveling rows (the rows a harmonizer transforms)."""
        if self.traveling is None or self.traveling.empty:
            return self.train
        return pd.concat([self.train, self.traveling], ignore_index=True)


def read_roi_table(path: str | Path) -> pd.DataFrame:
    """Read ``roi_table.tsv`` (``n/a`` = missing; identifiers as strings)."""
    path = Path(path)
    if not path.is_file():
        raise HarmonizationError(
            f"{path}: no group ROI table; run the participant level with --template or "
            "--template-dir first (it writes group/roi_table.tsv)")
    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a"],
                            dtype={"subject": str, "session": str, "run": str})
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise HarmonizationError(f"{path}: not a readable TSV ({exc})") from exc
    for col in ("subject", "metric"):
        if col not in table.columns:
            raise HarmonizationError(f"{path}: column {col!r} missing")
    if table.empty:
        raise HarmonizationError(f"{path}: the ROI table has no rows")
    return table


def _traveling_mask(table: pd.DataFrame, site: str, column: str) -> np.ndarray:
    flagged = np.zeros(len(table), bool)
    if column in table.columns:
        flagged = table[column].astype(str).str.strip().str.lower().isin(_TRUE).to_numpy()
    # a subject seen at more than one site travels, whatever participants.tsv says
    n_sites = table.groupby("subject")[site].transform("nunique").to_numpy()
    return flagged | (n_sites > 1)


def _run_label(row: pd.Series) -> str:
    parts = [f"sub-{row['subject']}"]
    for key in ("session", "run"):
        if key in row and isinstance(row[key], str) and row[key] and row[key] != "nan":
            parts.append(f"{key[:3]}-{row[key]}")
    return "_".join(parts)


def _features(table: pd.DataFrame, covariates: Sequence[str], site: str,
              requested: Sequence[str] | None) -> list[str]:
    skip = set(ID_COLUMNS) | NON_FEATURE_COLUMNS | set(covariates) | {site}
    if requested is not None:
        missing = [f for f in requested if f not in table.columns]
        if missing:
            raise HarmonizationError(f"ROI column {missing[0]!r} not in the ROI table")
        return list(requested)
    feats = [c for c in table.columns
             if c not in skip and pd.api.types.is_numeric_dtype(table[c])
             and table[c].notna().any()]
    if not feats:
        raise HarmonizationError("the ROI table has no numeric ROI columns")
    return feats


def load_group_tables(
    roi_table: str | Path | pd.DataFrame,
    *,
    covariates: Sequence[str] = ("age", "sex"),
    effect: str = "dx",
    metrics: Sequence[str] | None = ("fa", "md"),
    site: str = "site",
    traveling_column: str = "traveling",
    rois: Sequence[str] | None = None,
    min_per_site: int = 2,
) -> dict[str, GroupTable]:
    """Split the group ROI table into one checked :class:`GroupTable` per metric.

    Parameters
    ----------
    roi_table : path or DataFrame
        ``group/roi_table.tsv`` or its content.
    covariates : sequence of str
        Biological covariates to protect (besides ``effect``).
    effect : str
        Effect of interest (e.g. ``dx``), protected and scored.
    metrics : sequence of str, optional
        Metrics to keep (lower case, as in the table); None = all in the table.
    site : str
        Site column.
    traveling_column : str
        participants.tsv column flagging traveling subjects.
    rois : sequence of str, optional
        ROI columns (default: every numeric ROI column).
    min_per_site : int
        Fewest training subjects a site must have (ComBat estimates a site variance).

    Raises
    ------
    HarmonizationError
        Naming the column, metric, subject or site at fault.
    """
    table = read_roi_table(roi_table) if not isinstance(roi_table, pd.DataFrame) \
        else roi_table.copy()
    covs = list(dict.fromkeys([*covariates, effect]))
    for col in [site, *covs]:
        if col not in table.columns:
            raise HarmonizationError(
                f"column {col!r} is not in the ROI table (participants.tsv / sessions.tsv "
                f"columns: {', '.join(c for c in table.columns if c not in ID_COLUMNS)[:200]})")
    table["metric"] = table["metric"].astype(str).str.lower()
    available = sorted(table["metric"].unique())
    wanted = available if metrics is None else [m.lower() for m in metrics]
    for m in wanted:
        if m not in available:
            raise HarmonizationError(f"metric {m!r} not in the ROI table (has "
                                     f"{', '.join(available)})")
    table[site] = table[site].astype(str)
    out: dict[str, GroupTable] = {}
    for metric in wanted:
        sub = table[table["metric"] == metric].reset_index(drop=True)
        feats = _features(sub, covs, site, rois)
        for col in covs:
            bad = sub[col].isna()
            if bad.any():
                raise HarmonizationError(
                    f"{_run_label(sub.loc[bad].iloc[0])}: covariate {col!r} is missing "
                    f"(n/a) in participants.tsv")
        trav = _traveling_mask(sub, site, traveling_column)
        train = sub.loc[~trav].reset_index(drop=True)
        travel = sub.loc[trav].reset_index(drop=True)
        dup = train["subject"].duplicated()
        if dup.any():
            raise HarmonizationError(
                f"sub-{train.loc[dup, 'subject'].iloc[0]} has several {metric} runs at one "
                "site; keep one run per subject (e.g. --session-label) for the group level")
        counts = train[site].value_counts()
        small = counts[counts < min_per_site]
        if len(small):
            raise HarmonizationError(
                f"site {small.index[0]!r} has {int(small.iloc[0])} non-traveling subject(s); "
                f"ComBat-type harmonizers need at least {min_per_site} per site")
        if len(counts) < 2:
            raise HarmonizationError(f"only one site ({counts.index[0]!r}) in the ROI table: "
                                     "nothing to harmonize")
        unseen = sorted(set(travel[site]) - set(counts.index)) if len(travel) else []
        if unseen:
            raise HarmonizationError(f"traveling subjects were scanned at site {unseen[0]!r}, "
                                     "which has no other subject to fit its site effect")
        values = train[feats]
        if values.isna().all(axis=0).any():
            empty = values.columns[values.isna().all(axis=0)][0]
            raise HarmonizationError(f"ROI {empty!r} ({metric}) is empty for every run")
        out[metric] = GroupTable(metric=metric, train=train,
                                 traveling=travel if len(travel) else None, features=feats,
                                 covariates=covs, effect=effect, site=site)
    return out
