"""Evaluation logic, checked with tiny harmonizers defined here and against scikit-learn,
statsmodels and hand computations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import StratifiedKFold, cross_val_score

from dmriharmony.errors import HarmonizationError
from dmriharmony.evaluation import (
    CovariateSubset,
    EffectEstimator,
    NoHarmonization,
    compare_harmonizers,
    effect_estimates,
    effect_preservation,
    evaluate_harmonizer,
    make_classifier,
    meta_analysis,
    site_prediction,
    summarize,
    to_markdown,
    traveling_agreement,
    traveling_preservation,
)
from dmriharmony.evaluation.evaluate import COLUMNS
from dmriharmony.simulate.roi_table import simulate_roi_table

# --------------------------------------------------------------------------- tiny harmonizers


class SiteCentering:
    """Subtract each site's mean, add the grand mean; ignores covariates (removes confounded
    biology with the site)."""

    def fit(self, X, sites, covariates=None):
        X, s = np.asarray(X, float), np.asarray(sites)
        self.grand_ = X.mean(0)
        self.means_ = {k: X[s == k].mean(0) for k in np.unique(s)}
        return self

    def transform(self, X, sites, covariates=None):
        X, s = np.asarray(X, float).copy(), np.asarray(sites)
        for k in np.unique(s):
            X[s == k] += self.grand_ - self.means_[k]
        return X


class LocationScale:
    """Location/scale adjustment protecting covariates (ComBat without empirical Bayes,
    Johnson et al. 2007 eq. 2.1 with gamma/delta estimated by per-site moments)."""

    def _design(self, sites, covariates):
        Z = sm.add_constant(np.asarray(covariates, float), has_constant="add")
        return (np.asarray(sites)[:, None] == self.sites_[None, :]).astype(float), Z[:, 1:]

    def fit(self, X, sites, covariates=None):
        X = np.asarray(X, float)
        self.sites_ = np.unique(sites)
        S, C = self._design(sites, covariates)
        B = np.linalg.lstsq(np.hstack([S, C]), X, rcond=None)[0]
        w = S.mean(0)
        self.alpha_ = w @ B[: len(self.sites_)]
        self.beta_ = B[len(self.sites_):]
        resid = X - S @ B[: len(self.sites_)] - C @ self.beta_
        self.sd_ = np.sqrt((resid**2).mean(0))
        Zs = (X - self.alpha_ - C @ self.beta_) / self.sd_
        self.gamma_ = np.array([Zs[S[:, i] == 1].mean(0) for i in range(len(self.sites_))])
        self.delta_ = np.array([Zs[S[:, i] == 1].std(0, ddof=1) for i in range(len(self.sites_))])
        return self

    def transform(self, X, sites, covariates=None):
        X = np.asarray(X, float)
        S, C = self._design(sites, covariates)
        Zs = (X - self.alpha_ - C @ self.beta_) / self.sd_
        Zs = (Zs - S @ self.gamma_) / (S @ self.delta_)
        return Zs * self.sd_ + self.alpha_ + C @ self.beta_


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sim():
    """A confounded multi-site table: dx and age distributions differ between sites."""
    return simulate_roi_table(n_sites=4, n_per_site=150, n_features=8, seed=3,
                              dx_prop_range=(0.3, 0.7), age_site_shift=6.0, n_traveling=8)


COV = ["age", "sex", "dx"]


# --------------------------------------------------------------------------- site prediction


def test_site_prediction_before_matches_sklearn_cross_val_score(sim):
    """Without residualisation the raw score is sklearn's CV balanced accuracy, same folds."""
    table, truth = sim
    f = truth["features"]
    res = site_prediction(table, f, None, covariates=COV, residualize=False, seed=5)
    ref = cross_val_score(make_classifier("logistic"), table[f].to_numpy(),
                          table["site"].to_numpy(),
                          cv=StratifiedKFold(5, shuffle=True, random_state=5),
                          scoring="balanced_accuracy")
    np.testing.assert_allclose(res.before_folds, ref, rtol=0, atol=1e-12)
    assert res.before == pytest.approx(ref.mean())
    assert res.after == res.before and res.chance == 0.25 and res.n_splits == 5


