"""Design-matrix helpers shared by the harmonizers.

This module turns a table of subjects' covariates into the numeric columns of a linear model
(the ``mod`` matrix of sva::ComBat / neuroCombat), remembers how it did so (categorical levels,
column order, spline knots) so that new subjects are encoded identically at transform time, and
serialises that encoding to plain JSON.

Encoding rules (neuroCombat semantics, Fortin et al. 2017):

- categorical column -> one 0/1 dummy per level except the reference level, which is the first
  level in sorted order (``np.unique`` order, as neuroCombat's ``make_design_matrix``);
- numeric column -> itself, as a continuous regressor;
- site -> a full one-hot block (no intercept column: the site block spans it); with a reference
  site its column is all ones, as sva's ``ref.batch`` (Zhang et al. 2018).

Columns are categorical when their dtype is object / string / category / bool, numeric otherwise,
unless the caller names them explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from dmriharmony.errors import HarmonizationError

__all__ = [
    "CovariateEncoder",
    "as_site_labels",
    "check_design_rank",
    "natural_cubic_basis",
    "natural_cubic_penalty",
    "site_onehot",
]


def as_site_labels(sites: Any, n: int | None = None, *, what: str = "sites") -> np.ndarray:
    """Return site labels as a 1-D array of ``str``, checking length and missing labels.

    Parameters
    ----------
    sites : array-like or pandas.Series
        One label per row (scan).
    n : int, optional
        Expected number of rows.
    what : str
        Name used in error messages.

    Returns
    -------
    numpy.ndarray of str
    """
    arr = np.asarray(sites, dtype=object).ravel()
    if n is not None and arr.shape[0] != n:
        raise HarmonizationError(f"{what} has {arr.shape[0]} labels but the data have {n} rows")
    missing = pd.isna(pd.Series(arr))
    if missing.any():
        row = int(np.flatnonzero(missing.to_numpy())[0])
        raise HarmonizationError(f"{what} has a missing site label (first at row {row})")
    return np.array([str(s) for s in arr], dtype=str)


def site_onehot(codes: np.ndarray, n_sites: int, ref_index: int | None = None) -> np.ndarray:
    """Site indicator block of the ComBat design (Johnson et al. 2007, eq. 2.1).

    With ``ref_index`` the reference site's column is all ones (sva ``ref.batch``), so the other
    site coefficients become differences from the reference site.
    """
    block = np.zeros((codes.shape[0], n_sites))
    block[np.arange(codes.shape[0]), codes] = 1.0
    if ref_index is not None:
        block[:, ref_index] = 1.0
    return block


def natural_cubic_basis(x: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Natural cubic regression spline basis without intercept.

    Truncated-power form of Hastie, Tibshirani & Friedman, *Elements of Statistical Learning*
    (2009), eqs. 5.4-5.5: ``N_1 = x``, ``N_{k+1} = d_k - d_{K-1}`` with
    ``d_k = ((x - xi_k)_+^3 - (x - xi_K)_+^3) / (xi_K - xi_k)``, ``k = 1..K-2``. The basis is
    cubic between the boundary knots ``xi_1``, ``xi_K`` and *linear* beyond them, so values
    outside the training range are extrapolated linearly (not with an exploding cubic).
    ``x`` and ``knots`` are rescaled to the boundary knots' unit interval first for conditioning.

    Parameters
    ----------
    x : ndarray, shape (n,)
    knots : ndarray, shape (K,), sorted, K >= 2 (first and last are the boundary knots)

    Returns
    -------
    ndarray, shape (n, K - 1)
    """
    knots = np.asarray(knots, dtype=float)
    lo, hi = knots[0], knots[-1]
    scale = hi - lo if hi > lo else 1.0
    u = (np.asarray(x, dtype=float) - lo) / scale
    k = (knots - lo) / scale
    K = k.shape[0]
    cols = [u]

    def d(j: int) -> np.ndarray:
        return (np.clip(u - k[j], 0, None) ** 3 - np.clip(u - k[-1], 0, None) ** 3) / (k[-1] - k[j])

    if K > 2:
        last = d(K - 2)
        for j in range(K - 2):
            cols.append(d(j) - last)
    return np.column_stack(cols)


