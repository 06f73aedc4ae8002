"""Cross-validated site prediction: how much scanner information is left in the features.

A classifier that predicts the acquisition site from the features should do no better than
chance after a good harmonization (e.g. Fortin et al., *NeuroImage* 2018; Bayer et al.,
*NeuroImage* 2022 "Site effects how-to and when"). Two details make the score honest:

1. **No leakage.** The harmonizer is fitted inside each training fold only and then applied to
   the held-out fold (as it would be applied to subjects scanned later). Fitting it on all rows
   first lets it see (and, for flexible models, memorise) the test rows, and the held-out
   accuracy then says nothing about new data.
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
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

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

    ``before``/``after`` are the means over folds; ``*_folds`` the per-fold scores; ``chance`` is
    ``1/n_sites``; ``chance_permutation`` the mean balanced accuracy with shuffled site labels
    (NaN unless permutations were requested) and ``chance_permutation_q95`` its 95th percentile.
    """

    before: float
    after: float
    chance: float
    n_sites: int
    n_splits: int
    before_folds: list[float] = field(default_factory=list)
    after_folds: list[float] = field(default_factory=list)
    chance_permutation: float = float("nan")
    chance_permutation_q95: float = float("nan")


def make_classifier(kind: str = "logistic", seed: int = 0):
    """Classifier used to predict site: ``"logistic"`` (standardised features, multinomial
    L2-regularised logistic regression) or ``"forest"`` (random forest, 200 trees, seeded)."""
    if kind == "logistic":
        return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
    if kind == "forest":
        return RandomForestClassifier(n_estimators=200, random_state=seed, n_jobs=1)
    raise HarmonizationError(f"unknown classifier {kind!r}: use 'logistic' or 'forest'")


def _residualize(
    X_train: np.ndarray, X_test: np.ndarray, train: pd.DataFrame, test: pd.DataFrame,
    site: str, covariates: Sequence[str],
) -> tuple[np.ndarray, np.ndarray]:
    """Remove covariate effects estimated on the training fold with site as a fixed effect."""
    C_train, _ = covariate_design(train, covariates)
    C_test, names = covariate_design(test, covariates)
    if C_train.shape[1] != C_test.shape[1]:
        raise HarmonizationError("a categorical covariate has levels in the test fold that the "
                                 "training fold lacks")
    levels = sorted(train[site].astype(str).unique())
    D = np.hstack([site_dummies(train[site].to_numpy(), levels), C_train])
    k = len(levels)
    Xc = np.where(np.isnan(X_train), np.nanmean(X_train, axis=0), X_train)
    beta = ols(D, Xc)["beta"][k:]
    return X_train - C_train @ beta, X_test - C_test @ beta


def _cv_scores(
    X: np.ndarray, y: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]], classifier: str,
    seed: int,
) -> list[float]:
    scores = []
    for tr, te in folds:
        clf = make_classifier(classifier, seed)
        clf.fit(X[tr], y[tr])
        scores.append(balanced_accuracy_score(y[te], clf.predict(X[te])))
    return scores


def site_prediction(
    table: pd.DataFrame,
    features: Sequence[str],
    harmonizer: HarmonizerSpec | None = None,
    site: str = "site",
    covariates: Sequence[str] = (),
    n_splits: int = 5,
    seed: int = 0,
    classifier: str = "logistic",
    residualize: bool = True,
    n_permutations: int = 0,
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
    classifier : {"logistic", "forest"}
        See :func:`make_classifier`.
    residualize : bool
        Regress the covariates out (fitted on the training fold, site as fixed effect).
    n_permutations : int
        If > 0, also estimate chance by scoring the raw features against shuffled site labels.

    Returns
    -------
    SitePredictionResult
    """
    features = list(features)
    covariates = list(covariates)
    check_columns(table, [site, *covariates])
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
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = list(skf.split(X, y))

    before: list[float] = []
    after: list[float] = []
    for tr, te in folds:
        train, test = table.iloc[tr], table.iloc[te]
        variants = [("before", X[tr], X[te])]
        if harmonizer is not None:
            _, (Xh_tr, Xh_te) = fit_transform(harmonizer, train, [train, test], features, site,
                                              covariates)
            variants.append(("after", Xh_tr, Xh_te))
        for label, A, B in variants:
            if residualize and covariates:
                A, B = _residualize(A, B, train, test, site, covariates)
            # Classifiers need complete rows: impute with the training-fold feature means.
            means = np.nanmean(A, axis=0)
            A = np.where(np.isnan(A), means, A)
            B = np.where(np.isnan(B), means, B)
            clf = make_classifier(classifier, seed)
            clf.fit(A, y[tr])
            score = balanced_accuracy_score(y[te], clf.predict(B))
            (before if label == "before" else after).append(float(score))
    if harmonizer is None:
        after = list(before)

    result = SitePredictionResult(
        before=float(np.mean(before)), after=float(np.mean(after)), chance=1.0 / len(counts),
        n_sites=len(counts), n_splits=k, before_folds=before, after_folds=after,
    )
    if n_permutations > 0:
        rng = np.random.default_rng(seed)
        Xc = np.where(np.isnan(X), np.nanmean(X, axis=0), X)
        null = []
        for _ in range(n_permutations):
            yp = rng.permutation(y)
            fp = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(Xc, yp))
            null.append(float(np.mean(_cv_scores(Xc, yp, fp, classifier, seed))))
        result.chance_permutation = float(np.mean(null))
        result.chance_permutation_q95 = float(np.quantile(null, 0.95))
    return result
