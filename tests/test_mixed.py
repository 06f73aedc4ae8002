"""Mixed-effects mega-analysis (harmonizers.mixed) against lme4 and statsmodels."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from dmriharmony.errors import HarmonizationError
from dmriharmony.harmonizers import mixed


def _sleepstudy(ref: dict) -> pd.DataFrame:
    return pd.DataFrame({k: ref[k] for k in ("Reaction", "Days", "Subject")})


@pytest.mark.parametrize("key", ["ri_REML", "ri_ML", "rs_REML", "rs_ML"])
def test_sleepstudy_matches_lme4(lme4_sleepstudy: dict, key: str) -> None:
    """lme4 1.1-31 lmer() on sleepstudy (../shared/refs/lme4_sleepstudy.json), to 1e-4.

    lme4's own optimiser stops ~1e-5 short of the optimum for the random-slope ML fit (our
    log-likelihood there is higher by 1e-8), hence a relative tolerance of 1e-4, not tighter.
    """
    ref = lme4_sleepstudy["fits"][key]
    rs = "Days" if key.startswith("rs") else None
    fit = mixed.fit(
        _sleepstudy(lme4_sleepstudy), ["Reaction"], fixed="Days", site="Subject",
        reml=key.endswith("REML"), random_slope=rs,
    )
    tol = dict(rtol=1e-4, atol=0)
    np.testing.assert_allclose(
        fit.coef.loc["Reaction"].to_numpy(), list(ref["fixef"].values()), **tol
    )
    np.testing.assert_allclose(fit.se.loc["Reaction"].to_numpy(), list(ref["se"].values()), **tol)
    np.testing.assert_allclose(fit.sigma2_resid["Reaction"], ref["sigma2"], **tol)
    np.testing.assert_allclose(fit.loglik["Reaction"], ref["logLik"], rtol=1e-8)
    vc = ref["varcomp"]
    if rs is None:
        np.testing.assert_allclose(fit.sigma2_site["Reaction"], vc[0]["vcov"], **tol)
        icc = vc[0]["vcov"] / (vc[0]["vcov"] + ref["sigma2"])
        np.testing.assert_allclose(fit.icc["Reaction"], icc, **tol)
    else:
        row = fit.varcomp.loc["Reaction"]
        np.testing.assert_allclose(row["var_intercept"], vc[0]["vcov"], **tol)
        np.testing.assert_allclose(row["var_slope"], vc[1]["vcov"], **tol)
        np.testing.assert_allclose(row["cov"], vc[2]["vcov"], **tol)
        np.testing.assert_allclose(row["corr"], vc[2]["sdcor"], rtol=1e-3)
    assert fit.converged["Reaction"]


def test_satterthwaite_df_balanced_anova(lme4_sleepstudy: dict) -> None:
    """Satterthwaite df in a balanced one-way design equal the classical mean-square formula.

    sleepstudy is balanced (18 subjects x 10 days): REML equals the ANOVA estimates, Days is a
    within-subject term with exactly N - S - 1 = 161 df, and var(intercept) = MSB/N +
    dbar^2 MSW/Sxx combines the between (17 df) and within (161 df) mean squares (Satterthwaite
    1946, eq. 17; the values lmerTest prints for this model).
    """
    data = _sleepstudy(lme4_sleepstudy)
    fit = mixed.fit(data, ["Reaction"], fixed="Days", site="Subject", df="satterthwaite")
    y, d, g = data["Reaction"].to_numpy(), data["Days"].to_numpy(float), data["Subject"]
    n_sub, n_obs = g.nunique(), len(data)
    dc = d - data.groupby("Subject")["Days"].transform("mean").to_numpy()
    yc = y - data.groupby("Subject")["Reaction"].transform("mean").to_numpy()
    sxx = (dc**2).sum()
    b1 = (dc * yc).sum() / sxx
    msw = ((yc - b1 * dc) ** 2).sum() / (n_obs - n_sub - 1)
    ybar_s = data.groupby("Subject")["Reaction"].mean().to_numpy()
    msb = 10 * ((ybar_s - y.mean()) ** 2).sum() / (n_sub - 1)
    a, b = msb / n_obs, d.mean() ** 2 * msw / sxx
    df0 = (a + b) ** 2 / (a**2 / (n_sub - 1) + b**2 / (n_obs - n_sub - 1))
    np.testing.assert_allclose(fit.se.loc["Reaction", "Intercept"] ** 2, a + b, rtol=1e-6)
    np.testing.assert_allclose(fit.df.loc["Reaction", "Days"], n_obs - n_sub - 1, rtol=1e-4)
    np.testing.assert_allclose(fit.df.loc["Reaction", "Intercept"], df0, rtol=1e-4)


def _random_table(seed: int, n: int = 360, n_sites: int = 9, p: int = 4) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    site = rng.integers(0, n_sites, n)
    df = pd.DataFrame(
        {
            "site": [f"site{s}" for s in site],
            "age": (rng.uniform(20, 80, n) - 50) / 10,
            "sex": rng.choice(["F", "M"], n),
            "dx": rng.choice(["CN", "PT"], n),
        }
    )
    for j in range(p):
        b0 = rng.normal(0, 0.7 + 0.3 * j, n_sites)
        b1 = rng.normal(0, 0.3, n_sites)
        df[f"f{j}"] = (
            1 + 0.1 * df["age"] + 0.3 * (df["dx"] == "PT") + b0[site] + b1[site] * df["age"]
            + rng.normal(0, 1, n)
        )
    return df


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("slope", [None, "age"])
def test_matches_statsmodels_mixedlm(reml: bool, slope: str | None) -> None:
    """statsmodels 0.14+ MixedLM (BFGS, gtol 1e-10), feature by feature, on random data.

    Coefficients, variance components and log-likelihood agree to 1e-4 (relative). Standard
    errors differ by design: statsmodels inverts the observed Hessian of all parameters, lme4 and
    we use ``sigma^2 (X'V^-1X)^-1``; they agree to 5e-3.
    """
    smf = pytest.importorskip("statsmodels.formula.api")
    data = _random_table(7)
    feats = ["f0", "f1", "f2", "f3"]
    fit = mixed.fit(data, feats, fixed="age + sex + dx", site="site", reml=reml,
                    random_slope=slope)
    for f in feats:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = smf.mixedlm(f"{f} ~ age + sex + dx", data, groups="site",
                                re_formula=None if slope is None else "~age")
            res = model.fit(reml=reml, method=["bfgs"], gtol=1e-10)
        fe = res.fe_params
        np.testing.assert_allclose(fit.coef.loc[f, fe.index], fe, rtol=1e-4, atol=1e-8)
        np.testing.assert_allclose(fit.se.loc[f, fe.index], res.bse_fe[fe.index], rtol=5e-3)
        np.testing.assert_allclose(fit.sigma2_resid[f], res.scale, rtol=1e-4)
        cov_re = np.asarray(res.cov_re)
        if slope is None:
            np.testing.assert_allclose(fit.sigma2_site[f], cov_re[0, 0], rtol=1e-4)
        else:
            vc = fit.varcomp.loc[f]
            np.testing.assert_allclose(
                [vc["var_intercept"], vc["cov"], vc["var_slope"]],
                [cov_re[0, 0], cov_re[0, 1], cov_re[1, 1]], rtol=1e-4,
            )
        # our optimum is never worse than statsmodels' (same likelihood definition)
        assert fit.loglik[f] >= res.llf - 1e-6
        np.testing.assert_allclose(fit.loglik[f], res.llf, rtol=1e-6)


def test_missing_values_equal_fit_on_observed_rows() -> None:
    """A NaN row of one feature drops that subject for that feature only."""
    data = _random_table(3, n=150, n_sites=6, p=3)
    data.loc[[3, 17, 50, 51], "f1"] = np.nan
    for slope in (None, "age"):
        full = mixed.fit(data, ["f0", "f1", "f2"], fixed="age + dx", random_slope=slope)
        sub = mixed.fit(data.dropna(subset=["f1"]), ["f1"], fixed="age + dx", random_slope=slope)
        assert full.nobs["f1"] == 146 and full.nobs["f0"] == 150
        np.testing.assert_allclose(full.coef.loc["f1"], sub.coef.loc["f1"], rtol=1e-6)
        np.testing.assert_allclose(full.loglik["f1"], sub.loglik["f1"], rtol=1e-10)
        np.testing.assert_allclose(full.se.loc["f1"], sub.se.loc["f1"], rtol=1e-5)


def test_vectorised_equals_one_at_a_time() -> None:
    data = _random_table(11, p=4)
    feats = ["f0", "f1", "f2", "f3"]
    together = mixed.fit(data, feats, fixed="age + sex + dx")
    for f in feats:
        alone = mixed.fit(data, [f], fixed="age + sex + dx")
        # the same optimum to the optimizer's tolerance (xtol 1e-9 on the variance parameter;
        # the vectorised and single fits take different paths, and BLAS builds round apart)
        np.testing.assert_allclose(together.coef.loc[f], alone.coef.loc[f], rtol=1e-7)
        np.testing.assert_allclose(together.sigma2_site[f], alone.sigma2_site[f], rtol=1e-6)


def test_no_site_variance_is_exact_zero() -> None:
    """A feature without site effect gets sigma2_site = 0 (boundary), and equals OLS."""
    rng = np.random.default_rng(0)
    n = 200
    data = pd.DataFrame({"site": rng.choice(list("abcde"), n), "age": rng.normal(size=n)})
    y = 0.5 * data["age"] + rng.normal(size=n)
    # remove any between-site difference of the residual means exactly
    resid = y - np.polyval(np.polyfit(data["age"], y, 1), data["age"])
    data["f"] = y - resid.groupby(data["site"]).transform("mean") * 1.5
    fit = mixed.fit(data, ["f"], fixed="age", reml=False)
    assert fit.sigma2_site["f"] == 0.0
    beta = np.polyfit(data["age"], data["f"], 1)
    np.testing.assert_allclose(fit.coef.loc["f", ["age", "Intercept"]], beta, rtol=1e-8)


def test_cohens_d_formulas() -> None:
    data = _random_table(5, p=2)
    fit = mixed.fit(data, ["f0", "f1"], fixed="age + sex + dx")
    n1 = (data["dx"] == "PT").sum()
    n2 = len(data) - n1
    t = fit.t["dx[T.PT]"].to_numpy()
    dfr = len(data) - 4
    np.testing.assert_allclose(fit.d("dx"), t * (n1 + n2) / np.sqrt(n1 * n2 * dfr))
    np.testing.assert_allclose(fit.d("dx", "t"), t * np.sqrt(1 / n1 + 1 / n2))
    np.testing.assert_allclose(
        fit.d("dx[T.PT]", "beta"), fit.coef["dx[T.PT]"] / np.sqrt(fit.sigma2_resid)
    )
    np.testing.assert_allclose(fit.d("age"), 2 * fit.t["age"] / np.sqrt(dfr))
    with pytest.raises(HarmonizationError, match="continuous"):
        fit.d("age", "t")
    frame = fit.to_frame("dx")
    assert {"estimate", "se", "t", "p", "d", "icc", "sigma2_site"} <= set(frame.columns)
    assert (frame["icc"].between(0, 1)).all()


def test_ranef_are_blups() -> None:
    """Site BLUPs: b_s = sigma_b^2 n_s / (sigma^2 + n_s sigma_b^2) * mean residual of site s."""
    data = _random_table(9, p=1)
    fit = mixed.fit(data, ["f0"], fixed="age")
    beta = fit.coef.loc["f0"]
    resid = data["f0"] - beta["Intercept"] - beta["age"] * data["age"]
    g = resid.groupby(data["site"])
    sb, se2 = fit.sigma2_site["f0"], fit.sigma2_resid["f0"]
    expect = sb * g.count() / (se2 + g.count() * sb) * g.mean()
    np.testing.assert_allclose(fit.ranef["Intercept"]["f0"].loc[expect.index], expect, rtol=1e-8)


def test_input_errors_name_the_culprit() -> None:
    data = _random_table(1, p=2)
    with pytest.raises(HarmonizationError, match="'scanner'"):
        mixed.fit(data, ["f0"], site="scanner")
    with pytest.raises(HarmonizationError, match="'height'"):
        mixed.fit(data, ["f0"], fixed="age + height")
    with pytest.raises(HarmonizationError, match="'nope'"):
        mixed.fit(data, ["nope"], fixed="age")
    bad = data.copy()
    bad.loc[5, "age"] = np.nan
    with pytest.raises(HarmonizationError, match="'age'.*row 5"):
        mixed.fit(bad, ["f0"], fixed="age")
    dup = data.assign(age2=2 * data["age"])
    with pytest.raises(HarmonizationError, match="'age2'.*collinear"):
        mixed.fit(dup, ["f0"], fixed="age + age2")
    one = data.assign(site="only")
    with pytest.raises(HarmonizationError, match="at least 2 sites"):
        mixed.fit(one, ["f0"], fixed="age")
    with pytest.raises(HarmonizationError, match="df method"):
        mixed.fit(data, ["f0"], df="kenward")


def test_small_site_skipped_with_warning_and_constant_feature_nan() -> None:
    data = _random_table(2, p=2)
    data.loc[0, "site"] = "tiny"
    data["flat"] = 3.0
    with pytest.warns(UserWarning) as record:
        fit = mixed.fit(data, ["f0", "flat"], fixed="age")
    messages = " ".join(str(w.message) for w in record)
    assert "'tiny' (1)" in messages and "'flat'" in messages
    assert "tiny" not in fit.sites
    assert np.isnan(fit.coef.loc["flat"]).all()
    assert np.isfinite(fit.coef.loc["f0"]).all()


def test_many_features_fast() -> None:
    """2,000 features x 400 subjects x 10 sites (random intercept) in well under a few seconds."""
    import time

    rng = np.random.default_rng(4)
    n, p = 400, 2000
    site = rng.integers(0, 10, n)
    cols = {"site": site.astype(str), "age": rng.normal(size=n)}
    y = rng.normal(size=(n, p)) + rng.normal(size=(10, p))[site]
    data = pd.concat([pd.DataFrame(cols), pd.DataFrame(y, columns=[f"v{j}" for j in range(p)])],
                     axis=1)
    t0 = time.perf_counter()
    fit = mixed.fit(data, fixed="age")
    assert time.perf_counter() - t0 < 10
    assert fit.converged.all() and (fit.icc > 0.2).mean() > 0.9


@pytest.mark.parametrize("reml", [True, False])
def test_random_slope_global_optimum_near_singular(reml: bool) -> None:
    """Features with no intercept or no slope variance (singular Lambda, ridges and two basins)
    reach the optimum of multi-start bounded L-BFGS-B (scipy) on the same deviance."""
    from scipy import optimize

    from dmriharmony.harmonizers._mixed_lik import lambda_from_theta, profile
    from dmriharmony.harmonizers._mixed_stats import site_stats

    rng = np.random.default_rng(5)
    n, n_sites = 300, 8
    site = rng.integers(0, n_sites, n)
    age = rng.normal(0, 1, n)
    data = pd.DataFrame({"site": site.astype(str), "age": age})
    feats = [5, 53, 56, 10]  # the hard cases of this seed (ridges, two basins) and an easy one
    for j in range(max(feats) + 1):
        sb, ss = [0, 0.1, 0.5, 1.0][j % 4], [0, 0.05, 0.3][j % 3]
        y = 0.2 * age + rng.normal(0, sb, n_sites)[site] + rng.normal(0, ss, n_sites)[site] * age
        data[f"f{j}"] = y + rng.normal(0, 1, n)
    names = [f"f{j}" for j in feats]
    fit = mixed.fit(data, names, fixed="age", random_slope="age", reml=reml)
    x = np.column_stack([np.ones(n), age])
    z = np.column_stack([np.ones(n), (age - age.mean()) / age.std()])
    _, codes = np.unique(data["site"], return_inverse=True)
    for f in names:
        y = data[f].to_numpy()
        st = site_stats(x, z, ((y - y.mean()) / y.std())[:, None], codes, n_sites)

        def dev(th: np.ndarray, st=st) -> float:
            return profile(st, lambda_from_theta(np.atleast_2d(th), 2), reml).deviance[0]

        best = min(
            optimize.minimize(dev, x0, method="L-BFGS-B",
                              bounds=[(0, None), (None, None), (0, None)]).fun
            for x0 in ([0.5, 0, 0.2], [1, 0.3, 0.5], [0.1, -0.1, 0.05], [0.01, 0, 0.01])
        )
        ll_best = -0.5 * (best + (n - 2 * reml) * np.log(y.var()))
        assert fit.loglik[f] >= ll_best - 1e-6, f


def test_feature_whose_missing_rows_break_the_design_is_nan() -> None:
    """A feature observed only in one dx group cannot estimate dx: NaN with a warning."""
    rng = np.random.default_rng(0)
    n = 120
    data = pd.DataFrame({"site": rng.choice(list("abcd"), n), "dx": rng.choice(["CN", "PT"], n)})
    data["f"] = rng.normal(size=n)
    data["g"] = data["f"].where(data["dx"] == "CN")
    with pytest.warns(UserWarning, match="rank-deficient, e.g. 'g'"):
        fit = mixed.fit(data, ["f", "g"], fixed="dx")
    assert np.isnan(fit.coef.loc["g"]).all() and np.isnan(fit.sigma2_site["g"])
    assert np.isfinite(fit.coef.loc["f"]).all()
