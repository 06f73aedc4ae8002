"""ComBat: native implementation vs the neuroCombat package, edge cases as sva::ComBat, I/O.

Reference: neuroCombat 0.2.12 (Fortin et al., the Python port of sva::ComBat), run in the same
test through ``backend="neurocombat"``; agreement is required to 1e-6 (max abs).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.special import logsumexp

from dmriharmony.errors import HarmonizationError
from dmriharmony.harmonizers import ComBat
from dmriharmony.harmonizers._combat_eb import nonparametric_eb
from dmriharmony.harmonizers._combat_neuro import numpy_int_alias

SITES = ["A", "B", "C"]


def make_data(n_per=(30, 50, 40), p=40, seed=1, sex_effect=0.5):
    """Site location/scale effects on top of age and sex effects (ComBat's model)."""
    rng = np.random.default_rng(seed)
    sites = np.repeat(SITES, n_per)
    n = sites.shape[0]
    # ages exactly representable in float32 (neuroCombat casts continuous covariates to float32)
    age = np.round(rng.uniform(20, 80, n), 1).astype(np.float32).astype(float)
    sex = rng.choice(["F", "M"], n)
    cov = pd.DataFrame({"age": age, "sex": sex})
    X = rng.normal(size=(n, p)) + 0.02 * age[:, None] + (sex == "M")[:, None] * sex_effect
    code = np.searchsorted(SITES, sites)
    X += rng.normal(0, 0.5, (3, p))[code]
    X *= rng.uniform(0.7, 1.4, (3, p))[code]
    return X, sites, cov


SETTINGS = [
    pytest.param({}, id="parametric"),
    pytest.param({"parametric": False}, id="nonparametric"),
    pytest.param({"mean_only": True}, id="mean_only"),
    pytest.param({"mean_only": True, "parametric": False}, id="mean_only_nonparametric"),
    pytest.param({"ref_site": "B"}, id="ref_site"),
    pytest.param({"ref_site": "B", "parametric": False}, id="ref_site_nonparametric"),
    pytest.param({"ref_site": "C", "mean_only": True}, id="ref_site_mean_only"),
    pytest.param({"eb": False}, id="no_eb"),
]


@pytest.mark.parametrize("kwargs", SETTINGS)
def test_native_matches_neurocombat(kwargs):
    X, sites, cov = make_data()
    native = ComBat(**kwargs)
    ours = native.fit_transform(X, sites, cov)
    ref_model = ComBat(backend="neurocombat", **kwargs)
    theirs = ref_model.fit_transform(X, sites, cov)
    assert np.abs(ours - theirs).max() < 1e-6
    # the estimates too
    for name in ("gamma_star_", "delta_star_", "var_pooled_", "grand_mean_"):
        assert np.abs(getattr(native, name) - getattr(ref_model, name)).max() < 1e-8, name
    # and the recovered neuroCombat model reproduces its own output through transform()
    assert np.abs(ref_model.transform(X, sites, cov) - theirs).max() < 1e-9
    # ref site rows are left exactly unchanged
    if "ref_site" in kwargs:
        rows = sites == kwargs["ref_site"]
        np.testing.assert_array_equal(ours[rows], X[rows])


def test_neurocombat_backend_restores_numpy():
    """The np.int alias (neuroCombat's ref_batch path) exists only while neuroCombat runs."""
    had = "int" in vars(np)
    X, sites, cov = make_data(p=10)
    ComBat(ref_site="A", backend="neurocombat").fit(X, sites, cov)
    assert ("int" in vars(np)) == had
    with numpy_int_alias():
        assert np.int is int  # noqa: NPY001
    assert ("int" in vars(np)) == had


def test_priors_match_neurocombat():
    X, sites, cov = make_data()
    a = ComBat().fit(X, sites, cov)
    b = ComBat(backend="neurocombat").fit(X, sites, cov)
    for name in ("gamma_hat_", "delta_hat_", "gamma_bar_", "t2_", "a_prior_", "b_prior_"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-9, atol=1e-12)


def test_removes_site_effect_and_keeps_covariate_effect():
    X, sites, cov = make_data(n_per=(80, 80, 80), p=60, seed=3)
    Xh = ComBat().fit_transform(X, sites, cov)
    code = np.searchsorted(SITES, sites)
    design = np.column_stack([np.ones(len(sites)), cov["age"], cov["sex"] == "M"])

    def site_spread(Y):
        resid = Y - design @ np.linalg.lstsq(design, Y, rcond=None)[0]
        means = np.array([resid[code == i].mean(0) for i in range(3)])
        sds = np.array([resid[code == i].std(0) for i in range(3)])
        return np.abs(means).mean(), np.log(sds).std(0).mean()

    m0, s0 = site_spread(X)
    m1, s1 = site_spread(Xh)
    assert m1 < 0.2 * m0 and s1 < 0.5 * s0
    full_design = np.column_stack([design, np.eye(3)[code][:, 1:]])
    beta_before = np.linalg.lstsq(full_design, X, rcond=None)[0]
    beta_after = np.linalg.lstsq(design, Xh, rcond=None)[0]
    # the sex effect (0.5, scaled by the sites' average scale ~1.05) survives harmonization
    assert abs(beta_after[2].mean() - beta_before[2].mean()) < 0.1


def test_new_subjects_use_their_own_covariates():
    X, sites, cov = make_data()
    h = ComBat().fit(X, sites, cov)
    full = h.transform(X, sites, cov)
    np.testing.assert_allclose(ComBat().fit_transform(X, sites, cov), full, atol=1e-12)
    # training subjects presented later, one at a time, in a different order: same result,
    # which requires using each subject's own age and sex (neuroCombatFromTraining does not)
    idx = np.random.default_rng(0).permutation(len(sites))[:15]
    for i in idx:
        one = h.transform(X[i : i + 1], sites[i : i + 1], cov.iloc[i : i + 1])
        np.testing.assert_allclose(one[0], full[i], atol=1e-12)
    sub = h.transform(X[idx], sites[idx], cov.iloc[idx].reset_index(drop=True))
    np.testing.assert_allclose(sub, full[idx], atol=1e-12)


def test_unseen_site_is_an_error():
    X, sites, cov = make_data(p=8)
    h = ComBat().fit(X, sites, cov)
    bad = sites.copy()
    bad[3] = "Z"
    with pytest.raises(HarmonizationError, match="'Z'.*not seen"):
        h.transform(X, bad, cov)


def test_unseen_covariate_level_is_an_error():
    X, sites, cov = make_data(p=8)
    h = ComBat().fit(X, sites, cov)
    cov2 = cov.copy()
    cov2.loc[0, "sex"] = "X"
    with pytest.raises(HarmonizationError, match="sex"):
        h.transform(X, sites, cov2)


def test_dataframe_in_dataframe_out_and_feature_check():
    X, sites, cov = make_data(p=6)
    df = pd.DataFrame(X, columns=[f"roi{j}" for j in range(6)],
                      index=[f"s{j}" for j in range(len(X))])
    h = ComBat().fit(df, sites, cov)
    out = h.transform(df, sites, cov)
    assert isinstance(out, pd.DataFrame)
    assert list(out.columns) == list(df.columns) and list(out.index) == list(df.index)
    with pytest.raises(HarmonizationError, match="roi0"):
        h.transform(df.rename(columns={"roi0": "other"}), sites, cov)
    with pytest.raises(HarmonizationError, match="5 features"):
        h.transform(X[:, :5], sites, cov)


@pytest.mark.parametrize("kwargs", [{}, {"parametric": False, "ref_site": "A"}])
def test_save_load_roundtrip(tmp_path, kwargs):
    X, sites, cov = make_data(p=12)
    h = ComBat(**kwargs).fit(X, sites, cov)
    path = tmp_path / "model.npz"
    h.save(path)
    with np.load(path, allow_pickle=False) as npz:  # safe format: no pickled objects
        assert "gamma_star_" in npz.files
    h2 = ComBat.load(path)
    assert h2.parametric == h.parametric and h2.ref_site == h.ref_site
    np.testing.assert_array_equal(h2.transform(X, sites, cov), h.transform(X, sites, cov))
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]  # no temp file left behind


