"""How much site information a latent code still carries (scikit-learn, no torch).

Moyer et al. (2020), sec. 3.3, judge invariance by training a classifier to predict the site
from z; we report its cross-validated balanced accuracy (chance = 1 / number of sites).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dmriharmony.errors import HarmonizationError


@dataclass(frozen=True)
class LatentSiteAccuracy:
    """Cross-validated balanced accuracy of a z -> site classifier."""

    balanced_accuracy: float
    fold_scores: tuple[float, ...]
    chance: float
    n_sites: int
    n_samples: int

    @property
    def above_chance(self) -> float:
        return self.balanced_accuracy - self.chance


def latent_site_accuracy(
    z: np.ndarray,
    sites: Sequence | np.ndarray,
    *,
    n_splits: int = 5,
    groups: Sequence | np.ndarray | None = None,
    max_samples: int | None = 20000,
    seed: int = 0,
) -> LatentSiteAccuracy:
    """Balanced accuracy of a logistic-regression site classifier on latent codes.

    Parameters
    ----------
    z
        (n, d) latent codes (e.g. :meth:`SiteInvariantVAE.encode`).
    sites
        n site labels.
    n_splits
        Folds (stratified by site, or grouped by ``groups`` so a subject is never on both sides).
    max_samples
        Stratified random subsample for speed (``None``: all).
    seed
        Seeds the subsample and the folds.
    """
    z = np.asarray(z, dtype=float)
    labels = np.asarray(sites).astype(str).ravel()
    if z.ndim != 2 or z.shape[0] != labels.size:
        raise HarmonizationError(f"z of shape {z.shape} does not match {labels.size} site labels")
    if not np.all(np.isfinite(z)):
        raise HarmonizationError("latent codes hold NaN or infinite values")
    uniq, counts = np.unique(labels, return_counts=True)
    if uniq.size < 2:
        raise HarmonizationError("latent site accuracy needs at least 2 sites")
    if counts.min() < n_splits:
        raise HarmonizationError(
            f"site {uniq[np.argmin(counts)]!r} has {counts.min()} samples, fewer than "
            f"{n_splits} folds"
        )
    grp = None if groups is None else np.asarray(groups).astype(str).ravel()
    rng = np.random.default_rng(seed)
    keep = np.arange(labels.size)
    if max_samples is not None and labels.size > max_samples:
        per_site = max(n_splits, max_samples // uniq.size)
        keep = np.sort(np.concatenate([
            rng.choice(np.flatnonzero(labels == s), size=min(per_site, c), replace=False)
            for s, c in zip(uniq, counts)
        ]))
    zk, yk = z[keep], labels[keep]
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    if grp is not None:
        cv = GroupKFold(n_splits=n_splits)
        scores = cross_val_score(clf, zk, yk, groups=grp[keep], cv=cv,
                                 scoring="balanced_accuracy")
    else:
        cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        scores = cross_val_score(clf, zk, yk, cv=cv, scoring="balanced_accuracy")
    return LatentSiteAccuracy(
        balanced_accuracy=float(np.mean(scores)), fold_scores=tuple(float(s) for s in scores),
        chance=1.0 / uniq.size, n_sites=int(uniq.size), n_samples=int(keep.size),
    )
