"""Meta-analysis of per-site effects: the early ENIGMA approach to multi-site studies.

Each site estimates the effect of interest (e.g. diagnosis) on every feature with its own linear
model; the per-site effect sizes are then pooled by inverse-variance fixed- or random-effects
meta-analysis (Jahanshad et al. 2013, NeuroImage 81:455; Kelly et al. 2018, Mol Psychiatry 23:1261).

>>> from dmriharmony.harmonizers import meta
>>> eff = meta.site_effects(table, site="site", effect="dx", covariates=["age", "sex"])
>>> res = meta.pool(yi, vi, method="REML")            # (k,) or (k, p) arrays
>>> pooled = meta.meta_analyze(table, effect="dx", covariates=["age", "sex"])
>>> fig = meta.forest(eff, "FA_GCC", method="REML", path="forest_GCC.png")

Every tau^2 estimator (FE, DL, HE, SJ, PM, ML, REML) runs on all features at once and reproduces
metafor (Viechtbauer 2010) on its ``dat.bcg`` example.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..errors import HarmonizationError
from ._forest import forest_plot, save_figure_atomic
from ._meta_effects import d_from_t, hedges_j, site_effects
from ._meta_pool import TAU2_METHODS, PoolResult, fdr, pool, tau2_estimate

__all__ = [
    "TAU2_METHODS",
    "PoolResult",
    "d_from_t",
    "effects_to_arrays",
    "fdr",
    "forest",
    "forest_plot",
    "forest_plots",
    "save_figure_atomic",
    "hedges_j",
    "meta_analyze",
    "pool",
    "site_effects",
    "tau2_estimate",
]


def effects_to_arrays(
    effects: pd.DataFrame, value: str = "yi"
) -> tuple[np.ndarray, list[Any], list[Any]]:
    """Pivot a tidy :func:`site_effects` table into a (sites, features) array (NaN = missing).

    Returns the array, the site labels (rows) and the feature names (columns), both in order of
    first appearance.
    """
    for c in ("feature", "site", value):
        if c not in effects.columns:
            raise HarmonizationError(f"column {c!r} not found in the effects table")
    sites = list(pd.unique(effects["site"]))
    feats = list(pd.unique(effects["feature"]))
    wide = effects.pivot(index="site", columns="feature", values=value)
    wide = wide.reindex(index=sites, columns=feats)
    return wide.to_numpy(dtype=float), sites, feats


def meta_analyze(
    table: pd.DataFrame,
    features: Sequence[str] | None = None,
    site: str = "site",
    effect: str = "dx",
    covariates: Sequence[str] | None = None,
    measure: str = "d",
    method: str = "REML",
    knha: bool = False,
    weighting: str = "inverse_variance",
    level: float = 0.95,
    return_effects: bool = False,
    **effect_kwargs: Any,
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Per-site effect sizes, pooled per feature, with Benjamini-Hochberg FDR across features.

    Parameters
    ----------
    table, features, site, effect, covariates, measure
        As in :func:`site_effects` (``effect_kwargs`` are passed on to it too).
    method, knha, level
        As in :func:`pool`.
    weighting : {"inverse_variance", "sample_size"}
        Pool with inverse-variance weights (the default) or with the site sample sizes as user
        weights (tau^2 still estimated by ``method``).
    return_effects : bool
        Also return the tidy per-site effects table.

    Returns
    -------
    DataFrame
        Indexed by feature: the :class:`PoolResult` fields plus ``p_fdr``.
    """
    if weighting not in ("inverse_variance", "sample_size"):
        raise HarmonizationError(
            f"unknown weighting {weighting!r}; choose 'inverse_variance' or 'sample_size'"
        )
    effects = site_effects(
        table, site=site, effect=effect, covariates=covariates, measure=measure,
        features=features, **effect_kwargs,
    )
    yi, _, feats = effects_to_arrays(effects, "yi")
    vi, _, _ = effects_to_arrays(effects, "vi")
    weights = None
    if weighting == "sample_size":
        weights, _, _ = effects_to_arrays(effects, "n")
    res = pool(yi, vi, method=method, knha=knha, weights=weights, level=level)
    out = res.to_frame(index=pd.Index(feats, name="feature"))
    out["p_fdr"] = fdr(out["p"].to_numpy())
    out["measure"] = effects["measure"].iloc[0]
    if return_effects:
        return out, effects
    return out


def forest(
    effects: pd.DataFrame,
    feature: Any,
    method: str = "REML",
    knha: bool = False,
    level: float = 0.95,
    path: str | Path | None = None,
    title: str | None = None,
) -> Any:
    """Forest plot of one feature from a :func:`site_effects` table, pooled by ``method``.

    Returns the matplotlib Figure; with ``path`` (.png/.svg/.pdf) it is also written atomically.
    """
    for c in ("feature", "site", "yi", "vi"):
        if c not in effects.columns:
            raise HarmonizationError(f"column {c!r} not found in the effects table")
    rows = effects[effects["feature"] == feature]
    if rows.empty:
        raise HarmonizationError(f"feature {feature!r} not found in the effects table")
    yi, vi = rows["yi"].to_numpy(dtype=float), rows["vi"].to_numpy(dtype=float)
    res = pool(yi, vi, method=method, knha=knha, level=level)
    measure = str(rows["measure"].iloc[0]) if "measure" in rows.columns else "effect size"
    return forest_plot(
        yi, vi, rows["site"].tolist(), pooled=res, title=title or str(feature),
        xlabel=measure, level=level, path=path,
    )


def forest_plots(
    effects: pd.DataFrame,
    out_dir: str | Path,
    features: Sequence[Any] | None = None,
    method: str = "REML",
    fmt: str = "png",
) -> list[Path]:
    """One forest plot per feature, written as ``<out_dir>/forest_<feature>.<fmt>``."""
    out_dir = Path(out_dir)
    feats = list(pd.unique(effects["feature"])) if features is None else list(features)
    paths = []
    for f in tqdm(feats, desc="forest plots", disable=len(feats) < 20):
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(f))
        path = out_dir / f"forest_{safe}.{fmt}"
        forest(effects, f, method=method, path=path)
        paths.append(path)
    return paths
