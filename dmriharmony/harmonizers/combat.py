"""ComBat harmonization (Johnson, Li & Rabinovic 2007; Fortin et al. 2017, 2018).

Model (Johnson et al. 2007, eq. 2.1; Fortin et al. 2017, eq. 1), for subject ``j`` of site ``i``
and feature ``v``::

    y_ijv = alpha_v + x_ij' beta_v + gamma_iv + delta_iv * eps_ijv,   eps_ijv ~ N(0, sigma_v^2)

``x_ij`` are the covariates whose effects are protected (age, sex, diagnosis...). ComBat
standardises each feature with the pooled location/scale fit, estimates the site effects
``gamma_iv`` (additive) and ``delta_iv`` (multiplicative), shrinks them across features by
empirical Bayes -- parametric (normal / inverse-gamma priors, Johnson et al. eqs. 3.1-3.2) or
non-parametric (the empirical distribution of the other features' estimates, section 3.2) --
and removes them::

    y*_ijv = sigma_v (z_ijv - gamma*_iv) / sqrt(delta*_iv) + alpha_v + x_ij' beta_v.

The native implementation here is vectorised over features and follows sva::ComBat (Leek et al.,
the reference implementation) and neuroCombat (Fortin) formula by formula, so the two agree to
rounding. Behaviour at the edges, as sva does and documented here:

- a feature constant within a site (zero variance there), or with no observed value at a site,
  is left unadjusted everywhere and kept out of the prior estimates (sva ``zero.rows``;
  neuroCombat instead adjusts it and its bogus estimates shift every other feature's prior);
- a site with a single subject switches the whole model to the mean-only version with a warning
  (sva: ``if(any(table(batch)==1)) mean.only=TRUE``; neuroCombat returns all-NaN);
- missing values (NaN) are handled per feature: each feature's regression, pooled variance and
  site estimates use its observed values only; NaN stay NaN in the output. (sva's NA branch
  estimates the pooled variance with ``rowVars`` -- centred, ddof=1 -- unlike its complete-data
  branch; we use the complete-data estimator, the mean squared residual over observed values,
  for every feature, so a feature's result does not jump when one value goes missing);
- covariates confounded with site raise :class:`~dmriharmony.errors.HarmonizationError` naming the
  columns (sva stops with "covariate is confounded with batch");
- the parametric EB iteration stops by sva's rule (``max |new - old| / old <= 1e-4``);
- the non-parametric EB is computed in log space from each feature's sufficient statistics
  (:func:`~dmriharmony.harmonizers._combat_eb.nonparametric_eb`): finite at any site size
  (neuroCombat's density product underflows to NaN above ~525 subjects per site) and O(p^2)
  per site instead of O(p^2 n).

A fitted model harmonizes subjects that arrive later from the same sites with *their own*
covariates (the covariate effects are recomputed from the stored coefficients), unlike
neuroCombat's ``neuroCombatFromTraining`` that applies the training average; an unseen site is
an error. ``backend="neurocombat"`` runs the neuroCombat package itself for exact reproduction
(see :mod:`~dmriharmony.harmonizers._combat_neuro`).

References
----------
Johnson WE, Li C, Rabinovic A. Adjusting batch effects in microarray expression data using
empirical Bayes methods. Biostatistics 8(1):118-127, 2007.
Fortin J-P et al. Harmonization of multi-site diffusion tensor imaging data. NeuroImage 161:
149-170, 2017.
Zhang Y, Jenkins DF, Manimaran S, Johnson WE. Alternative empirical Bayes models for adjusting
for batch effects in genomic studies. BMC Bioinformatics 19:262, 2018 (reference-batch ComBat,
sva ``ref.batch``).
Leek JT et al. sva: Surrogate Variable Analysis, Bioconductor R package (``ComBat``).
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import numpy as np
import pandas as pd
from scipy.linalg import solve_triangular

from dmriharmony.errors import HarmonizationError
from dmriharmony.harmonizers import _combat_eb as ebm
from dmriharmony.harmonizers._combat_io import read_model, write_model
from dmriharmony.harmonizers._design import (
    CovariateEncoder,
    as_site_labels,
    check_design_rank,
    site_onehot,
)

__all__ = ["ComBat"]

log = logging.getLogger(__name__)

_BACKENDS = ("native", "neurocombat")


def as_feature_matrix(X: Any, *, what: str = "X") -> tuple[np.ndarray, list[str] | None]:
    """Return ``X`` as a float64 ``(subjects, features)`` array and its feature names.

    NaN (missing) values are allowed; infinities and non-numeric columns are errors.
    """
    names = None
    if isinstance(X, pd.DataFrame):
        names = [str(c) for c in X.columns]
        for col in X.columns:
            if not (pd.api.types.is_numeric_dtype(X[col]) or pd.api.types.is_bool_dtype(X[col])):
                raise HarmonizationError(f"{what} column {col!r} is not numeric")
        arr = X.to_numpy(dtype=float, na_value=np.nan)
    else:
        try:
            arr = np.asarray(X, dtype=float)  # no copy: X is never modified
        except (TypeError, ValueError) as exc:
            raise HarmonizationError(f"{what} is not a numeric array ({exc})") from exc
    if arr.ndim != 2:
        raise HarmonizationError(f"{what} must be 2-D (subjects x features), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise HarmonizationError(f"{what} is empty (shape {arr.shape})")
    if np.isinf(arr).any():
        col = int(np.flatnonzero(np.isinf(arr).any(axis=0))[0])
        label = names[col] if names else f"#{col}"
        raise HarmonizationError(f"{what} has infinite values in feature {label}")
    return arr, names


class ComBat:
    """ComBat harmonization of a subjects x features table (Johnson 2007, Fortin 2017).

    Parameters
    ----------
    parametric : bool
        Parametric (normal / inverse-gamma priors) or non-parametric empirical Bayes.
    mean_only : bool
        Adjust the site locations only (``delta = 1``).
    ref_site : str, optional
        Reference site (sva ``ref.batch``): its data are left unchanged and the other sites are
        mapped onto its location and scale; the pooled variance is estimated on it alone.
    eb : bool
        Shrink the site estimates by empirical Bayes (``False``: plain location/scale estimates).
    backend : {"native", "neurocombat"}
        ``"native"``: the vectorised implementation of this module. ``"neurocombat"``: call the
        neuroCombat package (exact reproduction of its results, with its limitations: no
        missing values, all-NaN output for non-parametric EB on large sites).
    categorical, continuous : sequence of str, optional
        Covariate columns to protect, by kind. By default every column of ``covariates`` is
        used, object/string/category/bool columns as categorical and numeric ones as
        continuous.
    conv : float
        Convergence threshold of the parametric EB iteration (sva: 1e-4).
    engine : {"auto", "torch", "numpy"}
        Array library of the non-parametric pair loop.

    Attributes
    ----------
    sites_ : ndarray of str
        Site labels in sorted order (the row order of the site estimates).
    n_per_site_ : ndarray of int
    grand_mean_ : ndarray (p,)
        ``alpha_v``: site-size-weighted mean of the site intercepts (reference site's with
        ``ref_site``).
    beta_ : ndarray (q, p)
        Covariate coefficients, one row per design column (``covariate_names_``).
    var_pooled_ : ndarray (p,)
        ``sigma_v^2``.
    gamma_hat_, delta_hat_, gamma_star_, delta_star_ : ndarray (k, p)
        Site location/scale estimates before and after empirical Bayes.
    gamma_bar_, t2_, a_prior_, b_prior_ : ndarray (k,)
        Prior hyper-parameters per site (NaN where not used).
    adjusted_ : ndarray of bool (p,)
        Features that are harmonized (others are returned unchanged; their estimates are NaN).
    mean_only_ : bool
        Whether the mean-only model was used (also set when a site has a single subject).
    """

    def __init__(
        self,
        parametric: bool = True,
        mean_only: bool = False,
        ref_site: str | None = None,
        eb: bool = True,
        *,
        backend: str = "native",
        categorical: list[str] | None = None,
        continuous: list[str] | None = None,
        conv: float = 1e-4,
        engine: str = "auto",
    ) -> None:
        self.parametric = parametric
        self.mean_only = mean_only
        self.ref_site = ref_site
        self.eb = eb
        self.backend = backend
        self.categorical = categorical
        self.continuous = continuous
        self.conv = conv
        self.engine = engine

    # ------------------------------------------------------------------------------------------
    # hooks for the variants
    def _smooth_spec(self) -> dict[str, int]:
        """Covariates expanded in a spline basis (ComBat-GAM overrides)."""
        return {}

    def _fit_location(self, design: np.ndarray, Y: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Coefficients ``B`` (m, f) of ``Y ~ design`` (OLS); ``Y`` holds features ``cols``."""
        return _ols(design, Y)

    def _params(self) -> dict[str, Any]:
        return {
            "parametric": bool(self.parametric),
            "mean_only": bool(self.mean_only),
            "ref_site": None if self.ref_site is None else str(self.ref_site),
            "eb": bool(self.eb),
            "backend": self.backend,
            "categorical": self.categorical,
            "continuous": self.continuous,
            "conv": float(self.conv),
            "engine": self.engine,
        }

    # ------------------------------------------------------------------------------------------
    def fit(self, X: Any, sites: Any, covariates: pd.DataFrame | None = None) -> ComBat:
        """Estimate the ComBat model on training data.

        Parameters
        ----------
        X : array-like or DataFrame, shape (n_subjects, n_features)
        sites : array-like, shape (n_subjects,)
        covariates : DataFrame with n_subjects rows, optional
            Biological covariates whose effects are protected.
        """
        self._fit(X, sites, covariates)
        return self

    def fit_transform(self, X: Any, sites: Any, covariates: pd.DataFrame | None = None) -> Any:
        """Fit, then harmonize the training data (same result as ``fit(...).transform(...)``)."""
        direct = self._fit(X, sites, covariates)
        if direct is not None:  # neuroCombat backend: return its own output exactly
            return self._wrap(X, direct)
        return self.transform(X, sites, covariates)

    def _fit(self, X: Any, sites: Any, covariates: pd.DataFrame | None) -> np.ndarray | None:
        if self.backend not in _BACKENDS:
            raise HarmonizationError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")
        Xa, names = as_feature_matrix(X)
        n, p = Xa.shape
        labels = as_site_labels(sites, n)
        levels, codes = np.unique(labels, return_inverse=True)
        if levels.shape[0] < 2:
            raise HarmonizationError(f"ComBat needs at least 2 sites, got only {levels[0]!r}")
        ref_index = None
        if self.ref_site is not None:
            if str(self.ref_site) not in levels:
                raise HarmonizationError(
                    f"reference site {self.ref_site!r} is not among the sites {list(levels)}"
                )
            ref_index = int(np.flatnonzero(levels == str(self.ref_site))[0])
        counts = np.bincount(codes, minlength=levels.shape[0])
        enc = CovariateEncoder(self.categorical, self.continuous, self._smooth_spec())
        enc.fit(covariates, n)
        float32 = self.backend == "neurocombat"
        C = _encode(enc, covariates, n, float32)
        site_block = site_onehot(codes, levels.shape[0], ref_index)
        check_design_rank(site_block, C, enc.design_names_, list(levels))

        self.sites_ = levels
        self.n_per_site_ = counts
        self.encoder_ = enc
        self.covariate_names_ = list(enc.design_names_)
        self.feature_names_ = names
        self.n_features_in_ = p
        self.ref_index_ = ref_index
        self.float32_covariates_ = float32
        if self.backend == "neurocombat":
            from dmriharmony.harmonizers._combat_neuro import fit_neurocombat

            state, data = fit_neurocombat(
                Xa, labels, covariates, enc, C, parametric=self.parametric, eb=self.eb,
                mean_only=self.mean_only, ref_site=self.ref_site,
            )
            for key, value in state.items():
                setattr(self, key, value)
            return data
        self._fit_native(Xa, codes, counts, ref_index, site_block, C)
        return None

    # ------------------------------------------------------------------------------------------
    def _fit_native(
        self,
        X: np.ndarray,
        codes: np.ndarray,
        counts: np.ndarray,
        ref: int | None,
        site_block: np.ndarray,
        C: np.ndarray,
    ) -> None:
        n, p = X.shape
        k = counts.shape[0]
        mean_only = bool(self.mean_only)
        if counts.min() < 2:
            if ref is not None and counts[ref] < 2:
                raise HarmonizationError(
                    f"reference site {self.sites_[ref]!r} has {counts[ref]} subject; the pooled"
                    " variance is estimated on the reference site alone and needs at least 2"
                )
            if not mean_only:
                single = [str(s) for s in self.sites_[counts < 2]]
                warnings.warn(
                    f"site(s) {single} have a single subject: using the mean-only ComBat for all"
                    " sites (as sva::ComBat)",
                    stacklevel=4,
                )
            mean_only = True
        self.mean_only_ = mean_only

        finite = np.isfinite(X)
        site_rows = [np.flatnonzero(codes == i) for i in range(k)]
        adjustable = _adjustable_features(X, finite, site_rows, counts, mean_only)
        D = np.hstack([site_block, C])
        B, estimable = _regress(D, X, finite, adjustable, self._fit_location)
        adjustable &= estimable

        # residuals of the location model, in one n x p buffer (reused for the standardised data)
        resid = D @ np.nan_to_num(B)
        np.subtract(X, resid, out=resid)
        has_nan = ~finite.all(axis=0)
        # pooled variance: mean squared residual (over the reference site with ref_site)
        var_pooled = _mean_square(resid, None if ref is None else site_rows[ref], finite, has_nan)
        adjustable &= np.isfinite(var_pooled) & (var_pooled > 0)
        if not adjustable.any():
            raise HarmonizationError(
                "no feature can be harmonized: every feature is constant within a site, missing"
                " at a site, or not estimable"
            )
        n_skip = int((~adjustable).sum())
        if n_skip:
            bad = np.flatnonzero(~adjustable)
            shown = ", ".join(self._feature_label(j) for j in bad[:5])
            warnings.warn(
                f"{n_skip} feature(s) left unadjusted (constant within a site, no observed value"
                f" at a site, or not estimable), e.g. {shown}",
                stacklevel=4,
            )

        cols = np.flatnonzero(adjustable)
        every = cols.shape[0] == p
        Bs = B[:k][:, cols]
        grand = Bs[ref] if ref is not None else (counts / n) @ Bs
        beta = B[k:][:, cols]
        vp = var_pooled[cols]
        # standardised data z = (y - alpha - x'beta) / sigma = (resid + site part - alpha) / sigma
        z = resid if every else resid[:, cols]
        del resid
        for i in range(k):
            z[_rows(site_rows[i])] += site_block[site_rows[i][0]] @ Bs - grand
        z /= np.sqrt(vp)
        nan_sub = has_nan[cols]

        f = cols.shape[0]
        n_obs = np.zeros((k, f))
        means = np.zeros((k, f))
        ss = np.zeros((k, f))
        for i in range(k):
            zi = z[_rows(site_rows[i])]  # a view when contiguous: z is not needed afterwards
            if not nan_sub.any():
                c = np.full(f, float(site_rows[i].shape[0]))
                m = zi.mean(axis=0)
                zi -= m
            else:
                miss = ~finite[site_rows[i]][:, cols]
                c = (~miss).sum(axis=0).astype(float)
                zi[miss] = 0.0
                m = zi.sum(axis=0) / c
                zi -= m
                zi[miss] = 0.0
            n_obs[i], means[i], ss[i] = c, m, np.einsum("ij,ij->j", zi, zi)
            del zi
        del z
        gamma_hat = means - means[ref] if ref is not None else means.copy()
        if ref is not None:
            gamma_hat[ref] = means[ref]
        with np.errstate(divide="ignore", invalid="ignore"):
            delta_hat = np.ones((k, f)) if mean_only else ss / (n_obs - 1.0)

        gamma_star = gamma_hat.copy()
        delta_star = delta_hat.copy()
        gbar = np.full(k, np.nan)
        t2 = np.full(k, np.nan)
        a_pr = np.full(k, np.nan)
        b_pr = np.full(k, np.nan)
        if self.eb:
            for i in range(k):
                gbar[i], t2[i] = ebm.gamma_prior(gamma_hat[i])
                if not mean_only:
                    a_pr[i], b_pr[i] = ebm.delta_prior(delta_hat[i])
                if i == ref:
                    continue
                log.info("ComBat: empirical Bayes for site %s (%d features)", self.sites_[i], f)
                if self.parametric and mean_only:
                    gamma_star[i] = ebm.mean_only_eb(gamma_hat[i], gbar[i], t2[i])
                elif self.parametric:
                    gamma_star[i], delta_star[i] = ebm.parametric_eb(
                        n_obs[i], means[i], ss[i], gamma_hat[i], delta_hat[i],
                        gbar[i], t2[i], a_pr[i], b_pr[i], conv=self.conv,
                    )
                else:
                    gamma_star[i], delta_star[i] = ebm.nonparametric_eb(
                        n_obs[i], means[i], ss[i], gamma_hat[i], delta_hat[i], engine=self.engine
                    )
                if mean_only:
                    delta_star[i] = 1.0
        if ref is not None:
            gamma_star[ref] = 0.0
            delta_star[ref] = 1.0

        def full(a: np.ndarray) -> np.ndarray:
            out = np.full(a.shape[:-1] + (p,), np.nan)
            out[..., cols] = a
            return out

        self.adjusted_ = adjustable
        self.grand_mean_ = full(grand)
        self.beta_ = full(beta)
        self.var_pooled_ = full(vp)
        self.gamma_hat_ = full(gamma_hat)
        self.delta_hat_ = full(delta_hat)
        self.gamma_star_ = full(gamma_star)
        self.delta_star_ = full(delta_star)
        self.gamma_bar_, self.t2_, self.a_prior_, self.b_prior_ = gbar, t2, a_pr, b_pr

    # ------------------------------------------------------------------------------------------
    def transform(self, X: Any, sites: Any, covariates: pd.DataFrame | None = None) -> Any:
        """Harmonize subjects of the training sites with the fitted model.

        New subjects use their own covariates. Rows of the reference site, features the model
        left unadjusted and missing values are returned unchanged.

        Returns
        -------
        ndarray or DataFrame (same type, index and columns as ``X``)
        """
        self._check_fitted()
        Xa, names = as_feature_matrix(X)
        n, p = Xa.shape
        if p != self.n_features_in_:
            raise HarmonizationError(
                f"X has {p} features but the model was fitted on {self.n_features_in_}"
            )
        if names is not None and self.feature_names_ is not None and names != self.feature_names_:
            got, want = next((a, b) for a, b in zip(names, self.feature_names_) if a != b)
            raise HarmonizationError(
                f"X has feature column {got!r} where the fitted model has {want!r}"
            )
        labels = as_site_labels(sites, n)
        unseen = sorted(set(labels) - set(self.sites_))
        if unseen:
            raise HarmonizationError(
                f"site(s) {unseen} were not seen when fitting (known: {list(self.sites_)});"
                " ComBat cannot harmonize a site it has no estimates for"
            )
        codes = np.searchsorted(self.sites_, labels)
        C = _encode(self.encoder_, covariates, n, self.float32_covariates_)
        return self._wrap(X, self._apply(Xa, codes, C))

    def _apply(self, X: np.ndarray, codes: np.ndarray, C: np.ndarray) -> np.ndarray:
        """``y* = (y - m) / sqrt(delta*) + m - gamma* sigma / sqrt(delta*)``, ``m = alpha + x'beta``
        (the ComBat adjustment, Johnson et al. 2007 eq. 2.4, rearranged), site by site."""
        cols = np.flatnonzero(self.adjusted_)
        every = cols.shape[0] == X.shape[1]
        out = np.empty_like(X) if every else X.copy()
        sd = np.sqrt(self.var_pooled_[cols])
        beta = self.beta_[:, cols]
        grand = self.grand_mean_[cols]
        for i in np.unique(codes):
            idx = np.flatnonzero(codes == i)
            rows = _rows(idx)
            if i == self.ref_index_:
                if every:
                    out[rows] = X[rows]
                continue
            mean = C[rows] @ beta
            mean += grand
            inv = 1.0 / np.sqrt(self.delta_star_[i, cols])
            if every and isinstance(rows, slice):  # write straight into the output (a view)
                y = out[rows]
                np.subtract(X[rows], mean, out=y)
            else:
                y = X[rows] if every else X[np.ix_(idx, cols)]
                y -= mean
            y *= inv
            mean -= self.gamma_star_[i, cols] * sd * inv
            y += mean
            if not (every and isinstance(rows, slice)):
                if every:
                    out[rows] = y
                else:
                    out[np.ix_(idx, cols)] = y
        return out

    @staticmethod
    def _wrap(X: Any, arr: np.ndarray) -> Any:
        if isinstance(X, pd.DataFrame):
            return pd.DataFrame(arr, index=X.index, columns=X.columns)
        return arr

    def _check_fitted(self) -> None:
        if not hasattr(self, "adjusted_"):
            raise HarmonizationError(f"this {type(self).__name__} is not fitted yet; call fit()")

    def _feature_label(self, j: int) -> str:
        if getattr(self, "feature_names_", None):
            return repr(self.feature_names_[j])
        return f"#{j}"

    # ------------------------------------------------------------------------------------------
    _ARRAYS = (
        "n_per_site_", "grand_mean_", "beta_", "var_pooled_", "gamma_hat_", "delta_hat_",
        "gamma_star_", "delta_star_", "gamma_bar_", "t2_", "a_prior_", "b_prior_", "adjusted_",
    )

    def _extra_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Additional arrays and metadata of a variant (CovBat overrides)."""
        return {}, {}

    def _set_extra_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        return None

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The fitted model as numeric arrays and a JSON-serialisable header."""
        self._check_fitted()
        arrays = {name: getattr(self, name) for name in self._ARRAYS}
        meta = {
            "class": type(self).__name__,
            "params": self._params(),
            "sites": [str(s) for s in self.sites_],
            "ref_index": self.ref_index_,
            "mean_only_effective": bool(self.mean_only_),
            "feature_names": self.feature_names_,
            "n_features": int(self.n_features_in_),
            "covariate_names": self.covariate_names_,
            "encoder": self.encoder_.to_dict(),
            "float32_covariates": bool(self.float32_covariates_),
        }
        extra_arrays, extra_meta = self._extra_state()
        arrays.update(extra_arrays)
        meta["extra"] = extra_meta
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> ComBat:
        """Rebuild a fitted model from :meth:`get_state` output."""
        obj = cls(**meta["params"])
        for name in cls._ARRAYS:
            if name not in arrays:
                raise HarmonizationError(f"the saved {cls.__name__} model lacks the array {name!r}")
            setattr(obj, name, arrays[name])
        obj.adjusted_ = obj.adjusted_.astype(bool)
        obj.sites_ = np.array(meta["sites"], dtype=str)
        obj.ref_index_ = meta["ref_index"]
        obj.mean_only_ = meta["mean_only_effective"]
        obj.feature_names_ = meta["feature_names"]
        obj.n_features_in_ = meta["n_features"]
        obj.covariate_names_ = meta["covariate_names"]
        obj.encoder_ = CovariateEncoder.from_dict(meta["encoder"])
        obj.float32_covariates_ = meta["float32_covariates"]
        obj._set_extra_state(arrays, meta.get("extra", {}))
        return obj

    def save(self, path: str | os.PathLike) -> None:
        """Save the fitted model to ``path`` (``.npz`` with a JSON header; no pickle)."""
        write_model(path, *self.get_state())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ComBat:
        """Load a model written by :meth:`save`."""
        return cls.from_state(*read_model(path, cls.__name__))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({args})"