def natural_cubic_penalty(knots: np.ndarray) -> np.ndarray:
    """Roughness penalty ``P_jk = integral N_j''(u) N_k''(u) du`` of :func:`natural_cubic_basis`.

    The second derivatives are linear between knots and zero outside the boundary knots, so
    Simpson's rule on each inter-knot interval integrates their products exactly (in the
    rescaled unit interval used by the basis). The linear column ``N_1`` is unpenalised (its
    row and column are zero), so a penalised fit shrinks towards a straight line, as a
    smoothing spline does (Hastie et al. 2009, section 5.4; Wood 2017, section 5.3).
    """
    knots = np.asarray(knots, dtype=float)
    lo, hi = knots[0], knots[-1]
    scale = hi - lo if hi > lo else 1.0
    k = (knots - lo) / scale
    K = k.shape[0]
    m = K - 1
    if K <= 2:
        return np.zeros((m, m))

    def second(u: np.ndarray) -> np.ndarray:
        def dd(j: int) -> np.ndarray:
            return 6.0 * (np.clip(u - k[j], 0, None) - np.clip(u - k[-1], 0, None)) / (k[-1] - k[j])

        last = dd(K - 2)
        cols = [np.zeros_like(u)] + [dd(j) - last for j in range(K - 2)]
        return np.column_stack(cols)

    P = np.zeros((m, m))
    for a, b in zip(k[:-1], k[1:]):
        u = np.array([a, 0.5 * (a + b), b])
        S = second(u)
        w = np.array([1.0, 4.0, 1.0]) * (b - a) / 6.0
        P += S.T @ (w[:, None] * S)
    return P


def check_design_rank(
    site_block: np.ndarray, cov: np.ndarray, names: Sequence[str], sites: Sequence[str]
) -> None:
    """Raise if covariate columns are confounded with site or with each other.

    Adds the covariate columns one by one to the site block and reports every column that does
    not increase the rank (i.e. is a linear combination of site indicators and earlier columns).
    """
    if cov.shape[1] == 0:
        return
    full = np.hstack([site_block, cov])
    if np.linalg.matrix_rank(full) == full.shape[1]:
        return
    bad = []
    current = site_block
    rank = np.linalg.matrix_rank(current)
    for j, name in enumerate(names):
        trial = np.hstack([current, cov[:, j : j + 1]])
        r = np.linalg.matrix_rank(trial)
        if r == rank:
            bad.append(name)
        else:
            current, rank = trial, r
    raise HarmonizationError(
        "covariate column(s) " + ", ".join(repr(b) for b in bad)
        + " are confounded with site (or with other covariates); the design is rank-deficient,"
        + f" so their effect cannot be separated from the site effect (sites: {', '.join(sites)})"
    )


