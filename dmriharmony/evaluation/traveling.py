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

A traveling subject scanned more than once at a site (same-site rescans, e.g.
``ses-ge`` and ``ses-gerescan1``) enters these between-site numbers with one scan per site: the
first session in sorted session order (``ses-ge`` sorts before ``ses-gerescan1``). The
rescans measure the same-site noise floor instead
(:func:`dmriharmony.evaluation.traveling_maps.scan_rescan_rmse` at the voxel level).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from dmriharmony.errors import HarmonizationError
from dmriharmony.evaluation._design import check_columns, feature_matrix

__all__ = ["traveling_agreement", "traveling_preservation"]

logger = logging.getLogger(__name__)


def _one_scan_per_site(table: pd.DataFrame, subject: str, site: str,
                       session: str | None) -> np.ndarray:
    """Boolean mask of the rows kept: per (subject, site), the first session in sorted order.

    Without duplicated (subject, site) pairs every row is kept. Duplicates are resolved only
    when they differ by session (same-site rescans); two rows of one subject, site and session
    (or duplicates without a session column) are an error, as before rescans were handled.
    """
    dup = table.duplicated([subject, site])
    if not dup.any():
        return np.ones(len(table), bool)
    has_session = session is not None and session in table.columns
    same = table.duplicated([subject, site, session]) if has_session else dup
    if same.any():
        row = table.loc[same].iloc[0]
        where = f" in session {row[session]!r}" if has_session else ""
        raise HarmonizationError(f"traveling subject {row[subject]!r} appears twice at site "
                                 f"{row[site]!r}{where}")
    ses = table[session]
    key = ses.where(ses.isna(), ses.astype(str))
    order = (table[[subject, site]].assign(_ses=key.to_numpy(), _pos=np.arange(len(table)))
             .sort_values("_ses", kind="stable", na_position="last"))
    first = order.drop_duplicates([subject, site])["_pos"].to_numpy()
    keep = np.zeros(len(table), bool)
    keep[first] = True
    logger.info("traveling agreement: %d same-site rescan row(s) left out (first session per "
                "subject and site kept)", int((~keep).sum()))
    return keep


def traveling_agreement(
    table: pd.DataFrame,
    features: Sequence[str],
    subject: str = "subject",
    site: str = "site",
    clean: pd.DataFrame | None = None,
    session: str | None = "session",
) -> pd.DataFrame:
    """Between-site CV (%) and RMSE of traveling subjects, per feature.

    One scan per subject and site enters: where a subject has several sessions at one site
    (same-site rescans, e.g. ``ge`` and ``gerescan1``), the first session in sorted session
    order (string order of the ``session`` column, missing last; ``ge`` before ``gerescan1``)
    and the other sessions are left out, so that rescans neither weigh a site twice nor mix
    scan-rescan noise into the between-site numbers. Data with one session per subject and
    site are used as they are.

    Parameters
    ----------
    table : DataFrame
        Traveling-subject scans: one row per (subject, site), or per (subject, site, session)
        with rescans.
    features : sequence of str
        Feature columns.
    subject, site : str
        Subject and site columns.
    clean : DataFrame, optional
        Site-free values of the same rows (same order), to report ``rmse_truth``.
    session : str or None
        Session column telling rescans apart (ignored when absent from ``table``; None: no
        session column). Two rows of one subject and site with the same session, or without a
        session column, are an error.

    Returns
    -------
    DataFrame indexed by feature with ``cv`` (%), ``rmse`` and ``rmse_truth`` (NaN without
    ``clean``), ``n_subjects``.
    """
    features = list(features)
    check_columns(table, [subject, site], "traveling table")
    Y = feature_matrix(table, features, "traveling table")
    first = _one_scan_per_site(table, subject, site, session)
    n_sites = table.groupby(subject)[site].nunique()
    keep_subj = n_sites.index[n_sites >= 2]
    if len(keep_subj) == 0:
        raise HarmonizationError("no traveling subject was scanned at two or more sites")
    keep = table[subject].isin(keep_subj).to_numpy() & first
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
    session: str | None = "session",
) -> pd.DataFrame:
    """Tidy before/after table of :func:`traveling_agreement` (metrics ``traveling_cv``,
    ``traveling_rmse``, ``traveling_rmse_truth``; feature ``ALL`` holds the feature means).

    Same-site rescans: the first session per subject and site in sorted session order enters
    (see :func:`traveling_agreement`)."""
    tb = traveling_agreement(before, features, subject, site, clean, session)
    ta = traveling_agreement(after, features, subject, site, clean, session)
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
