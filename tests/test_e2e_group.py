"""End to end on DWI: simulator dataset -> participant level (DTI, TBSS, ROI rows) -> group level
with every ROI-table harmonizer and the skeleton-level voxel ComBat -> evaluation and report.

Slow (about 6 minutes on 2 cores: 21 DWI runs): run in CI by ``.ci/run``. The evaluation table
of the group level must equal what the evaluation module gives when called directly on the same
ROI table (the numbers of the harmonizer issues), and the group's ComBat table must equal
ComBat fitted directly.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from dmriharmony.cli.run import main

pytestmark = pytest.mark.slow
ALL = "combat,covbat,gam,meta,mixed,rish,vae"


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    ds, out, work = root / "ds", root / "out", root / "work"
    subprocess.run([sys.executable, "-m", "dmriharmony.simulate.cli", str(ds), "--seed", "5",
                    "--subjects-per-site", "6", "--traveling-subjects", "1", "--quiet"],
                   check=True)
    assert main([str(ds), str(out), "participant", "-w", str(work), "--template", "phantom",
                 "--nprocs", "2"]) == 0
    assert main([str(ds), str(out), "group", "-w", str(work), "--nprocs", "2",
                 "--harmonizers", ALL, "--covariates", "age,sex", "--effect", "dx",
                 "--seed", "3"]) == 0
    return {"ds": ds, "out": out, "work": work, "group": out / "dmriharmony" / "group"}


def test_group_outputs_for_every_method(e2e):
    g = e2e["group"]
    table = pd.read_csv(g / "roi_table.tsv", sep="\t")
    assert len(table[table["metric"] == "FA"]) == 21  # 18 single-site runs + 3 traveling
    for h in ("combat", "covbat", "gam", "rish", "vae"):
        assert (g / f"roi_table_desc-{h}.tsv").is_file()
    for m in ("none", "combat", "covbat", "gam", "meta", "mixed", "rish", "vae"):
        assert (g / f"effects_desc-{m}.tsv").is_file(), m
    # signal-level harmonizers: per-run refitted maps, models, traveling-subject scores
    for h in ("rish", "vae"):
        assert len(list(e2e["out"].glob(f"dmriharmony/sub-*/**/*_param-fa_desc-{h}_"
                                         "dwimap.nii.gz"))) == 2 * 21  # native + template
        ev = pd.read_csv(g / f"evaluation_desc-{h}.tsv", sep="\t")
        assert ev["subject"].tolist() == ["trav01", "trav01"]
        assert ev["metric"].tolist() == ["fa", "md"]
    assert (g / "models" / "vae" / "vae_model" / "vae_weights.pt").is_file()
    latent = __import__("json").loads((g / "vae_latent_site_accuracy.json").read_text())
    assert 0 <= latent["balanced_accuracy"] <= 1 and latent["chance"] == pytest.approx(1 / 3)
    text = (g / "report.html").read_text()
    assert "Traveling subjects" in text and "forest" in text


def test_evaluation_equals_the_evaluation_module_called_directly(e2e):
    from dmriharmony.evaluation import compare_harmonizers
    from dmriharmony.group import load_group_tables
    from dmriharmony.group.harmonize import _spec

    tables = load_group_tables(e2e["group"] / "roi_table.tsv", covariates=["age", "sex"],
                               effect="dx", metrics=["fa"])
    t = tables["fa"]
    folds = max(2, min(5, int(t.train["site"].value_counts().min())))
    ours = pd.read_csv(e2e["group"] / "evaluation.tsv", sep="\t", na_values=["n/a"])
    for name in ("combat", "covbat", "mixed"):
        direct = compare_harmonizers({name: _spec(name, None)}, t.train, features=t.features,
                                     site="site", covariates=t.covariates, effect="dx",
                                     traveling=t.traveling, n_splits=folds, seed=3)
        got = ours[(ours["harmonizer"] == name) & (ours["param"] == "fa")]
        merged = direct.merge(got, on=["metric", "feature"], suffixes=("", "_ours"))
        assert len(merged) == len(direct), name
        for c in direct.select_dtypes("number").columns:
            np.testing.assert_allclose(merged[f"{c}_ours"], merged[c], rtol=1e-8,
                                       atol=1e-12, equal_nan=True, err_msg=f"{name} {c}")


def test_combat_site_effect_removed_on_real_pipeline_output(e2e):
    s = pd.read_csv(e2e["group"] / "evaluation_summary.tsv", sep="\t",
                    na_values=["n/a"]).set_index(["harmonizer", "param"])
    # MD carries the strongest scanner effect of the phantom (b-value dependence)
    assert s.loc[("none", "md"), "site_acc_before"] > s.loc[("none", "md"), "chance"] + 0.1
    assert s.loc[("combat", "md"), "site_acc_after"] < s.loc[("none", "md"), "site_acc_before"]
    assert s.loc[("combat", "md"), "traveling_cv_after"] < s.loc[("combat", "md"),
                                                                 "traveling_cv_before"]


def test_skeleton_level_on_pipeline_output(e2e):
    assert main([str(e2e["ds"]), str(e2e["out"]), "group", "-w", str(e2e["work"]),
                 "--level", "skeleton", "--harmonizers", "combat", "--features", "fa,md"]) == 0
    ev = pd.read_csv(e2e["group"] / "evaluation_desc-skeleton.tsv", sep="\t")
    assert set(ev["metric"]) == {"fa", "md"}
    maps = sorted((e2e["out"] / "dmriharmony").glob(
        "sub-*/**/*_param-fa_desc-skeletoncombat_dwimap.nii.gz"))
    assert len(maps) == 21