def test_site_prediction_sees_site_and_location_scale_removes_it(sim):
    table, truth = sim
    res = site_prediction(table, truth["features"], LocationScale, covariates=COV, seed=0)
    assert res.before > 0.6
    assert abs(res.after - res.chance) < 0.1
    assert len(res.after_folds) == 5 and np.isfinite(res.after_leaky)


def test_leaky_protocol_is_visible():
    """Fitted on all rows, site centering forces each held-out fold's site means to mirror the
    training fold's: the classifier is systematically wrong (anti-learning, far below chance).
    Fitted in-fold it scores chance."""
    table, truth = simulate_roi_table(n_sites=3, n_per_site=15, n_features=8, seed=1)
    res = site_prediction(table, truth["features"], SiteCentering, covariates=[], seed=0)
    assert res.before > 0.6
    assert abs(res.after - 1 / 3) < 0.1
    assert res.after_leaky < 1 / 3 - 0.15
    assert len(res.after_leaky_folds) == 5


def test_residualization_separates_biology_from_scanner():
    """No scanner effect, but age differs by site: raw features predict site through age;
    regressing age out (within site, training fold) brings the score back to chance."""
    table, truth = simulate_roi_table(n_sites=3, n_per_site=150, n_features=8, seed=2,
                                      site_location=0.0, site_location_spread=0.0,
                                      site_scale=0.0, site_scale_spread=0.0,
                                      age_site_shift=25.0, age_slope=-0.003)
    f = truth["features"]
    raw = site_prediction(table, f, None, covariates=COV, residualize=False, seed=0)
    adj = site_prediction(table, f, None, covariates=COV, residualize=True, seed=0)
    assert raw.before > 0.55
    assert abs(adj.before - 1 / 3) < 0.08


def test_permutation_chance_level(sim):
    table, truth = sim
    res = site_prediction(table, truth["features"][:3], None, covariates=COV, n_permutations=5,
                          seed=0, n_splits=3)
    assert abs(res.chance_permutation - 0.25) < 0.06
    assert res.chance_permutation_q95 >= res.chance_permutation


def test_site_prediction_is_deterministic_and_seeded(sim):
    table, truth = sim
    f = truth["features"]
    small = table.groupby("site").head(20)
    forest = RandomForestClassifier(n_estimators=10, random_state=4)
    a = site_prediction(small, f[:4], SiteCentering, covariates=COV, seed=4, classifier=forest,
                        n_splits=2, leaky=False)
    b = site_prediction(small, f[:4], SiteCentering, covariates=COV, seed=4, classifier=forest,
                        n_splits=2, leaky=False)
    assert not hasattr(forest, "estimators_")  # a clone is fitted, never the given one
    default = make_classifier("forest", seed=4)
    assert default.n_estimators == 200 and default.random_state == 4
    assert a.before_folds == b.before_folds and a.after_folds == b.after_folds
    assert np.isnan(a.after_leaky)
    c = site_prediction(small, f[:4], None, covariates=COV, seed=4, classifier="lda")
    assert 0.0 <= c.before <= 1.0


def test_site_prediction_errors(sim):
    table, truth = sim
    f = truth["features"]
    with pytest.raises(HarmonizationError, match="'scanner'"):
        site_prediction(table, f, site="scanner")
    one = table[table["site"] == "site0"]
    with pytest.raises(HarmonizationError, match="single site"):
        site_prediction(one, f)
    lonely = pd.concat([table, table.iloc[[0]].assign(site="siteX")], ignore_index=True)
    with pytest.raises(HarmonizationError, match="'siteX' has a single scan"):
        site_prediction(lonely, f)
    with pytest.raises(HarmonizationError, match="classifier 'svm'"):
        site_prediction(table, f, classifier="svm")


