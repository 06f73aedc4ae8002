"""CovBat: harmonization of means, variances *and covariances* (Chen et al., HBM 2022).

ComBat removes site effects feature by feature; multivariate site effects remain in the
covariance between features (e.g. between ROIs), which is what a classifier picks up. CovBat
(Chen AA, Beer JC, Tustison NJ, Cook PA, Shinohara RT, Shou H; Human Brain Mapping 43(4):
1179-1195, 2022), algorithm of its section 2.3 and of the authors' R function ``covbat``:

1. ComBat with the protected covariates; keep the harmonized residuals
   ``e*_ij = y*_ij - alpha - x_ij' beta`` (original scale);
2. principal components of the residuals: ``prcomp(t(e*), center = TRUE, scale. = std.var)``;
3. the first ``K`` PC scores -- ``K`` the smallest number explaining more than ``percent_var``
   of the variance, or ``n_pc`` -- are harmonized by ComBat without covariates
   (``score_eb = False``, i.e. location/scale estimates without empirical Bayes, by default);
4. back-projection: ``e** = (scores** V') * scale + centre`` and ``y** = e** + alpha + x'beta``.

For a model that harmonizes subjects arriving later, the fitted state keeps the ComBat model,
the PCA centre/scale and the first ``K`` loadings, and the score ComBat model; because the
loadings are orthonormal, changing the first ``K`` scores changes the data by
``(scores** - scores) V_K'`` and the remaining components pass through unchanged, exactly as in
the R function's full reconstruction.

Missing values are not supported (PCA needs complete data): an error names the feature.
Features that ComBat leaves unadjusted (constant within a site) are kept out of the PCA and
returned unchanged.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd

from dmriharmony.errors import HarmonizationError
from dmriharmony.harmonizers._combat_io import read_model, write_model
from dmriharmony.harmonizers._design import as_site_labels
from dmriharmony.harmonizers.combat import ComBat, _encode, as_feature_matrix

__all__ = ["CovBat"]


class CovBat:
    """CovBat harmonization (Chen et al., Hum Brain Mapp 2022).

    Parameters
    ----------
    parametric, mean_only, eb : bool
        Options of the first (ComBat) step, as :class:`~.combat.ComBat`.
    percent_var : float
        Harmonize the first PCs explaining more than this proportion of the residual variance
        (R ``percent.var``, default 0.95).
    n_pc : int, optional
        Number of PCs to harmonize (overrides ``percent_var``).
    std_var : bool
        Scale the residuals to unit variance before the PCA (R ``std.var``, default True).
    score_eb, score_parametric : bool
        Empirical Bayes options of the score ComBat (R defaults: no EB, parametric).
    categorical, continuous, conv, engine
        As :class:`~.combat.ComBat`.

    Attributes
    ----------
    combat_ : ComBat
        The first-step model.
    score_combat_ : ComBat
        The ComBat model of the PC scores.
    center_, scale_ : ndarray (f,)
        PCA centring and scaling of the adjusted features' residuals.
    components_ : ndarray (n_pc_, f)
        Loadings of the harmonized PCs.
    explained_variance_ratio_ : ndarray
        Of all PCs.
    n_pc_ : int
    """

    def __init__(
        self,
        parametric: bool = True,
        mean_only: bool = False,
        eb: bool = True,
        percent_var: float = 0.95,
        n_pc: int | None = None,
        std_var: bool = True,
        score_eb: bool = False,
        score_parametric: bool = True,
        *,
        categorical: list[str] | None = None,
        continuous: list[str] | None = None,
        conv: float = 1e-4,
        engine: str = "auto",
    ) -> None:
        self.parametric = parametric
        self.mean_only = mean_only
        self.eb = eb
        self.percent_var = percent_var
        self.n_pc = n_pc
        self.std_var = std_var
        self.score_eb = score_eb
        self.score_parametric = score_parametric
        self.categorical = categorical
        self.continuous = continuous
        self.conv = conv
        self.engine = engine

    def _params(self) -> dict[str, Any]:
        return {
            "parametric": bool(self.parametric), "mean_only": bool(self.mean_only),
            "eb": bool(self.eb), "percent_var": float(self.percent_var),
            "n_pc": None if self.n_pc is None else int(self.n_pc),
            "std_var": bool(self.std_var), "score_eb": bool(self.score_eb),
            "score_parametric": bool(self.score_parametric), "categorical": self.categorical,
            "continuous": self.continuous, "conv": float(self.conv), "engine": self.engine,
        }

    # ------------------------------------------------------------------------------------------
    def fit(self, X: Any, sites: Any, covariates: pd.DataFrame | None = None) -> CovBat:
        """Fit ComBat, the PCA of its residuals and the ComBat model of the leading scores."""
        if not 0 < float(self.percent_var) <= 1:
            raise HarmonizationError(f"percent_var must be in (0, 1], got {self.percent_var}")
        Xa, _ = as_feature_matrix(X)
        _check_complete(Xa, X)
        combat = ComBat(
            self.parametric, self.mean_only, None, self.eb, categorical=self.categorical,
            continuous=self.continuous, conv=self.conv, engine=self.engine,
        )
        combat.fit(X, sites, covariates)
        self.combat_ = combat
        n = Xa.shape[0]
        Y = np.asarray(combat.transform(Xa, sites, covariates), dtype=float)
        C = _encode(combat.encoder_, covariates, n, False)
        cols = np.flatnonzero(combat.adjusted_)
        f = cols.shape[0]
        center = np.empty(f)
        scale = np.ones(f)
        dual = n <= f
        G = np.zeros((n, n) if dual else (f, f))
        Zfull = None if dual else np.empty((n, f))
        # pass 1: residual centre/scale per feature, and the Gram matrix (by feature blocks)
        for J in _blocks(f):
            R = self._resid_block(Y, C, cols[J])
            center[J] = R.mean(axis=0)
            if self.std_var:
                sd = R.std(axis=0, ddof=1)
                scale[J] = np.where(sd > 0, sd, 1.0)
            R -= center[J]
            R /= scale[J]
            if dual:
                G += R @ R.T
            else:
                Zfull[:, J] = R
        if not dual:
            G = Zfull.T @ Zfull
        w, basis = np.linalg.eigh(G)
        order = np.argsort(w)[::-1]
        eigval, basis = np.clip(w[order], 0.0, None), basis[:, order]
        ratio = eigval / np.sum(eigval)
        if self.n_pc is not None:
            npc = int(self.n_pc)
            if not 1 <= npc <= eigval.shape[0]:
                raise HarmonizationError(
                    f"n_pc must be between 1 and {eigval.shape[0]}, got {npc}"
                )
        else:
            npc = int(np.argmax(np.cumsum(ratio) > float(self.percent_var) - 1e-12)) + 1
        sv = np.sqrt(eigval)
        rank = int(np.sum(sv > 1e-6 * sv[0]))
        if npc > rank:
            raise HarmonizationError(
                f"CovBat: {npc} principal components requested but the residuals have numerical"
                f" rank {rank}; lower n_pc or percent_var"
            )
        self.center_, self.scale_ = center, scale
        if dual:
            # Z = U S V': V_k = Z' u_k / s_k (pass 2), scores = U_k s_k
            V = np.empty((npc, f))
            Uk = basis[:, :npc]
            for J in _blocks(f):
                V[:, J] = (Uk.T @ self._z_block(Y, C, cols[J], J)) / sv[:npc, None]
            scores = Uk * sv[:npc]
        else:
            V = basis[:, :npc].T.copy()
            scores = Zfull @ V.T
        labels = as_site_labels(sites, n)
        self.score_combat_ = ComBat(
            self.score_parametric, False, None, self.score_eb, conv=self.conv, engine=self.engine
        ).fit(scores, labels)
        self.components_ = V
        self.explained_variance_ratio_ = ratio
        self.n_pc_ = npc
        return self

    def _resid_block(self, Y: np.ndarray, C: np.ndarray, cj: np.ndarray) -> np.ndarray:
        """ComBat residuals ``y* - alpha - x'beta`` of the features ``cj`` (a new array)."""
        combat = self.combat_
        R = Y[:, cj]
        R -= C @ combat.beta_[:, cj]
        R -= combat.grand_mean_[cj]
        return R

    def _z_block(self, Y: np.ndarray, C: np.ndarray, cj: np.ndarray, J: slice) -> np.ndarray:
        """Centred and scaled residuals of the features ``cj`` (PCA input)."""
        R = self._resid_block(Y, C, cj)
        R -= self.center_[J]
        R /= self.scale_[J]
        return R

    def transform(self, X: Any, sites: Any, covariates: pd.DataFrame | None = None) -> Any:
        """Harmonize subjects of the training sites (their own covariates are used).

        Works by feature blocks: memory is the output plus the loadings plus one block.
        """
        if not hasattr(self, "components_"):
            raise HarmonizationError("this CovBat is not fitted yet; call fit()")
        Xa, _ = as_feature_matrix(X)
        _check_complete(Xa, X)
        n = Xa.shape[0]
        Y = np.asarray(self.combat_.transform(Xa, sites, covariates), dtype=float)
        C = _encode(self.combat_.encoder_, covariates, n, False)
        cols = np.flatnonzero(self.combat_.adjusted_)
        V = self.components_
        scores = np.zeros((n, V.shape[0]))
        for J in _blocks(cols.shape[0]):
            scores += self._z_block(Y, C, cols[J], J) @ V[:, J].T
        labels = as_site_labels(sites, n)
        change = np.asarray(self.score_combat_.transform(scores, labels), dtype=float) - scores
        for J in _blocks(cols.shape[0]):
            cj = cols[J]
            Z = self._z_block(Y, C, cj, J)
            Z += change @ V[:, J]
            Z *= self.scale_[J]
            Z += self.center_[J]
            Z += C @ self.combat_.beta_[:, cj]
            Z += self.combat_.grand_mean_[cj]
            Y[:, cj] = Z
        if isinstance(X, pd.DataFrame):
            return pd.DataFrame(Y, index=X.index, columns=X.columns)
        return Y

    def fit_transform(self, X: Any, sites: Any, covariates: pd.DataFrame | None = None) -> Any:
        """Fit, then harmonize the training data."""
        return self.fit(X, sites, covariates).transform(X, sites, covariates)

    # ------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Save the fitted model (``.npz`` with a JSON header; no pickle)."""
        if not hasattr(self, "components_"):
            raise HarmonizationError("this CovBat is not fitted yet; call fit()")
        arrays: dict[str, np.ndarray] = {
            "center_": self.center_, "scale_": self.scale_, "components_": self.components_,
            "explained_variance_ratio_": self.explained_variance_ratio_,
        }
        meta: dict[str, Any] = {"class": "CovBat", "params": self._params(), "n_pc": self.n_pc_}
        for prefix, model in (("combat", self.combat_), ("scores", self.score_combat_)):
            a, m = model.get_state()
            arrays.update({f"{prefix}.{k}": v for k, v in a.items()})
            meta[prefix] = m
        write_model(path, arrays, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CovBat:
        """Load a model written by :meth:`save`."""
        arrays, meta = read_model(path, "CovBat")
        obj = cls(**meta["params"])
        for prefix, attr in (("combat", "combat_"), ("scores", "score_combat_")):
            head = prefix + "."
            part = {k[len(head) :]: v for k, v in arrays.items() if k.startswith(head)}
            setattr(obj, attr, ComBat.from_state(part, meta[prefix]))
        obj.center_, obj.scale_ = arrays["center_"], arrays["scale_"]
        obj.components_ = arrays["components_"]
        obj.explained_variance_ratio_ = arrays["explained_variance_ratio_"]
        obj.n_pc_ = int(meta["n_pc"])
        return obj

    # the first (ComBat) step's site estimates, for reports
    @property
    def sites_(self) -> np.ndarray:
        return self.combat_.sites_

    @property
    def adjusted_(self) -> np.ndarray:
        return self.combat_.adjusted_

    @property
    def gamma_hat_(self) -> np.ndarray:
        return self.combat_.gamma_hat_

    @property
    def delta_hat_(self) -> np.ndarray:
        return self.combat_.delta_hat_

    @property
    def gamma_star_(self) -> np.ndarray:
        return self.combat_.gamma_star_

    @property
    def delta_star_(self) -> np.ndarray:
        return self.combat_.delta_star_

    def __repr__(self) -> str:
        return "CovBat(" + ", ".join(f"{k}={v!r}" for k, v in self._params().items()) + ")"


_BLOCK = 8192


def _blocks(f: int) -> list[slice]:
    """Feature blocks of at most ``_BLOCK`` columns."""
    return [slice(j, min(j + _BLOCK, f)) for j in range(0, f, _BLOCK)]


def _check_complete(Xa: np.ndarray, X: Any) -> None:
    missing = np.isnan(Xa).any(axis=0)
    if missing.any():
        j = int(np.flatnonzero(missing)[0])
        name = repr(str(X.columns[j])) if isinstance(X, pd.DataFrame) else f"#{j}"
        raise HarmonizationError(
            f"CovBat needs complete data (its PCA step): feature {name} has missing values"
        )
