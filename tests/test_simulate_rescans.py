"""Same-site rescans of traveling subjects (simulate_dataset(rescans=N), --rescans)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

os.environ.setdefault("NIPYPE_NO_ET", "1")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from dmriharmony.bids import collect_dwi_runs, load_layout, site_table  # noqa: E402
from dmriharmony.errors import SimulationError  # noqa: E402
from dmriharmony.evaluation.traveling import traveling_agreement  # noqa: E402
from dmriharmony.simulate import simulate_dataset  # noqa: E402
from dmriharmony.simulate.cli import main as cli_main  # noqa: E402

KW = dict(subjects_per_site=0, traveling_subjects=1, sites=["ge", "siemens"], voxel_size=5.0,
          progress=False)
SUB = "sub-trav01"
SESSIONS = ["ses-ge", "ses-gerescan1", "ses-siemens", "ses-siemensrescan1"]


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _dwi(root: Path, ses: str) -> np.ndarray:
    return np.asarray(nib.load(root / SUB / ses / "dwi" / f"{SUB}_{ses}_dwi.nii.gz").dataobj)


@pytest.fixture(scope="module")
def rescan_ds(tmp_path_factory) -> Path:
    return simulate_dataset(tmp_path_factory.mktemp("resc") / "r1", seed=2, rescans=1, **KW)


@pytest.fixture(scope="module")
def plain_ds(tmp_path_factory) -> Path:
    return simulate_dataset(tmp_path_factory.mktemp("resc") / "r0", seed=2, **KW)


def test_rescan_sessions_and_sessions_tsv(rescan_ds):
    assert sorted(p.name for p in (rescan_ds / SUB).glob("ses-*")) == SESSIONS
    for ses in SESSIONS:
        d = rescan_ds / SUB / ses / "dwi"
        for ext in ("nii.gz", "bval", "bvec", "json"):
            assert (d / f"{SUB}_{ses}_dwi.{ext}").is_file()
    st = pd.read_csv(rescan_ds / SUB / f"{SUB}_sessions.tsv", sep="\t", dtype=str)
    assert sorted(st["session_id"]) == SESSIONS
    assert dict(zip(st["session_id"], st["site"])) == {
        "ses-ge": "ge", "ses-gerescan1": "ge", "ses-siemens": "siemens",
        "ses-siemensrescan1": "siemens"}
    assert st["age"].nunique() == 1
    readme = (rescan_ds / "README").read_text()
    assert "rescanned 1 time(s)" in readme and "ses-<site>rescan1" in readme
    desc = json.loads((rescan_ds / "dataset_description.json").read_text())
    assert "rescans=1" in desc["GeneratedBy"][0]["Description"]


def test_rescan_groundtruth(rescan_ds):
    gt = rescan_ds / "derivatives" / "groundtruth"
    for ses in ("ses-gerescan1", "ses-siemensrescan1"):
        stem = f"{SUB}_{ses}"
        x = gt / SUB / ses / "xfm"
        assert (x / f"{stem}_from-scanner_to-anat_xfm.txt").is_file()
        assert (x / f"{stem}_from-scanner_to-phantom_desc-affine_xfm.txt").is_file()
        assert (x / f"{stem}_from-scanner_to-phantom_desc-affine_xfm.json").is_file()
        for m in ("fa", "md", "ad", "rd"):
            assert (gt / SUB / ses / "dwi" /
                    f"{stem}_space-phantom_model-tensor_param-{m}_dwimap.nii.gz").is_file()
    roi = pd.read_csv(gt / "roi_groundtruth.tsv", sep="\t")
    per = roi.groupby("session_id")["site"].unique()
    assert {k: list(v) for k, v in per.items()} == {
        "ses-ge": ["ge"], "ses-gerescan1": ["ge"], "ses-siemens": ["siemens"],
        "ses-siemensrescan1": ["siemens"]}
    # same biology, same site weighting: the noise-free truth of a rescan is the first scan's
    a = roi[roi.session_id == "ses-ge"].set_index(["metric", "roi"])["value"]
    b = roi[roi.session_id == "ses-gerescan1"].set_index(["metric", "roi"])["value"]
    pd.testing.assert_series_equal(a, b.loc[a.index], check_names=False)
    fa = f"{SUB}_ses-ge_space-phantom_model-tensor_param-fa_dwimap.nii.gz"
    far = fa.replace("ses-ge", "ses-gerescan1")
    assert (gt / SUB / "ses-ge" / "dwi" / fa).read_bytes() == \
        (gt / SUB / "ses-gerescan1" / "dwi" / far).read_bytes()


def test_rescan_has_own_pose_and_noise(rescan_ds):
    gt = rescan_ds / "derivatives" / "groundtruth" / SUB
    pose = [(gt / ses / "xfm" / f"{SUB}_{ses}_from-scanner_to-anat_xfm.txt").read_text()
            for ses in ("ses-ge", "ses-gerescan1")]
    assert pose[0] != pose[1]


def test_rescan_has_own_noise(tmp_path, monkeypatch):
    """With the head pose fixed the grids agree: a rescan differs by its noise draw only."""
    import dmriharmony.simulate.dataset as ds

    monkeypatch.setattr(ds, "random_head_pose", lambda rng: np.eye(4))
    kw = {**KW, "sites": ["ge"], "traveling_subjects": 1}
    noisy = simulate_dataset(tmp_path / "noisy", seed=2, rescans=1, **kw)
    a, b = _dwi(noisy, "ses-ge"), _dwi(noisy, "ses-gerescan1")
    assert a.shape == b.shape and not np.array_equal(a, b)
    assert np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1] > 0.8
    clean = simulate_dataset(tmp_path / "clean", seed=2, rescans=1, snr=None, **kw)
    np.testing.assert_array_equal(_dwi(clean, "ses-ge"), _dwi(clean, "ses-gerescan1"))


def test_rescans_zero_keeps_files_and_first_sessions(rescan_ds, plain_ds):
    hp, hr = _hashes(plain_ds), _hashes(rescan_ds)
    assert not any("rescan" in k for k in hp)
    assert sorted(p.name for p in (plain_ds / SUB).glob("ses-*")) == ["ses-ge", "ses-siemens"]
    # the first sessions' files do not depend on the rescans
    same = [k for k in hp if k.startswith((f"{SUB}/ses-", f"derivatives/groundtruth/{SUB}/"))]
    assert same and all(hr[k] == hp[k] for k in same)
    changed = {k for k in hp if hr[k] != hp[k]}
    assert changed <= {"README", "dataset_description.json", "participants.json",
                       "sessions.json", f"{SUB}/{SUB}_sessions.tsv",
                       "derivatives/groundtruth/roi_groundtruth.tsv"}


def test_same_seed_identical_files(rescan_ds, tmp_path):
    again = simulate_dataset(tmp_path / "again", seed=2, rescans=1, **KW)
    assert _hashes(again) == _hashes(rescan_ds)


def test_site_table_maps_rescans_to_their_site(rescan_ds):
    table = site_table(collect_dwi_runs(load_layout(rescan_ds)), rescan_ds)
    got = dict(zip(table["session"], table["site"]))
    assert got == {"ge": "ge", "gerescan1": "ge", "siemens": "siemens",
                   "siemensrescan1": "siemens"}
    assert set(table["site_source"]) == {"sessions.tsv"}


def test_roi_agreement_uses_first_session_per_site():
    t = pd.DataFrame({"subject": ["t"] * 4, "session": ["gerescan1", "ge", "siemens",
                                                        "siemensrescan1"],
                      "site": ["ge", "ge", "siemens", "siemens"],
                      "FA": [0.9, 0.40, 0.44, 0.1]})
    out = traveling_agreement(t, ["FA"])
    ref = traveling_agreement(t.iloc[[1, 2]], ["FA"])
    pd.testing.assert_frame_equal(out, ref)
    clean = t.assign(FA=[0.0, 0.41, 0.41, 0.0])
    assert traveling_agreement(t, ["FA"], clean=clean).at["FA", "rmse_truth"] == \
        pytest.approx(np.sqrt((0.01**2 + 0.03**2) / 2))
    with pytest.raises(Exception, match="appears twice at site 'ge' in session 'ge'"):
        traveling_agreement(t.assign(session=["ge", "ge", "siemens", "x"]), ["FA"])


def test_bad_rescans(tmp_path):
    with pytest.raises(SimulationError, match="rescans must be >= 0"):
        simulate_dataset(tmp_path / "neg", seed=0, rescans=-1, **KW)
    assert not (tmp_path / "neg").exists()
    with pytest.raises(SimulationError, match="whole number"):
        simulate_dataset(tmp_path / "f", seed=0, rescans=1.5, **KW)
    with pytest.raises(SimulationError, match="also the label of rescan 1"):
        simulate_dataset(tmp_path / "clash", seed=0, rescans=1,
                         **{**KW, "sites": ["ge", {"preset": "siemens", "name": "gerescan1"}]})
    assert cli_main([str(tmp_path / "cli"), "--rescans", "-2", "--quiet"]) == 2


def test_cli_rescans(tmp_path):
    out = tmp_path / "cli"
    rc = cli_main([str(out), "--seed", "1", "--subjects-per-site", "0", "--sites", "ge",
                   "siemens", "--voxel-size", "5", "--rescans", "1", "--quiet"])
    assert rc == 0
    assert (out / SUB / "ses-siemensrescan1" / "dwi" /
            f"{SUB}_ses-siemensrescan1_dwi.nii.gz").is_file()


def test_group_table_and_evaluation_accept_rescans():
    from dmriharmony.group.harmonize import evaluate_methods
    from dmriharmony.group.table import load_group_tables
    from dmriharmony.simulate.roi_table import simulate_roi_table

    train, info = simulate_roi_table(n_sites=2, n_per_site=8, n_features=3, seed=1,
                                     n_traveling=1)
    train = train.assign(session=train["site"])
    trav = info["traveling"].assign(session=info["traveling"]["site"])
    rescan = trav.assign(session=trav["site"] + "rescan1")
    rescan[info["features"]] = rescan[info["features"]] + 0.01
    roi = pd.concat([train, trav, rescan], ignore_index=True).assign(metric="fa")
    roi["subject"] = roi["subject"].str.removeprefix("sub-")
    tables = load_group_tables(roi, metrics=["fa"], covariates=("age", "sex"))
    gt = tables["fa"]
    assert len(gt.traveling) == 4 and len(gt.train) == 16
    res, notes = evaluate_methods(["none"], gt, seed=0, n_splits=2)
    assert notes == []
    cv = res[(res.metric == "traveling_cv") & (res.feature == "ALL")]["before"].iloc[0]
    # the first session per site: the same number as without the rescans
    base, _ = evaluate_methods(["none"], load_group_tables(
        roi[~roi["session"].str.contains("rescan")], metrics=["fa"],
        covariates=("age", "sex"))["fa"], seed=0, n_splits=2)
    ref = base[(base.metric == "traveling_cv") & (base.feature == "ALL")]["before"].iloc[0]
    assert cv == pytest.approx(ref)