# ----------------------------------------------------------------------------------------------
def _encode(
    enc: CovariateEncoder, covariates: pd.DataFrame | None, n: int, float32: bool
) -> np.ndarray:
    """Design columns; with ``float32`` continuous columns are rounded as neuroCombat does."""
    C = enc.transform(covariates, n)
    if float32 and C.shape[1]:
        j = 0
        for name in enc.columns_:
            kind = enc.kinds_[name]
            width = len(enc.levels_[name]) - 1 if kind == "categorical" else 1
            if kind == "continuous":
                C[:, j] = C[:, j].astype(np.float32).astype(float)
            j += width
    return C


def _rows(idx: np.ndarray) -> np.ndarray | slice:
    """A slice (a view, no copy) when the row indices are one contiguous run, else the indices."""
    if idx.size and idx[-1] - idx[0] + 1 == idx.size:
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def _adjustable_features(
    X: np.ndarray,
    finite: np.ndarray,
    site_rows: list[np.ndarray],
    counts: np.ndarray,
    mean_only: bool,
) -> np.ndarray:
    """Features ComBat can adjust, by sva's rule plus the missing-value cases.

    Excluded: a feature constant within a site of two or more subjects (sva ``zero.rows``), with
    no observed value at a site, or -- unless mean-only -- with fewer than two observed values
    at a site (its site variance is undefined).
    """
    ok = np.ones(X.shape[1], dtype=bool)
    for i, rows in enumerate(site_rows):
        xi = X[_rows(rows)]
        obs = finite[_rows(rows)]
        c = obs.sum(axis=0)
        ok &= c >= (1 if mean_only else 2)
        if counts[i] >= 2:
            if obs.all():
                const = xi.max(axis=0) == xi.min(axis=0)
            else:
                with np.errstate(invalid="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    const = np.nanmax(xi, axis=0) == np.nanmin(xi, axis=0)
            ok &= ~(const & (c >= 2))
    return ok


def _ols(D: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Least squares ``Y ~ D`` through the thin QR of ``D`` (no copy of ``Y``)."""
    Q, R = np.linalg.qr(D)
    return solve_triangular(R, Q.T @ Y)


def _regress(
    D: np.ndarray, X: np.ndarray, finite: np.ndarray, use: np.ndarray, fit_fn: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature coefficients of ``X ~ D`` on observed rows, grouped by missingness pattern.

    Returns ``B`` (m, p) (NaN where not estimated) and a mask of features whose observed rows
    give a full-rank design.
    """
    m, p = D.shape[1], X.shape[1]
    B = np.full((m, p), np.nan)
    ok = np.zeros(p, dtype=bool)
    complete = use & finite.all(axis=0)
    if complete.all():
        B[:] = fit_fn(D, X, np.arange(p))
        ok[:] = True
    elif complete.any():
        B[:, complete] = fit_fn(D, X[:, complete], np.flatnonzero(complete))
        ok[complete] = True
    partial = np.flatnonzero(use & ~complete)
    if partial.size:
        patterns, inverse = np.unique(finite[:, partial].T, axis=0, return_inverse=True)
        inverse = np.asarray(inverse).ravel()
        for g, pattern in enumerate(patterns):
            cols = partial[inverse == g]
            Dg = D[pattern]
            if Dg.shape[0] <= m or np.linalg.matrix_rank(Dg) < m:
                continue
            B[:, cols] = fit_fn(Dg, X[np.ix_(pattern, cols)], cols)
            ok[cols] = True
    return B, ok


def _mean_square(
    r: np.ndarray, rows: np.ndarray | None, finite: np.ndarray, has_nan: np.ndarray
) -> np.ndarray:
    """Per-column mean of squares of ``r`` (restricted to ``rows``) over observed entries."""
    if rows is not None:
        r = r[rows]
        finite = finite[rows]
    out = np.einsum("ij,ij->j", r, r) / r.shape[0]
    cols = np.flatnonzero(has_nan)
    if cols.size:
        sub = r[:, cols]
        obs = finite[:, cols]
        sub[~obs] = 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            out[cols] = np.einsum("ij,ij->j", sub, sub) / obs.sum(axis=0)
    return out
