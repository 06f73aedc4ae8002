"""Synthetic ENIGMA-like ROI table: determinism, the generative model, truth recovery, errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm

from dmriharmony.errors import SimulationError
from dmriharmony.simulate.roi_table import ENIGMA_ROIS, simulate_roi_table


def _mean_model(table: pd.DataFrame, truth: dict) -> np.ndarray:
    """The noise-free biology of every row, rebuilt from ``truth`` (FA units)."""
    f = truth["features"]
    a = table["age"].to_numpy()[:, None] - truth["age0"]
    return (truth["intercept"][f].to_numpy() + a * truth["age_slope"][f].to_numpy()
            + truth["age_quadratic"] * a**2
            + table["sex"].to_numpy()[:, None] * truth["sex_effect"][f].to_numpy()
            + table["dx"].to_numpy()[:, None] * truth["dx_beta"][f].to_numpy())


def test_same_seed_same_table_other_seed_other_table():
    a, ta = simulate_roi_table(n_sites=3, n_per_site=20, n_features=5, seed=7)
    b, tb = simulate_roi_table(n_sites=3, n_per_site=20, n_features=5, seed=7)
    c, _ = simulate_roi_table(n_sites=3, n_per_site=20, n_features=5, seed=8)
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(ta["gamma"], tb["gamma"])
    assert not np.allclose(a[ta["features"]], c[ta["features"]])


def test_layout_names_and_types():
    table, truth = simulate_roi_table(n_sites=4, n_per_site=[10, 20, 30, 40], n_features=22, seed=1)
    assert list(table.columns[:5]) == ["subject", "site", "age", "sex", "dx"]
    assert truth["features"][:20] == list(ENIGMA_ROIS)
    assert truth["features"][20:] == ["ROI021", "ROI022"]
    assert table["site"].value_counts().sort_index().tolist() == [10, 20, 30, 40]
    assert table["subject"].is_unique
    assert set(table["sex"]) <= {0, 1} and set(table["dx"]) == {0, 1}
    assert truth["gamma"].shape == truth["delta"].shape == (4, 22)
    assert truth["clean"].shape == table.shape


def test_generative_model_holds_exactly():
    """observed - biology = gamma_site + delta_site * (clean - biology), row by row."""
    table, truth = simulate_roi_table(n_sites=3, n_per_site=[15, 25, 35], n_features=6, seed=3,
                                      age_quadratic=-2e-5, age_site_shift=4.0)
    f = truth["features"]
    mu = _mean_model(table, truth)
    resid_obs = table[f].to_numpy() - mu
    resid_clean = truth["clean"][f].to_numpy() - mu
    g = truth["gamma"].loc[table["site"]].to_numpy()
    d = truth["delta"].loc[table["site"]].to_numpy()
    np.testing.assert_allclose(resid_obs, g + d * resid_clean, rtol=0, atol=1e-12)


def test_site_effects_are_identifiable_like_combat():
    """sum_i n_i gamma_if = 0 and sum_i n_i delta_if^2 / n = 1 (ComBat's pooled scale)."""
    sizes = [12, 40, 80]
    _, truth = simulate_roi_table(n_sites=3, n_per_site=sizes, n_features=8, seed=5,
                                  site_location=2.0, site_scale=0.5)
    w = np.asarray(sizes) / sum(sizes)
    np.testing.assert_allclose(w @ truth["gamma"].to_numpy(), 0.0, atol=1e-14)
    np.testing.assert_allclose(w @ truth["delta"].to_numpy() ** 2, 1.0, atol=1e-12)
    assert (truth["delta"].to_numpy() > 0).all()


def test_clean_table_recovers_the_true_effects_ols_statsmodels():
    """OLS (statsmodels) on the site-free table recovers d and the age slope within 3 SE."""
    table, truth = simulate_roi_table(n_sites=4, n_per_site=500, n_features=4, seed=11,
                                      dx_prop_range=(0.3, 0.6))
    clean = truth["clean"]
    X = sm.add_constant(clean[["dx", "age", "sex"]].astype(float))
    for f in truth["features"]:
        fit = sm.OLS(clean[f].to_numpy(), X).fit()
        assert abs(fit.params["dx"] - truth["dx_beta"][f]) < 3 * fit.bse["dx"]
        assert abs(fit.params["age"] - truth["age_slope"][f]) < 3 * fit.bse["age"]
        # residual SD is the scanner-free sigma_f, so d = beta / sigma recovers dx_d
        assert np.sqrt(fit.scale) == pytest.approx(truth["noise_sd"][f], rel=0.05)
        d = fit.params["dx"] / np.sqrt(fit.scale)
        assert abs(d - truth["dx_d"][f]) < 3 * np.sqrt(1 / 800 + 1 / 1200)
    np.testing.assert_allclose(truth["dx_d"], truth["dx_beta"] / truth["noise_sd"])


def test_given_effects_are_used_and_confounding_is_applied():
    table, truth = simulate_roi_table(n_sites=3, n_per_site=100, n_features=3, seed=2,
                                      dx_d=[-0.5, -0.6, -0.7], age_slope=-0.002,
                                      age_site_shift=10.0, dx_prop_range=(0.2, 0.8))
    np.testing.assert_allclose(truth["dx_d"], [-0.5, -0.6, -0.7])
    np.testing.assert_allclose(truth["age_slope"], -0.002)
    prop = table.groupby("site")["dx"].mean()
    np.testing.assert_allclose(prop.to_numpy(), [0.2, 0.5, 0.8])
    age = table.groupby("site")["age"].mean().to_numpy()
    assert age[0] < age[1] < age[2]
    np.testing.assert_allclose(np.diff(truth["site_age_mean"]), 10.0)


def test_traveling_subjects_share_biology_across_sites():
    _, truth = simulate_roi_table(n_sites=3, n_per_site=30, n_features=5, seed=4, n_traveling=6,
                                  scan_noise_fraction=0.0)
    trav, clean = truth["traveling"], truth["traveling_clean"]
    f = truth["features"]
    assert len(trav) == 18 and trav.groupby("subject")["site"].nunique().eq(3).all()
    # without scan noise the site-free values of one subject are identical at every site
    spread = clean.groupby("subject")[f].std().to_numpy()
    np.testing.assert_allclose(spread, 0.0, atol=1e-12)
    # the observed values differ by the site effects only
    assert (trav.groupby("subject")[f].std().to_numpy() > 0).all()
    mu = clean[f].to_numpy()
    g = truth["gamma"].loc[trav["site"]].to_numpy()
    d = truth["delta"].loc[trav["site"]].to_numpy()
    base = _mean_model(trav, truth)
    np.testing.assert_allclose(trav[f].to_numpy(), base + g + d * (mu - base), atol=1e-12)


def test_scan_noise_makes_traveling_values_differ():
    _, truth = simulate_roi_table(n_sites=2, n_per_site=10, n_features=3, seed=4, n_traveling=4,
                                  scan_noise_fraction=0.5)
    f = truth["features"]
    assert (truth["traveling_clean"].groupby("subject")[f].std().to_numpy() > 0).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_sites": 1}, "n_sites"),
        ({"n_per_site": [10, 3]}, "site1 has 3"),
        ({"n_per_site": [10, 10, 10]}, "n_per_site"),
        ({"feature_correlation": 1.0}, "feature_correlation"),
        ({"dx_prop_range": (0.0, 0.5)}, "dx_prop_range"),
        ({"site_scale": -1.0}, "site_scale"),
        ({"dx_d": [0.1, 0.2]}, "dx_d"),
        ({"noise_sd": 0.0}, "noise_sd"),
        ({"age_range": (50, 20)}, "age_range"),
        ({"n_traveling": -1}, "n_traveling"),
    ],
)
def test_impossible_configurations_raise(kwargs, match):
    args = {"n_sites": 2, "n_per_site": 10, "n_features": 3} | kwargs
    with pytest.raises(SimulationError, match=match):
        simulate_roi_table(**args)