def test_fold_count_is_capped_by_smallest_site(sim):
    table, truth = sim
    small = pd.concat([table, table.iloc[:3].assign(site="tiny")], ignore_index=True)
    res = site_prediction(small, truth["features"], None, covariates=COV)
    assert res.n_splits == 3 and res.chance == pytest.approx(1 / 5)


def test_missing_values_are_imputed_within_fold(sim):
    table, truth = sim
    t = table.copy()
    t.loc[::7, truth["features"][0]] = np.nan
    res = site_prediction(t, truth["features"], None, covariates=COV)
    assert np.isfinite(res.before)


# --------------------------------------------------------------------------- effects


def test_effect_estimates_equal_statsmodels_ols(sim):
    table, truth = sim
    f = truth["features"][:3]
    t = table.copy()
    t.loc[::9, f[1]] = np.nan  # rows dropped for that feature only
    est = effect_estimates(t, f, effect="dx", covariates=["age", "sex"])
    for feat in f:
        ok = t[feat].notna()
        X = sm.add_constant(t.loc[ok, ["dx", "age", "sex"]].astype(float))
        fit = sm.OLS(t.loc[ok, feat].to_numpy(), X).fit()
        for term in ("dx", "age", "sex"):
            assert est.at[feat, f"{term}_beta"] == pytest.approx(fit.params[term], rel=1e-10)
            assert est.at[feat, f"{term}_se"] == pytest.approx(fit.bse[term], rel=1e-10)
        assert est.at[feat, "sigma"] == pytest.approx(np.sqrt(fit.scale), rel=1e-10)
        assert est.at[feat, "dx_d"] == pytest.approx(fit.params["dx"] / np.sqrt(fit.scale))
        assert est.at[feat, "n"] == ok.sum()


def test_effect_estimates_with_site_term_and_categorical_effect(sim):
    table, truth = sim
    f = truth["features"][:2]
    t = table.assign(group=np.where(table["dx"] == 1, "patient", "control"))
    est = effect_estimates(t, f, effect="group", covariates=["age"], site="site")
    X = pd.get_dummies(t[["site"]], drop_first=True, dtype=float)
    X.insert(0, "age", t["age"])
    X.insert(0, "group", t["dx"].astype(float))
    fit = sm.OLS(t[f[0]].to_numpy(), sm.add_constant(X)).fit()
    assert est.at[f[0], "group[patient]_beta"] == pytest.approx(fit.params["group"], rel=1e-10)
    assert est.at[f[0], "group_d"] == pytest.approx(fit.params["group"] / np.sqrt(fit.scale))


def test_effect_preservation_clean_data_is_close_to_truth(sim):
    table, truth = sim
    f = truth["features"]
    res = effect_preservation(table, truth["clean"], f, "dx", ["age", "sex"], truth)
    all_d = res[(res.metric == "dx_d") & (res.feature == "ALL")].iloc[0]
    # sampling error only: SE of one d at n = 600 is sqrt(1/n1 + 1/n2) ~ 0.083
    assert abs(all_d["after"] - all_d["truth"]) < 3 * 0.083
    per = res[(res.metric == "dx_d") & (res.feature != "ALL")]
    assert (abs(per["after"] - per["truth"]) < 4 * 0.083).all()
    # the raw multi-site data attenuate d (site variance inflates the residual SD)
    assert abs(all_d["before"]) < abs(all_d["after"])
    assert set(res["metric"]) == {"dx_d", "dx_beta", "age_beta", "sex_beta"}
    assert res.groupby("metric").size().eq(len(f) + 1).all()


def test_truth_missing_a_feature_is_named(sim):
    table, truth = sim
    f = truth["features"]
    bad = {"dx_d": truth["dx_d"].drop(f[2])}
    with pytest.raises(HarmonizationError, match=repr(f[2])):
        effect_preservation(table, table, f, truth=bad)


