"""SH representation: DIPY descoteaux07 (legacy=False) fit/evaluate, orders, shells, RISH."""

from __future__ import annotations

import numpy as np
import pytest
from dipy.data import get_sphere
from scipy.spatial.transform import Rotation

from dmriharmony.errors import HarmonizationError
from dmriharmony.sh import (
    SHFit,
    evaluate_sh,
    find_shells,
    fit_sh,
    fit_shells,
    map_to_bvalue,
    n_coeffs,
    n_unique_directions,
    order_for_directions,
    rish_features,
    scale_by_order,
    sh_matrix,
)
from dmriharmony.sh.basis import degrees


def _dirs(n: int, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed).normal(size=(n, 3))
    return g / np.linalg.norm(g, axis=1, keepdims=True)


def _tensor_signal(bvals: np.ndarray, bvecs: np.ndarray, D: np.ndarray) -> np.ndarray:
    return np.exp(-bvals * np.einsum("ni,ij,nj->n", bvecs, D, bvecs))


WM = np.diag([1.7e-3, 0.3e-3, 0.3e-3])


def test_coefficient_counts_and_order_selection():
    assert [n_coeffs(o) for o in (0, 2, 4, 6, 8)] == [1, 6, 15, 28, 45]
    expected = {1: 0, 5: 0, 6: 2, 14: 2, 15: 4, 27: 4, 28: 6, 44: 6, 45: 8, 64: 8, 300: 8}
    assert {n: order_for_directions(n) for n in expected} == expected
    assert order_for_directions(64, max_order=6) == 6
    # antipodal pairs carry no new information for a symmetric basis
    g = _dirs(30, 0)
    assert n_unique_directions(np.vstack([g, -g, g])) == 30
    coeffs = fit_sh(np.ones((2, 60)), np.vstack([g, -g]))
    assert coeffs.shape == (2, 28)  # order 6 from 30 distinct directions, not 8
    with pytest.raises(HarmonizationError, match="even"):
        n_coeffs(3)


def test_basis_is_orthonormal_real_descoteaux():
    """legacy=False gives an orthonormal basis: (4 pi / N) B^T B ~ I on a dense sphere."""
    v = get_sphere(name="repulsion724").vertices
    B = sh_matrix(v, 8)
    gram = 4 * np.pi / len(v) * B.T @ B
    assert np.max(np.abs(gram - np.eye(45))) < 0.02
    # Y_00 = 1 / sqrt(4 pi)
    np.testing.assert_allclose(B[:, 0], 1 / np.sqrt(4 * np.pi))
    # symmetric: Y(g) = Y(-g)
    np.testing.assert_allclose(sh_matrix(-v, 8), B, atol=1e-12)


@pytest.mark.parametrize("order", [2, 4, 6, 8])
def test_round_trip_exact_on_band_limited_signal(order):
    rng = np.random.default_rng(order)
    coeffs = rng.normal(size=(5, n_coeffs(order)))
    train, other = _dirs(90, 1), _dirs(33, 2)
    signal = evaluate_sh(coeffs, train)
    fitted = fit_sh(signal, train, order=order, smooth=0.0)
    np.testing.assert_allclose(fitted, coeffs, atol=1e-10)
    np.testing.assert_allclose(evaluate_sh(fitted, other), coeffs @ sh_matrix(other, order).T,
                               atol=1e-10)
    # Laplace-Beltrami regularisation shrinks the energy of the highest order
    smoothed = fit_sh(signal, train, order=order, smooth=0.006)
    assert rish_features(smoothed)[:, -1].sum() < rish_features(coeffs)[:, -1].sum()


def test_fit_input_validation():
    g = _dirs(30, 3)
    with pytest.raises(HarmonizationError, match="b-vectors"):
        fit_sh(np.ones(29), g)
    with pytest.raises(HarmonizationError, match="NaN"):
        fit_sh(np.full(30, np.nan), g)
    with pytest.raises(HarmonizationError, match="only 30 directions"):
        fit_sh(np.ones(30), g, order=8, smooth=0.0)
    with pytest.raises(HarmonizationError, match="b-vector 0 is zero"):
        fit_sh(np.ones(30), np.vstack([np.zeros(3), g[1:]]))


