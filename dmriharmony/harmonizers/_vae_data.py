"""Input checks, site coding and the validation split of the VAE (numpy only)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dmriharmony.errors import HarmonizationError


def check_features(X: np.ndarray, n_features: int | None = None, what: str = "X") -> np.ndarray:
    """(n_voxels, n_features) finite float32 array; names the first bad row/column."""
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise HarmonizationError(f"{what} must be a 2-D (voxels x features) array, got {arr.shape}")
    if arr.shape[0] == 0:
        raise HarmonizationError(f"{what} has no voxels (rows)")
    if n_features is not None and arr.shape[1] != n_features:
        raise HarmonizationError(
            f"{what} has {arr.shape[1]} features per voxel but the VAE was built for {n_features}"
        )
    try:
        arr = arr.astype(np.float32, copy=False)
    except (TypeError, ValueError):
        raise HarmonizationError(f"{what} must hold numbers") from None
    bad = ~np.isfinite(arr)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise HarmonizationError(
            f"{what} holds NaN or infinite values ({int(bad.sum())} cells, first at voxel "
            f"{int(row)}, feature {int(col)})"
        )
    return arr


def check_sites(sites: Sequence | np.ndarray, n: int, known: Sequence[str] | None = None,
                what: str = "sites") -> np.ndarray:
    """Site labels as a string array of length ``n``; unseen labels raise, naming the site."""
    labels = np.asarray(sites).astype(str).ravel()
    if labels.size != n:
        raise HarmonizationError(f"{what} has {labels.size} labels for {n} voxels")
    if known is not None:
        unseen = sorted(set(labels.tolist()) - set(known))
        if unseen:
            raise HarmonizationError(
                f"site {unseen[0]!r} was not seen in training (trained on {list(known)})"
            )
    return labels


def site_index(labels: np.ndarray, sites: Sequence[str]) -> np.ndarray:
    """Integer code of each label in the sorted training ``sites``."""
    lookup = {s: i for i, s in enumerate(sites)}
    return np.fromiter((lookup[s] for s in labels), dtype=np.int64, count=labels.size)


def split_validation(
    sites: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (train, validation) masks, held out per site.

    With ``groups`` (subject or scan labels, one per voxel) whole groups are held out, so that
    neighbouring voxels of one scan never sit on both sides; a site with a single group falls
    back to holding out voxels. Each site keeps at least one training voxel.
    """
    n = sites.size
    val = np.zeros(n, dtype=bool)
    if fraction <= 0:
        return ~val, val
    rng = np.random.default_rng(seed)
    for site in np.unique(sites):
        idx = np.flatnonzero(sites == site)
        site_groups = np.unique(groups[idx]) if groups is not None else np.array([])
        if site_groups.size >= 2:
            k = min(max(1, int(round(fraction * site_groups.size))), site_groups.size - 1)
            chosen = rng.choice(site_groups, size=k, replace=False)
            val[idx[np.isin(groups[idx], chosen)]] = True
        elif idx.size >= 2:
            k = min(max(1, int(round(fraction * idx.size))), idx.size - 1)
            val[rng.choice(idx, size=k, replace=False)] = True
    return ~val, val
