"""Per-site effect sizes from a per-site linear model with covariates (early ENIGMA approach).

Each site fits ``feature ~ 1 + effect + covariates`` by ordinary least squares, all features at
once (the design is shared), and converts the t statistic of the effect term into a standardised
effect size with its sampling variance.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import special

from ..errors import HarmonizationError

MEASURES = ("d", "z", "beta")
D_FORMULAS = ("t", "nakagawa", "beta")


def hedges_j(df: Any) -> np.ndarray:
    """Exact small-sample correction of Cohen's d (Hedges 1981, eq. 6e).

    ``J(m) = Gamma(m/2) / (sqrt(m/2) Gamma((m-1)/2))``; metafor's ``escalc("SMD")`` uses it with
    ``m = n1 + n2 - 2``.
    """
    m = np.asarray(df, dtype=float)
    with np.errstate(invalid="ignore"):
        return np.exp(special.gammaln(m / 2) - 0.5 * np.log(m / 2) - special.gammaln((m - 1) / 2))


def d_from_t(t: Any, n1: Any, n2: Any, df: Any, formula: str = "t") -> np.ndarray:
    """Cohen's d of a two-group term from its t statistic.

    ``"t"``: ``d = t sqrt(1/n1 + 1/n2)`` (Rosenthal 1994; equals the pooled-SD Cohen's d when there
    are no covariates). ``"nakagawa"``: ``d = t (n1 + n2) / (sqrt(n1 n2) sqrt(df))`` (Nakagawa &
    Cuthill 2007, Biol Rev 82:591, Table 3 eq. 10), the formula of the ENIGMA working-group scripts.
    """
    t, n1, n2, df = (np.asarray(a, dtype=float) for a in (t, n1, n2, df))
    if formula == "t":
        return t * np.sqrt(1.0 / n1 + 1.0 / n2)
    if formula == "nakagawa":
        return t * (n1 + n2) / (np.sqrt(n1 * n2) * np.sqrt(df))
    raise HarmonizationError(f"unknown d formula {formula!r}; choose 't' or 'nakagawa'")


def _require_columns(table: pd.DataFrame, columns: Sequence[str]) -> None:
    have = set(table.columns)
    missing = [c for c in columns if c not in have]
    if missing:
        raise HarmonizationError(f"column {missing[0]!r} not found in the table")


def resolve_features(
    table: pd.DataFrame, features: Sequence[str] | None, exclude: Sequence[str]
) -> list[str]:
    """The feature columns: all numeric columns not in ``exclude`` unless given; all numeric.

    Reads ``table.dtypes`` once (no per-column indexing: 100,000 voxel columns stay cheap).
    """
    dtypes = table.dtypes

    def numeric(dt: Any) -> bool:
        return pd.api.types.is_numeric_dtype(dt) and not pd.api.types.is_bool_dtype(dt)

    if features is None:
        excl = set(exclude)
        feats = [c for c, dt in dtypes.items() if c not in excl and numeric(dt)]
        if not feats:
            raise HarmonizationError("no numeric feature columns found in the table")
        return feats
    feats = list(features)
    _require_columns(table, feats)
    dups = set(table.columns[table.columns.duplicated()])
    by_name = dict(zip(table.columns, dtypes))
    for c in feats:
        if c in dups:
            raise HarmonizationError(f"feature column {c!r} appears more than once in the table")
        if not pd.api.types.is_numeric_dtype(by_name[c]):
            raise HarmonizationError(f"feature column {c!r} is not numeric")
    return feats


def encode_binary(
    values: pd.Series, reference: Any = None, name: str = "effect"
) -> tuple[np.ndarray, str]:
    """Code a two-level term as 0 (reference) / 1; return the codes and the non-reference label."""
    levels = pd.unique(values)
    if len(levels) != 2:
        raise HarmonizationError(
            f"column {name!r} must have exactly two levels for measure='d', found {len(levels)}"
        )
    if reference is None:
        try:
            reference = sorted(levels)[0]
        except TypeError:
            reference = levels[0]
    if reference not in set(levels):
        raise HarmonizationError(f"reference level {reference!r} not found in column {name!r}")
    other = [lv for lv in levels if lv != reference][0]
    return (values.to_numpy() == other).astype(float), str(other)


def covariate_block(table: pd.DataFrame, covariates: Sequence[str]) -> pd.DataFrame:
    """Numeric design columns for the covariates: categorical ones one-hot encoded (drop first)."""
    blocks = []
    for c in covariates:
        col = table[c]
        if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
            blocks.append(col.astype(float).rename(c))
        else:
            dummies = pd.get_dummies(col.astype(str), prefix=c, prefix_sep="[T.", dtype=float)
            dummies.columns = [f"{name}]" for name in dummies.columns]
            blocks.append(dummies.iloc[:, 1:])
    if not blocks:
        return pd.DataFrame(index=table.index)
    return pd.concat(blocks, axis=1)


def _site_design(effect_col: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """[1, effect, covariates] keeping only covariate columns that add rank within the site."""
    n = effect_col.shape[0]
    x = np.column_stack([np.ones(n), effect_col])
    rank = np.linalg.matrix_rank(x)
    for j in range(cov.shape[1]):
        trial = np.column_stack([x, cov[:, j]])
        r = np.linalg.matrix_rank(trial)
        if r > rank:
            x, rank = trial, r
    return x


def _ols_term(
    x: np.ndarray, y: np.ndarray, j: int
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """Coefficient ``j``, its SE, the residual df and variance per column of ``y`` (OLS)."""
    n, q = x.shape
    xtx_inv = np.linalg.inv(x.T @ x)
    beta = xtx_inv @ (x.T @ y)
    resid = y - x @ beta
    df = n - q
    s2 = (resid**2).sum(axis=0) / df
    se = np.sqrt(s2 * xtx_inv[j, j])
    return beta[j], se, df, s2


def site_effects(
    table: pd.DataFrame,
    site: str = "site",
    effect: str = "dx",
    covariates: Sequence[str] | None = None,
    measure: str = "d",
    features: Sequence[str] | None = None,
    reference: Any = None,
    hedges: bool = True,
    d_formula: str = "t",
) -> pd.DataFrame:
    """Per-site, per-feature effect sizes of one term from a per-site linear model.

    Each site fits ``feature ~ 1 + effect + covariates`` by OLS (covariate columns that are
    constant or collinear within a site are dropped for that site) and converts the effect's t
    statistic into:

    - ``measure="d"`` (two-level ``effect``): Cohen's d by ``d_formula`` (see :func:`d_from_t`;
      default ``d = t sqrt(1/n1 + 1/n2)``), Hedges' g = J(df) d with the exact correction
      (Hedges 1981) and sampling variance ``1/n1 + 1/n2 + g^2 / (2 (n1 + n2))`` (Hedges & Olkin
      1985, eq. 5.15; metafor ``escalc("SMD")``). With ``d_formula="beta"`` d is the coefficient
      divided by the residual SD. ``yi`` is g (or d with ``hedges=False``).
    - ``measure="z"`` (continuous or two-level ``effect``): partial correlation
      ``r = t / sqrt(t^2 + df)`` and Fisher's ``z = atanh(r)`` with variance ``1 / (n - 3 - c)``,
      ``c`` the number of covariate columns (Fisher 1924; ENIGMA partial-correlation meta-analyses).
    - ``measure="beta"``: standardised coefficient ``b sd(x) / sd(y)`` with variance
      ``se(b)^2 (sd(x)/sd(y))^2``.

    Parameters
    ----------
    table : DataFrame
        One row per subject with the feature, site, effect and covariate columns.
    site, effect : str
        Column names of the site label and of the term whose effect is estimated.
    covariates : sequence of str, optional
        Covariate columns (numeric or categorical; categorical ones are one-hot encoded).
    measure : {"d", "z", "beta"}
    features : sequence of str, optional
        Feature columns; default every numeric column other than site, effect and covariates.
    reference : optional
        Reference (control) level of a two-level effect; default the first in sorted order.
    hedges : bool
        Apply Hedges' small-sample correction to d.
    d_formula : {"t", "nakagawa", "beta"}

    Returns
    -------
    DataFrame
        Tidy, one row per (feature, site): ``feature, site, n, n1, n2, df, b, t, yi, vi, sei,
        measure`` plus ``d`` (for "d") or ``r`` (for "z"). ``n1`` counts the non-reference level.
        Sites where the term cannot be estimated (one group only, no residual df) are dropped with
        a warning naming the site.
    """
    if not isinstance(table, pd.DataFrame):
        raise HarmonizationError("table must be a pandas DataFrame")
    if measure not in MEASURES:
        raise HarmonizationError(f"unknown measure {measure!r}; choose one of {MEASURES}")
    if d_formula not in D_FORMULAS:
        raise HarmonizationError(f"unknown d_formula {d_formula!r}; choose one of {D_FORMULAS}")
    covariates = list(covariates or [])
    _require_columns(table, [site, effect, *covariates])
    feats = resolve_features(table, features, [site, effect, *covariates])
    for c in [site, effect, *covariates]:
        if table[c].isna().any():
            row = table.index[table[c].isna().to_numpy()][0]
            raise HarmonizationError(f"column {c!r} has a missing value (row {row!r})")

    binary = measure == "d" or not pd.api.types.is_numeric_dtype(table[effect])
    binary = binary or set(pd.unique(table[effect])) <= {0, 1}
    if binary:
        eff_codes, level = encode_binary(table[effect], reference, effect)
    else:
        eff_codes, level = table[effect].to_numpy(dtype=float), effect
    cov = covariate_block(table, covariates).to_numpy(dtype=float)
    y_all = table[feats].to_numpy(dtype=float)
    sites = table[site].to_numpy()

    rows = []
    for s in pd.unique(sites):
        idx = np.flatnonzero(sites == s)
        if idx.size < 3:
            warnings.warn(
                f"site {s!r} dropped: {idx.size} subject(s), too few for a per-site model",
                stacklevel=2,
            )
            continue
        e = eff_codes[idx]
        if np.ptp(e) == 0:
            warnings.warn(
                f"site {s!r} dropped: {effect!r} does not vary within the site", stacklevel=2
            )
            continue
        x = _site_design(e, cov[idx])
        if x.shape[0] - x.shape[1] < 1 + (measure == "z"):
            warnings.warn(
                f"site {s!r} dropped: {x.shape[0]} subjects leave no residual degrees of freedom "
                f"for {x.shape[1]} model terms",
                stacklevel=2,
            )
            continue
        y = y_all[idx]
        b = np.full(len(feats), np.nan)
        se = np.full(len(feats), np.nan)
        s2 = np.full(len(feats), np.nan)
        n_f = np.full(len(feats), float(idx.size))
        n1_f = np.full(len(feats), float(e.sum()) if binary else np.nan)
        df_f = np.full(len(feats), float(x.shape[0] - x.shape[1]))
        observed = np.isfinite(y)
        # Features sharing a pattern of missing subjects share a design: one OLS per pattern.
        if observed.all():
            patterns, which = np.ones((idx.size, 1), dtype=bool), np.zeros(len(feats), int)
        else:
            patterns, which = np.unique(observed, axis=1, return_inverse=True)
        for g in range(patterns.shape[1]):
            ok = patterns[:, g]
            cols = np.flatnonzero(which.ravel() == g)
            n_f[cols] = ok.sum()
            if binary:
                n1_f[cols] = e[ok].sum()
            if ok.sum() < 2 or np.ptp(e[ok]) == 0:
                continue
            xg = x if ok.all() else _site_design(e[ok], cov[idx][ok])
            if xg.shape[0] - xg.shape[1] < 1 + (measure == "z"):
                continue
            bg, seg, dfg, s2g = _ols_term(xg, y[np.ix_(ok, cols)], 1)
            b[cols], se[cols], df_f[cols], s2[cols] = bg, seg, dfg, s2g
        # zero residual variance up to rounding, relative to the data's own magnitude (a
        # feature constant at the site has sd 0 and b ~ 0: its scale is |y|)
        sd_y = np.nanstd(y, axis=0, ddof=1)
        scale = np.maximum(np.maximum(np.abs(b), sd_y), np.nanmean(np.abs(y), axis=0))
        perfect = se <= 1e-12 * scale
        if perfect.any():
            warnings.warn(
                f"site {s!r}: {int(perfect.sum())} feature(s) fitted perfectly (zero residual "
                f"variance), e.g. {feats[int(np.flatnonzero(perfect)[0])]!r}; left out",
                stacklevel=2,
            )
            b[perfect] = se[perfect] = np.nan
        with np.errstate(invalid="ignore", divide="ignore"):
            t = b / se
        rec: dict[str, Any] = {
            "feature": feats, "site": s, "n": n_f.astype(int), "n1": n1_f,
            "n2": n_f - n1_f, "df": df_f, "b": b, "t": t,
        }
        if measure == "d":
            n1, n2 = n1_f, n_f - n1_f
            if d_formula == "beta":
                d = b / np.sqrt(s2)
            else:
                d = d_from_t(t, n1, n2, df_f, d_formula)
            yi = hedges_j(df_f) * d if hedges else d
            rec["d"] = d
            rec["yi"] = yi
            rec["vi"] = 1.0 / n1 + 1.0 / n2 + yi**2 / (2.0 * (n1 + n2))
        elif measure == "z":
            r = t / np.sqrt(t**2 + df_f)
            rec["r"] = r
            rec["yi"] = np.arctanh(r)
            rec["vi"] = 1.0 / (df_f - 1.0)  # = 1 / (n - 3 - c)
        else:
            scale = np.std(e, ddof=1) / sd_y
            rec["yi"] = b * scale
            rec["vi"] = (se * scale) ** 2
        rec["sei"] = np.sqrt(rec["vi"])
        rec["measure"] = measure if measure != "d" else ("g" if hedges else "d")
        rec["level"] = level
        rows.append(pd.DataFrame(rec))
    if not rows:
        raise HarmonizationError(f"no site allows estimating {effect!r}")
    out = pd.concat(rows, ignore_index=True)
    out = out.dropna(subset=["yi", "vi"]).reset_index(drop=True)
    return out