def test_load_rejects_other_files(tmp_path):
    with pytest.raises(HarmonizationError, match="does not exist"):
        ComBat.load(tmp_path / "nope.npz")
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    with pytest.raises(HarmonizationError, match="header"):
        ComBat.load(tmp_path / "x.npz")


def _reference_int_eprior(sdat, g_hat, d_hat):
    """sva's int.eprior, written directly on the raw data but with log-sum-exp weights."""
    F, n = sdat.shape
    gs, ds = np.empty(F), np.empty(F)
    for i in range(F):
        g = np.delete(g_hat, i)
        d = np.delete(d_hat, i)
        sum2 = ((sdat[i][None, :] - g[:, None]) ** 2).sum(axis=1)
        logw = -n / 2 * np.log(2 * np.pi * d) - sum2 / (2 * d)
        w = np.exp(logw - logsumexp(logw))
        gs[i] = w @ g
        ds[i] = w @ d
    return gs, ds


@pytest.mark.parametrize("n", [3, 40, 800])
@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_nonparametric_eb_kernel_any_site_size(n, engine):
    """Log-space sufficient-statistics kernel = direct evaluation, finite beyond 525 subjects."""
    pytest.importorskip("torch") if engine == "torch" else None
    rng = np.random.default_rng(n)
    F = 150
    sdat = rng.normal(rng.normal(0, 0.4, F)[:, None], np.sqrt(rng.gamma(8, 0.125, F))[:, None],
                      (F, n))
    sdat[0] *= 10.0  # an isolated feature: every weight of its row underflows the shared bound
    g = sdat.mean(axis=1)
    d = sdat.var(axis=1, ddof=1)
    ss = ((sdat - g[:, None]) ** 2).sum(axis=1)
    gs, ds = nonparametric_eb(np.full(F, float(n)), g, ss, g, d, chunk=32, block=48, engine=engine)
    g_ref, d_ref = _reference_int_eprior(sdat, g, d)
    assert np.isfinite(gs).all() and np.isfinite(ds).all()
    np.testing.assert_allclose(gs, g_ref, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(ds, d_ref, rtol=1e-9, atol=1e-11)


def test_nonparametric_large_site_finite_where_neurocombat_fails():
    X, sites, cov = make_data(n_per=(600, 30, 30), p=25, seed=5)
    Xh = ComBat(parametric=False).fit_transform(X, sites, cov)
    assert np.isfinite(Xh).all()
    with pytest.raises(HarmonizationError, match="NaN"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ComBat(parametric=False, backend="neurocombat").fit(X, sites, cov)


def test_feature_constant_within_a_site_is_left_unadjusted():
    X, sites, cov = make_data(p=20)
    Xc = X.copy()
    Xc[sites == "B", 7] = 0.3
    with pytest.warns(UserWarning, match="1 feature"):
        h = ComBat().fit(Xc, sites, cov)
    out = h.transform(Xc, sites, cov)
    np.testing.assert_array_equal(out[:, 7], Xc[:, 7])
    assert not h.adjusted_[7] and np.isnan(h.gamma_star_[:, 7]).all()
    # kept out of the priors: the other features are as if it were not there (sva zero.rows)
    keep = np.arange(20) != 7
    ref = ComBat().fit_transform(X[:, keep], sites, cov)
    np.testing.assert_allclose(out[:, keep], ref, atol=1e-12)


def test_single_subject_site_falls_back_to_mean_only():
    X, sites, cov = make_data(n_per=(30, 50, 1), p=15, seed=2)
    with pytest.warns(UserWarning, match="single subject"):
        h = ComBat().fit(X, sites, cov)
    assert h.mean_only_
    out = h.transform(X, sites, cov)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ComBat(mean_only=True).fit_transform(X, sites, cov), atol=1e-12)


def test_missing_values_handled_per_feature():
    X, sites, cov = make_data(p=20, seed=4)
    Xm = X.copy()
    rng = np.random.default_rng(0)
    holes = rng.random(X.shape) < 0.05
    holes[:, :10] = False  # features 0-9 complete
    Xm[holes] = np.nan
    for kw in ({}, {"parametric": False}, {"eb": False}):
        out = ComBat(**kw).fit_transform(Xm, sites, cov)
        np.testing.assert_array_equal(np.isnan(out), holes)
    # eb=False: each feature is harmonized on its own, so complete features are not affected
    a = ComBat(eb=False).fit_transform(Xm, sites, cov)
    b = ComBat(eb=False).fit_transform(X[:, :10], sites, cov)
    np.testing.assert_allclose(a[:, :10], b, atol=1e-12)
    # a feature's estimates use its observed values: one missing value barely moves the result
    X1 = X.copy()
    X1[0, 12] = np.nan
    c = ComBat(eb=False).fit_transform(X1, sites, cov)
    d = ComBat(eb=False).fit_transform(X, sites, cov)
    assert np.nanmax(np.abs(c[1:, 12] - d[1:, 12])) < 0.1


def test_all_missing_at_a_site_is_left_unadjusted():
    X, sites, cov = make_data(p=10)
    X[sites == "A", 3] = np.nan
    with pytest.warns(UserWarning, match="unadjusted"):
        out = ComBat().fit_transform(X, sites, cov)
    np.testing.assert_array_equal(out[:, 3], X[:, 3])


def test_confounded_covariate_names_the_column():
    X, sites, cov = make_data(p=5)
    cov = cov.assign(scanner=np.where(sites == "A", "prisma", "other"))
    with pytest.raises(HarmonizationError, match="scanner.*confounded"):
        ComBat().fit(X, sites, cov)
    cov2 = cov.drop(columns="scanner").assign(dose=(sites == "C") * 2.0)
    with pytest.raises(HarmonizationError, match="dose"):
        ComBat().fit(X, sites, cov2)


def test_bad_inputs():
    X, sites, cov = make_data(p=5)
    with pytest.raises(HarmonizationError, match="at least 2 sites"):
        ComBat().fit(X, np.repeat("A", len(sites)), cov)
    with pytest.raises(HarmonizationError, match="reference site 'Q'"):
        ComBat(ref_site="Q").fit(X, sites, cov)
    with pytest.raises(HarmonizationError, match="labels"):
        ComBat().fit(X, sites[:-1], cov)
    Xi = X.copy()
    Xi[2, 1] = np.inf
    with pytest.raises(HarmonizationError, match="infinite.*#1"):
        ComBat().fit(Xi, sites, cov)
    with pytest.raises(HarmonizationError, match="not fitted"):
        ComBat().transform(X, sites, cov)
    with pytest.raises(HarmonizationError, match="covariates are required"):
        ComBat().fit(X, sites, cov).transform(X, sites, None)
    with pytest.raises(HarmonizationError, match="backend"):
        ComBat(backend="R").fit(X, sites, cov)


def test_parametric_stops_by_sva_rule():
    """A looser threshold stops earlier (the rule is applied), the default equals neuroCombat."""
    X, sites, cov = make_data()
    loose = ComBat(conv=0.5).fit(X, sites, cov)
    tight = ComBat().fit(X, sites, cov)
    assert np.abs(loose.delta_star_ - tight.delta_star_).max() > 1e-6


def test_reference_site_with_missing_values_and_input_untouched():
    X, sites, cov = make_data(p=12, seed=9)
    X[np.random.default_rng(1).random(X.shape) < 0.03] = np.nan
    before = X.copy()
    out = ComBat(ref_site="A").fit_transform(X, sites, cov)
    np.testing.assert_array_equal(X, before)  # the input array is never modified
    np.testing.assert_array_equal(np.isnan(out), np.isnan(X))
    rows = sites == "A"
    np.testing.assert_array_equal(out[rows], X[rows])
    assert np.isfinite(out[~np.isnan(X)]).all()


@pytest.mark.parametrize("kwargs", [{}, {"ref_site": "B", "parametric": False}])
def test_row_order_does_not_matter(kwargs):
    """Sites interleaved (fancy-indexed paths) give the same result as sites in blocks."""
    X, sites, cov = make_data(p=15, seed=12)
    X[np.random.default_rng(2).random(X.shape) < 0.02] = np.nan
    out = ComBat(**kwargs).fit_transform(X, sites, cov)
    perm = np.random.default_rng(3).permutation(len(sites))
    shuffled = ComBat(**kwargs).fit_transform(X[perm], sites[perm],
                                              cov.iloc[perm].reset_index(drop=True))
    np.testing.assert_allclose(shuffled, out[perm], atol=1e-10, equal_nan=True)