# --------------------------------------------------------------------------- traveling subjects


def test_traveling_agreement_by_hand():
    t = pd.DataFrame({"subject": ["a", "a", "b", "b", "b", "c"],
                      "site": ["s1", "s2", "s1", "s2", "s3", "s1"],
                      "FA": [0.40, 0.44, 0.50, 0.52, 0.48, 0.9]})
    out = traveling_agreement(t, ["FA"])
    cv_a = np.std([0.40, 0.44], ddof=1) / 0.42
    cv_b = np.std([0.50, 0.52, 0.48], ddof=1) / 0.50
    assert out.at["FA", "cv"] == pytest.approx(100 * (cv_a + cv_b) / 2)
    dev = np.array([-0.02, 0.02, 0.0, 0.02, -0.02])
    assert out.at["FA", "rmse"] == pytest.approx(np.sqrt(np.mean(dev**2)))
    assert out.at["FA", "n_subjects"] == 2  # "c" was scanned once: not a traveler
    clean = t.assign(FA=[0.41, 0.41, 0.5, 0.5, 0.5, 0.9])
    out = traveling_agreement(t, ["FA"], clean=clean)
    err = np.array([-0.01, 0.03, 0.0, 0.02, -0.02])
    assert out.at["FA", "rmse_truth"] == pytest.approx(np.sqrt(np.mean(err**2)))


def test_traveling_errors():
    t = pd.DataFrame({"subject": ["a", "a"], "site": ["s1", "s1"], "FA": [0.4, 0.5]})
    with pytest.raises(HarmonizationError, match="'a' appears twice at site 's1'"):
        traveling_agreement(t, ["FA"])
    t = pd.DataFrame({"subject": ["a", "b"], "site": ["s1", "s2"], "FA": [0.4, 0.5]})
    with pytest.raises(HarmonizationError, match="two or more sites"):
        traveling_agreement(t, ["FA"])


def test_traveling_preservation_improves_with_harmonization(sim):
    table, truth = sim
    f = truth["features"]
    h = LocationScale().fit(table[f], table["site"], table[COV])
    trav = truth["traveling"]
    after = trav.copy()
    after[f] = h.transform(trav[f], trav["site"], trav[COV])
    res = traveling_preservation(trav, after, f, clean=truth["traveling_clean"])
    allrows = res[res.feature == "ALL"].set_index("metric")
    assert allrows.at["traveling_cv", "after"] < 0.6 * allrows.at["traveling_cv", "before"]
    assert allrows.at["traveling_rmse_truth", "after"] < allrows.at["traveling_rmse_truth",
                                                                      "before"]


# --------------------------------------------------------------------------- scoring


def test_evaluate_harmonizer_tidy_table(sim):
    table, truth = sim
    res = evaluate_harmonizer(LocationScale, table, truth=truth, traveling=truth["traveling"],
                              traveling_clean=truth["traveling_clean"], n_splits=3)
    assert list(res.columns) == COLUMNS
    metrics = set(res["metric"])
    assert {"site_balanced_accuracy", "site_balanced_accuracy_leaky", "dx_d", "age_beta",
            "rmse_to_clean", "dx_d_clean", "traveling_cv", "traveling_rmse_truth"} <= metrics
    allrows = res[res.feature == "ALL"].set_index("metric")
    # harmonized d equals the d of the same subjects without site effects, up to the
    # estimation error of the site parameters
    assert allrows.at["dx_d", "after"] == pytest.approx(allrows.at["dx_d_clean", "after"],
                                                        rel=0.05)
    assert allrows.at["dx_d_clean", "truth"] == pytest.approx(truth["dx_d"].mean())
    assert allrows.at["rmse_to_clean", "after"] < 0.5 * allrows.at["rmse_to_clean", "before"]
    assert np.isnan(allrows.at["site_balanced_accuracy", "rel_err_after"])


