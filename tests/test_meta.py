"""Meta-analysis of per-site effects (harmonizers.meta) against metafor, statsmodels, scipy."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, stats

from dmriharmony.errors import HarmonizationError
from dmriharmony.harmonizers import meta

CLOSED_FORM = ("FE", "DL", "HE", "SJ")
FIELDS = {
    "estimate": "estimate", "se": "se", "zval": "z", "tval": "z", "pval": "p", "ci_lb": "ci_low",
    "ci_ub": "ci_high", "tau2": "tau2", "I2": "I2", "H2": "H2", "QE": "Q", "QEp": "Q_p", "k": "k",
    "df": "df",
}


@pytest.mark.parametrize("fit", ["FE", "DL", "REML", "PM", "HE", "SJ", "ML", "REML_knha"])
def test_bcg_matches_metafor(metafor_bcg: dict, fit: str) -> None:
    """metafor 3.8-1 rma() on dat.bcg (../shared/refs/metafor_bcg.json).

    1e-6 (relative) for the closed-form estimators FE, DL, HE, SJ; 1e-5 for the iterative ones
    (metafor stops REML/ML Fisher scoring at a tau^2 change of 1e-5; we solve to 1e-12). PM
    follows R's uniroot path exactly, so it is checked to 1e-6 as well.
    """
    ref = metafor_bcg["fits"][fit]
    method = fit.split("_")[0]
    res = meta.pool(metafor_bcg["yi"], metafor_bcg["vi"], method=method,
                    knha=fit.endswith("knha"))
    rtol = 1e-6 if method in (*CLOSED_FORM, "PM") else 1e-5
    for key, value in ref.items():
        got = getattr(res, FIELDS[key])
        np.testing.assert_allclose(got, value, rtol=rtol, atol=1e-300, err_msg=f"{fit} {key}")


def test_bcg_prediction_interval(metafor_bcg: dict) -> None:
    """metafor predict(): est +- z sqrt(se^2 + tau2); with knha t(k-1) (Riley et al. 2011)."""
    y, v = metafor_bcg["yi"], metafor_bcg["vi"]
    ref = metafor_bcg["fits"]["REML"]
    res = meta.pool(y, v, method="REML")
    half = stats.norm.ppf(0.975) * np.sqrt(ref["se"] ** 2 + ref["tau2"])
    np.testing.assert_allclose([res.pi_low, res.pi_high],
                               [ref["estimate"] - half, ref["estimate"] + half], rtol=1e-5)
    kh = metafor_bcg["fits"]["REML_knha"]
    res = meta.pool(y, v, method="REML", knha=True)
    half = stats.t.ppf(0.975, 12) * np.sqrt(kh["se"] ** 2 + kh["tau2"])
    np.testing.assert_allclose(res.pi_high, kh["estimate"] + half, rtol=1e-5)
    hig = meta.pool(y, v, method="REML", pi_higgins=True)
    half = stats.t.ppf(0.975, 11) * np.sqrt(ref["se"] ** 2 + ref["tau2"])
    np.testing.assert_allclose(hig.pi_low, ref["estimate"] - half, rtol=1e-5)


def _random_meta(seed: int, k: int = 8, p: int = 300) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    v = rng.uniform(0.01, 0.3, (k, p))
    tau2 = rng.choice([0.0, 0.02, 0.2], p)
    y = rng.normal(0.2, np.sqrt(v + tau2))
    return y, v


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_likelihood_estimators_maximise_the_likelihood(method: str) -> None:
    """tau^2 equals a direct bounded maximisation of the (restricted) likelihood by scipy."""
    y, v = _random_meta(1, p=40)
    res = meta.pool(y, v, method=method)

    def negll(t: float, yy: np.ndarray, vv: np.ndarray) -> float:
        w = 1.0 / (vv + t)
        mu = (w * yy).sum() / w.sum()
        out = np.log(vv + t).sum() + (w * (yy - mu) ** 2).sum()
        return out + (np.log(w.sum()) if method == "REML" else 0.0)

    for j in range(y.shape[1]):
        opt = optimize.minimize_scalar(negll, bounds=(0, 10), args=(y[:, j], v[:, j]),
                                       method="bounded", options={"xatol": 1e-12})
        best = min(opt.x, 0.0, key=lambda t: negll(t, y[:, j], v[:, j]))
        assert negll(res.tau2[j], y[:, j], v[:, j]) <= negll(best, y[:, j], v[:, j]) + 1e-9
        np.testing.assert_allclose(res.tau2[j], best, atol=1e-6)


@pytest.mark.parametrize("method", meta.TAU2_METHODS)
def test_vectorised_equals_column_by_column_and_nan_is_missing(method: str) -> None:
    y, v = _random_meta(2, p=30)
    y[2, 5] = np.nan
    v[0, 7] = np.nan
    res = meta.pool(y, v, method=method)
    for j in (0, 5, 7, 12):
        ok = np.isfinite(y[:, j]) & np.isfinite(v[:, j])
        one = meta.pool(y[ok, j], v[ok, j], method=method)
        assert res.k[j] == ok.sum()
        for name in ("estimate", "se", "tau2", "Q", "I2", "p"):
            np.testing.assert_allclose(getattr(res, name)[j], getattr(one, name), rtol=1e-9,
                                       err_msg=name)


def test_dl_agrees_with_statsmodels_and_is_truncated() -> None:
    """statsmodels combine_effects DL equals ours when heterogeneous; when the set is homogeneous
    statsmodels' tau^2 goes negative (NaN SE) and ours is truncated at 0 (= fixed effect)."""
    cm = pytest.importorskip("statsmodels.stats.meta_analysis")
    rng = np.random.default_rng(3)
    v = rng.uniform(0.05, 0.2, 10)
    y = rng.normal(0, np.sqrt(v + 0.3))
    sm = cm.combine_effects(y, v, method_re="dl")
    ours = meta.pool(y, v, method="DL")
    np.testing.assert_allclose(ours.tau2, sm.tau2, rtol=1e-10)
    np.testing.assert_allclose(ours.estimate, sm.mean_effect_re, rtol=1e-10)
    np.testing.assert_allclose(ours.se, sm.sd_eff_w_re, rtol=1e-10)
    fe = meta.pool(y, v, method="FE")
    np.testing.assert_allclose(fe.estimate, sm.mean_effect_fe, rtol=1e-10)
    y_h = np.full(10, 0.3) + 0.01 * rng.normal(size=10)
    ours = meta.pool(y_h, v, method="DL")
    assert ours.tau2 == 0.0 and np.isfinite(ours.se)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cm.combine_effects(y_h, v, method_re="dl").tau2 < 0


