"""Group level end to end: participant-level outputs -> ``dmriharmony ... group`` -> harmonized
tables, effect tables, saved models, evaluation, report; resume, reproducibility, later batches,
bad input.

The participant-level outputs are made by the ROI-table simulator (tests/_group_data.py) so that
the group level is tested in seconds; the full chain on DWI (participant level then group level)
is the slow test at the end and ``make demo``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _group_data import make_group_input

from dmriharmony.cli.run import main

ALL = "combat,covbat,gam,meta,mixed"


def _group(d: dict, work: Path, *extra: str) -> int:
    return main([str(d["bids"]), str(d["out"]), "group", "-w", str(work), *extra])


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("group")
    d = make_group_input(root)
    code = _group(d, root / "work", "--harmonizers", ALL, "--covariates", "age,sex",
                  "--effect", "dx", "--seed", "7")
    assert code == 0
    d["root"] = root
    d["group"] = d["deriv"] / "group"
    return d


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", na_values=["n/a"], dtype={"subject": str, "session": str})


def test_every_output_is_written(study):
    g = study["group"]
    for name in ("combat", "covbat", "gam"):
        assert (g / f"roi_table_desc-{name}.tsv").is_file()
        for metric in ("fa", "md"):
            assert (g / "models" / name / f"{metric}_model.npz").is_file()
    for name in ("none", "combat", "covbat", "gam", "meta", "mixed"):
        eff = _read(g / f"effects_desc-{name}.tsv")
        assert set(eff["metric"]) == {"fa", "md"}
        assert set(eff["feature"]) == set(study["features"])
    for f in ("roi_table.tsv", "site_effects_desc-meta.tsv", "evaluation.tsv",
              "evaluation_summary.tsv", "report.html"):
        assert (g / f).is_file(), f
    assert not list(study["deriv"].glob(".group-*")), "staging folder left behind"


def test_sidecars_record_versions_and_options(study):
    side = json.loads((study["group"] / "roi_table_desc-combat.json").read_text())
    assert side["GeneratedBy"]["Name"] == "dmriharmony"
    assert {"dmriharmony", "dipy", "nipype", "torch"} <= set(side["ToolVersions"])
    assert side["Options"]["Harmonizers"] == ALL.split(",")
    assert side["Options"]["Seed"] == 7
    assert (study["group"] / "models" / "combat" / "fa_model_provenance.json").is_file()


def test_harmonized_table_equals_combat_fitted_directly(study):
    """The group level's ComBat output is ComBat on the non-traveling runs (age, sex, dx kept)."""
    from dmriharmony.harmonizers import ComBat

    feats = study["features"]
    raw = _read(study["group"] / "roi_table.tsv")
    raw = raw[raw["metric"] == "FA"]
    parts = pd.read_csv(study["bids"] / "participants.tsv", sep="\t")
    trav = set(parts.loc[parts["traveling"] == "yes", "participant_id"].str[4:])
    train = raw[~raw["subject"].isin(trav)].reset_index(drop=True)
    model = ComBat(parametric=True).fit(train[feats].to_numpy(), train["site"].to_numpy(),
                                        train[["age", "sex", "dx"]])
    expected = model.transform(raw[feats].to_numpy(), raw["site"].to_numpy(),
                               raw[["age", "sex", "dx"]].reset_index(drop=True))
    out = _read(study["group"] / "roi_table_desc-combat.tsv")
    out = out[out["metric"] == "fa"].assign(session=lambda t: t["session"].fillna("n/a"))
    got = out.set_index(["subject", "session"]).loc[
        list(zip(raw["subject"], raw["session"].fillna("n/a").astype(str), strict=True))]
    # the TSV keeps 10 significant digits
    np.testing.assert_allclose(got[feats].to_numpy(), expected, rtol=1e-8)
    # the same model was saved
    saved = ComBat.load(study["group"] / "models" / "combat" / "fa_model.npz")
    np.testing.assert_allclose(
        saved.transform(train[feats].to_numpy(), train["site"].to_numpy(),
                        train[["age", "sex", "dx"]]),
        model.transform(train[feats].to_numpy(), train["site"].to_numpy(),
                        train[["age", "sex", "dx"]]), rtol=1e-12)


