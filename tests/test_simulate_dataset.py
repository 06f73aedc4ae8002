"""End-to-end tests of simulate_dataset: BIDS validity, ground truth, determinism, accuracy."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from dipy.core.gradients import gradient_table
from dipy.reconst.dti import TensorModel

from dmriharmony.errors import SimulationError
from dmriharmony.simulate import (
    load_phantom_template,
    load_scan_transform,
    resample_to_scan,
    simulate_dataset,
)
from dmriharmony.simulate.anatomy import LABELS
from dmriharmony.simulate.cli import main as cli_main
from dmriharmony.simulate.scanners import PRESETS

VENDOR_FIELDS = ("Manufacturer", "ManufacturersModelName", "MagneticFieldStrength",
                 "DeviceSerialNumber", "SoftwareVersions", "EchoTime", "RepetitionTime")
SITES = ("ge", "siemens", "philips")


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _dwi_runs(root: Path) -> list[Path]:
    return sorted(root.glob("sub-*/ses-*/dwi/*_dwi.nii.gz"))


@pytest.fixture(scope="module")
def noisy_ds(tmp_path_factory) -> Path:
    return simulate_dataset(tmp_path_factory.mktemp("sim") / "noisy", seed=11,
                            subjects_per_site=1, traveling_subjects=1, voxel_size=3.5,
                            progress=False)


@pytest.fixture(scope="module")
def noisefree_ds(tmp_path_factory) -> Path:
    return simulate_dataset(tmp_path_factory.mktemp("sim") / "noisefree", seed=5,
                            subjects_per_site=0, traveling_subjects=1, snr=None,
                            native_groundtruth=True, progress=False)


# ------------------------------------------------------------------ BIDS structure
def test_pybids_indexes_with_validation(noisy_ds):
    from bids import BIDSLayout

    layout = BIDSLayout(str(noisy_ds), validate=True)
    assert sorted(layout.get_sessions()) == sorted(SITES)
    assert set(layout.get_subjects()) == {"ge01", "siemens01", "philips01", "trav01"}
    runs = layout.get(suffix="dwi", extension=".nii.gz")
    assert len(runs) == 6
    trav = layout.get(subject="trav01", suffix="dwi", extension=".nii.gz")
    assert sorted(r.entities["session"] for r in trav) == sorted(SITES)


def test_gradients_match_volumes_and_sidecars(noisy_ds):
    runs = _dwi_runs(noisy_ds)
    assert len(runs) == 6
    for run in runs:
        stem = str(run)[: -len(".nii.gz")]
        n = nib.load(run).shape[3]
        bvals = np.loadtxt(stem + ".bval", ndmin=1)
        bvecs = np.loadtxt(stem + ".bvec", ndmin=2)
        assert bvals.size == n and bvecs.shape == (3, n), run.name
        dw = bvals > 50
        np.testing.assert_allclose(np.linalg.norm(bvecs[:, dw], axis=0), 1.0, atol=1e-5)
        meta = json.loads(Path(stem + ".json").read_text())
        assert set(VENDOR_FIELDS) <= set(meta), run.name
        site = run.parent.parent.name.removeprefix("ses-")
        assert meta["Manufacturer"] == PRESETS[site].vendor
        assert meta["EchoTime"] == pytest.approx(PRESETS[site].te_ms / 1000)
        if meta["Manufacturer"] != "Philips":
            assert {"PhaseEncodingDirection", "TotalReadoutTime"} <= set(meta)
        # sform/qform set, voxel size as requested
        img = nib.load(run)
        assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
        np.testing.assert_allclose(img.header.get_zooms()[:3], 3.5, atol=1e-5)


def test_participants_and_sessions(noisy_ds):
    p = pd.read_csv(noisy_ds / "participants.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert list(p.columns[:5]) == ["participant_id", "site", "age", "sex", "dx"]
    trav = p.set_index("participant_id").loc["sub-trav01"]
    assert trav["site"] == "n/a" and trav["traveling"] == "yes"
    assert set(p["dx"]) <= {"0", "1"} and set(p["sex"]) <= {"M", "F"}
    for row in p.itertuples():
        ses = pd.read_csv(noisy_ds / row.participant_id / f"{row.participant_id}_sessions.tsv",
                          sep="\t", dtype=str)
        assert list(ses["session_id"]) == [f"ses-{s}" for s in ses["site"]]
        if row.site != "n/a":
            assert list(ses["site"]) == [row.site]
            lo, hi = PRESETS[row.site].age_range
            assert lo <= float(row.age) <= hi
    desc = json.loads((noisy_ds / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "raw" and "BIDSVersion" in desc


def test_bids_validator_passes(noisy_ds, repo_root):
    exe = shutil.which("bids-validator-deno") or str(repo_root / ".venv/bin/bids-validator-deno")
    if not Path(exe).exists():
        pytest.skip("bids-validator-deno not installed (pip install bids-validator-deno)")
    try:
        out = subprocess.run([exe, str(noisy_ds), "--format", "json"], capture_output=True,
                             text=True, timeout=180)
        report = json.loads(out.stdout)
    except (subprocess.TimeoutExpired, json.JSONDecodeError, OSError) as exc:
        pytest.skip(f"bids-validator-deno could not run here: {exc}")
    errors = [i for i in report["issues"]["issues"] if i["severity"] == "error"]
    assert errors == [], errors[:3]


# ------------------------------------------------------------------ ground truth
def test_groundtruth_files(noisy_ds):
    gt = noisy_ds / "derivatives" / "groundtruth"
    desc = json.loads((gt / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"]
    tpl = load_phantom_template()
    for run in _dwi_runs(noisy_ds):
        sub, ses = run.parts[-4], run.parts[-3]
        for m in ("fa", "md", "ad", "rd"):
            f = gt / sub / ses / "dwi" / f"{sub}_{ses}_space-phantom_model-tensor_param-{m}" \
                "_dwimap.nii.gz"
            img = nib.load(f)
            assert img.shape == tpl["fa"].shape
            np.testing.assert_allclose(img.affine, tpl["affine"])
        fa = nib.load(gt / sub / ses / "dwi" /
                      f"{sub}_{ses}_space-phantom_model-tensor_param-fa_dwimap.nii.gz").get_fdata()
        assert 0.0 <= fa.min() and 0.7 < fa.max() < 1.0
        assert (gt / sub / ses / "xfm" / f"{sub}_{ses}_from-scanner_to-phantom_desc-affine_xfm"
                ".txt").is_file()
        assert (gt / sub / "xfm" / f"{sub}_from-anat_to-phantom_desc-warp_xfm.nii.gz").is_file()
    # the bundled template is copied next to the maps
    assert (gt / "tpl-phantom" / "phantom_labels.nii.gz").is_file()
    roi = pd.read_csv(gt / "roi_groundtruth.tsv", sep="\t")
    assert len(roi) == 6 * (len(LABELS) + 1) * 4


def test_true_effects_are_where_they_were_put(noisy_ds):
    gt = noisy_ds / "derivatives" / "groundtruth"
    eff = pd.read_csv(gt / "effects.tsv", sep="\t")
    meta = json.loads((gt / "effects.json").read_text())
    dx_rois = set(meta["EffectModel"]["dx_rois"])
    assert set(eff["site"]) == {"tissue", *SITES}
    fa_dx = eff[(eff.term == "dx") & (eff.metric == "fa")]
    inside = fa_dx[fa_dx.roi.isin(dx_rois)]
    outside = fa_dx[~fa_dx.roi.isin(dx_rois) & (fa_dx.roi != "AverageWM")]
    assert (inside.value < -0.01).all()
    assert outside.value.abs().max() < 0.1 * inside.value.abs().min()
    md_dx = eff[(eff.term == "dx") & (eff.metric == "md") & eff.roi.isin(dx_rois)]
    assert (md_dx.value > 0).all()
    age = eff[(eff.term == "age") & (eff.metric == "fa") & (eff.roi != "AverageWM")]
    assert (age.value < 0).all()
    # the genu ages faster (age multiplier 1.4 on the corpus callosum)
    t = age[age.site == "tissue"].set_index("roi").value
    assert t["GCC"] < t["SLF-L"]


def test_noise_free_dti_recovers_groundtruth_fa(noisefree_ds):
    """Acceptance: plain DIPY DTI on noise-free traveling-subject scans, median |dFA| < 0.02."""
    gt = noisefree_ds / "derivatives" / "groundtruth"
    tpl = load_phantom_template()
    sub = "sub-trav01"
    stats = {}
    for site in SITES:
        ses = f"ses-{site}"
        stem = f"{sub}_{ses}"
        d = noisefree_ds / sub / ses / "dwi"
        img = nib.load(d / f"{stem}_dwi.nii.gz")
        data = img.get_fdata()
        bv = np.loadtxt(d / f"{stem}_dwi.bval")
        bvec = np.loadtxt(d / f"{stem}_dwi.bvec")
        aff, warp = load_scan_transform(
            gt / sub / ses / "xfm" / f"{stem}_from-scanner_to-phantom_desc-affine_xfm.txt",
            gt / sub / "xfm" / f"{sub}_from-anat_to-phantom_desc-warp_xfm.nii.gz")
        wm = resample_to_scan(tpl["tissue"], img, aff, warp, order=0) == 3
        fa_t = nib.load(gt / sub / ses / "dwi" /
                        f"{stem}_space-phantom_model-tensor_param-fa_dwimap.nii.gz")
        fa_gt = resample_to_scan(fa_t, img, aff, warp, order=1)
        fa_nat = nib.load(gt / sub / ses / "dwi" /
                          f"{stem}_model-tensor_param-fa_dwimap.nii.gz").get_fdata()
        low = bv < 1100  # the b = 1000 shell and b0 (ENIGMA-DTI practice for multi-shell)
        fit = TensorModel(gradient_table(bv[low], bvecs=bvec[:, low])).fit(data[..., low],
                                                                            mask=wm)
        err_t = np.median(np.abs(fit.fa - fa_gt)[wm])
        err_n = np.median(np.abs(fit.fa - fa_nat)[wm])
        assert wm.sum() > 3000
        assert err_t < 0.02, f"{site}: median |FA - GT| = {err_t:.4f}"
        assert err_n < 0.01, f"{site}: median |FA - native GT| = {err_n:.4f}"
        fit_all = TensorModel(gradient_table(bv, bvecs=bvec)).fit(data, mask=wm)
        md_gt = resample_to_scan(nib.load(gt / sub / ses / "dwi" /
                                          f"{stem}_space-phantom_model-tensor_param-md_dwimap"
                                          ".nii.gz"), img, aff, warp)
        stats[site] = {"md_ratio": np.median(fit_all.md[wm] / md_gt[wm]),
                       "fa_all": np.median(fit_all.fa[wm]), "fa_low": np.median(fit.fa[wm]),
                       "err_all": np.median(np.abs(fit_all.fa - fa_gt)[wm])}
    # physics: the higher the b-values, the lower the DTI MD relative to b -> 0
    assert stats["philips"]["md_ratio"] > stats["ge"]["md_ratio"] > stats["siemens"]["md_ratio"]
    # adding b = 2000 raises FA (the extra-axonal signal decays first)
    assert stats["siemens"]["fa_all"] > stats["siemens"]["fa_low"]
    assert stats["siemens"]["err_all"] < 0.03


def _wm_in_scan(ds: Path, sub: str, ses: str, img) -> np.ndarray:
    gt = ds / "derivatives" / "groundtruth"
    stem = f"{sub}_{ses}"
    aff, warp = load_scan_transform(
        gt / sub / ses / "xfm" / f"{stem}_from-scanner_to-phantom_desc-affine_xfm.txt",
        gt / sub / "xfm" / f"{sub}_from-anat_to-phantom_desc-warp_xfm.nii.gz")
    return resample_to_scan(load_phantom_template()["tissue"], img, aff, warp, order=0) == 3


def test_noisy_traveling_subject_differs_between_sites(noisy_ds):
    """At the sites' SNR the same brain gives different MD: higher b -> lower MD."""
    sub = "sub-trav01"
    md = {}
    for site in SITES:
        stem = f"{sub}_ses-{site}"
        d = noisy_ds / sub / f"ses-{site}" / "dwi"
        img = nib.load(d / f"{stem}_dwi.nii.gz")
        bv = np.loadtxt(d / f"{stem}_dwi.bval")
        bvec = np.loadtxt(d / f"{stem}_dwi.bvec")
        wm = _wm_in_scan(noisy_ds, sub, f"ses-{site}", img)
        fit = TensorModel(gradient_table(bv, bvecs=bvec)).fit(img.get_fdata(), mask=wm)
        md[site] = np.median(fit.md[wm])
    assert md["philips"] > md["ge"] > md["siemens"]
    assert md["philips"] / md["siemens"] > 1.1


