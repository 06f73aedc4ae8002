"""Nipype interfaces of the harmonizers, each run inside a tiny nipype Workflow in a tmp dir."""

from __future__ import annotations

import os

os.environ.setdefault("NIPYPE_NO_ET", "1")  # no version check over the network

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from nipype.interfaces.utility import IdentityInterface  # noqa: E402
from nipype.pipeline import engine as pe  # noqa: E402

from dmriharmony.errors import HarmonizationError  # noqa: E402
from dmriharmony.interfaces.harmonizers import (  # noqa: E402
    ApplyHarmonizer,
    ComBatGAMHarmonize,
    ComBatHarmonize,
    CovBatHarmonize,
    MetaAnalysis,
    MixedModel,
    load_table,
    resolve_features,
    write_tsv,
)
from dmriharmony.simulate.roi_table import simulate_roi_table  # noqa: E402

COV = ["age", "sex", "dx"]


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """ROI table TSV (subject, site, features) and a separate participants TSV (covariates)."""
    root = tmp_path_factory.mktemp("tables")
    table, truth = simulate_roi_table(n_sites=3, n_per_site=40, n_features=5, seed=2,
                                      dx_prop_range=(0.3, 0.6))
    feats = truth["features"]
    roi = root / "roi_table.tsv"
    table[["subject", "site", *feats]].to_csv(roi, sep="\t", index=False)
    parts = root / "participants.tsv"
    table[["subject", *COV]].sample(frac=1.0, random_state=0).to_csv(parts, sep="\t",
                                                                     index=False)
    full = root / "full_table.tsv"
    table.to_csv(full, sep="\t", index=False)
    return {"roi": str(roi), "participants": str(parts), "full": str(full), "table": table,
            "features": feats, "root": root}


def _run(interface, base_dir, name: str, **inputs):
    """Run ``interface`` as the only node of a Workflow fed by an IdentityInterface."""
    wf = pe.Workflow(name=f"wf_{name}", base_dir=str(base_dir))
    src = pe.Node(IdentityInterface(fields=list(inputs)), name="inputnode")
    for k, v in inputs.items():
        setattr(src.inputs, k, v)
    node = pe.Node(interface, name=name)
    wf.connect([(src, node, [(k, k) for k in inputs])])
    graph = wf.run(plugin="Linear")
    (done,) = [n for n in graph.nodes() if n.name == name]
    return done.result.outputs


# --------------------------------------------------------------------------- I/O glue


def test_load_table_joins_covariates_and_names_missing_subject(tables, tmp_path):
    merged, extra = load_table(tables["roi"], tables["participants"])
    assert extra == COV
    pd.testing.assert_frame_equal(merged[["subject", *COV]], tables["table"][["subject", *COV]])
    part = pd.read_csv(tables["participants"], sep="\t")
    short = tmp_path / "short.tsv"
    part[part.subject != "sub-00007"].to_csv(short, sep="\t", index=False)
    with pytest.raises(HarmonizationError, match="'sub-00007'"):
        load_table(tables["roi"], str(short))
    dup = tmp_path / "dup.tsv"
    pd.concat([part, part.iloc[:1]]).to_csv(dup, sep="\t", index=False)
    with pytest.raises(HarmonizationError, match="appears twice"):
        load_table(tables["roi"], str(dup))


def test_resolve_features_and_atomic_write(tables, tmp_path):
    t = tables["table"]
    assert resolve_features(t, None, ["site", *COV]) == tables["features"]
    with pytest.raises(HarmonizationError, match="'nope'"):
        resolve_features(t, ["GCC", "nope"], [])
    out = write_tsv(t.head(3), tmp_path / "x.tsv")
    assert pd.read_csv(out, sep="\t").shape == (3, t.shape[1])
    assert [p.name for p in tmp_path.iterdir()] == ["x.tsv"]  # no temporary file left


# --------------------------------------------------------------------------- effect estimators


def test_meta_analysis_node(tables, tmp_path):
    from dmriharmony.harmonizers import meta

    out = _run(MetaAnalysis(), tmp_path, "meta", in_file=tables["roi"],
               covariates_file=tables["participants"], covariates=["age", "sex"], effect="dx",
               method="REML")
    pooled = pd.read_csv(out.effects_file, sep="\t", index_col="feature")
    per_site = pd.read_csv(out.site_effects_file, sep="\t")
    ref = meta.meta_analyze(tables["table"], features=tables["features"], effect="dx",
                            covariates=["age", "sex"], method="REML")
    np.testing.assert_allclose(pooled.loc[tables["features"], "estimate"],
                               ref.loc[tables["features"], "estimate"], rtol=1e-10)
    assert set(per_site["site"]) == {"site0", "site1", "site2"}
    assert len(per_site) == 3 * len(tables["features"])


def test_mixed_model_node(tables, tmp_path):
    from dmriharmony.harmonizers import mixed

    out = _run(MixedModel(), tmp_path, "mixed", in_file=tables["full"], covariates=COV,
               effect="dx", fixed="dx + age + sex", d_formula="beta")
    res = pd.read_csv(out.effects_file, sep="\t", index_col="feature")
    coef = pd.read_csv(out.coef_file, sep="\t", index_col="feature")
    fit = mixed.fit(tables["table"], tables["features"], fixed="dx + age + sex", site="site")
    np.testing.assert_allclose(res.loc[tables["features"], "estimate"],
                               fit.coef.loc[tables["features"], "dx"], rtol=1e-8)
    np.testing.assert_allclose(res["d"], fit.d("dx", formula="beta"), rtol=1e-8)
    assert list(res.index) == tables["features"]
    assert {"sigma2_site", "sigma2_resid", "icc", "p"} <= set(res.columns)
    assert list(coef.columns) == list(fit.coef.columns)