class CovariateEncoder:
    """Encode a covariate table into design-matrix columns, remembering the encoding.

    Parameters
    ----------
    categorical : sequence of str, optional
        Columns to treat as categorical (default: inferred from dtype).
    continuous : sequence of str, optional
        Columns to treat as continuous (default: inferred from dtype).
    smooth : dict, optional
        ``{column: n_knots}`` for columns expanded in a natural cubic spline basis
        (:func:`natural_cubic_basis`) with knots at training quantiles (used by ComBat-GAM).
    """

    def __init__(
        self,
        categorical: Sequence[str] | None = None,
        continuous: Sequence[str] | None = None,
        smooth: dict[str, int] | None = None,
    ) -> None:
        self.categorical = list(categorical) if categorical is not None else None
        self.continuous = list(continuous) if continuous is not None else None
        self.smooth = dict(smooth or {})
        self.columns_: list[str] = []
        self.kinds_: dict[str, str] = {}
        self.levels_: dict[str, list[str]] = {}
        self.knots_: dict[str, list[float]] = {}
        self.design_names_: list[str] = []

    # -- fitting ------------------------------------------------------------------------------
    def fit(self, covariates: pd.DataFrame | None, n: int) -> CovariateEncoder:
        """Learn column kinds, categorical levels and spline knots from training covariates."""
        cov = self._check_frame(covariates, n, fitted=False)
        self.columns_, self.kinds_, self.levels_, self.knots_ = [], {}, {}, {}
        if cov is None:
            self.design_names_ = []
            return self
        for name in self.smooth:
            if name not in cov.columns:
                raise HarmonizationError(f"smooth term {name!r} is not a covariates column")
        for col in cov.columns:
            name = str(col)
            series = cov[col]
            if name in self.smooth:
                kind = "smooth"
            elif self.categorical is not None and name in self.categorical:
                kind = "categorical"
            elif self.continuous is not None and name in self.continuous:
                kind = "continuous"
            elif self.categorical is not None or self.continuous is not None:
                continue  # explicit lists given: ignore other columns
            elif _is_categorical(series):
                kind = "categorical"
            else:
                kind = "continuous"
            self.columns_.append(name)
            self.kinds_[name] = kind
            if kind == "categorical":
                levels = _sorted_levels(series)
                if len(levels) < 2:
                    raise HarmonizationError(
                        f"categorical covariate {name!r} has a single level {levels[0]!r}"
                    )
                self.levels_[name] = levels
            elif kind in ("continuous", "smooth"):
                values = _numeric(series, name)
                if kind == "smooth":
                    n_knots = int(self.smooth[name])
                    if n_knots < 2:
                        raise HarmonizationError(f"smooth term {name!r} needs at least 2 knots")
                    knots = np.unique(np.quantile(values, np.linspace(0, 1, n_knots)))
                    if knots.shape[0] < 2:
                        raise HarmonizationError(f"smooth term {name!r} is constant")
                    self.knots_[name] = [float(k) for k in knots]
        for name in (self.categorical or []) + (self.continuous or []):
            if name not in cov.columns.astype(str):
                raise HarmonizationError(f"covariate column {name!r} not found in covariates")
        self.design_names_ = self._names()
        return self

    def _names(self) -> list[str]:
        names: list[str] = []
        for name in self.columns_:
            kind = self.kinds_[name]
            if kind == "categorical":
                names += [f"{name}[{lev}]" for lev in self.levels_[name][1:]]
            elif kind == "smooth":
                names += [f"s({name})_{j}" for j in range(len(self.knots_[name]) - 1)]
            else:
                names.append(name)
        return names

    # -- transforming -------------------------------------------------------------------------
    def transform(self, covariates: pd.DataFrame | None, n: int) -> np.ndarray:
        """Design columns (n, q) for ``covariates`` with the learned encoding."""
        if not self.columns_:
            return np.zeros((n, 0))
        cov = self._check_frame(covariates, n, fitted=True)
        assert cov is not None
        cols = []
        strcols = {str(c): c for c in cov.columns}
        for name in self.columns_:
            series = cov[strcols[name]]
            kind = self.kinds_[name]
            if kind == "categorical":
                values = np.array([str(v) for v in series])
                levels = self.levels_[name]
                unseen = sorted(set(values) - set(levels))
                if unseen:
                    raise HarmonizationError(
                        f"covariate {name!r} has level(s) {unseen} not seen when fitting"
                        f" (known: {levels})"
                    )
                for lev in levels[1:]:
                    cols.append((values == lev).astype(float)[:, None])
            elif kind == "smooth":
                knots = np.array(self.knots_[name])
                cols.append(natural_cubic_basis(_numeric(series, name), knots))
            else:
                cols.append(_numeric(series, name)[:, None])
        return np.hstack(cols)

    def _check_frame(self, covariates: Any, n: int, *, fitted: bool) -> pd.DataFrame | None:
        if covariates is None:
            if fitted and self.columns_:
                raise HarmonizationError(
                    f"covariates are required (the model was fitted with {self.columns_})"
                )
            return None
        if isinstance(covariates, pd.Series):
            covariates = covariates.to_frame()
        if not isinstance(covariates, pd.DataFrame):
            raise HarmonizationError("covariates must be a pandas DataFrame (or None)")
        if covariates.shape[0] != n:
            raise HarmonizationError(
                f"covariates has {covariates.shape[0]} rows but the data have {n} rows"
            )
        names = [str(c) for c in covariates.columns]
        if fitted:
            needed = self.columns_
        elif self.categorical is not None or self.continuous is not None:
            needed = list(self.categorical or []) + list(self.continuous or []) + list(self.smooth)
        else:
            needed = names
        for name in needed:
            if name not in names:
                raise HarmonizationError(f"covariate column {name!r} missing from covariates")
            col = covariates[covariates.columns[names.index(name)]]
            if col.isna().any():
                row = covariates.index[int(np.flatnonzero(col.isna().to_numpy())[0])]
                raise HarmonizationError(
                    f"covariate column {name!r} has missing values (first at row {row!r})"
                )
        return covariates

    # -- persistence --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return {
            "categorical": self.categorical,
            "continuous": self.continuous,
            "smooth": self.smooth,
            "columns": self.columns_,
            "kinds": self.kinds_,
            "levels": self.levels_,
            "knots": self.knots_,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> CovariateEncoder:
        """Rebuild an encoder saved with :meth:`to_dict`."""
        enc = cls(state.get("categorical"), state.get("continuous"), state.get("smooth"))
        enc.columns_ = list(state["columns"])
        enc.kinds_ = dict(state["kinds"])
        enc.levels_ = {k: list(v) for k, v in state["levels"].items()}
        enc.knots_ = {k: list(v) for k, v in state.get("knots", {}).items()}
        enc.design_names_ = enc._names()
        return enc


def _sorted_levels(series: pd.Series) -> list[str]:
    """Distinct values as strings, in ``np.unique`` order of the raw values (numeric order for
    numbers, so the reference level is the one neuroCombat's ``make_design_matrix`` drops)."""
    values = series.to_numpy()
    if pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series):
        return [str(v) for v in np.unique(values)]
    return sorted({str(v) for v in values})


def _is_categorical(series: pd.Series) -> bool:
    return bool(
        isinstance(series.dtype, pd.CategoricalDtype)
        or pd.api.types.is_bool_dtype(series)
        or pd.api.types.is_object_dtype(series)
        or pd.api.types.is_string_dtype(series)
    )


def _numeric(series: pd.Series, name: str) -> np.ndarray:
    try:
        values = pd.to_numeric(series).to_numpy(dtype=float)
    except (ValueError, TypeError) as exc:
        raise HarmonizationError(f"covariate column {name!r} is not numeric") from exc
    if not np.all(np.isfinite(values)):
        raise HarmonizationError(f"covariate column {name!r} has non-finite values")
    return values
