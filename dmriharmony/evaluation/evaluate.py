"""Score harmonizers on a table: one tidy DataFrame per harmonizer, side by side for many.

Three questions (Fortin et al., *NeuroImage* 2017; Bayer et al., *NeuroImage* 2022):

1. is the scanner gone? cross-validated site prediction (:mod:`.site_prediction`);
2. is the biology kept? effect estimates before vs after vs truth (:mod:`.effects`);
3. do traveling subjects agree across sites? (:mod:`.traveling`).

Methods that estimate effects without harmonizing data (meta-analysis, mixed model; see
:mod:`.estimators`) answer question 2 only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from dmriharmony.errors import HarmonizationError
from dmriharmony.evaluation._design import check_columns
from dmriharmony.evaluation._harmonizer import HarmonizerSpec, fit_transform
from dmriharmony.evaluation.effects import effect_estimates, effect_preservation
from dmriharmony.evaluation.estimators import EffectEstimator
from dmriharmony.evaluation.site_prediction import site_prediction
from dmriharmony.evaluation.traveling import traveling_preservation

__all__ = ["COLUMNS", "compare_harmonizers", "evaluate_harmonizer", "summarize",
           "to_markdown"]

logger = logging.getLogger(__name__)

#: Columns of the tidy evaluation table.
COLUMNS = ["metric", "feature", "before", "after", "truth", "rel_err_before", "rel_err_after"]


def _default_features(table: pd.DataFrame, exclude: Sequence[str]) -> list[str]:
    skip = set(exclude)
    feats = [c for c in table.columns
             if c not in skip and pd.api.types.is_numeric_dtype(table[c])]
    if not feats:
        raise HarmonizationError("no numeric feature columns found in the table")
    return feats


def _resolve(
    table: pd.DataFrame, features: Sequence[str] | None, site: str, covariates: Sequence[str],
    effect: str, subject: str, truth: Mapping | None,
) -> list[str]:
    check_columns(table, [site, effect, *covariates])
    if features is None:
        if truth is not None and "features" in truth:
            features = list(truth["features"])
        else:
            features = _default_features(table, [site, effect, subject, *covariates])
    features = list(features)
    check_columns(table, features)
    return features


def evaluate_harmonizer(
    harmonizer: HarmonizerSpec | EffectEstimator,
    table: pd.DataFrame,
    features: Sequence[str] | None = None,
    site: str = "site",
    covariates: Sequence[str] = ("age", "sex", "dx"),
    effect: str = "dx",
    truth: Mapping | None = None,
    traveling: pd.DataFrame | None = None,
    traveling_clean: pd.DataFrame | None = None,
    n_splits: int = 5,
    seed: int = 0,
    classifier: str = "logistic",
    residualize: bool = True,
    n_permutations: int = 0,
    subject: str = "subject",
    site_term: bool = False,
) -> pd.DataFrame:
    """Score one harmonizer (or effect estimator) on a multi-site table.

    Parameters
    ----------
    harmonizer : class, factory, instance or :class:`~.estimators.EffectEstimator`
        A harmonizer with ``fit(X, sites, covariates)``/``transform`` (fresh copies are fitted;
        the given instance is never modified), or an effect estimator (meta-analysis, mixed
        model), which is scored on the effect only.
    table : DataFrame
        One row per scan: site, covariates, features.
    features : sequence of str, optional
        Feature columns; default ``truth["features"]`` or all other numeric columns.
    site : str
        Site column.
    covariates : sequence of str
        Covariates the harmonizer protects (include ``effect`` to protect it: leaving it out is
        how a harmonizer removes the biology confounded with site). The effect model adjusts for
        all of them.
    effect : str
        Term whose preservation is scored (binary: Cohen's d; also ``*_beta`` of every term).
    truth : mapping, optional
        Ground truth keyed by metric name (``dx_d``, ``age_beta``...), e.g. from
        :func:`dmriharmony.simulate.roi_table.simulate_roi_table`.
    traveling : DataFrame, optional
        Traveling-subject scans (``subject``, ``site``, covariates, features): harmonized by the
        model fitted on ``table`` and scored by between-site CV/RMSE.
    traveling_clean : DataFrame, optional
        Their site-free values (simulation), for the RMSE to the truth.
    n_splits, seed, classifier, residualize, n_permutations
        Site-prediction settings (:func:`~.site_prediction.site_prediction`).
    subject : str
        Subject column of ``traveling``.
    site_term : bool
        Add site as a fixed effect to the effect model (default: pooled model, the analysis
        one runs on harmonized data).

    Returns
    -------
    Tidy DataFrame with :data:`COLUMNS`. Metrics: ``site_balanced_accuracy`` (truth = chance
    level 1/n_sites), ``site_chance_permutation`` (if requested), ``{effect}_d``, ``{t}_beta``
    (per feature and ``ALL``), ``traveling_cv``/``traveling_rmse``/``traveling_rmse_truth``.
    """
    covariates = list(covariates)
    features = _resolve(table, features, site, covariates, effect, subject, truth)
    table = table.reset_index(drop=True)
    model_cov = [c for c in covariates if c != effect]
    effect_site = site if site_term else None

    if isinstance(harmonizer, EffectEstimator):
        return _evaluate_estimator(harmonizer, table, features, site, model_cov, effect, truth,
                                   effect_site)

    parts = []
    sp = site_prediction(table, features, harmonizer, site=site, covariates=covariates,
                         n_splits=n_splits, seed=seed, classifier=classifier,
                         residualize=residualize, n_permutations=n_permutations)
    parts.append(pd.DataFrame({"metric": ["site_balanced_accuracy"], "feature": ["ALL"],
                               "before": [sp.before], "after": [sp.after],
                               "truth": [sp.chance]}))
    if n_permutations > 0:
        parts.append(pd.DataFrame({"metric": ["site_chance_permutation"], "feature": ["ALL"],
                                   "before": [sp.chance_permutation],
                                   "after": [sp.chance_permutation], "truth": [sp.chance]}))

    apply_to = [table] + ([traveling] if traveling is not None else [])
    if traveling is not None:
        check_columns(traveling, [subject, site, *covariates, *features], "traveling table")
    _, harmonized = fit_transform(harmonizer, table, apply_to, features, site, covariates)
    after = table.copy()
    after[features] = harmonized[0]
    parts.append(effect_preservation(table, after, features, effect, model_cov, truth,
                                     effect_site))
    if traveling is not None:
        trav_after = traveling.reset_index(drop=True).copy()
        trav_after[features] = harmonized[1]
        parts.append(traveling_preservation(traveling.reset_index(drop=True), trav_after,
                                            features, subject, site, traveling_clean))
    out = pd.concat(parts, ignore_index=True)
    return _finish(out)


def _evaluate_estimator(
    est: EffectEstimator, table: pd.DataFrame, features: list[str], site: str,
    model_cov: list[str], effect: str, truth: Mapping | None, effect_site: str | None,
) -> pd.DataFrame:
    before = effect_estimates(table, features, effect, model_cov, effect_site)
    metric = f"{effect}_d"
    if metric not in before.columns:
        raise HarmonizationError(f"effect {effect!r} is not binary: no Cohen's d to compare")
    after = est(table, features, site, effect, model_cov)
    t = truth.get(metric) if truth is not None else None
    tv = (pd.Series(t).loc[features].to_numpy(dtype=float) if isinstance(t, pd.Series)
          else np.full(len(features), np.nan if t is None else float(t)))
    out = pd.DataFrame({"metric": metric, "feature": features,
                        "before": before[metric].to_numpy(), "after": after.to_numpy(),
                        "truth": tv})
    agg = pd.DataFrame({"metric": [metric], "feature": ["ALL"],
                        "before": [out["before"].mean()], "after": [out["after"].mean()],
                        "truth": [out["truth"].mean()]})
    out = pd.concat([out, agg], ignore_index=True)
    return _finish(out)


def _finish(out: pd.DataFrame) -> pd.DataFrame:
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = out["metric"].str.endswith(("_d", "_beta"))
        out["rel_err_before"] = np.where(rel, (out["before"] - out["truth"]) / out["truth"].abs(),
                                         np.nan)
        out["rel_err_after"] = np.where(rel, (out["after"] - out["truth"]) / out["truth"].abs(),
                                        np.nan)
    return out[COLUMNS]


def compare_harmonizers(
    harmonizers: Mapping[str, HarmonizerSpec | EffectEstimator],
    table: pd.DataFrame,
    **kwargs,
) -> pd.DataFrame:
    """Run :func:`evaluate_harmonizer` for every named harmonizer on the same table and folds.

    Returns the tidy tables stacked with a leading ``harmonizer`` column.
    """
    if not harmonizers:
        raise HarmonizationError("no harmonizer to compare")
    frames = []
    for name, spec in harmonizers.items():
        logger.info("evaluating %s", name)
        res = evaluate_harmonizer(spec, table, **kwargs)
        res.insert(0, "harmonizer", name)
        frames.append(res)
    return pd.concat(frames, ignore_index=True)


def summarize(results: pd.DataFrame, effect: str = "dx") -> pd.DataFrame:
    """One row per harmonizer from :func:`compare_harmonizers` output (feature ``ALL`` rows).

    Columns: site balanced accuracy before/after and chance; mean ``{effect}_d`` before/after/
    truth and relative error after; mean age slope relative error after (if present);
    traveling CV before/after (if present).
    """
    res = results if "harmonizer" in results.columns else results.assign(harmonizer="harmonizer")
    allrows = res[res["feature"] == "ALL"]
    names = list(dict.fromkeys(res["harmonizer"]))
    rows = []
    for name in names:
        sub = allrows[allrows["harmonizer"] == name].set_index("metric")

        def get(metric: str, col: str, sub: pd.DataFrame = sub) -> float:
            return float(sub.at[metric, col]) if metric in sub.index else np.nan

        rows.append({
            "harmonizer": name,
            "site_acc_before": get("site_balanced_accuracy", "before"),
            "site_acc_after": get("site_balanced_accuracy", "after"),
            "chance": get("site_balanced_accuracy", "truth"),
            f"{effect}_d_before": get(f"{effect}_d", "before"),
            f"{effect}_d_after": get(f"{effect}_d", "after"),
            f"{effect}_d_truth": get(f"{effect}_d", "truth"),
            f"{effect}_d_rel_err_after": get(f"{effect}_d", "rel_err_after"),
            "age_beta_rel_err_after": get("age_beta", "rel_err_after"),
            "traveling_cv_before": get("traveling_cv", "before"),
            "traveling_cv_after": get("traveling_cv", "after"),
        })
    return pd.DataFrame(rows).set_index("harmonizer")


def to_markdown(df: pd.DataFrame, floatfmt: str = ".3f") -> str:
    """Render a DataFrame as a GitHub markdown table (no optional dependency needed)."""
    df = df.reset_index() if df.index.name is not None else df
    cols = [str(c) for c in df.columns]

    def fmt(v) -> str:
        if isinstance(v, float | np.floating):
            return "" if np.isnan(v) else format(float(v), floatfmt)
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
    return "\n".join(lines) + "\n"
