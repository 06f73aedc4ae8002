"""Voxel-level traveling-subject error (dmriharmony.evaluation.traveling_maps)."""

import nibabel as nib
import numpy as np
import pytest

from dmriharmony.errors import HarmonizationError
from dmriharmony.evaluation.traveling_maps import between_site_rmse, rmse_reduction, site_mean_rmse


def _maps(offsets, seed=0, shape=(6, 5, 4)):
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.2, 0.8, shape)
    return {s: base + off for s, off in offsets.items()}, np.ones(shape, bool)


def test_pairwise_rmse_of_constant_offsets():
    maps, mask = _maps({"ge": 0.0, "siemens": 0.03, "philips": -0.01})
    df = between_site_rmse(maps, mask)
    got = {(a, b): r for a, b, r in zip(df.site_a, df.site_b, df.rmse)}
    assert got[("ge", "philips")] == pytest.approx(0.01)
    assert got[("ge", "siemens")] == pytest.approx(0.03)
    assert got[("philips", "siemens")] == pytest.approx(0.04)
    assert df.set_index(["site_a", "site_b"]).loc[("ge", "siemens"), "mean_diff"] == \
        pytest.approx(-0.03)
    # about the mean of (0, .03, -.01) = 0.00667
    mu = np.mean([0.0, 0.03, -0.01])
    expect = np.sqrt(np.mean([(0 - mu) ** 2, (0.03 - mu) ** 2, (-0.01 - mu) ** 2]))
    assert site_mean_rmse(maps, mask) == pytest.approx(expect)


def test_mask_and_images(tmp_path):
    maps, mask = _maps({"a": 0.0, "b": 0.1})
    mask[0] = False
    maps["b"][0] += 5.0  # outside the mask: ignored
    paths = {}
    for s, arr in maps.items():
        paths[s] = tmp_path / f"{s}.nii.gz"
        nib.save(nib.Nifti1Image(arr, np.eye(4)), paths[s])
    df = between_site_rmse(paths, nib.Nifti1Image(mask.astype(np.uint8), np.eye(4)))
    assert df.rmse.iloc[0] == pytest.approx(0.1)
    assert df.n_voxels.iloc[0] == mask.sum()


def test_reduction():
    before, mask = _maps({"a": 0.0, "b": 0.1})
    after, _ = _maps({"a": 0.0, "b": 0.025})
    red = rmse_reduction(before, after, mask)
    assert red["reduction"] == pytest.approx(0.75)


def test_bad_inputs():
    maps, mask = _maps({"a": 0.0, "b": 0.1})
    with pytest.raises(HarmonizationError, match="'b' has shape"):
        between_site_rmse({"a": maps["a"], "b": maps["b"][:-1]}, mask)
    with pytest.raises(HarmonizationError, match=">= 2 sites"):
        between_site_rmse({"a": maps["a"]}, mask)
    bad = maps["b"].copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(HarmonizationError, match="non-finite"):
        between_site_rmse({"a": maps["a"], "b": bad}, mask)
