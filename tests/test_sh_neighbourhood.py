"""Voxel + neighbour feature vectors (Moyer et al. 2020: 7 x 46 = 322 values)."""

from __future__ import annotations

import numpy as np
import pytest

from dmriharmony.errors import HarmonizationError
from dmriharmony.sh import (
    centre_features,
    fit_shells,
    neighbourhood_features,
    neighbourhood_offsets,
    to_volume,
)


def test_offsets():
    for k in (6, 18, 26):
        offs = neighbourhood_offsets(k)
        assert offs.shape == (k + 1, 3)
        assert np.array_equal(offs[0], [0, 0, 0])
        assert len({tuple(o) for o in offs}) == k + 1
    assert np.abs(neighbourhood_offsets(6)).sum(axis=1)[1:].tolist() == [1] * 6
    with pytest.raises(HarmonizationError, match="connectivity"):
        neighbourhood_offsets(8)


def test_layout_border_and_mask_rule():
    shape = (4, 3, 2)
    vol = np.stack([np.arange(24.0).reshape(shape), -np.arange(24.0).reshape(shape)], axis=-1)
    mask = np.ones(shape, bool)
    mask[3, 2, 1] = False
    x = neighbourhood_features(vol, mask)
    assert x.shape == (23, 14)
    idx = np.argwhere(mask)
    row = int(np.flatnonzero((idx == [1, 1, 0]).all(axis=1))[0])
    blocks = x[row].reshape(7, 2)
    # centre, -x, +x, -y, +y, -z (outside: centre), +z
    assert blocks[:, 0].tolist() == [vol[1, 1, 0, 0], vol[0, 1, 0, 0], vol[2, 1, 0, 0],
                                     vol[1, 0, 0, 0], vol[1, 2, 0, 0], vol[1, 1, 0, 0],
                                     vol[1, 1, 1, 0]]
    np.testing.assert_array_equal(blocks[:, 1], -blocks[:, 0])
    # a neighbour outside the mask is replaced by the centre voxel
    row = int(np.flatnonzero((idx == [3, 2, 0]).all(axis=1))[0])
    assert x[row].reshape(7, 2)[6, 0] == vol[3, 2, 0, 0]
    np.testing.assert_array_equal(centre_features(x, 2), vol[mask])
    np.testing.assert_array_equal(to_volume(centre_features(x, 2), mask)[mask], vol[mask])
    with pytest.raises(HarmonizationError, match="NaN"):
        bad = vol.copy()
        bad[0, 0, 0, 1] = np.nan
        neighbourhood_features(bad, mask)
    with pytest.raises(HarmonizationError, match="mask shape"):
        neighbourhood_features(vol, mask[:3])


def test_moyer_input_width_from_an_sh_fit():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(60, 3))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    bvals = np.r_[0.0, np.full(60, 1000.0)]
    bvecs = np.vstack([np.zeros(3), g])
    data = 1000 * np.exp(-1000 * 7e-4 * rng.uniform(0.5, 1.5, size=(5, 5, 4, 1)))
    data = np.concatenate([np.full((5, 5, 4, 1), 1000.0), np.repeat(data, 60, axis=-1)], -1)
    fit = fit_shells(data, bvals, bvecs)
    feats = neighbourhood_features(fit.features(), fit.mask)
    assert feats.shape == (100, 7 * 46) == (100, 322)
