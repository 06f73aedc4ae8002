"""Participant workflow: embedding, accuracy against ground truth, DIPY's real data, caching."""

from __future__ import annotations

import json
import os
import shutil

os.environ.setdefault("NIPYPE_NO_ET", "1")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dmriharmony.cli.run import main  # noqa: E402
from dmriharmony.dti.synthetic import write_bids_dataset  # noqa: E402
from dmriharmony.workflows.participant import (  # noqa: E402
    OUTPUT_FIELDS,
    ParticipantOptions,
    init_participant_wf,
)

SMALL = {"shape": (12, 12, 6), "n_dirs": 15}


def _node_result(graph, name):
    for node in graph.nodes():
        if node.name == name:
            return node.result.outputs
    raise AssertionError(f"no node {name}")


def _wm_error(fa_file, truth_file, labels_file):
    """Median |FA - truth| over WM (a downstream node, proving the outputnode is wired)."""
    import nibabel as nib
    import numpy as np

    fa = np.asarray(nib.load(fa_file).dataobj)
    truth = np.load(truth_file)
    wm = np.load(labels_file) == 2
    return float(np.median(np.abs(fa[wm] - truth[wm])))


def _load(path):
    return np.asarray(nib.load(str(path)).dataobj)


def test_participant_wf_embeds_and_fits(tmp_path):
    root = tmp_path / "ds"
    truth = write_bids_dataset(root, ("01",), snr=200, **SMALL)
    d = root / "sub-01" / "dwi"
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    np.save(tmp_path / "truth.npy", truth["01"])
    np.save(tmp_path / "labels.npy", truth["labels"])
    dti = init_participant_wf(options=ParticipantOptions(fit_method="ols"), name="dti")
    assert set(dti.get_node("outputnode").inputs.copyable_trait_names()) == set(OUTPUT_FIELDS)
    dti.inputs.inputnode.dwi_file = str(d / "sub-01_dwi.nii.gz")
    dti.inputs.inputnode.bval_file = str(d / "sub-01_dwi.bval")
    dti.inputs.inputnode.bvec_file = str(d / "sub-01_dwi.bvec")
    score = pe.Node(niu.Function(input_names=["fa_file", "truth_file", "labels_file"],
                                 output_names=["error"], function=_wm_error), name="score")
    score.inputs.truth_file = str(tmp_path / "truth.npy")
    score.inputs.labels_file = str(tmp_path / "labels.npy")
    outer = pe.Workflow(name="outer", base_dir=str(tmp_path / "work"))
    outer.connect(dti, "outputnode.fa", score, "fa_file")
    graph = outer.run()
    assert _node_result(graph, "score").error < 0.02
    out = _node_result(graph, "fit_tensor")
    fa = _load(out.fa)
    assert out.fit_info["FitMethod"] == "ols"
    assert out.fit_info["ShellsUsed"] == [0, 1000]
    assert _load(out.tensor).shape == fa.shape + (6,)
    assert _load(out.v1).shape == fa.shape + (3,)


def test_high_snr_fa_within_002_through_cli(tmp_path, capsys):
    """Acceptance: median |FA - truth| over WM < 0.02 at high SNR, multi-shell input."""
    root = tmp_path / "ds"
    truth = write_bids_dataset(root, ("01", "02"), snr=80, bvalues=(1000.0, 2000.0),
                               shape=(16, 16, 8), n_dirs=30)
    out = tmp_path / "out"
    assert main([str(root), str(out), "participant"]) == 0
    deriv = out / "dmriharmony"
    wm = truth["labels"] == 2
    for sub in ("01", "02"):
        base = deriv / f"sub-{sub}" / "dwi" / f"sub-{sub}_model-tensor_param-fa_dwimap"
        fa = _load(f"{base}.nii.gz")
        err = np.median(np.abs(fa[wm] - truth[sub][wm]))
        assert err < 0.02, (sub, err)
        meta = json.loads(open(f"{base}.json").read())
        # b = 2000 excluded by the default b <= 1500
        assert meta["Model"]["Parameters"]["ShellsUsed"] == [0, 1000]
        assert meta["Model"]["FitMethod"] == "wls"
        assert meta["Sources"] == [f"bids:raw:sub-{sub}/dwi/sub-{sub}_dwi.nii.gz"]
        assert set(meta["ToolVersions"]) >= {"dmriharmony", "dipy", "nipype"}
        assert meta["Options"]["denoise"] == "none" and meta["Options"]["gibbs"] is False
        qc = (deriv / f"sub-{sub}" / "dwi" / f"sub-{sub}_model-tensor_qc.tsv").read_text()
        header, row = qc.strip().split("\n")
        values = dict(zip(header.split("\t"), row.split("\t")))
        assert float(values["snr"]) == pytest.approx(80, rel=0.2)
        assert 0 <= float(values["outlier_fraction"]) < 0.05
        assert float(values["residual_rmse"]) < 0.05
    desc = json.loads((deriv / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "dmriharmony"
    assert "model-tensor" in (deriv / ".bidsignore").read_text() or \
        "*_dwimap.nii.gz" in (deriv / ".bidsignore").read_text()
    table = (deriv / "site_table.tsv").read_text().splitlines()
    assert len(table) == 3 and table[0].startswith("subject\tsession")


def test_real_small_64d_through_workflow(tmp_path):
    """DIPY's real small_64D through the CLI equals a bare DIPY WLS fit on the same mask."""
    from dipy.core.gradients import gradient_table
    from dipy.data import get_fnames
    from dipy.reconst.dti import TensorModel

    fdata, fbval, fbvec = get_fnames(name="small_64D")
    root = tmp_path / "ds"
    d = root / "sub-real" / "dwi"
    d.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "small_64D", "BIDSVersion": "1.10.0"}))
    shutil.copy(fdata, d / "sub-real_dwi.nii")
    shutil.copy(fbval, d / "sub-real_dwi.bval")
    shutil.copy(fbvec, d / "sub-real_dwi.bvec")  # NaN b-vector on the b=0 volume: tolerated
    out = tmp_path / "out"
    assert main([str(root), str(out), "participant"]) == 0
    dd = out / "dmriharmony" / "sub-real" / "dwi"
    fa = _load(dd / "sub-real_model-tensor_param-fa_dwimap.nii.gz")
    md = _load(dd / "sub-real_model-tensor_param-md_dwimap.nii.gz")
    mask = _load(dd / "sub-real_desc-brain_mask.nii.gz") > 0
    data = np.asarray(nib.load(fdata).dataobj, np.float64)
    bvals = np.loadtxt(fbval)
    bvecs = np.nan_to_num(np.loadtxt(fbvec))  # small_64D stores N rows of 3
    assert bvecs.shape == (len(bvals), 3)
    dw = bvals > 50
    bvecs[dw] /= np.linalg.norm(bvecs[dw], axis=1, keepdims=True)
    ref = TensorModel(gradient_table(bvals, bvecs=bvecs)).fit(np.clip(data, 1e-6, None),
                                                               mask=mask)
    np.testing.assert_allclose(fa[mask], np.clip(ref.fa[mask], 0, 1), atol=1e-5)
    np.testing.assert_allclose(md[mask], ref.md[mask], rtol=1e-4, atol=1e-9)
    assert np.all(fa[~mask] == 0)