def test_effect_tables_equal_the_estimators_called_directly(study):
    from dmriharmony.harmonizers import meta, mixed

    feats = study["features"]
    raw = _read(study["group"] / "roi_table.tsv")
    raw = raw[(raw["metric"] == "FA") & raw["session"].isna()]
    res = meta.meta_analyze(raw, feats, site="site", effect="dx", covariates=["age", "sex"],
                            measure="d", method="REML")
    got = _read(study["group"] / "effects_desc-meta.tsv").query("metric == 'fa'")
    np.testing.assert_allclose(got.set_index("feature").loc[feats, "d_pooled"],
                               res.loc[feats, "estimate"], rtol=1e-8)
    fit = mixed.fit(raw, feats, fixed="age + sex + dx", site="site", reml=True, progress=False)
    term = next(t for t in fit.terms if t.startswith("dx"))
    got = _read(study["group"] / "effects_desc-mixed.tsv").query("metric == 'fa'")
    np.testing.assert_allclose(got.set_index("feature").loc[feats, "estimate"],
                               fit.coef[term].loc[feats], rtol=1e-7)


def test_evaluation_shows_site_removed_and_effect_kept(study):
    s = _read(study["group"] / "evaluation_summary.tsv").set_index(["harmonizer", "param"])
    for h in ("combat", "covbat", "gam"):
        assert s.loc[(h, "fa"), "site_acc_after"] < s.loc[(h, "fa"), "site_acc_before"]
        assert s.loc[(h, "fa"), "site_acc_after"] <= s.loc[(h, "fa"), "chance"] + 0.15
        # traveling subjects agree better across sites after harmonization
        assert s.loc[(h, "fa"), "traveling_cv_after"] < s.loc[(h, "fa"), "traveling_cv_before"]
    # dx effect sign kept by every method
    d0 = s.loc[("none", "fa"), "dx_d_before"]
    for h in ("combat", "covbat", "gam", "meta", "mixed"):
        assert np.sign(s.loc[(h, "fa"), "dx_d_after"]) == np.sign(d0)


def test_report_embeds_its_figures(study):
    text = (study["group"] / "report.html").read_text()
    assert text.count("src='data:image/png;base64,") + text.count(
        'src="data:image/png;base64,') >= 6
    assert "http://" not in text and "https://" not in text  # self-contained
    for h in ("combat", "covbat", "gam", "meta", "mixed"):
        assert h in text


def test_rerun_reuses_nodes_and_same_seed_gives_identical_outputs(study, tmp_path):
    harm = study["root"] / "work" / "dmriharmony_group_wf" / "harmonize"
    result = next(harm.glob("result_*.pklz"))
    before = result.stat().st_mtime_ns
    assert _group(study, study["root"] / "work", "--harmonizers", ALL, "--seed", "7") == 0
    assert result.stat().st_mtime_ns == before, "finished node was recomputed"
    # a fresh copy of the inputs, a fresh work folder: byte-identical tables and report
    d2 = make_group_input(tmp_path)
    assert _group(d2, tmp_path / "work", "--harmonizers", ALL, "--seed", "7") == 0
    g1, g2 = study["group"], d2["deriv"] / "group"
    names = sorted(p.relative_to(g1) for p in g1.rglob("*") if p.suffix in (".tsv", ".html"))
    assert names == sorted(p.relative_to(g2) for p in g2.rglob("*")
                           if p.suffix in (".tsv", ".html"))
    for n in names:
        assert (g1 / n).read_bytes() == (g2 / n).read_bytes(), n
    for npz in g1.rglob("*.npz"):
        a, b = np.load(npz), np.load(g2 / npz.relative_to(g1))
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            numeric = a[k].dtype.kind in "fc"
            assert np.array_equal(a[k], b[k], equal_nan=numeric), (npz, k)


def test_apply_model_harmonizes_a_later_batch(study, tmp_path):
    from dmriharmony.harmonizers import ComBat

    batch = make_group_input(tmp_path, n_per_site=4, n_traveling=0, seed=11, first=500)
    assert _group(batch, tmp_path / "work", "--harmonizers", "combat",
                  "--apply-model", str(study["group"])) == 0
    out = _read(batch["deriv"] / "group" / "roi_table_desc-combat.tsv")
    assert not (batch["deriv"] / "group" / "models").exists()  # nothing refitted
    raw = _read(batch["deriv"] / "group" / "roi_table.tsv")
    feats = study["features"]
    model = ComBat.load(study["group"] / "models" / "combat" / "fa_model.npz")
    fa = raw[raw["metric"] == "FA"].reset_index(drop=True)
    expected = model.transform(fa[feats].to_numpy(), fa["site"].to_numpy(),
                               fa[["age", "sex", "dx"]])
    got = out[out["metric"] == "fa"].set_index("subject").loc[fa["subject"], feats]
    np.testing.assert_allclose(got.to_numpy(), expected, rtol=1e-8)


