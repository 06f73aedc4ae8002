"""ComBat-GAM (Pomponio et al., NeuroImage 2020): smooth age effects, vectorised penalised fit.

neuroHarmonize itself cannot be installed next to numpy 2 (it pins numpy<2), so the checks are
properties: the exact spline penalty, GCV equal to a per-feature brute-force fit with the
explicit hat matrix, and a nonlinear age curve preserved where linear ComBat distorts it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.integrate import quad

from dmriharmony.errors import HarmonizationError
from dmriharmony.harmonizers import ComBat, ComBatGAM
from dmriharmony.harmonizers._design import natural_cubic_basis, natural_cubic_penalty
from dmriharmony.harmonizers.gam import penalised_fit


def lifespan_data(seed=0, p=30):
    """An inverted-U FA-like age curve; the three sites cover different age ranges."""
    rng = np.random.default_rng(seed)
    sites = np.repeat(["A", "B", "C"], 100)
    age = np.concatenate([rng.uniform(8, 30, 100), rng.uniform(20, 55, 100),
                          rng.uniform(45, 85, 100)])
    curve = 0.45 + 0.1 * np.exp(-(((age - 35) / 20) ** 2))
    truth = curve[:, None] * rng.uniform(0.8, 1.2, p) + rng.normal(0, 0.02, (300, p))
    code = np.searchsorted(["A", "B", "C"], sites)
    shift = rng.normal(0, 0.03, (3, p))
    X = truth + shift[code] - shift.mean(axis=0)
    return X, sites, pd.DataFrame({"age": age}), truth


def test_penalty_matrix_is_the_exact_integral():
    knots = np.array([0.0, 1.0, 2.5, 3.0, 7.0])
    P = natural_cubic_penalty(knots)
    u = (np.linspace(0, 7, 7001))

    def second(j, x):
        h = 1e-3
        B = natural_cubic_basis(np.array([x - h, x, x + h]), knots)[:, j]
        return (B[0] - 2 * B[1] + B[2]) / h**2 * 7.0**2  # d2/du2 in the unit interval

    assert u.size and P.shape == (4, 4)
    for j in range(4):
        for k in range(4):
            val = quad(lambda x, j=j, k=k: second(j, x) * second(k, x), 0, 7,
                       points=knots, limit=200)[0] / 7.0
            assert P[j, k] == pytest.approx(val, rel=1e-4, abs=1e-6)
    assert np.allclose(P[0], 0) and np.allclose(P[:, 0], 0)  # the linear part is free


def test_gcv_equals_brute_force():
    rng = np.random.default_rng(1)
    n = 80
    x = rng.uniform(0, 1, n)
    knots = np.quantile(x, np.linspace(0, 1, 8))
    D = np.column_stack([np.ones(n), natural_cubic_basis(x, knots)])
    S = np.zeros((D.shape[1],) * 2)
    S[1:, 1:] = natural_cubic_penalty(knots)
    Y = np.column_stack([np.sin(3 * x), x, np.cos(9 * x), rng.normal(size=n)])
    Y = Y + rng.normal(0, 0.1, Y.shape)
    grid = np.logspace(-6, 2, 17)
    B, lam = penalised_fit(D, Y, S, grid)
    for j in range(Y.shape[1]):
        scores = []
        for value in grid:
            A = D @ np.linalg.solve(D.T @ D + value * S, D.T)
            r = Y[:, j] - A @ Y[:, j]
            scores.append(n * (r @ r) / (n - np.trace(A)) ** 2)
        best = grid[int(np.argmin(scores))]
        assert lam[j] == best
        ref = np.linalg.solve(D.T @ D + best * S, D.T @ Y[:, j])
        np.testing.assert_allclose(B[:, j], ref, rtol=1e-8, atol=1e-10)
    assert lam[1] == grid[-1]  # a straight line: the largest penalty wins


def test_nonlinear_age_curve_preserved_where_linear_combat_distorts_it():
    X, sites, cov, truth = lifespan_data()

    def error(Y):
        e = Y - truth
        return np.sqrt(((e - e.mean(axis=0)) ** 2).mean())

    lin = error(ComBat().fit_transform(X, sites, cov))
    gam = error(ComBatGAM().fit_transform(X, sites, cov))
    assert gam < 0.5 * lin
    assert gam < 0.01  # noise sd is 0.02; the site shifts were 0.03


def test_unpenalised_gam_equals_combat_with_spline_columns():
    X, sites, cov, _ = lifespan_data(p=10)
    model = ComBatGAM(penalty=None, n_knots=5).fit(X, sites, cov)
    knots = np.array(model.encoder_.knots_["age"])
    basis = pd.DataFrame(natural_cubic_basis(cov["age"].to_numpy(), knots),
                         columns=[f"b{j}" for j in range(4)])
    np.testing.assert_allclose(model.transform(X, sites, cov),
                               ComBat().fit_transform(X, sites, basis), atol=1e-10)


def test_new_subjects_roundtrip_and_extrapolation(tmp_path):
    X, sites, cov, _ = lifespan_data(p=8)
    model = ComBatGAM(categorical=None).fit(X, sites, cov)
    assert np.isfinite(model.lambda_).all()
    full = model.transform(X, sites, cov)
    idx = np.array([0, 150, 299])
    np.testing.assert_allclose(model.transform(X[idx], sites[idx], cov.iloc[idx]), full[idx],
                               atol=1e-12)
    older = cov.iloc[idx].assign(age=[95.0, 99.0, 101.0]).reset_index(drop=True)
    assert np.isfinite(model.transform(X[idx], sites[idx], older)).all()
    model.save(tmp_path / "gam.npz")
    again = ComBatGAM.load(tmp_path / "gam.npz")
    np.testing.assert_array_equal(again.transform(X, sites, cov), full)
    np.testing.assert_array_equal(again.lambda_, model.lambda_)


def test_bad_smooth_terms():
    X, sites, cov, _ = lifespan_data(p=3)
    with pytest.raises(HarmonizationError, match="'bmi'"):
        ComBatGAM(smooth=["bmi"]).fit(X, sites, cov)
    with pytest.raises(HarmonizationError, match="native"):
        ComBatGAM(backend="neurocombat")
    with pytest.raises(HarmonizationError, match="penalty"):
        ComBatGAM(penalty="aic").fit(X, sites, cov)