def test_rerun_reuses_finished_nodes(tmp_path):
    root = tmp_path / "ds"
    write_bids_dataset(root, ("01",), **SMALL)
    out, work = tmp_path / "out", tmp_path / "work"
    args = [str(root), str(out), "participant", "-w", str(work)]
    assert main(args) == 0
    results = sorted(work.glob("**/fit_tensor/result_fit_tensor.pklz"))
    assert len(results) == 1
    stamp = results[0].stat().st_mtime_ns
    fa = next(out.glob("**/*param-fa_dwimap.nii.gz"))
    fa.unlink()  # a deleted output is restored from the cache
    assert main(args) == 0
    assert results[0].stat().st_mtime_ns == stamp  # the fit was not re-run
    assert fa.exists()
    # a changed option re-runs the fit
    assert main(args + ["--fit-method", "ols"]) == 0
    assert results[0].stat().st_mtime_ns != stamp


def test_split_shells_and_sessions_through_cli(tmp_path):
    root = tmp_path / "ds"
    truth = write_bids_dataset(root, ("01",), sessions=("A", "B"), bvalues=(1000.0, 2500.0),
                               split_shells=True, inherit=True, snr=100, **SMALL)
    out = tmp_path / "out"
    assert main([str(root), str(out), "participant", "--session-label", "B"]) == 0
    dd = out / "dmriharmony" / "sub-01" / "ses-B" / "dwi"
    names = sorted(p.name for p in dd.iterdir())
    assert "sub-01_ses-B_model-tensor_param-fa_dwimap.nii.gz" in names
    assert not (out / "dmriharmony" / "sub-01" / "ses-A").exists()
    meta = json.loads((dd / "sub-01_ses-B_model-tensor_param-fa_dwimap.json").read_text())
    assert len(meta["Sources"]) == 2 and all("acq-" in s for s in meta["Sources"])
    fa = _load(dd / "sub-01_ses-B_model-tensor_param-fa_dwimap.nii.gz")
    wm = truth["labels"] == 2
    assert np.median(np.abs(fa[wm] - truth["01"][wm])) < 0.02


@pytest.mark.parametrize("extra", [
    ["--denoise", "mppca"], ["--fit-method", "restore"],
    # MultiProc polls its workers every few seconds: ~15 s of wall time for a tiny job
    pytest.param(["--nprocs", "2", "--omp-nthreads", "1"], marks=pytest.mark.slow),
    ["--plugin", "Linear", "--plugin-args", "{}"],
])
def test_options_run(tmp_path, extra):
    root = tmp_path / "ds"
    truth = write_bids_dataset(root, ("01",), snr=60, **SMALL)
    out = tmp_path / "out"
    assert main([str(root), str(out), "participant", *extra]) == 0
    fa_file = next(out.glob("**/*param-fa_dwimap.nii.gz"))
    fa = _load(fa_file)
    wm = truth["labels"] == 2
    assert np.median(np.abs(fa[wm] - truth["01"][wm])) < 0.05
    meta = json.loads(fa_file.with_name(fa_file.name.replace(".nii.gz", ".json")).read_text())
    if "--denoise" in extra:
        assert meta["Preprocessing"]["Denoising"] == "mppca"
    if "restore" in extra:
        assert meta["Model"]["FitMethod"] == "restore"


@pytest.mark.slow
def test_gibbs_option_runs(tmp_path):
    root = tmp_path / "ds"
    write_bids_dataset(root, ("01",), snr=60, **SMALL)
    out = tmp_path / "out"
    assert main([str(root), str(out), "participant", "--gibbs"]) == 0
    meta = json.loads(next(out.glob("**/*param-fa_dwimap.json")).read_text())
    assert meta["Preprocessing"]["GibbsRemoval"] is True