def test_rish_invariant_under_rotation_of_the_gradient_table():
    """Sampling a band-limited function on R g instead of g only rotates its coefficients."""
    rng = np.random.default_rng(7)
    coeffs = rng.normal(size=(4, 45))
    g = _dirs(100, 4)
    for seed in range(3):
        R = Rotation.random(random_state=seed).as_matrix()
        rotated = fit_sh(evaluate_sh(coeffs, g @ R.T), g, order=8, smooth=0.0)
        assert np.max(np.abs(rotated - coeffs)) > 0.1  # the coefficients do change
        np.testing.assert_allclose(rish_features(rotated), rish_features(coeffs), rtol=1e-9)


def test_rish_of_rotated_tensor_signal():
    """A rotated DTI signal (not band-limited) keeps its RISH features to SH truncation error."""
    g = get_sphere(name="repulsion724").vertices
    b = np.full(len(g), 1000.0)
    ref = rish_features(fit_sh(_tensor_signal(b, g, WM), g, order=8, smooth=0.0))
    for seed in range(3):
        R = Rotation.random(random_state=seed).as_matrix()
        rot = rish_features(fit_sh(_tensor_signal(b, g, R @ WM @ R.T), g, order=8, smooth=0.0))
        np.testing.assert_allclose(rot, ref, rtol=2e-3, atol=1e-7)
    # isotropic signal: all energy in l = 0, E_0 = 4 pi exp(-2 b D)
    iso = rish_features(fit_sh(_tensor_signal(b, g, np.eye(3) * 1e-3), g, order=8, smooth=0.0))
    np.testing.assert_allclose(iso[0], 4 * np.pi * np.exp(-2.0), rtol=1e-3)
    assert np.all(iso[1:] < 1e-12)


def test_scale_by_order_scales_rish_by_square():
    coeffs = np.random.default_rng(0).normal(size=(6, 45))
    scale = np.array([1.0, 0.8, 1.3, 0.5, 2.0])
    np.testing.assert_allclose(rish_features(scale_by_order(coeffs, scale)),
                               rish_features(coeffs) * scale**2)
    assert list(degrees(4)) == [0, 2, 2, 2, 2, 2, 4, 4, 4, 4, 4, 4, 4, 4, 4]
    with pytest.raises(HarmonizationError, match="one per even order"):
        scale_by_order(coeffs, scale[:3])


def test_find_shells_groups_jittered_bvalues():
    bvals = np.array([0, 5, 995, 1005, 1000, 2010, 1990, 3000, 0])
    shells = find_shells(bvals)
    assert [round(b) for b, _ in shells] == [1000, 2000, 3000]
    assert [list(i) for _, i in shells] == [[2, 3, 4], [5, 6], [7]]
    assert find_shells(np.zeros(3)) == []


def _multishell(n_vox: int = 6):
    g1, g2 = _dirs(32, 10), _dirs(64, 11)
    bvals = np.r_[0, 0, np.full(32, 1000.0), np.full(64, 2000.0)]
    bvecs = np.vstack([np.zeros((2, 3)), g1, g2])
    rots = [Rotation.random(random_state=s).as_matrix() for s in range(n_vox)]
    s0 = np.linspace(500, 1500, n_vox)
    data = np.stack([s0[i] * _tensor_signal(bvals, bvecs, R @ WM @ R.T)
                     for i, R in enumerate(rots)])
    return data, bvals, bvecs, rots, s0


