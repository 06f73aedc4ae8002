"""Shared helpers of the evaluation modules: input checks, design matrices, vectorised OLS."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from dmriharmony.errors import HarmonizationError


def check_columns(table: pd.DataFrame, columns: Sequence[str], what: str = "table") -> None:
    """Raise a one-line error naming the first column missing from ``table``."""
    if not isinstance(table, pd.DataFrame):
        raise HarmonizationError(f"{what} must be a pandas DataFrame, got {type(table).__name__}")
    for col in columns:
        if col not in table.columns:
            raise HarmonizationError(f"column {col!r} not found in {what} "
                                     f"(columns: {', '.join(map(str, table.columns[:12]))}...)")


def feature_matrix(table: pd.DataFrame, features: Sequence[str], what: str = "table") -> np.ndarray:
    """Return ``table[features]`` as a float (n, p) array; a clear error names a bad column."""
    check_columns(table, features, what)
    out = np.empty((len(table), len(features)))
    for k, f in enumerate(features):
        col = pd.to_numeric(table[f], errors="coerce").to_numpy(dtype=float)
        if np.isnan(col).all() and len(col):
            raise HarmonizationError(f"feature column {f!r} in {what} has no numeric values")
        out[:, k] = col
    return out


def covariate_design(
    table: pd.DataFrame, covariates: Sequence[str], what: str = "table"
) -> tuple[np.ndarray, list[str]]:
    """Encode covariates as numeric columns (no intercept).

    Numeric columns are used as they are; non-numeric (or boolean) columns are dummy coded with
    the first level (sorted) as reference. Returns the (n, k) matrix and the column names.
    """
    check_columns(table, covariates, what)
    blocks: list[np.ndarray] = []
    names: list[str] = []
    for c in covariates:
        col = table[c]
        if col.isna().any():
            raise HarmonizationError(f"covariate {c!r} in {what} has missing values")
        if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
            blocks.append(col.to_numpy(dtype=float)[:, None])
            names.append(c)
        else:
            levels = sorted(col.astype(str).unique())
            for lev in levels[1:]:
                blocks.append((col.astype(str) == lev).to_numpy(dtype=float)[:, None])
                names.append(f"{c}[{lev}]")
    if not blocks:
        return np.empty((len(table), 0)), []
    return np.hstack(blocks), names


def site_dummies(sites: np.ndarray, levels: Sequence[str]) -> np.ndarray:
    """One-hot site indicators (n, n_levels) for the given level order."""
    sites = np.asarray(sites).astype(str)
    return (sites[:, None] == np.asarray(levels, dtype=str)[None, :]).astype(float)


def ols(X: np.ndarray, Y: np.ndarray) -> dict[str, np.ndarray]:
    """Ordinary least squares for many responses at once.

    Parameters
    ----------
    X : (n, k) design (full column rank required).
    Y : (n, p) responses; NaNs are not allowed here (callers drop incomplete rows per feature).

    Returns
    -------
    dict with ``beta`` (k, p), ``se`` (k, p), ``sigma2`` (p,) residual variance on ``n - k``
    degrees of freedom, ``df`` and ``resid`` (n, p).
    """
    n, k = X.shape
    if n <= k:
        raise HarmonizationError(f"{n} rows are too few for a model with {k} terms")
    q, r = np.linalg.qr(X)
    if np.min(np.abs(np.diag(r))) < 1e-10 * max(1.0, np.max(np.abs(np.diag(r)))):
        raise HarmonizationError("the design matrix is rank deficient (a covariate is constant "
                                 "or confounded with site)")
    beta = np.linalg.solve(r, q.T @ Y)
    resid = Y - X @ beta
    df = n - k
    sigma2 = np.sum(resid**2, axis=0) / df
    rinv = np.linalg.inv(r)
    xtx_inv_diag = np.sum(rinv**2, axis=1)
    se = np.sqrt(np.outer(xtx_inv_diag, sigma2))
    return {"beta": beta, "se": se, "sigma2": sigma2, "df": np.asarray(df), "resid": resid}