def test_template_instance_is_never_fitted(sim):
    table, truth = sim
    template = LocationScale()
    evaluate_harmonizer(template, table, truth=truth, n_splits=2)
    assert not hasattr(template, "alpha_")


def test_compare_and_summarize_show_failures_honestly():
    table, truth = simulate_roi_table(n_sites=4, n_per_site=400, n_features=8, seed=3,
                                      dx_prop_range=(0.3, 0.7), age_site_shift=6.0)
    res = compare_harmonizers({"none": None, "centering": SiteCentering,
                               "locscale": LocationScale}, table, truth=truth, n_splits=3)
    # SE of the mean d over 8 correlated features at n = 1600 is ~ 0.035 (6%): 15% is 2.5 SE
    summ = summarize(res, effect_tol=0.15)
    assert list(summ.index) == ["none", "centering", "locscale"]
    # no harmonization: site still visible, d attenuated; centering without covariates
    # removes the dx effect confounded with site; the covariate-protecting one passes
    assert not summ.at["none", "site_ok"]
    assert not summ.at["centering", "effect_ok"]
    assert summ.at["locscale", "site_ok"] and summ.at["locscale", "effect_ok"]
    assert summ.at["none", "site_acc_after"] == summ.at["none", "site_acc_before"]
    md = to_markdown(summ)
    assert md.startswith("| harmonizer |") and md.count("\n") == 2 + 3


def test_effect_estimator_rows(sim):
    table, truth = sim

    def pooled_ols(t, feats, site, effect, cov):
        return effect_estimates(t, feats, effect, cov, site=site)[f"{effect}_d"]

    est = EffectEstimator(pooled_ols, name="site fixed effect")
    res = evaluate_harmonizer(est, table, truth=truth)
    assert set(res["metric"]) == {"dx_d"}
    allrow = res[res.feature == "ALL"].iloc[0]
    assert allrow["truth"] == pytest.approx(truth["dx_d"].mean())
    assert abs(allrow["rel_err_after"]) < 0.15


def test_meta_analysis_estimator_pools_per_site_effects(sim):
    from dmriharmony.harmonizers import meta

    table, truth = sim
    f = truth["features"]
    d = meta_analysis("REML")(table, f, "site", "dx", ["age", "sex"])
    ref = meta.meta_analyze(table, features=f, effect="dx", covariates=["age", "sex"],
                            method="REML")["estimate"]
    np.testing.assert_allclose(d.to_numpy(), ref.loc[f].to_numpy(), rtol=1e-12)
    assert abs(d.mean() / truth["dx_d"].mean() - 1) < 0.15


def test_no_harmonization_is_identity():
    X = np.arange(6.0).reshape(3, 2)
    h = NoHarmonization().fit(X, ["a", "b", "a"])
    np.testing.assert_array_equal(h.transform(X, ["a", "b", "a"]), X)
    with pytest.raises(HarmonizationError, match="2 feature columns"):
        h.transform(np.ones((2, 3)), ["a", "b"])


def test_bad_harmonizer_spec_and_wrong_shape(sim):
    table, truth = sim

    class Bad:
        def fit(self, X, s, c=None):
            return self

        def transform(self, X, s, c=None):
            return np.asarray(X)[:, :1]

    with pytest.raises(HarmonizationError, match="returned shape"):
        evaluate_harmonizer(Bad, table, truth=truth, n_splits=2)

    class Nan(NoHarmonization):
        def transform(self, X, s, c=None):
            out = super().transform(X, s, c)
            out[:3, 2] = np.nan
            return out

    with pytest.raises(HarmonizationError, match=f"NaN for 3 observed values of feature "
                                                 f"'{truth['features'][2]}'"):
        evaluate_harmonizer(Nan, table, truth=truth, n_splits=2)
    with pytest.raises(HarmonizationError, match="cannot make a harmonizer"):
        evaluate_harmonizer(42, table, truth=truth, n_splits=2)
    with pytest.raises(HarmonizationError, match="column 'diagnosis'"):
        evaluate_harmonizer(LocationScale, table, effect="diagnosis", truth=truth)