def test_bad_input_is_one_line_and_leaves_outputs_untouched(study, tmp_path, capsys):
    d = make_group_input(tmp_path, n_per_site=4, n_traveling=0)
    work = tmp_path / "work"
    assert _group(d, work, "--harmonizers", "combat") == 0
    group = d["deriv"] / "group"
    before = {p: p.read_bytes() for p in group.rglob("*") if p.is_file()}
    capsys.readouterr()

    assert _group(d, work, "--harmonizers", "combat,bogus") == 64
    err = capsys.readouterr().err
    assert "bogus" in err and err.count("\n") == 1

    assert _group(d, work, "--harmonizers", "combat", "--covariates", "age,handedness") == 65
    err = capsys.readouterr().err
    assert "handedness" in err and err.startswith("dmriharmony: error:")

    assert _group(d, work, "--harmonizers", "combat", "--reference-site", "nowhere") == 65
    assert "nowhere" in capsys.readouterr().err

    assert _group(d, work, "--harmonizers", "combat", "--apply-model",
                  str(tmp_path / "missing")) == 66
    assert "saved models" in capsys.readouterr().err

    after = {p: p.read_bytes() for p in group.rglob("*") if p.is_file()}
    assert after == before
    assert not list(d["deriv"].glob(".group-*"))

    empty = tmp_path / "empty"
    (empty / "bids").mkdir(parents=True)
    (empty / "out" / "dmriharmony").mkdir(parents=True)
    (empty / "out" / "dmriharmony" / "site_table.tsv").write_text("subject\tsite\n")
    assert main([str(empty / "bids"), str(empty / "out"), "group"]) == 66
    assert "no ROI rows" in capsys.readouterr().err


def test_group_workflow_embeds_after_a_join(tmp_path):
    """A user's graph: per-subject iterable -> JoinNode -> init_group_wf."""
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    from dmriharmony.workflows.group import init_group_wf

    d = make_group_input(tmp_path, n_per_site=5, n_traveling=0)
    rows = sorted(str(p) for p in d["deriv"].glob("sub-*/**/*_roi.tsv"))
    wf = pe.Workflow(name="user_wf", base_dir=str(tmp_path / "work"))
    subjects = pe.Node(niu.IdentityInterface(fields=["roi_file"]), name="subjects")
    subjects.iterables = ("roi_file", rows)
    qc = pe.Node(niu.IdentityInterface(fields=["roi_file"]), name="user_qc")
    join = pe.JoinNode(niu.IdentityInterface(fields=["roi_files"]), joinsource="subjects",
                       joinfield=["roi_files"], name="join_rois")
    group = init_group_wf(harmonizers=["combat", "meta"], report=False, evaluate=False)
    group.inputs.inputnode.participants_tsv = str(d["bids"] / "participants.tsv")
    group.inputs.inputnode.site_table = str(d["deriv"] / "site_table.tsv")
    sink = pe.Node(niu.Function(input_names=["group_dir"], output_names=["effects"],
                                function=_user_step), name="user_sink")
    wf.connect([(subjects, qc, [("roi_file", "roi_file")]),
                (qc, join, [("roi_file", "roi_files")]),
                (join, group, [("roi_files", "inputnode.roi_files")]),
                (group, sink, [("outputnode.group_dir", "group_dir")])])
    graph = wf.run(plugin="Linear")
    node = next(n for n in graph.nodes() if n.name == "user_sink")
    effects = Path(node.result.outputs.effects)
    assert effects.name == "effects_desc-meta.tsv" and effects.is_file()
    table = _read(effects.parent / "roi_table_desc-combat.tsv")
    assert len(table) == 2 * len(rows)  # FA and MD rows of every run


def _user_step(group_dir):
    """A user's node after the group workflow: takes the meta-analysis table."""
    from pathlib import Path

    return str(Path(group_dir) / "effects_desc-meta.tsv")
