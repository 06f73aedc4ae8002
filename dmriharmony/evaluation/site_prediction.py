"""Cross-validated site prediction: how much scanner information is left in the features.

A classifier that predicts the acquisition site from the features should do no better than
chance after a good harmonization (a standard check, reviewed by Bayer et al., "Site effects
how-to and when", *Front Neurol* 2022). Two details make the score honest:

1. **No leakage.** The harmonizer is fitted inside each training fold only and then applied to
   the held-out fold (as it would be applied to subjects scanned later). Fitting it on all rows
   first lets it see (and, for flexible models, memorise) the test rows, and the held-out
   accuracy then says nothing about new data. Both numbers are reported (``after`` and
   ``after_leaky``). The leak does not only flatter flexible models: with a location
   adjustment fitted on all rows, each held-out fold's site means are forced to mirror the
   training fold's, the classifier becomes systematically wrong (anti-learning) and scores
   *below* chance, a symptom of leakage, not of a good harmonizer.
2. **Biology is not site.** When covariates (age, sex, dx) are distributed differently across
   sites, a perfect harmonizer leaves site predictable from biology. With ``residualize=True``
   the covariate effects, estimated within site on the training fold (features ~ site +
   covariates), are subtracted from training and test features before classification, so only
   scanner information is scored.

The score is the balanced accuracy (mean per-site recall), whose chance level is ``1/n_sites``
whatever the site sizes; a permutation null (site labels shuffled) is available too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, clone
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from dmriharmony.errors import HarmonizationError
from dmriharmony.evaluation._design import (
    check_columns,
    covariate_design,
    feature_matrix,
    ols,
    site_dummies,
)
from dmriharmony.evaluation._harmonizer import HarmonizerSpec, fit_transform

__all__ = ["SitePredictionResult", "make_classifier", "site_prediction"]

logger = logging.getLogger(__name__)


@dataclass
class SitePredictionResult:
    """Balanced accuracies of site prediction, before and after harmonization.

    Attributes
    ----------
    before, after : float
        Mean over folds of the held-out balanced accuracy on the raw features and on features
        harmonized by a model fitted on the training fold only (the honest score).
    after_leaky : float
        The same classifier and folds on features harmonized by one model fitted on *all* rows
        (held-out rows included), as done when a table is harmonized first and analysed next.
        Its gap to ``after`` shows how much fitting on the test rows flatters the harmonizer.
    chance : float
        ``1 / n_sites``, the expected balanced accuracy of a classifier that ignores the features.
    chance_permutation, chance_permutation_q95 : float
        Mean and 95th percentile of the CV balanced accuracy with shuffled site labels (NaN
        unless permutations were requested).
    before_folds, after_folds, after_leaky_folds : list of float
        Per-fold scores.
    """

    before: float
    after: float
    chance: float
    n_sites: int
    n_splits: int
    after_leaky: float = float("nan")
    before_folds: list[float] = field(default_factory=list)
    after_folds: list[float] = field(default_factory=list)
    after_leaky_folds: list[float] = field(default_factory=list)
    chance_permutation: float = float("nan")
    chance_permutation_q95: float = float("nan")


def make_classifier(kind: str | BaseEstimator = "logistic", seed: int = 0) -> BaseEstimator:
    """Classifier used to predict site.

    ``"logistic"``: standardised features, multinomial L2-regularised logistic regression
    (``C=1``); ``"forest"``: random forest, 200 trees, seeded; ``"lda"``: linear discriminant
    analysis. Any scikit-learn classifier instance is accepted too (an unfitted clone is used).
    """
    if isinstance(kind, BaseEstimator):
        return clone(kind)
    if kind == "logistic":
        return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
    if kind == "forest":
        return RandomForestClassifier(n_estimators=200, random_state=seed, n_jobs=1)
    if kind == "lda":
        return LinearDiscriminantAnalysis()
    raise HarmonizationError(f"unknown classifier {kind!r}: use 'logistic', 'forest' or 'lda'")


def _residualize(
    X_train: np.ndarray, X_test: np.ndarray, C_train: np.ndarray, C_test: np.ndarray,
    sites_train: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Subtract covariate effects fitted on the training fold (features ~ site + covariates).

    Site enters as a fixed effect so that the covariate slopes are within-site slopes, which
    confounding between site and biology cannot bias.
    """
    levels = sorted(np.unique(sites_train))
    D = np.hstack([site_dummies(sites_train, levels), C_train])
    k = len(levels)
    Xc = np.where(np.isnan(X_train), np.nanmean(X_train, axis=0), X_train)
    beta = ols(D, Xc)["beta"][k:]
    return X_train - C_train @ beta, X_test - C_test @ beta


def _score(
    A: np.ndarray, B: np.ndarray, y_train: np.ndarray, y_test: np.ndarray,
    C_train: np.ndarray | None, C_test: np.ndarray | None, classifier: str | BaseEstimator,
    seed: int,
) -> float:
    """Balanced accuracy of one fold: optional residualisation, mean imputation, classifier."""
    if C_train is not None and C_train.shape[1]:
        A, B = _residualize(A, B, C_train, C_test, y_train)
    # Classifiers need complete rows: impute with the training-fold feature means.
    means = np.nanmean(A, axis=0)
    means = np.where(np.isnan(means), 0.0, means)
    A = np.where(np.isnan(A), means, A)
    B = np.where(np.isnan(B), means, B)
    clf = make_classifier(classifier, seed)
    # Small problems: one BLAS thread is several times faster than contending threads.
    with threadpool_limits(limits=1):
        clf.fit(A, y_train)
        pred = clf.predict(B)
    return float(balanced_accuracy_score(y_test, pred))