# --------------------------------------------------------------------------- harmonizers


def _check_harmonized(out, tables, kind):
    t = tables["table"]
    harm = pd.read_csv(out.out_file, sep="\t")
    assert list(harm.columns) == ["subject", "site", *tables["features"]]
    assert harm["subject"].tolist() == t["subject"].tolist()
    assert np.isfinite(harm[tables["features"]].to_numpy()).all()
    # the site means move together after harmonization
    spread_before = t.groupby("site")[tables["features"]].mean().std().mean()
    spread_after = harm.groupby("site")[tables["features"]].mean().std().mean()
    assert spread_after < 0.5 * spread_before, kind
    eff = pd.read_csv(out.effects_file, sep="\t")
    assert {"dx_d", "age_beta", "sex_beta"} <= set(eff["metric"])
    assert os.path.getsize(out.model_file) > 0
    return harm


def test_combat_node_and_apply_to_new_scans(tables, tmp_path):
    from dmriharmony.harmonizers import ComBat

    out = _run(ComBatHarmonize(), tmp_path, "combat", in_file=tables["roi"],
               covariates_file=tables["participants"], covariates=COV)
    harm = _check_harmonized(out, tables, "combat")
    t = tables["table"]
    f = tables["features"]
    ref = ComBat().fit(t[f], t["site"].to_numpy(), t[COV]).transform(t[f], t["site"].to_numpy(),
                                                                     t[COV])
    np.testing.assert_allclose(harm[f].to_numpy(), np.asarray(ref), rtol=0, atol=1e-10)
    model = ComBat().fit(t[f], t["site"].to_numpy(), t[COV])
    site_eff = pd.read_csv(out.site_effects_file, sep="\t")
    assert len(site_eff) == 3 * len(f)
    g = site_eff.pivot(index="site", columns="feature", values="gamma_star").loc[:, f]
    np.testing.assert_allclose(g.to_numpy(), model.gamma_star_, rtol=1e-10)
    # the saved model harmonizes "later" scans exactly as the fitted one did
    later = tmp_path / "later.tsv"
    t[["subject", "site", *f]].iloc[::4].to_csv(later, sep="\t", index=False)
    applied = _run(ApplyHarmonizer(), tmp_path, "apply", in_file=str(later),
                   covariates_file=tables["participants"], covariates=COV,
                   model_file=out.model_file, harmonizer="combat")
    again = pd.read_csv(applied.out_file, sep="\t")
    np.testing.assert_allclose(again[f].to_numpy(), harm[f].to_numpy()[::4], atol=1e-10)


def test_combat_node_options_reach_the_model(tables, tmp_path):
    out = _run(ComBatHarmonize(), tmp_path, "combat_np", in_file=tables["full"], covariates=COV,
               parametric=False, ref_site="site1")
    harm = pd.read_csv(out.out_file, sep="\t")
    f = tables["features"]
    t = tables["table"]
    ref_rows = (t["site"] == "site1").to_numpy()
    # the reference site is left as it was
    np.testing.assert_allclose(harm.loc[ref_rows, f].to_numpy(), t.loc[ref_rows, f].to_numpy(),
                               atol=1e-10)
    # the full table keeps its covariate columns untouched
    pd.testing.assert_frame_equal(harm[COV], t[COV])


def test_covbat_node(tables, tmp_path):
    out = _run(CovBatHarmonize(), tmp_path, "covbat", in_file=tables["roi"],
               covariates_file=tables["participants"], covariates=COV)
    _check_harmonized(out, tables, "covbat")


def test_combat_gam_node(tables, tmp_path):
    out = _run(ComBatGAMHarmonize(), tmp_path, "gam", in_file=tables["roi"],
               covariates_file=tables["participants"], covariates=COV, smooth=["age"])
    _check_harmonized(out, tables, "combat_gam")


def test_missing_column_is_named(tables, tmp_path):
    node = ComBatHarmonize(in_file=tables["roi"], covariates=["age"])
    with pytest.raises(HarmonizationError, match="column 'age' not found"):
        node.run(cwd=str(tmp_path))


def test_output_names_are_bids_desc_labels(tables, tmp_path):
    out = _run(ComBatGAMHarmonize(), tmp_path, "gam_names", in_file=tables["full"],
               covariates=COV, smooth=["age"])
    assert os.path.basename(out.out_file) == "roi_table_desc-combatgam.tsv"
    assert os.path.basename(out.model_file) == "model_desc-combatgam.npz"
    assert os.path.basename(out.site_effects_file) == "site_effects_desc-combatgam.tsv"


def test_apply_to_an_unseen_site_is_an_error_naming_it(tables, tmp_path):
    out = _run(ComBatHarmonize(), tmp_path, "combat_fit", in_file=tables["full"], covariates=COV)
    new = tmp_path / "new_site.tsv"
    tables["table"].head(5).assign(site="siteZ").to_csv(new, sep="\t", index=False)
    node = ApplyHarmonizer(in_file=str(new), covariates=COV, model_file=out.model_file)
    with pytest.raises(HarmonizationError, match="siteZ"):
        node.run(cwd=str(tmp_path))