def test_fit_shells_multishell_orders_and_prediction():
    data, bvals, bvecs, rots, s0 = _multishell()
    fit = fit_shells(data, bvals, bvecs, smooth=0.0)
    assert [round(b) for b in fit.bvalues] == [1000, 2000]
    assert [s.order for s in fit.shells] == [6, 8]  # 32 and 64 directions
    np.testing.assert_allclose(fit.b0, s0)
    assert fit.features().shape == (6, 1 + 28 + 45)
    # re-synthesis on the acquired scheme and on an unseen scheme of the same shells
    pred = fit.predict(bvals, bvecs)
    assert np.max(np.abs(pred - data) / s0[:, None]) < 0.02
    g = _dirs(40, 12)
    new_b, new_g = np.r_[0, np.full(40, 2000.0)], np.vstack([np.zeros(3), g])
    truth = np.stack([s0[i] * _tensor_signal(new_b, new_g, R @ WM @ R.T)
                      for i, R in enumerate(rots)])
    assert np.max(np.abs(fit.predict(new_b, new_g) - truth) / s0[:, None]) < 0.02


def test_bvalue_matching_and_mapping():
    data, bvals, bvecs, rots, s0 = _multishell()
    fit = fit_shells(data, bvals, bvecs, smooth=0.0)
    g = _dirs(40, 13)
    for b in (600.0, 1500.0, 2500.0):  # below, between and beyond the fitted shells
        tb, tg = np.full(40, b), g
        with pytest.raises(HarmonizationError, match=f"b={b:g} matches no fitted shell"):
            fit.predict(tb, tg)
        truth = np.stack([_tensor_signal(tb, tg, R @ WM @ R.T) for R in rots])
        mapped = fit.normalized_signal(tb, tg, bvalue_mapping=True)
        assert np.max(np.abs(mapped - truth)) < 0.03, b
    # map_to_bvalue: coefficients at b = 1500 close to a direct fit at b = 1500
    dense = get_sphere(name="repulsion724").vertices
    direct = np.stack([fit_sh(_tensor_signal(np.full(len(dense), 1500.0), dense, R @ WM @ R.T),
                              dense, order=8, smooth=0.0) for R in rots])
    mapped = map_to_bvalue(fit, 1500.0)
    assert mapped.order == 8
    assert np.max(np.abs(mapped.coeffs - direct)) < 0.02
    # a matching shell comes back as is (within tolerance), and can be truncated
    assert map_to_bvalue(fit, 1040.0) is fit.shells[0]
    assert map_to_bvalue(fit, 2000.0, order=4).coeffs.shape == (6, 15)


def test_fit_shells_mask_and_bad_input(tmp_path):
    data, bvals, bvecs, _, _ = _multishell()
    mask = np.array([True, True, False, True, True, True])
    data[2] = np.nan  # outside the mask: ignored
    data[4, :2] = 0.0  # b0 = 0: dropped from the mask
    fit = fit_shells(data, bvals, bvecs, mask=mask)
    assert list(fit.mask) == [True, True, False, True, False, True]
    assert np.all(fit.shells[0].coeffs[~fit.mask] == 0)
    with pytest.raises(HarmonizationError, match="no b=0 volume"):
        fit_shells(data[:, 2:], bvals[2:], bvecs[2:], mask=mask)
    with pytest.raises(HarmonizationError, match="NaN"):
        fit_shells(data, bvals, bvecs)
    with pytest.raises(HarmonizationError, match="99 b-values"):
        fit_shells(data, np.r_[bvals, 0], bvecs, mask=mask)
    with pytest.raises(HarmonizationError, match="no SH order given for shell b=2000"):
        fit_shells(data, bvals, bvecs, mask=mask, order={1000: 4})
    fit4 = fit_shells(data, bvals, bvecs, mask=mask, order={1000: 4, 2000: 6})
    assert [s.order for s in fit4.shells] == [4, 6]


def test_features_round_trip_to_dwi():
    data, bvals, bvecs, _, _ = _multishell()
    fit = fit_shells(data, bvals, bvecs)
    feats = fit.features()
    back = SHFit.from_features(feats, fit.mask, fit.bvalues, [s.order for s in fit.shells])
    np.testing.assert_array_equal(back.features(), feats)
    np.testing.assert_allclose(back.predict(bvals, bvecs), fit.predict(bvals, bvecs))
    with pytest.raises(HarmonizationError, match="width 74 do not match"):
        SHFit.from_features(feats, fit.mask, fit.bvalues, [8, 8])