def test_sample_size_weights_and_fdr() -> None:
    y, v = _random_meta(4, k=6, p=50)
    n = np.array([20, 35, 50, 80, 120, 40])
    res = meta.pool(y, v, method="DL", weights=n)
    tau2 = meta.pool(y, v, method="DL").tau2
    est = (n[:, None] * y).sum(0) / n.sum()
    var = (n[:, None] ** 2 * (v + tau2)).sum(0) / n.sum() ** 2
    np.testing.assert_allclose(res.estimate, est, rtol=1e-12)
    np.testing.assert_allclose(res.se, np.sqrt(var), rtol=1e-12)
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    p = meta.pool(y, v, method="REML").p
    np.testing.assert_allclose(meta.fdr(p), multitest.multipletests(p, method="fdr_bh")[1])


def test_pool_input_errors() -> None:
    with pytest.raises(HarmonizationError, match="shape"):
        meta.pool([0.1, 0.2], [0.1])
    with pytest.raises(HarmonizationError, match="vi must be > 0"):
        meta.pool([0.1, 0.2], [0.1, 0.0])
    with pytest.raises(HarmonizationError, match="unknown method"):
        meta.pool([0.1, 0.2], [0.1, 0.1], method="XX")


def _two_group_table(seed: int, n_sites: int = 4, n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_sites):
        dx = rng.choice(["control", "patient"], n)
        age = rng.uniform(20, 70, n)
        sex = rng.choice(["F", "M"], n)
        base = rng.normal(0.45, 0.02)
        fa = base + 0.02 * (dx == "patient") - 0.001 * age + rng.normal(0, 0.02, n)
        md = 0.8 + 0.05 * (dx == "patient") + rng.normal(0, 0.05, n)
        rows.append(pd.DataFrame({"site": f"S{s}", "dx": dx, "age": age, "sex": sex,
                                  "FA": fa, "MD": md}))
    return pd.concat(rows, ignore_index=True)


