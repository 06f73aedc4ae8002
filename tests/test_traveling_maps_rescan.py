"""Scan-rescan decomposition of the voxel-level traveling error (scan_rescan_rmse)."""

import nibabel as nib
import numpy as np
import pytest

from dmriharmony.errors import HarmonizationError
from dmriharmony.evaluation.traveling_maps import scan_rescan_rmse

SITES = {"ge": "ge", "gerescan1": "ge", "siemens": "siemens", "siemensrescan1": "siemens"}


def _maps(d, s, shape=(40, 40, 30), seed=0):
    """Site offset d at siemens, independent noise of SD s in every session."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.2, 0.8, shape)
    off = {"ge": 0.0, "siemens": d}
    return {ses: base + off[site] + rng.normal(0, s, shape) for ses, site in SITES.items()}


def test_offset_plus_noise_known_answer():
    d, s = 0.03, 0.02
    out = scan_rescan_rmse(_maps(d, s), SITES, np.ones((40, 40, 30)))
    assert out["n_between_pairs"] == 4 and out["n_within_pairs"] == 2
    assert out["n_voxels"] == 40 * 40 * 30
    assert out["between_rmse"] == pytest.approx(np.sqrt(d**2 + 2 * s**2), rel=0.01)
    assert out["within_rmse"] == pytest.approx(np.sqrt(2) * s, rel=0.01)
    assert out["site_rmse"] == pytest.approx(d, rel=0.03)


def test_exact_by_hand_and_means_of_squares():
    # one voxel: values chosen so every pairwise MSE is known exactly
    maps = {"a1": np.array([0.0]), "a2": np.array([1.0]), "b1": np.array([3.0])}
    sites = {"a1": "A", "a2": "A", "b1": "B", "unused": "C"}
    out = scan_rescan_rmse(maps, sites, np.array([1]))
    # between pairs: (a1, b1) MSE 9, (a2, b1) MSE 4 -> mean 6.5; within: (a1, a2) MSE 1
    assert out["between_rmse"] == pytest.approx(np.sqrt(6.5))
    assert out["within_rmse"] == pytest.approx(1.0)
    assert out["site_rmse"] == pytest.approx(np.sqrt(5.5))
    assert (out["n_between_pairs"], out["n_within_pairs"]) == (2, 1)


def test_noise_only_clips_at_zero_and_mask_is_used():
    maps = {"a1": np.zeros((3, 3)), "a2": np.full((3, 3), 2.0), "b1": np.ones((3, 3))}
    maps["b1"][0, 0] = 50.0  # outside the mask
    mask = np.ones((3, 3), bool)
    mask[0, 0] = False
    out = scan_rescan_rmse(maps, {"a1": "A", "a2": "A", "b1": "B"}, mask)
    assert out["between_rmse"] == pytest.approx(1.0)  # within^2 = 4 > between^2 = 1
    assert out["within_rmse"] == pytest.approx(2.0)
    assert out["site_rmse"] == 0.0
    assert out["n_voxels"] == 8


def test_without_rescans_within_is_nan_and_images_paths_work(tmp_path):
    shape = (4, 4, 3)
    maps = {"ge": np.full(shape, 0.4), "siemens": np.full(shape, 0.5)}
    p = tmp_path / "siemens.nii.gz"
    nib.save(nib.Nifti1Image(maps["siemens"].astype(np.float32), np.eye(4)), p)
    inputs = {"ge": nib.Nifti1Image(maps["ge"].astype(np.float32), np.eye(4)), "siemens": p}
    out = scan_rescan_rmse(inputs, {"ge": "ge", "siemens": "siemens"}, np.ones(shape))
    assert out["between_rmse"] == pytest.approx(0.1, rel=1e-6)
    assert np.isnan(out["within_rmse"]) and np.isnan(out["site_rmse"])
    assert out["n_within_pairs"] == 0 and out["n_between_pairs"] == 1


def test_errors():
    shape = (3, 3, 3)
    m = np.ones(shape)
    maps = {"ge": np.zeros(shape), "gerescan1": np.zeros(shape), "siemens": np.ones(shape)}
    with pytest.raises(HarmonizationError, match=r"\['siemens'\] of the maps have no site"):
        scan_rescan_rmse(maps, {"ge": "ge", "gerescan1": "ge"}, m)
    with pytest.raises(HarmonizationError, match=">= 2 sites"):
        scan_rescan_rmse(maps, {"ge": "ge", "gerescan1": "ge", "siemens": "ge"}, m)
    bad = {**maps, "siemens": np.ones((3, 3, 2))}
    with pytest.raises(HarmonizationError, match="session 'siemens'.*shape"):
        scan_rescan_rmse(bad, SITES, m)
    nan = {**maps, "gerescan1": np.full(shape, np.nan)}
    with pytest.raises(HarmonizationError, match="non-finite"):
        scan_rescan_rmse(nan, SITES, m)
    with pytest.raises(HarmonizationError, match="mask is empty"):
        scan_rescan_rmse(maps, SITES, np.zeros(shape))