# ------------------------------------------------------------------ determinism and CLI
def test_same_seed_identical_files_different_seed_different_subjects(tmp_path):
    kw = dict(sites=["philips"], subjects_per_site=1, traveling_subjects=0, voxel_size=4.0,
              progress=False)
    a = simulate_dataset(tmp_path / "a", seed=3, **kw)
    b = simulate_dataset(tmp_path / "b", seed=3, **kw)
    ha, hb = _hashes(a), _hashes(b)
    assert ha == hb and len(ha) > 15
    c = simulate_dataset(tmp_path / "c", seed=4, **kw)
    hc = _hashes(c)
    dwi = "sub-philips01/ses-philips/dwi/sub-philips01_ses-philips_dwi.nii.gz"
    assert hc[dwi] != ha[dwi]
    pa = pd.read_csv(a / "participants.tsv", sep="\t")
    pc = pd.read_csv(c / "participants.tsv", sep="\t")
    assert not np.allclose(pa["age"], pc["age"])
    # gzip headers carry no time stamp
    raw = (a / dwi).read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\x00\x00\x00\x00"


def test_refuses_to_overwrite_and_bad_arguments(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(SimulationError, match="not empty"):
        simulate_dataset(tmp_path / "x", sites=["ge"], subjects_per_site=1,
                         traveling_subjects=0, progress=False)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"
    with pytest.raises(SimulationError, match="nothing to simulate"):
        simulate_dataset(tmp_path / "y", subjects_per_site=0, traveling_subjects=0,
                         progress=False)
    with pytest.raises(SimulationError, match="duplicate"):
        simulate_dataset(tmp_path / "z", sites=["ge", "ge"], progress=False)


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli_main([str(out), "--seed", "1", "--subjects-per-site", "1",
                   "--traveling-subjects", "0", "--sites", "ge", "--voxel-size", "4",
                   "--snr", "30", "--quiet"])
    assert rc == 0
    assert "BIDS dataset" in capsys.readouterr().out
    meta = json.loads((out / "sub-ge01/ses-ge/dwi/sub-ge01_ses-ge_dwi.json").read_text())
    assert meta["Manufacturer"] == "GE"
    rc = cli_main([str(tmp_path / "bad"), "--sites", "hitachi", "--quiet"])
    assert rc == 2
    assert "unknown site preset" in capsys.readouterr().err
