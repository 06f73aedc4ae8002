"""Traveling-subject agreement: the same brain scanned at every site should give the same numbers.

For each feature ``f`` and traveling subject ``s`` scanned at sites ``i = 1..m_s``:

- between-site coefficient of variation ``CV_sf = SD_i(y_isf) / mean_i(y_isf)`` (SD with
  ``ddof=1``), averaged over subjects and reported in percent (the reproducibility measure of
  multi-site traveling-subject studies, e.g. Vollmar et al., *NeuroImage* 2010; Tax et al.,
  *NeuroImage* 2019);
- between-site RMSE: root mean square of ``y_isf - mean_i(y_isf)`` over all subjects and sites
  (same units as the feature);
- with scanner-free values (simulation), RMSE to the truth: root mean square of
  ``y_isf - y*_isf``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from dmriharmony.errors import HarmonizationError
from dmriharmony.evaluation._design import check_columns, feature_matrix

__all__ = ["traveling_agreement", "traveling_preservation"]


def traveling_agreement(
    table: pd.DataFrame,
    features: Sequence[str],
    subject: str = "subject",
    site: str = "site",
    clean: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Between-site CV (%) and RMSE of traveling subjects, per feature.

    Parameters
    ----------
    table : DataFrame
        Traveling-subject scans: one row per (subject, site).
    features : sequence of str
        Feature columns.
    subject, site : str
        Subject and site columns.
    clean : DataFrame, optional
        Site-free values of the same rows (same order), to report ``rmse_truth``.

    Returns
    -------
    DataFrame indexed by feature with ``cv`` (%), ``rmse`` and ``rmse_truth`` (NaN without
    ``clean``), ``n_subjects``.
    """
    features = list(features)
    check_columns(table, [subject, site], "traveling table")
    Y = feature_matrix(table, features, "traveling table")
    dup = table.duplicated([subject, site])
    if dup.any():
        row = table.loc[dup].iloc[0]
        raise HarmonizationError(f"traveling subject {row[subject]!r} appears twice at site "
                                 f"{row[site]!r}")
    n_sites = table.groupby(subject)[site].nunique()
    keep_subj = n_sites.index[n_sites >= 2]
    if len(keep_subj) == 0:
        raise HarmonizationError("no traveling subject was scanned at two or more sites")
    keep = table[subject].isin(keep_subj).to_numpy()
    df = pd.DataFrame(Y[keep], columns=features)
    groups = table.loc[keep, subject].to_numpy()
    g = df.groupby(groups)
    sd = g.std(ddof=1)
    mean = g.mean()
    cv = (sd / mean.abs()).mean(axis=0) * 100.0
    dev = df - g.transform("mean")
    rmse = np.sqrt((dev**2).mean(axis=0))
    out = pd.DataFrame({"cv": cv, "rmse": rmse}, index=pd.Index(features, name="feature"))
    if clean is not None:
        if len(clean) != len(table):
            raise HarmonizationError("clean traveling table must have the same rows as the table")
        Yc = feature_matrix(clean, features, "clean traveling table")[keep]
        out["rmse_truth"] = np.sqrt(np.nanmean((Y[keep] - Yc) ** 2, axis=0))
    else:
        out["rmse_truth"] = np.nan
    out["n_subjects"] = len(keep_subj)
    return out


def traveling_preservation(
    before: pd.DataFrame,
    after: pd.DataFrame,
    features: Sequence[str],
    subject: str = "subject",
    site: str = "site",
    clean: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Tidy before/after table of :func:`traveling_agreement` (metrics ``traveling_cv``,
    ``traveling_rmse``, ``traveling_rmse_truth``; feature ``ALL`` holds the feature means)."""
    tb = traveling_agreement(before, features, subject, site, clean)
    ta = traveling_agreement(after, features, subject, site, clean)
    rows = []
    for col in ("cv", "rmse", "rmse_truth"):
        if col == "rmse_truth" and clean is None:
            continue
        metric = f"traveling_{col}"
        rows.append(pd.DataFrame({"metric": metric, "feature": list(features),
                                  "before": tb[col].to_numpy(), "after": ta[col].to_numpy()}))
        rows.append(pd.DataFrame({"metric": [metric], "feature": ["ALL"],
                                  "before": [tb[col].mean()], "after": [ta[col].mean()]}))
    out = pd.concat(rows, ignore_index=True)
    # Scan-to-scan noise keeps the ideal above 0 and unknown here: no truth column value.
    out["truth"] = np.nan
    return out