def test_site_d_without_covariates_is_hedges_g() -> None:
    """Without covariates d is the pooled-SD Cohen's d and g = J d, vi as metafor escalc("SMD")
    (Hedges 1981; Hedges & Olkin 1985 eq. 5.15)."""
    table = _two_group_table(0)
    eff = meta.site_effects(table, effect="dx", features=["FA"])
    for s, grp in table.groupby("site"):
        a = grp.loc[grp.dx == "patient", "FA"].to_numpy()
        b = grp.loc[grp.dx == "control", "FA"].to_numpy()
        n1, n2 = a.size, b.size
        sp = np.sqrt(((n1 - 1) * a.var(ddof=1) + (n2 - 1) * b.var(ddof=1)) / (n1 + n2 - 2))
        d = (a.mean() - b.mean()) / sp
        m = n1 + n2 - 2
        j = np.exp(np.log(np.abs(1 - 3 / (4 * m - 1))))  # approximate J, checked loosely
        g_exact = meta.hedges_j(m) * d
        row = eff[(eff.site == s) & (eff.feature == "FA")].iloc[0]
        np.testing.assert_allclose(row["d"], d, rtol=1e-10)
        np.testing.assert_allclose(row["yi"], g_exact, rtol=1e-10)
        np.testing.assert_allclose(row["yi"], j * d, rtol=1e-4)
        np.testing.assert_allclose(row["vi"], 1 / n1 + 1 / n2 + g_exact**2 / (2 * (n1 + n2)))


def test_site_effects_with_covariates_use_the_ols_t() -> None:
    """With covariates d comes from the OLS t of the effect (statsmodels OLS per site)."""
    sm = pytest.importorskip("statsmodels.formula.api")
    table = _two_group_table(1)
    eff = meta.site_effects(table, effect="dx", covariates=["age", "sex"], features=["FA", "MD"])
    for s, grp in table.groupby("site"):
        ols = sm.ols("FA ~ C(dx) + age + C(sex)", grp).fit()
        row = eff[(eff.site == s) & (eff.feature == "FA")].iloc[0]
        np.testing.assert_allclose(row["t"], ols.tvalues["C(dx)[T.patient]"], rtol=1e-10)
        np.testing.assert_allclose(row["df"], ols.df_resid)
        n1 = (grp.dx == "patient").sum()
        n2 = len(grp) - n1
        np.testing.assert_allclose(row["d"], row["t"] * np.sqrt(1 / n1 + 1 / n2), rtol=1e-12)


def test_partial_correlation_fisher_z() -> None:
    """measure='z': the partial correlation of the feature and age given dx (residual method)."""
    table = _two_group_table(2)
    eff = meta.site_effects(table, effect="age", covariates=["dx"], measure="z", features=["FA"])
    for s, grp in table.groupby("site"):
        dx = (grp.dx == "patient").to_numpy(float)
        z = np.column_stack([np.ones(len(grp)), dx])
        ra = grp.age - z @ np.linalg.lstsq(z, grp.age, rcond=None)[0]
        rf = grp.FA - z @ np.linalg.lstsq(z, grp.FA, rcond=None)[0]
        r = np.corrcoef(ra, rf)[0, 1]
        row = eff[eff.site == s].iloc[0]
        np.testing.assert_allclose(row["r"], r, rtol=1e-10)
        np.testing.assert_allclose(row["yi"], np.arctanh(r), rtol=1e-10)
        np.testing.assert_allclose(row["vi"], 1 / (len(grp) - 3 - 1))


