"""``backend="neurocombat"``: run the neuroCombat package (Fortin et al.) for exact reproduction.

neuroCombat 0.2.12 (the last release, unmaintained since 2021) calls ``np.int`` in its
``ref_batch`` path; the alias was removed in numpy 1.24, so the call crashes with an
``AttributeError`` there. :func:`numpy_int_alias` restores ``np.int = int`` only while
neuroCombat runs and removes it afterwards (site-packages are not edited; a lock makes the
temporary alias safe across threads of this process).

neuroCombat casts continuous covariates to float32 in its design matrix; the model stores that
so that :meth:`ComBat.transform` encodes new subjects identically. neuroCombat does not return
the covariate coefficients, only their fitted values (``mod.mean``); they are recovered by least
squares on the design columns, which is exact because ``mod.mean`` lies in their span.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd

from dmriharmony.errors import HarmonizationError
from dmriharmony.harmonizers._design import CovariateEncoder

__all__ = ["numpy_int_alias", "fit_neurocombat"]

_LOCK = threading.Lock()
_SITE_COL = "__dmriharmony_site__"


@contextlib.contextmanager
def numpy_int_alias() -> Iterator[None]:
    """Temporarily define ``np.int`` (removed in numpy 1.24) as the builtin ``int``."""
    with _LOCK:
        had = "int" in vars(np)
        if not had:
            setattr(np, "int", int)  # noqa: B010
        try:
            yield
        finally:
            if not had:
                delattr(np, "int")


def fit_neurocombat(
    X: np.ndarray,
    labels: np.ndarray,
    covariates: pd.DataFrame | None,
    enc: CovariateEncoder,
    C: np.ndarray,
    *,
    parametric: bool,
    eb: bool,
    mean_only: bool,
    ref_site: str | None,
) -> tuple[dict[str, Any], np.ndarray]:
    """Run ``neuroCombat.neuroCombat`` and convert its estimates to :class:`ComBat` state.

    Returns the state (attribute name -> value) and neuroCombat's harmonized data, shape (n, p).
    """
    try:
        from neuroCombat import neuroCombat
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise HarmonizationError("backend='neurocombat' needs the neuroCombat package") from exc
    if np.isnan(X).any():
        raise HarmonizationError(
            "backend='neurocombat' does not handle missing values (NaN); use backend='native'"
        )
    if any(kind == "smooth" for kind in enc.kinds_.values()):
        raise HarmonizationError("backend='neurocombat' has no smooth (GAM) terms")
    n, p = X.shape
    frame = pd.DataFrame({_SITE_COL: labels})
    cat_cols = [c for c in enc.columns_ if enc.kinds_[c] == "categorical"]
    num_cols = [c for c in enc.columns_ if enc.kinds_[c] == "continuous"]
    if covariates is not None:
        strcols = {str(c): c for c in covariates.columns}
        for name in enc.columns_:
            values = covariates[strcols[name]].to_numpy()
            frame[name] = values.astype(str) if name in cat_cols else values.astype(float)
    buf = io.StringIO()
    # neuroCombat's own 0/0 in its convergence check of the reference site is harmless there
    with numpy_int_alias(), contextlib.redirect_stdout(buf), np.errstate(all="ignore"):
        out = neuroCombat(
            dat=np.ascontiguousarray(X.T),
            covars=frame,
            batch_col=_SITE_COL,
            categorical_cols=cat_cols,
            continuous_cols=num_cols,
            eb=eb,
            parametric=parametric,
            mean_only=mean_only,
            ref_batch=None if ref_site is None else str(ref_site),
        )
    data = np.asarray(out["data"], dtype=float).T
    if np.isnan(data).any():
        raise HarmonizationError(
            "neuroCombat returned NaN (its non-parametric likelihood product underflows for sites"
            " with more than ~525 subjects, and it fails on single-subject sites or constant"
            " features); use backend='native'"
        )
    est = out["estimates"]
    k = len(est["batches"])
    mod_mean = np.asarray(est["mod.mean"], dtype=float)
    if C.shape[1]:
        beta = np.linalg.lstsq(C, mod_mean.T, rcond=None)[0]
    else:
        beta = np.zeros((0, p))

    def per_site(value: Any) -> np.ndarray:
        if value is None:
            return np.full(k, np.nan)
        return np.asarray(value, dtype=float).reshape(k)

    state = {
        "mean_only_": bool(mean_only),
        "adjusted_": np.ones(p, dtype=bool),
        "grand_mean_": np.asarray(est["stand.mean"], dtype=float)[:, 0].copy(),
        "beta_": beta,
        "var_pooled_": np.asarray(est["var.pooled"], dtype=float).ravel(),
        "gamma_hat_": np.asarray(est["gamma_hat"], dtype=float),
        "delta_hat_": np.asarray(est["delta_hat"], dtype=float),
        "gamma_star_": np.asarray(est["gamma.star"], dtype=float),
        "delta_star_": np.asarray(est["delta.star"], dtype=float),
        "gamma_bar_": per_site(est["gamma_bar"]),
        "t2_": per_site(est["t2"]),
        "a_prior_": per_site(est["a_prior"]),
        "b_prior_": per_site(est["b_prior"]),
    }
    return state, data