@pytest.mark.filterwarnings("ignore::statsmodels.tools.sm_exceptions.ConvergenceWarning")
def test_mixed_model_estimator_matches_statsmodels_mixedlm():
    """d = beta / residual SD of ``y ~ dx + age + sex + (1 | site)``, checked against
    statsmodels MixedLM (REML) on two features."""
    from statsmodels.regression.mixed_linear_model import MixedLM

    from dmriharmony.evaluation import mixed_model

    table, truth = simulate_roi_table(n_sites=5, n_per_site=60, n_features=2, seed=9)
    f = truth["features"]
    d = mixed_model(reml=True)(table, f, "site", "dx", ["age", "sex"])
    X = sm.add_constant(table[["dx", "age", "sex"]].astype(float))
    for feat in f:
        res = MixedLM(table[feat].to_numpy(), X, groups=table["site"]).fit(reml=True)
        ref = res.fe_params["dx"] / np.sqrt(res.scale)
        assert d[feat] == pytest.approx(ref, rel=1e-4)


def test_covariate_subset_protects_only_what_it_keeps(sim):
    table, truth = sim
    f = truth["features"]
    seen = {}

    class Spy(LocationScale):
        def fit(self, X, sites, covariates=None):
            seen["cols"] = list(covariates.columns)
            return super().fit(X, sites, covariates)

    h = CovariateSubset(Spy, keep=["age", "sex"]).fit(table[f], table["site"], table[COV])
    assert seen["cols"] == ["age", "sex"]
    assert h.transform(table[f], table["site"], table[COV]).shape == (len(table), len(f))
    with pytest.raises(HarmonizationError, match="'sex' not among"):
        CovariateSubset(Spy, keep=["sex"]).fit(table[f], table["site"], table[["age"]])
    with pytest.raises(HarmonizationError, match="not fitted"):
        CovariateSubset(Spy, keep=["age"]).transform(table[f], table["site"], table[COV])


def test_default_harmonizers_are_all_constructible():
    from dmriharmony.evaluation import default_harmonizers
    from dmriharmony.evaluation._harmonizer import new_harmonizer

    specs = default_harmonizers()
    assert list(specs) == ["none", "combat", "combat_nonparametric", "combat_mean_only",
                           "combat_dx_unprotected", "covbat", "combat_gam", "meta_analysis",
                           "mixed_model"]
    for name, spec in specs.items():
        if isinstance(spec, EffectEstimator):
            continue
        h = new_harmonizer(spec)
        assert hasattr(h, "fit") and hasattr(h, "transform"), name
    assert new_harmonizer(specs["combat_nonparametric"]).parametric is False
    assert new_harmonizer(specs["combat_gam"]).smooth == ["age"]


def test_model_covariates_keep_a_misspecified_analysis_from_blaming_the_harmonizer():
    """With a curved age effect, ``y ~ dx + age + sex`` inflates the residual SD and shrinks d
    even on site-free data; giving the analysis model an age^2 column restores it."""
    table, truth = simulate_roi_table(n_sites=3, n_per_site=400, n_features=6, seed=5,
                                      age_quadratic=-6e-5, age_site_shift=8.0)
    table["age2"] = (table["age"] - truth["age0"]) ** 2
    truth["clean"]["age2"] = table["age2"].to_numpy()
    lin = evaluate_harmonizer(LocationScale, table, truth=truth, n_splits=2)
    quad = evaluate_harmonizer(LocationScale, table, truth=truth, n_splits=2,
                               model_covariates=["age", "age2", "sex", "dx"])

    def clean_err(res):
        row = res[(res.metric == "dx_d_clean") & (res.feature == "ALL")].iloc[0]
        return row["rel_err_after"]

    assert clean_err(lin) > 0.15  # attenuated towards 0 by the unmodelled curvature
    assert abs(clean_err(quad)) < 0.1
