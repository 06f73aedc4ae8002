"""Effect estimators that do not harmonize data: meta-analysis and mixed-effects mega-analysis.

They estimate the biological effect directly from multi-site data, so they enter the
comparison with their pooled Cohen's d (against the truth) instead of a harmonized table:

- :func:`meta_analysis`: per-site covariate-adjusted d, pooled by inverse-variance random effects
  (the early-ENIGMA approach; Jahanshad et al., *NeuroImage* 2013; Viechtbauer, *JSS* 2010);
- :func:`mixed_model`: ``feature ~ effect + covariates + (1 | site)`` on the pooled data, d of the
  effect term from its coefficient and the residual SD (ENIGMA mega-analysis).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dmriharmony.errors import HarmonizationError

__all__ = ["EffectEstimator", "meta_analysis", "mixed_model"]

EstimateFn = Callable[[pd.DataFrame, Sequence[str], str, str, Sequence[str]], pd.Series]


@dataclass(frozen=True)
class EffectEstimator:
    """A method that returns Cohen's d of ``effect`` per feature from a multi-site table.

    ``func(table, features, site, effect, covariates) -> Series`` (index: features).
    """

    func: EstimateFn
    name: str = "effect estimator"

    def __call__(
        self, table: pd.DataFrame, features: Sequence[str], site: str, effect: str,
        covariates: Sequence[str],
    ) -> pd.Series:
        out = self.func(table, list(features), site, effect, list(covariates))
        out = pd.Series(out, dtype=float)
        missing = [f for f in features if f not in out.index]
        if missing:
            raise HarmonizationError(f"{self.name} returned no estimate for feature "
                                     f"{missing[0]!r}")
        return out.loc[list(features)]


def _column(df: pd.DataFrame, candidates: Sequence[str], what: str) -> str:
    for c in candidates:
        if c in df.columns:
            return c
    raise HarmonizationError(f"{what}: none of the columns {list(candidates)} in "
                             f"{list(df.columns)}")


def meta_analysis(method: str = "REML", measure: str = "d") -> EffectEstimator:
    """Per-site d (Hedges-corrected, covariate-adjusted) pooled by random effects, per feature.

    Uses :func:`dmriharmony.harmonizers.meta.site_effects` and
    :func:`dmriharmony.harmonizers.meta.pool` (tau^2 by ``method``: FE, DL, REML, PM...).
    """

    def estimate(table, features, site, effect, covariates):
        from dmriharmony.harmonizers import meta

        cov = [c for c in covariates if c != effect]
        eff = meta.site_effects(table, site=site, effect=effect, covariates=cov,
                                measure=measure, features=list(features))
        yi, vi = _per_site_matrix(eff, features, site)
        res = meta.pool(yi, vi, method=method)
        est = res["estimate"] if isinstance(res, dict | pd.DataFrame) else res.estimate
        return pd.Series(np.asarray(est, dtype=float).reshape(-1), index=features)

    return EffectEstimator(estimate, name=f"meta-analysis ({method})")


def _per_site_matrix(
    eff: pd.DataFrame, features: Sequence[str], site: str
) -> tuple[np.ndarray, np.ndarray]:
    """(k_sites, p) arrays of effect sizes and sampling variances from ``site_effects`` output.

    Accepts the long layout (one row per site and feature with ``feature``, ``yi``/``d`` and
    ``vi``/``var`` columns).
    """
    eff = eff.reset_index()
    fcol = _column(eff, ["feature", "features"], "meta.site_effects output")
    scol = _column(eff, [site, "site"], "meta.site_effects output")
    ycol = _column(eff, ["yi", "d", "g", "effect", "estimate"], "meta.site_effects output")
    vcol = _column(eff, ["vi", "var", "variance"], "meta.site_effects output")
    yi = eff.pivot(index=scol, columns=fcol, values=ycol).loc[:, list(features)]
    vi = eff.pivot(index=scol, columns=fcol, values=vcol).loc[:, list(features)]
    return yi.to_numpy(dtype=float), vi.to_numpy(dtype=float)


def mixed_model(reml: bool = True, d_formula: str = "beta") -> EffectEstimator:
    """Cohen's d of the effect from ``feature ~ effect + covariates + (1 | site)`` per feature.

    Uses :func:`dmriharmony.harmonizers.mixed.fit` (vectorised over features, lme4's REML/ML).
    ``d_formula`` is passed to :meth:`MixedFit.d`: ``"beta"`` (default) is the coefficient over
    the within-site residual SD, the same definition as :func:`~.effects.effect_estimates` and
    the simulator's truth; ``"nakagawa"`` is the t-based d of the ENIGMA scripts.
    """

    def estimate(table, features, site, effect, covariates):
        from dmriharmony.harmonizers import mixed

        cov = [c for c in covariates if c != effect]
        fixed = " + ".join([effect, *cov])
        fit = mixed.fit(table, list(features), fixed=fixed, site=site, reml=reml)
        if not callable(getattr(fit, "d", None)):
            raise HarmonizationError(f"mixed.fit returned {type(fit).__name__} without a d() "
                                     "method")
        d = fit.d(effect, formula=d_formula)
        return pd.Series(np.asarray(d, dtype=float).reshape(-1), index=list(features))

    kind = "REML" if reml else "ML"
    return EffectEstimator(estimate, name=f"mixed model ({kind}, d={d_formula})")