def test_meta_analyze_end_to_end_recovers_effect() -> None:
    table = _two_group_table(3, n_sites=6, n=80)
    out, eff = meta.meta_analyze(table, effect="dx", covariates=["age", "sex"],
                                 features=["FA", "MD"], return_effects=True)
    assert list(out.index) == ["FA", "MD"] and (out["k"] == 6).all()
    assert {"estimate", "ci_low", "ci_high", "tau2", "I2", "Q", "pi_low", "p_fdr"} <= set(out)
    # true d: FA 0.02/0.02 = 1, MD 0.05/0.05 = 1
    assert abs(out.loc["FA", "estimate"] - 1.0) < 0.3 and abs(out.loc["MD", "estimate"] - 1) < 0.3
    ss = meta.meta_analyze(table, effect="dx", features=["FA"], weighting="sample_size")
    assert np.isfinite(ss.loc["FA", "estimate"])


def test_site_effects_validation_and_skips() -> None:
    table = _two_group_table(4)
    with pytest.raises(HarmonizationError, match="'scanner'"):
        meta.site_effects(table, site="scanner", effect="dx")
    with pytest.raises(HarmonizationError, match="'dx'.*two levels"):
        meta.site_effects(table.assign(dx=np.arange(len(table)) % 3), effect="dx")
    one = table.copy()
    one.loc[one.site == "S2", "dx"] = "control"
    with pytest.warns(UserWarning, match="site 'S2' dropped"):
        eff = meta.site_effects(one, effect="dx", features=["FA"])
    assert "S2" not in set(eff.site)
    tiny = pd.concat([table, table.iloc[:1].assign(site="S9")], ignore_index=True)
    with pytest.warns(UserWarning, match="site 'S9' dropped: 1 subject"):
        eff = meta.site_effects(tiny, effect="dx", features=["FA"])
    assert "S9" not in set(eff.site)
    bad = table.copy()
    bad.loc[3, "age"] = np.nan
    with pytest.raises(HarmonizationError, match="'age'.*row 3"):
        meta.site_effects(bad, effect="dx", covariates=["age"])
    # NaN rows of a feature: that feature uses the subjects it has
    nan = table.copy()
    nan.loc[[0, 1, 2], "FA"] = np.nan
    eff = meta.site_effects(nan, effect="dx", features=["FA", "MD"])
    s0 = eff[eff.site == "S0"].set_index("feature")
    assert s0.loc["FA", "n"] == 57 and s0.loc["MD", "n"] == 60
    sub = meta.site_effects(nan.dropna(subset=["FA"]), effect="dx", features=["FA"])
    np.testing.assert_allclose(s0.loc["FA", "yi"], sub[sub.site == "S0"]["yi"].iloc[0])
    # a feature constant at a site is left out with a warning, not an exception
    flat = table.copy()
    flat.loc[flat.site == "S1", "MD"] = 1.0
    with pytest.warns(UserWarning, match="fitted perfectly"):
        eff = meta.site_effects(flat, effect="dx", features=["FA", "MD"])
    assert ((eff.site == "S1") & (eff.feature == "MD")).sum() == 0


