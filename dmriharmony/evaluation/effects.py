"""Preservation of biological effects: effect estimates before vs after harmonization vs truth.

Per feature, the pooled (mega-analysis) linear model::

    y_f = b0 + b_effect * effect + sum_c b_c * covariate_c  [+ site fixed effects]  + e

is fitted by ordinary least squares, vectorised over features. Cohen's d of a binary effect is
``b_effect / sigma_f`` with ``sigma_f`` the residual SD, the covariate-adjusted standardised mean
difference used in ENIGMA mega-analyses (e.g. van Erp et al., *Biol Psychiatry* 2016). A good
harmonizer leaves these estimates where the truth is (Fortin et al., *NeuroImage* 2017, sec. 3.4:
harmonization must remove site effects while preserving biological variability).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from dmriharmony.errors import HarmonizationError
from dmriharmony.evaluation._design import (
    check_columns,
    covariate_design,
    feature_matrix,
    ols,
    site_dummies,
)

__all__ = ["effect_estimates", "effect_preservation"]


def _effect_design(
    table: pd.DataFrame, effect: str, covariates: Sequence[str], site: str | None
) -> tuple[np.ndarray, list[str]]:
    terms = [effect] + [c for c in covariates if c != effect]
    X, names = covariate_design(table, terms)
    blocks = [np.ones((len(table), 1)), X]
    names = ["Intercept"] + names
    if site is not None:
        check_columns(table, [site])
        levels = sorted(table[site].astype(str).unique())
        blocks.append(site_dummies(table[site].to_numpy(), levels)[:, 1:])
        names += [f"{site}[{lev}]" for lev in levels[1:]]
    return np.hstack(blocks), names


def effect_estimates(
    table: pd.DataFrame,
    features: Sequence[str],
    effect: str = "dx",
    covariates: Sequence[str] = ("age", "sex"),
    site: str | None = None,
) -> pd.DataFrame:
    """Estimate biological effects per feature with a pooled linear model.

    Parameters
    ----------
    table : DataFrame
        Subjects x (features + covariates [+ site]).
    features : sequence of str
        Feature columns (e.g. ROI FA values).
    effect : str
        Term of interest. A binary numeric (0/1) or two-level categorical column gives a Cohen's d.
    covariates : sequence of str
        Other terms in the model (numeric used as is, categorical dummy coded).
    site : str, optional
        If given, site enters as a fixed effect (dummy coded); if ``None`` the data are pooled as
        if they came from one scanner, which is the analysis run on harmonized data.

    Returns
    -------
    DataFrame indexed by feature with, for every numeric term ``t`` of the model (the effect and
    the covariates, dummy-coded names for categorical ones), columns ``t_beta`` and ``t_se``;
    ``sigma`` (residual SD), ``n``; and ``{effect}_d`` when the effect is binary.
    Rows with a missing value in a feature are dropped for that feature only.
    """
    features = list(features)
    if not features:
        raise HarmonizationError("no feature columns given")
    Y = feature_matrix(table, features)
    X, names = _effect_design(table, effect, covariates, site)
    terms = [nm for nm in names if nm != "Intercept" and not (site and nm.startswith(f"{site}["))]
    eff_names = [nm for nm in names if nm == effect or nm.startswith(f"{effect}[")]
    binary = len(eff_names) == 1 and set(np.unique(X[:, names.index(eff_names[0])])) <= {0.0, 1.0}

    cols: dict[str, np.ndarray] = {}
    p = len(features)
    beta = np.full((len(names), p), np.nan)
    se = np.full((len(names), p), np.nan)
    sigma = np.full(p, np.nan)
    nobs = np.zeros(p, dtype=int)
    complete = ~np.isnan(Y).any(axis=0)
    if complete.any():
        fit = ols(X, Y[:, complete])
        beta[:, complete], se[:, complete] = fit["beta"], fit["se"]
        sigma[complete] = np.sqrt(fit["sigma2"])
        nobs[complete] = len(Y)
    for k in np.flatnonzero(~complete):
        ok = ~np.isnan(Y[:, k])
        fit = ols(X[ok], Y[ok, k : k + 1])
        beta[:, k], se[:, k] = fit["beta"][:, 0], fit["se"][:, 0]
        sigma[k] = np.sqrt(fit["sigma2"][0])
        nobs[k] = int(ok.sum())
    for t in terms:
        j = names.index(t)
        cols[f"{t}_beta"] = beta[j]
        cols[f"{t}_se"] = se[j]
    cols["sigma"] = sigma
    cols["n"] = nobs
    if binary:
        with np.errstate(divide="ignore", invalid="ignore"):
            cols[f"{effect}_d"] = beta[names.index(eff_names[0])] / sigma
    return pd.DataFrame(cols, index=pd.Index(features, name="feature"))


def _truth_series(truth: Mapping | None, metric: str, features: Sequence[str]) -> np.ndarray:
    if truth is None or metric not in truth:
        return np.full(len(features), np.nan)
    val = truth[metric]
    if isinstance(val, pd.Series):
        missing = [f for f in features if f not in val.index]
        if missing:
            raise HarmonizationError(f"truth[{metric!r}] has no value for feature {missing[0]!r}")
        return val.loc[list(features)].to_numpy(dtype=float)
    arr = np.asarray(val, dtype=float)
    return np.full(len(features), float(arr)) if arr.ndim == 0 else arr


def effect_preservation(
    before: pd.DataFrame,
    after: pd.DataFrame,
    features: Sequence[str],
    effect: str = "dx",
    covariates: Sequence[str] = ("age", "sex"),
    truth: Mapping | None = None,
    site: str | None = None,
) -> pd.DataFrame:
    """Compare effect estimates before and after harmonization, and with the truth if known.

    Parameters
    ----------
    before, after : DataFrame
        The raw and the harmonized table (same rows, same covariate columns).
    features, effect, covariates, site
        As in :func:`effect_estimates`.
    truth : mapping, optional
        Ground truth keyed by metric name (``"dx_d"``, ``"dx_beta"``, ``"age_beta"``...), each a
        ``Series`` indexed by feature or a scalar, as returned by
        :func:`dmriharmony.simulate.roi_table.simulate_roi_table`.

    Returns
    -------
    Tidy DataFrame with columns ``metric, feature, before, after, truth, rel_err_before,
    rel_err_after``: one row per feature and metric (``{effect}_d`` if binary, and ``{t}_beta``
    for the effect and each numeric covariate), plus a row ``feature="ALL"`` holding the means
    across features (its relative errors are those of the mean estimate).
    """
    features = list(features)
    eb = effect_estimates(before, features, effect, covariates, site)
    ea = effect_estimates(after, features, effect, covariates, site)
    metrics = [c for c in eb.columns if c.endswith("_d")]
    metrics += [c for c in eb.columns if c.endswith("_beta")]
    rows = []
    for m in metrics:
        t = _truth_series(truth, m, features)
        b, a = eb[m].to_numpy(), ea[m].to_numpy()
        part = pd.DataFrame({"metric": m, "feature": features, "before": b, "after": a,
                             "truth": t})
        agg = pd.DataFrame({"metric": [m], "feature": ["ALL"], "before": [np.nanmean(b)],
                            "after": [np.nanmean(a)],
                            "truth": [np.mean(t) if np.isfinite(t).all() else np.nan]})
        rows += [part, agg]
    out = pd.concat(rows, ignore_index=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["rel_err_before"] = (out["before"] - out["truth"]) / out["truth"].abs()
        out["rel_err_after"] = (out["after"] - out["truth"]) / out["truth"].abs()
    return out