def site_prediction(
    table: pd.DataFrame,
    features: Sequence[str],
    harmonizer: HarmonizerSpec | None = None,
    site: str = "site",
    covariates: Sequence[str] = (),
    n_splits: int = 5,
    seed: int = 0,
    classifier: str | BaseEstimator = "logistic",
    residualize: bool = True,
    n_permutations: int = 0,
    leaky: bool = True,
    before_folds: Sequence[float] | None = None,
    residualize_covariates: Sequence[str] | None = None,
) -> SitePredictionResult:
    """Predict site from features by stratified K-fold CV, before and after harmonization.

    Parameters
    ----------
    table : DataFrame
        One row per scan with the site, covariate and feature columns.
    features : sequence of str
        Feature columns.
    harmonizer : class, factory or instance, optional
        Harmonizer with ``fit(X, sites, covariates)``/``transform``. A fresh copy is fitted on each
        training fold (never on the held-out rows) and applied to both folds. ``None`` scores
        only the raw data (``after`` equals ``before``).
    site : str
        Site column.
    covariates : sequence of str
        Biological covariates protected by the harmonizer (passed to it) and, with
        ``residualize``, regressed out before classification.
    n_splits : int
        Folds of the stratified K-fold (shuffled with ``seed``); capped by the smallest site.
    seed : int
        Seed of the fold split, the forest and the permutations.
    classifier : {"logistic", "forest", "lda"} or scikit-learn classifier
        See :func:`make_classifier`.
    residualize : bool
        Regress the covariates out (fitted on the training fold, site as fixed effect).
    n_permutations : int
        If > 0, also estimate chance by scoring the raw features against shuffled site labels.
    leaky : bool
        Also score the leaky protocol (harmonizer fitted once on all rows), ``after_leaky``.
    before_folds : sequence of float, optional
        Raw-data scores of the same folds computed earlier with the same arguments (a
        comparison of several harmonizers scores the raw data once); not recomputed.
    residualize_covariates : sequence of str, optional
        Columns regressed out before classification, if not ``covariates`` (e.g. with an
        ``age^2`` column when age acts nonlinearly, which the harmonizer is not given).

    Returns
    -------
    SitePredictionResult
    """
    features = list(features)
    covariates = list(covariates)
    resid_cov = covariates if residualize_covariates is None else list(residualize_covariates)
    check_columns(table, [site, *covariates, *resid_cov])
    table = table.reset_index(drop=True)
    y = table[site].astype(str).to_numpy()
    counts = pd.Series(y).value_counts()
    if len(counts) < 2:
        raise HarmonizationError(f"site column {site!r} has a single site; nothing to predict")
    if counts.min() < 2:
        raise HarmonizationError(f"site {counts.idxmin()!r} has a single scan; cross-validated "
                                 "site prediction needs at least 2 per site")
    k = int(min(n_splits, counts.min()))
    if k < n_splits:
        logger.warning("site %r has %d scans: using %d folds instead of %d",
                       counts.idxmin(), counts.min(), k, n_splits)
    X = feature_matrix(table, features)
    # Encode covariates once on the whole table so that every fold has the same columns.
    C = covariate_design(table, resid_cov)[0] if (residualize and resid_cov) else None
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = list(skf.split(X, y))

    X_leaky = None
    if harmonizer is not None and leaky:
        _, (X_leaky,) = fit_transform(harmonizer, table, [table], features, site, covariates)

    scores: dict[str, list[float]] = {"before": [], "after": [], "leaky": []}
    for fold, (tr, te) in enumerate(folds):
        logger.debug("site prediction fold %d/%d", fold + 1, k)
        Ctr = C[tr] if C is not None else None
        Cte = C[te] if C is not None else None
        variants = [] if before_folds is not None else [("before", X[tr], X[te])]
        if harmonizer is not None:
            train, test = table.iloc[tr], table.iloc[te]
            _, (Xh_tr, Xh_te) = fit_transform(harmonizer, train, [train, test], features, site,
                                              covariates)
            variants.append(("after", Xh_tr, Xh_te))
            if X_leaky is not None:
                variants.append(("leaky", X_leaky[tr], X_leaky[te]))
        for label, A, B in variants:
            scores[label].append(_score(A, B, y[tr], y[te], Ctr, Cte, classifier, seed))
    if before_folds is not None:
        if len(before_folds) != k:
            raise HarmonizationError(f"before_folds has {len(before_folds)} scores for {k} folds")
        scores["before"] = [float(v) for v in before_folds]
    if harmonizer is None:
        scores["after"] = list(scores["before"])

    result = SitePredictionResult(
        before=float(np.mean(scores["before"])), after=float(np.mean(scores["after"])),
        chance=1.0 / len(counts), n_sites=len(counts), n_splits=k,
        after_leaky=float(np.mean(scores["leaky"])) if scores["leaky"] else float("nan"),
        before_folds=scores["before"], after_folds=scores["after"],
        after_leaky_folds=scores["leaky"],
    )
    if n_permutations > 0:
        rng = np.random.default_rng(seed)
        null = []
        for _ in range(n_permutations):
            yp = rng.permutation(y)
            fp = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(X, yp)
            null.append(float(np.mean([
                _score(X[tr], X[te], yp[tr], yp[te], C[tr] if C is not None else None,
                       C[te] if C is not None else None, classifier, seed)
                for tr, te in fp])))
        result.chance_permutation = float(np.mean(null))
        result.chance_permutation_q95 = float(np.quantile(null, 0.95))
    return result