def test_forest_plot_writes_png_and_svg(tmp_path) -> None:
    table = _two_group_table(5)
    eff = meta.site_effects(table, effect="dx", features=["FA", "MD"])
    fig = meta.forest(eff, "FA", method="REML", path=tmp_path / "fa.png")
    assert fig.axes and (tmp_path / "fa.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta.forest(eff, "MD", method="FE", path=tmp_path / "md.svg")
    assert b"<svg" in (tmp_path / "md.svg").read_bytes()[:400]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    paths = meta.forest_plots(eff, tmp_path / "all")
    assert [p.name for p in paths] == ["forest_FA.png", "forest_MD.png"]
    with pytest.raises(HarmonizationError, match="'GCC'"):
        meta.forest(eff, "GCC")
    with pytest.raises(HarmonizationError, match=".png"):
        meta.forest(eff, "FA", path=tmp_path / "fa.gif")


@pytest.mark.parametrize("k", [2, 3, 8])
def test_forest_heterogeneity_line_clear_of_axis_label(k: int) -> None:
    """The tau^2/I^2/Q line sits below the x-axis label, not on it (any number of sites)."""
    from dmriharmony.harmonizers._forest import forest_plot

    rng = np.random.default_rng(k)
    yi, vi = rng.normal(0.3, 0.2, k), rng.uniform(0.01, 0.05, k)
    fig = forest_plot(yi, vi, [f"site{i}" for i in range(k)], pooled=meta.pool(yi, vi),
                      xlabel="d")
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    ax = fig.axes[0]
    label = ax.xaxis.label.get_window_extent(renderer)
    (note,) = [t for t in ax.texts if t.get_text().startswith("tau^2")]
    box = note.get_window_extent(renderer)
    assert box.y1 <= label.y0 + 0.5  # display coordinates: y grows upwards
    assert box.x0 >= ax.get_window_extent(renderer).x0 - 0.5  # starts at the axes' left


def test_hundred_thousand_features_reml_fast() -> None:
    """100,000 features x 10 sites by REML in a few seconds (PyMARE: ~1.5 s, see benchmarks)."""
    import time

    rng = np.random.default_rng(0)
    v = rng.uniform(0.02, 0.2, (10, 100_000))
    y = rng.normal(0.3, np.sqrt(v + 0.05))
    t0 = time.perf_counter()
    res = meta.pool(y, v, method="REML")
    assert time.perf_counter() - t0 < 8
    assert np.isfinite(res.estimate).all() and abs(np.mean(res.tau2) - 0.05) < 0.01


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_global_maximum_against_dense_grid(method: str) -> None:
    """On 3,000 random features (some with bimodal likelihoods) no point of a dense tau^2 grid
    has a higher likelihood than our estimate: the global, not a local, maximum."""
    from dmriharmony.harmonizers._meta_pool import _neg2ll

    rng = np.random.default_rng(0)
    k, p = 10, 3000
    v = rng.uniform(0.02, 0.2, (k, p))
    y = rng.normal(0.3, np.sqrt(v + rng.choice([0.0, 0.01, 0.05], p)))
    res = meta.pool(y, v, method=method)
    yc = y - y.mean(axis=0)
    ours = _neg2ll(yc, v, 1.0, res.tau2, method == "REML")
    grid = np.concatenate([[0.0], np.geomspace(1e-5, 2.0, 600)])
    best = np.min([_neg2ll(yc, v, 1.0, t, method == "REML") for t in grid], axis=0)
    assert (ours <= best + 1e-9).all()


def test_standardised_beta_equals_ols_on_z_scores() -> None:
    """measure='beta': b sd(x) / sd(y) is the coefficient of the z-scored regression."""
    table = _two_group_table(6)
    eff = meta.site_effects(table, effect="age", covariates=["dx"], measure="beta",
                            features=["FA"])
    for s, grp in table.groupby("site"):
        zs = (grp[["age", "FA"]] - grp[["age", "FA"]].mean()) / grp[["age", "FA"]].std()
        dx = (grp.dx == "patient").to_numpy(float)
        x = np.column_stack([np.ones(len(grp)), zs["age"], dx])
        coef, *_ = np.linalg.lstsq(x, zs["FA"].to_numpy(), rcond=None)
        row = eff[eff.site == s].iloc[0]
        np.testing.assert_allclose(row["yi"], coef[1], rtol=1e-10)
        resid = zs["FA"].to_numpy() - x @ coef
        se = np.sqrt(resid @ resid / (len(grp) - 3) * np.linalg.inv(x.T @ x)[1, 1])
        np.testing.assert_allclose(row["sei"], se, rtol=1e-10)


def test_effects_to_arrays_pivot() -> None:
    table = _two_group_table(7, n_sites=3)
    eff = meta.site_effects(table, effect="dx", features=["FA", "MD"])
    yi, sites, feats = meta.effects_to_arrays(eff)
    assert yi.shape == (3, 2) and sites == ["S0", "S1", "S2"] and feats == ["FA", "MD"]
    assert yi[1, 1] == eff[(eff.site == "S1") & (eff.feature == "MD")]["yi"].iloc[0]
