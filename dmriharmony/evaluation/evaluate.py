"""Score harmonizers on a table: one tidy DataFrame per harmonizer, side by side for many.

Three questions (Fortin et al., *NeuroImage* 2017; Bayer et al., *Front Neurol* 2022):

1. is the scanner gone? cross-validated site prediction (:mod:`.site_prediction`);
2. is the biology kept? effect estimates before vs after vs truth (:mod:`.effects`);
3. do traveling subjects agree across sites? (:mod:`.traveling`).

Methods that estimate effects without harmonizing data (meta-analysis, mixed model; see
:mod:`.estimators`) answer question 2 only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import partial

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from dmriharmony.errors import HarmonizationError
from dmriharmony.evaluation._design import check_columns
from dmriharmony.evaluation._harmonizer import (
    CovariateSubset,
    HarmonizerSpec,
    NoHarmonization,
    fit_transform,
)
from dmriharmony.evaluation.effects import effect_estimates, effect_preservation
from dmriharmony.evaluation.estimators import EffectEstimator, meta_analysis, mixed_model
from dmriharmony.evaluation.site_prediction import site_prediction
from dmriharmony.evaluation.traveling import traveling_preservation

__all__ = ["COLUMNS", "compare_harmonizers", "default_harmonizers", "evaluate_harmonizer",
           "summarize", "to_markdown"]

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
    before_folds: Sequence[float] | None = None,
    model_covariates: Sequence[str] | None = None,
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
        model fitted on ``table`` and scored by between-site CV/RMSE. Same-site rescans (several
        rows of one subject and site, told apart by a ``session`` column) are all harmonized;
        the between-site scores use the first session per subject and site in sorted session
        order (:func:`~.traveling.traveling_agreement`).
    traveling_clean : DataFrame, optional
        Their site-free values (simulation), for the RMSE to the truth.
    n_splits, seed, classifier, residualize, n_permutations
        Site-prediction settings (:func:`~.site_prediction.site_prediction`).
    subject : str
        Subject column of ``traveling``.
    site_term : bool
        Add site as a fixed effect to the effect model (default: pooled model, the analysis
        one runs on harmonized data).
    before_folds : sequence of float, optional
        Raw-data site-prediction fold scores already computed with the same settings.
    model_covariates : sequence of str, optional
        Terms of the analysis model (effect estimation, residualisation before site
        prediction), if not ``covariates``: e.g. ``["age", "age2", "sex", "dx"]`` when age acts
        nonlinearly, so that a misspecified analysis model does not pass for a harmonizer
        failure. The harmonizer is still given ``covariates`` only.

    Returns
    -------
    Tidy DataFrame with :data:`COLUMNS`. Metrics: ``site_balanced_accuracy`` (harmonizer
    fitted inside each training fold; truth = chance level 1/n_sites),
    ``site_balanced_accuracy_leaky`` (one harmonizer fitted on all rows, test rows included: the
    leak made visible), ``site_chance_permutation`` (if requested), ``{effect}_d``, ``{t}_beta``
    (per feature and ``ALL``), with ``truth["clean"]`` also ``rmse_to_clean`` and
    ``{effect}_d_clean`` (see :func:`_clean_rows`), and with a traveling table
    ``traveling_cv``/``traveling_rmse``/``traveling_rmse_truth``. ``rel_err_*`` is
    ``(estimate - truth) / |truth|`` for the effect metrics, NaN elsewhere.
    """
    covariates = list(covariates)
    analysis = covariates if model_covariates is None else list(model_covariates)
    features = _resolve(table, features, site, [*covariates, *analysis], effect, subject, truth)
    table = table.reset_index(drop=True)
    model_cov = [c for c in analysis if c != effect]
    effect_site = site if site_term else None

    if isinstance(harmonizer, EffectEstimator):
        return _evaluate_estimator(harmonizer, table, features, site, model_cov, effect, truth,
                                   effect_site)

    parts = []
    sp = site_prediction(table, features, harmonizer, site=site, covariates=covariates,
                         n_splits=n_splits, seed=seed, classifier=classifier,
                         residualize=residualize, n_permutations=n_permutations,
                         before_folds=before_folds, residualize_covariates=analysis)
    parts.append(pd.DataFrame({"metric": ["site_balanced_accuracy"], "feature": ["ALL"],
                               "before": [sp.before], "after": [sp.after],
                               "truth": [sp.chance]}))
    parts.append(pd.DataFrame({"metric": ["site_balanced_accuracy_leaky"], "feature": ["ALL"],
                               "before": [sp.before], "after": [sp.after_leaky],
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
    clean = _clean_table(truth, table, features, subject)
    if clean is not None:
        parts.append(_clean_rows(table, after, clean, features, effect, model_cov, truth,
                                 effect_site))
    if traveling is not None:
        trav_after = traveling.reset_index(drop=True).copy()
        trav_after[features] = harmonized[1]
        parts.append(traveling_preservation(traveling.reset_index(drop=True), trav_after,
                                            features, subject, site, traveling_clean))
    out = _finish(pd.concat(parts, ignore_index=True))
    out.attrs["site_prediction"] = sp
    return out


def _clean_table(
    truth: Mapping | None, table: pd.DataFrame, features: list[str], subject: str
) -> pd.DataFrame | None:
    """The simulator's site-free table of the same scans (``truth["clean"]``), checked."""
    if truth is None or truth.get("clean") is None:
        return None
    clean = pd.DataFrame(truth["clean"]).reset_index(drop=True)
    check_columns(clean, features, "truth['clean']")
    if len(clean) != len(table):
        raise HarmonizationError(f"truth['clean'] has {len(clean)} rows, the table {len(table)}")
    if subject in clean.columns and subject in table.columns and not np.array_equal(
            clean[subject].astype(str).to_numpy(), table[subject].astype(str).to_numpy()):
        raise HarmonizationError(f"truth['clean'] rows are not the table's rows (column "
                                 f"{subject!r} differs)")
    return clean


def _clean_rows(
    table: pd.DataFrame, after: pd.DataFrame, clean: pd.DataFrame, features: list[str],
    effect: str, model_cov: list[str], truth: Mapping | None, effect_site: str | None,
) -> pd.DataFrame:
    """Metrics that need the site-free values of the same scans (simulation only).

    ``rmse_to_clean``: root mean square difference to the site-free values, raw (``before``)
    and harmonized (``after``); ideal 0. ``{effect}_d_clean``: the effect estimated on the
    site-free table, i.e. the best any harmonizer can do on these subjects (its distance to the
    truth is sampling error, not harmonization error).
    """
    Xc = clean[features].to_numpy(dtype=float)
    raw = table[features].to_numpy(dtype=float)
    har = after[features].to_numpy(dtype=float)
    rb = np.sqrt(np.nanmean((raw - Xc) ** 2, axis=0))
    ra = np.sqrt(np.nanmean((har - Xc) ** 2, axis=0))
    parts = [
        pd.DataFrame({"metric": "rmse_to_clean", "feature": features, "before": rb, "after": ra,
                      "truth": 0.0}),
        pd.DataFrame({"metric": ["rmse_to_clean"], "feature": ["ALL"], "before": [rb.mean()],
                      "after": [ra.mean()], "truth": [0.0]}),
    ]
    ec = effect_estimates(clean.assign(**{c: table[c].to_numpy() for c in [effect, *model_cov]
                                          if c in table.columns}),
                          features, effect, model_cov, effect_site)
    metric = f"{effect}_d"
    if metric in ec.columns:
        tv = _truth_values(truth, metric, features)
        est = ec[metric].to_numpy()
        parts += [
            pd.DataFrame({"metric": f"{metric}_clean", "feature": features, "before": est,
                          "after": est, "truth": tv}),
            pd.DataFrame({"metric": [f"{metric}_clean"], "feature": ["ALL"],
                          "before": [est.mean()], "after": [est.mean()],
                          "truth": [tv.mean()]}),
        ]
    return pd.concat(parts, ignore_index=True)


def _truth_values(truth: Mapping | None, metric: str, features: list[str]) -> np.ndarray:
    t = truth.get(metric) if truth is not None else None
    if isinstance(t, pd.Series):
        missing = [f for f in features if f not in t.index]
        if missing:
            raise HarmonizationError(f"truth[{metric!r}] has no value for feature {missing[0]!r}")
        return t.loc[features].to_numpy(dtype=float)
    return np.full(len(features), np.nan if t is None else float(t))


def _evaluate_estimator(
    est: EffectEstimator, table: pd.DataFrame, features: list[str], site: str,
    model_cov: list[str], effect: str, truth: Mapping | None, effect_site: str | None,
) -> pd.DataFrame:
    before = effect_estimates(table, features, effect, model_cov, effect_site)
    metric = f"{effect}_d"
    if metric not in before.columns:
        raise HarmonizationError(f"effect {effect!r} is not binary: no Cohen's d to compare")
    after = est(table, features, site, effect, model_cov)
    tv = _truth_values(truth, metric, features)
    out = pd.DataFrame({"metric": metric, "feature": features,
                        "before": before[metric].to_numpy(), "after": after.to_numpy(),
                        "truth": tv})
    agg = pd.DataFrame({"metric": [metric], "feature": ["ALL"],
                        "before": [out["before"].mean()], "after": [out["after"].mean()],
                        "truth": [out["truth"].mean()]})
    out = pd.concat([out, agg], ignore_index=True)
    return _finish(out)


def _finish(out: pd.DataFrame) -> pd.DataFrame:
    """Relative errors (effect metrics only) and the column order of :data:`COLUMNS`."""
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = out["metric"].str.endswith(("_d", "_beta", "_d_clean"))
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

    Parameters
    ----------
    harmonizers : mapping name -> harmonizer spec or effect estimator
        ``None`` stands for no harmonization (the raw-data baseline); see
        :func:`default_harmonizers` for the standard set.
    table : DataFrame
        As in :func:`evaluate_harmonizer`.
    **kwargs
        Passed to :func:`evaluate_harmonizer` (same folds and seed for every harmonizer).

    Returns
    -------
    The tidy tables stacked with a leading ``harmonizer`` column.
    """
    if not harmonizers:
        raise HarmonizationError("no harmonizer to compare")
    frames = []
    before: list[float] | None = None
    for name, spec in tqdm(harmonizers.items(), desc="harmonizers", disable=None):
        logger.info("evaluating %s", name)
        spec = NoHarmonization if spec is None else spec
        res = evaluate_harmonizer(spec, table, before_folds=before, **kwargs)
        if before is None and not isinstance(spec, EffectEstimator):
            # the raw-data score is the same for every harmonizer (same folds): compute once
            before = res.attrs["site_prediction"].before_folds
        res.insert(0, "harmonizer", name)
        frames.append(res)
    return pd.concat(frames, ignore_index=True)


def default_harmonizers(
    smooth: str = "age", unprotected_keep: Sequence[str] = ("age", "sex")
) -> dict[str, HarmonizerSpec | EffectEstimator]:
    """The standard comparison set, for :func:`compare_harmonizers`.

    ``none`` (raw data); ComBat (Fortin et al. 2017): parametric EB, non-parametric EB,
    mean-only, and (as a warning example) ComBat protecting only ``unprotected_keep`` (the
    diagnosis left out); CovBat (Chen et al., *Hum Brain Mapp* 2022); ComBat-GAM (Pomponio et al.,
    *NeuroImage* 2020) with a smooth term for ``smooth``; and the effect estimators that
    do not harmonize data: random-effects meta-analysis of per-site d (REML) and the mixed model
    with a random site intercept (REML).
    """
    from dmriharmony.harmonizers import ComBat, ComBatGAM, CovBat

    return {
        "none": NoHarmonization,
        "combat": partial(ComBat, parametric=True),
        "combat_nonparametric": partial(ComBat, parametric=False),
        "combat_mean_only": partial(ComBat, mean_only=True),
        "combat_dx_unprotected": CovariateSubset(partial(ComBat), keep=unprotected_keep),
        "covbat": CovBat,
        "combat_gam": partial(ComBatGAM, smooth=[smooth]),
        "meta_analysis": meta_analysis("REML"),
        "mixed_model": mixed_model(reml=True),
    }


def summarize(
    results: pd.DataFrame, effect: str = "dx", site_tol: float = 0.1, effect_tol: float = 0.1
) -> pd.DataFrame:
    """One row per harmonizer from :func:`compare_harmonizers` output (feature ``ALL`` rows).

    Columns: site balanced accuracy before, after (fitted in-fold), after with the leaky protocol
    (fitted on all rows) and chance; mean ``{effect}_d`` before/after, on the site-free data
    (``_clean``) and true, relative error after; mean age-slope relative error after; RMSE to
    the site-free values before/after; traveling-subject CV (%) before/after. Then two pass/fail
    columns, the acceptance criteria: ``site_ok`` (``|after - chance| <= site_tol``) and
    ``effect_ok`` (``|rel_err_after of d| <= effect_tol``); NaN where not measured.
    """
    res = results if "harmonizer" in results.columns else results.assign(harmonizer="harmonizer")
    allrows = res[res["feature"] == "ALL"]
    names = list(dict.fromkeys(res["harmonizer"]))
    rows = []
    for name in names:
        sub = allrows[allrows["harmonizer"] == name].set_index("metric")

        def get(metric: str, col: str, sub: pd.DataFrame = sub) -> float:
            return float(sub.at[metric, col]) if metric in sub.index else np.nan

        acc, chance = get("site_balanced_accuracy", "after"), get("site_balanced_accuracy", "truth")
        rel = get(f"{effect}_d", "rel_err_after")
        rows.append({
            "harmonizer": name,
            "site_acc_before": get("site_balanced_accuracy", "before"),
            "site_acc_after": acc,
            "site_acc_after_leaky": get("site_balanced_accuracy_leaky", "after"),
            "chance": chance,
            f"{effect}_d_before": get(f"{effect}_d", "before"),
            f"{effect}_d_after": get(f"{effect}_d", "after"),
            f"{effect}_d_clean": get(f"{effect}_d_clean", "after"),
            f"{effect}_d_truth": get(f"{effect}_d", "truth"),
            f"{effect}_d_rel_err_after": rel,
            "age_beta_rel_err_after": get("age_beta", "rel_err_after"),
            "rmse_to_clean_before": get("rmse_to_clean", "before"),
            "rmse_to_clean_after": get("rmse_to_clean", "after"),
            "traveling_cv_before": get("traveling_cv", "before"),
            "traveling_cv_after": get("traveling_cv", "after"),
            "site_ok": _flag(abs(acc - chance) <= site_tol, acc, chance),
            "effect_ok": _flag(abs(rel) <= effect_tol, rel),
        })
    return pd.DataFrame(rows).set_index("harmonizer")


def _flag(ok: bool, *values: float) -> object:
    """``True``/``False``, or NaN when a value needed to decide is missing."""
    return np.nan if any(np.isnan(v) for v in values) else bool(ok)


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
