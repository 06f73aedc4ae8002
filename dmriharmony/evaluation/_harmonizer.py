"""How the evaluation talks to a harmonizer: fresh instances, fit on some rows, transform others."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from dmriharmony.errors import HarmonizationError


@runtime_checkable
class Harmonizer(Protocol):
    """What the evaluation needs: ``fit(X, sites, covariates)`` and ``transform(...)``."""

    def fit(self, X: Any, sites: Any, covariates: Any = None) -> Any: ...

    def transform(self, X: Any, sites: Any, covariates: Any = None) -> Any: ...


HarmonizerSpec = Harmonizer | Callable[[], Harmonizer] | type | None


def new_harmonizer(spec: HarmonizerSpec) -> Harmonizer:
    """Return a fresh, unfitted harmonizer from a class, a factory or a template instance.

    ``None`` gives :class:`NoHarmonization` (the identity).
    An instance is deep-copied (never refitted in place), so state learned in one
    cross-validation fold cannot reach another.
    """
    if spec is None:
        obj = NoHarmonization()
    elif isinstance(spec, type):
        obj = spec()
    elif isinstance(spec, Harmonizer):
        obj = copy.deepcopy(spec)
    elif callable(spec):
        obj = spec()
    else:
        raise HarmonizationError(f"cannot make a harmonizer from {spec!r}: give a class, a "
                                 "factory (callable) or an instance with fit/transform")
    if not isinstance(obj, Harmonizer):
        raise HarmonizationError(f"{type(obj).__name__} has no fit/transform methods")
    return obj


def fit_transform(
    spec: HarmonizerSpec,
    train: pd.DataFrame,
    apply_to: Sequence[pd.DataFrame],
    features: Sequence[str],
    site: str,
    covariates: Sequence[str],
) -> tuple[Harmonizer, list[np.ndarray]]:
    """Fit a fresh harmonizer on ``train`` and transform each table of ``apply_to``.

    Features are passed as a DataFrame (columns = feature names), sites as an array of labels and
    covariates as a DataFrame of the protected columns (``None`` when there are none).
    """
    h = new_harmonizer(spec)
    cov = list(covariates)

    def parts(df: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame | None]:
        X = df[list(features)].astype(float).reset_index(drop=True)
        c = df[cov].reset_index(drop=True) if cov else None
        return X, df[site].to_numpy(), c

    h.fit(*parts(train))
    out = []
    for df in apply_to:
        Xh = np.asarray(h.transform(*parts(df)), dtype=float)
        if Xh.shape != (len(df), len(features)):
            raise HarmonizationError(f"{type(h).__name__}.transform returned shape {Xh.shape}, "
                                     f"expected {(len(df), len(features))}")
        new_nan = np.isnan(Xh) & ~np.isnan(parts(df)[0].to_numpy(dtype=float))
        if new_nan.any():
            j = int(np.flatnonzero(new_nan.any(axis=0))[0])
            raise HarmonizationError(f"{type(h).__name__}.transform returned NaN for "
                                     f"{int(new_nan[:, j].sum())} observed values of feature "
                                     f"{features[j]!r}")
        out.append(Xh)
    return h, out


class NoHarmonization:
    """The identity "harmonizer": the baseline row of a comparison (raw data, site effects kept).

    ``fit`` only records the feature count; ``transform`` returns the features unchanged.
    """

    def fit(self, X: Any, sites: Any, covariates: Any = None) -> NoHarmonization:
        self.n_features_in_ = np.asarray(X, dtype=float).shape[1]
        return self

    def transform(self, X: Any, sites: Any, covariates: Any = None) -> np.ndarray:
        X = np.asarray(X, dtype=float)
        if X.ndim != 2 or X.shape[1] != getattr(self, "n_features_in_", X.shape[1]):
            raise HarmonizationError(f"expected {self.n_features_in_} feature columns, got "
                                     f"shape {X.shape}")
        return X.copy()


class CovariateSubset:
    """Wrap a harmonizer so that it protects only some of the covariates it is given.

    Used to show what happens when a biological term is *not* protected: with ``keep=["age",
    "sex"]`` a ComBat fit treats the diagnosis as noise, and removes the part of it that is
    confounded with site (Fortin et al., *NeuroImage* 2017, sec. 2.3: covariates must be
    included to be preserved).
    """

    def __init__(self, spec: HarmonizerSpec, keep: Sequence[str]) -> None:
        self.spec = spec
        self.keep = list(keep)

    def _subset(self, covariates: Any) -> pd.DataFrame | None:
        if not self.keep:
            return None
        if covariates is None:
            raise HarmonizationError(f"covariates {self.keep} requested but none given")
        cov = pd.DataFrame(covariates)
        missing = [c for c in self.keep if c not in cov.columns]
        if missing:
            raise HarmonizationError(f"covariate {missing[0]!r} not among {list(cov.columns)}")
        return cov[self.keep]

    def fit(self, X: Any, sites: Any, covariates: Any = None) -> CovariateSubset:
        self.harmonizer_ = new_harmonizer(self.spec)
        self.harmonizer_.fit(X, sites, self._subset(covariates))
        return self

    def transform(self, X: Any, sites: Any, covariates: Any = None) -> Any:
        if not hasattr(self, "harmonizer_"):
            raise HarmonizationError("CovariateSubset is not fitted: call fit first")
        return self.harmonizer_.transform(X, sites, self._subset(covariates))
