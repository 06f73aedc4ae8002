"""Voxel-neighbourhood feature vectors (the input of the VAE of Moyer et al. 2020).

Moyer et al., "Scanner invariant representations for diffusion MRI harmonization", Magn Reson
Med 84:2174-2189 (2020), sec. 2.4: each training sample is a voxel and its 6 face neighbours,
each described by b0 + order-8 SH coefficients: 7 x 46 = 322 values. Here the per-voxel
features are any (X, Y, Z, F) array (e.g. :meth:`dmriharmony.sh.fit.SHFit.features`) and the
neighbourhood any set of integer offsets (6-, 18- or 26-connected, or custom).

Layout of one sample: ``[centre F values, neighbour 1 F values, ...]`` in the order of the
offsets (centre first; for the 6-neighbourhood: -x, +x, -y, +y, -z, +z).

Border rule (our choice, documented): a neighbour outside the image or outside the mask is
replaced by the centre voxel's own features, so background never leaks into brain samples
and every mask voxel yields a sample.
"""

from __future__ import annotations

import itertools

import numpy as np

from dmriharmony.errors import HarmonizationError


def neighbourhood_offsets(connectivity: int = 6) -> np.ndarray:
    """Offsets (K, 3), centre first: 6 (faces), 18 (+ edges) or 26 (+ corners) neighbours."""
    if connectivity not in (6, 18, 26):
        raise HarmonizationError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    if connectivity == 6:
        nb = [(-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1)]
    else:
        limit = 2 if connectivity == 18 else 3
        nb = [o for o in itertools.product((-1, 0, 1), repeat=3)
              if 0 < sum(map(abs, o)) <= limit]
    return np.array([(0, 0, 0)] + nb, dtype=int)


def neighbourhood_features(
    volume: np.ndarray, mask: np.ndarray, offsets: np.ndarray | int = 6
) -> np.ndarray:
    """Samples (n_mask_voxels, K * F) from a per-voxel feature volume (X, Y, Z, F).

    Parameters
    ----------
    volume
        (X, Y, Z, F) per-voxel features.
    mask
        (X, Y, Z) voxels to sample, in C order (``np.argwhere(mask)``).
    offsets
        (K, 3) integer offsets with the centre ``(0, 0, 0)`` first, or a connectivity
        (6, 18, 26) for :func:`neighbourhood_offsets`.
    """
    volume = np.asarray(volume)
    mask = np.asarray(mask, dtype=bool)
    if volume.ndim != 4:
        raise HarmonizationError(f"feature volume must be 4-D (X, Y, Z, F), got {volume.shape}")
    if mask.shape != volume.shape[:3]:
        raise HarmonizationError(f"mask shape {mask.shape} != feature volume {volume.shape[:3]}")
    offs = neighbourhood_offsets(offsets) if isinstance(offsets, int) else np.asarray(offsets)
    if offs.ndim != 2 or offs.shape[1] != 3 or not np.array_equal(offs[0], [0, 0, 0]):
        raise HarmonizationError("offsets must be (K, 3) integers with (0, 0, 0) first")
    idx = np.argwhere(mask)
    if not np.all(np.isfinite(volume[mask])):
        raise HarmonizationError("feature volume contains NaN or infinite values in the mask")
    shape = np.array(mask.shape)
    blocks = []
    centre = volume[mask]
    for off in offs:
        nb = idx + off
        inside = np.all((nb >= 0) & (nb < shape), axis=1)
        valid = inside.copy()
        valid[inside] = mask[tuple(nb[inside].T)]
        block = centre.copy()
        block[valid] = volume[tuple(nb[valid].T)]
        blocks.append(block)
    return np.concatenate(blocks, axis=1)


def centre_features(samples: np.ndarray, n_per_voxel: int) -> np.ndarray:
    """The centre voxel's block (first ``n_per_voxel`` columns) of neighbourhood samples."""
    samples = np.asarray(samples)
    if samples.ndim != 2 or samples.shape[1] % n_per_voxel:
        raise HarmonizationError(
            f"samples of width {samples.shape[-1]} are not whole blocks of {n_per_voxel}"
        )
    return samples[:, :n_per_voxel]


def to_volume(values: np.ndarray, mask: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """Put per-voxel rows (n_mask_voxels, F) back into a (X, Y, Z, F) volume."""
    values = np.asarray(values)
    mask = np.asarray(mask, dtype=bool)
    if values.shape[0] != int(mask.sum()):
        raise HarmonizationError(
            f"{values.shape[0]} rows for a mask of {int(mask.sum())} voxels"
        )
    out = np.full(mask.shape + values.shape[1:], fill, dtype=values.dtype)
    out[mask] = values
    return out
