"""Registration, per-run TBSS and the Nipype workflows on the real ENIGMA template.

For speed the ENIGMA-DTI template (ENIGMA-git/ENIGMA-DTI-TBSS-Protocol) is block-averaged to
4 mm and re-skeletonised; the "subject" is that FA moved by a known rigid motion (3/-2/5 degrees,
4/-3/2 mm) plus a smooth random warp (1.5 voxels peak, seed 1). The full 1 mm route is the slow
test ``test_enigma_route_end_to_end_1mm``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dmriharmony.errors import TemplateError
from dmriharmony.tbss.io import load_image, save_nifti
from dmriharmony.tbss.pipeline import output_names, run_tbss
from dmriharmony.tbss.project import project_onto_skeleton
from dmriharmony.tbss.register import Registration, RegistrationConfig, rotation_angle_deg
from dmriharmony.tbss.roi import extract_rois
from dmriharmony.tbss.synthetic import deform, downsample_template, rigid_matrix
from dmriharmony.tbss.templates import enigma_template

RIGID = rigid_matrix((3.0, -2.0, 5.0), (4.0, -3.0, 2.0))
FAST = RegistrationConfig(affine_iters=[100, 50], syn_iters=[20, 10])


@pytest.fixture(scope="module")
def small_enigma(enigma_dir):
    return downsample_template(enigma_template(enigma_dir), 4)


@pytest.fixture(scope="module")
def subject(small_enigma, tmp_path_factory):
    tpl = small_enigma
    d = tmp_path_factory.mktemp("subject")
    fa = deform(tpl.fa, tpl.affine, RIGID, warp_voxels=1.5, seed=1)
    md = np.where(fa > 0, 1e-3 * (1.0 - 0.5 * fa), 0.0)
    paths = {"FA": d / "sub-01_fa.nii.gz", "MD": d / "sub-01_md.nii.gz"}
    save_nifti(fa, tpl.affine, paths["FA"])
    save_nifti(md, tpl.affine, paths["MD"])
    return fa, md, paths


@pytest.fixture(scope="module")
def tbss_outputs(small_enigma, subject, tmp_path_factory):
    out = tmp_path_factory.mktemp("tbss")
    _, _, paths = subject
    return run_tbss(paths["FA"], small_enigma, out / "sub-01_ses-A", {"MD": paths["MD"]},
                    session="A", config=FAST)


def _self_rois(tpl, others=None, fa=None):
    fa = tpl.fa if fa is None else fa
    proj = project_onto_skeleton(fa, tpl.skeleton, tpl.distance, tpl.search_directions,
                                 others, voxel_size=tpl.voxel_size)
    return {k: extract_rois(v, tpl.roi_mask, tpl.labels, tpl.label_table)
            for k, v in proj.items() if k != "source_index"}


def test_registration_recovers_known_motion(small_enigma, subject, tbss_outputs):
    tpl = small_enigma
    fa, _, _ = subject
    reg = Registration.load(tbss_outputs["affine"], tbss_outputs["warp"])
    # the affine maps template world to subject world: it approximates the applied motion
    assert np.abs(reg.affine[:3, :3] - RIGID[:3, :3]).max() < 0.05
    assert np.abs(reg.affine[:3, 3] - RIGID[:3, 3]).max() < 2.0
    brain = tpl.mask
    before = np.corrcoef(fa[brain], tpl.fa[brain])[0, 1]
    after = np.corrcoef(reg.transform(fa)[brain], tpl.fa[brain])[0, 1]
    assert before < 0.8 and after > 0.95


def test_tbss_run_outputs_and_accuracy(small_enigma, tbss_outputs):
    tpl = small_enigma
    out = tbss_outputs
    for key in ("warped_fa", "warped_md", "skeleton_fa", "skeleton_md", "roi_tsv", "qc_tsv",
                "qc_png", "affine", "warp"):
        assert key in out, key
    assert "space-ENIGMA4_model-tensor_param-fa_dwimap" in out["warped_fa"]
    qc = pd.read_csv(out["qc_tsv"], sep="\t", dtype={"subject": str})
    assert qc.loc[0, "subject"] == "01" and qc.loc[0, "fa_template_corr"] > 0.95
    # the QC row carries the linear transform's head rotation (the known motion's angle)
    assert qc.loc[0, "rotation_deg"] == pytest.approx(rotation_angle_deg(RIGID), abs=1.5)
    assert qc.loc[0, "linear_pyramid"] in ("configured", "finer")
    rows = pd.read_csv(out["roi_tsv"], sep="\t", dtype={"subject": str, "session": str})
    assert list(rows["metric"]) == ["FA", "MD"] and rows.loc[0, "session"] == "A"
    # Reference: the template itself moved by the exact motion and moved back by its exact
    # inverse (no warp). At 4 mm the two linear interpolations alone lower skeleton FA by ~0.03,
    # so registration + projection are judged by how little they add to that floor.
    oracle = deform(deform(tpl.fa, tpl.affine, RIGID), tpl.affine, np.linalg.inv(RIGID))

    def md_of(f):
        return np.where(f > 0, 1e-3 * (1 - 0.5 * f), 0)

    truth = _self_rois(tpl, {"MD": md_of(tpl.fa)})
    floor = _self_rois(tpl, {"MD": md_of(oracle)}, fa=oracle)
    ours = rows.set_index("metric")
    idx = truth["FA"].index
    fa_err = (ours.loc["FA", idx] - truth["FA"]["Average"]).abs()
    floor_err = (floor["FA"]["Average"] - truth["FA"]["Average"]).abs()
    assert fa_err["AverageFA"] < floor_err["AverageFA"] + 0.01
    assert fa_err.median() < floor_err.median() + 0.015  # 4 mm voxels: a coarse check
    md_err = (ours.loc["MD", idx] - truth["MD"]["Average"]).abs()
    assert md_err["AverageFA"] < 5e-5
    skel = load_image(out["skeleton_fa"]).get_fdata()
    assert np.all(skel[~tpl.skeleton] == 0) and np.mean(skel[tpl.skeleton] > 0) > 0.99
    assert open(out["qc_png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_saved_transforms_reproduce_the_run(small_enigma, subject, tbss_outputs, tmp_path):
    _, _, paths = subject
    reg = Registration.load(tbss_outputs["affine"], tbss_outputs["warp"])
    fa_img = load_image(paths["FA"])
    warped = np.where(small_enigma.mask, np.clip(reg.transform(fa_img.get_fdata()), 0, 1), 0)
    saved = load_image(tbss_outputs["warped_fa"]).get_fdata()
    np.testing.assert_allclose(warped, saved, atol=1e-5)
    again = run_tbss(paths["FA"], small_enigma, tmp_path / "sub-01_ses-A",
                     transforms=(tbss_outputs["affine"], tbss_outputs["warp"]))
    assert again["affine"] != tbss_outputs["affine"]
    np.testing.assert_allclose(load_image(again["skeleton_fa"]).get_fdata(),
                               load_image(tbss_outputs["skeleton_fa"]).get_fdata(), atol=1e-6)
    with pytest.raises(TemplateError, match="needs the template and subject images"):
        Registration.load(tbss_outputs["affine"])


def test_run_errors_name_the_file(small_enigma, subject, tmp_path):
    _, _, paths = subject
    bad = tmp_path / "sub-01_md.nii.gz"
    save_nifti(np.ones((5, 5, 5), np.float32), np.eye(4), bad)
    with pytest.raises(TemplateError, match="sub-01_md.nii.gz"):
        run_tbss(paths["FA"], small_enigma, tmp_path / "sub-01", {"MD": bad})
    with pytest.raises(TemplateError, match="not found or empty"):
        run_tbss(tmp_path / "missing_fa.nii.gz", small_enigma, tmp_path / "sub-01")
    names = output_names(tmp_path / "sub-02_run-1", "phantom")
    assert names["roi_tsv"].endswith("sub-02_run-1_space-phantom_desc-skeleton_roi.tsv")


def test_nipype_workflows(small_enigma, subject, tmp_path):
    from dmriharmony.workflows.tbss import init_tbss_group_wf, init_tbss_wf

    _, _, paths = subject
    tpl_dir = small_enigma.save(tmp_path / "tpl")
    wf = init_tbss_wf(name="tbss_sub01", template_source="folder", template_dir=str(tpl_dir),
                      registration={"syn_iters": [5], "affine_iters": [20, 10]})
    wf.base_dir = str(tmp_path / "work")
    wf.inputs.inputnode.fa = str(paths["FA"])
    wf.inputs.inputnode.md = str(paths["MD"])
    wf.inputs.inputnode.prefix = "sub-01"
    res = wf.run(plugin="Linear")
    run_node = [n for n in res.nodes() if n.name == "tbss_run"][0]
    outs = run_node.result.outputs
    rows = pd.read_csv(outs.roi_tsv, sep="\t", dtype={"subject": str})
    assert rows.loc[0, "subject"] == "01" and "GCC" in rows.columns
    parts = tmp_path / "participants.tsv"
    pd.DataFrame({"participant_id": ["sub-01"], "age": [31], "site": ["GE"]}).to_csv(
        parts, sep="\t", index=False)
    gwf = init_tbss_group_wf()
    gwf.base_dir = str(tmp_path / "work")
    gwf.inputs.inputnode.roi_files = [outs.roi_tsv]
    gwf.inputs.inputnode.skeleton_fa = [outs.skeleton_fa, outs.skeleton_fa]
    gwf.inputs.inputnode.participants_tsv = str(parts)
    gres = gwf.run(plugin="Linear")
    tnode = [n for n in gres.nodes() if n.name == "roi_table"][0]
    table = pd.read_csv(tnode.result.outputs.roi_table, sep="\t", dtype={"subject": str})
    assert table.loc[0, "age"] == 31 and table.loc[0, "site"] == "GE"
    merged = [n for n in gres.nodes() if n.name == "merge_skeletons"][0]
    assert load_image(merged.result.outputs.out_file).shape[3:] == (2,)


@pytest.mark.slow
def test_enigma_route_end_to_end_1mm(enigma_dir, tmp_path):
    """The real 1 mm ENIGMA route: subject = ENIGMA FA x a known motion, ENIGMA's own skeleton,
    distance map, JHU labels and mean_FA_skeleton."""
    tpl = enigma_template(enigma_dir)
    fa = deform(tpl.fa, tpl.affine, RIGID, warp_voxels=3.0, smoothness_voxels=10, seed=1)
    save_nifti(fa, tpl.affine, tmp_path / "sub-01_fa.nii.gz")
    out = run_tbss(tmp_path / "sub-01_fa.nii.gz", tpl, tmp_path / "sub-01")
    rows = pd.read_csv(out["roi_tsv"], sep="\t").set_index("metric")
    truth = _self_rois(tpl)["FA"]["Average"]
    err = (rows.loc["FA", truth.index] - truth).abs()
    qc = pd.read_csv(out["qc_tsv"], sep="\t")
    assert qc.loc[0, "fa_template_corr"] > 0.95
    assert err["AverageFA"] < 0.01 and err.median() < 0.02


def test_study_workflows_build():
    """The study-template route as graphs: a JoinNode over an iterable, and the MapNode route."""
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    from dmriharmony.workflows.tbss import init_study_tbss_wf, init_study_template_wf

    parent = pe.Workflow(name="parent")
    runs = pe.Node(niu.IdentityInterface(fields=["fa"]), name="runs")
    runs.iterables = ("fa", ["a.nii.gz", "b.nii.gz"])
    study = init_study_template_wf(joinsource="runs")
    parent.connect(runs, "fa", study, "inputnode.fa_files")
    node = study.get_node("study_template")
    assert isinstance(node, pe.JoinNode) and node.joinfield == ["fa_files"]
    wf = init_study_tbss_wf(registration={"syn_iters": [5]})
    names = {n.name for n in wf._get_all_nodes()}
    assert {"study_template", "tbss_run", "roi_table", "merge_skeletons"} <= names
    run = [n for n in wf._get_all_nodes() if n.name == "tbss_run"][0]
    assert isinstance(run, pe.MapNode) and "fa" in run.iterfield
    assert run.inputs.syn_iters == [5]
