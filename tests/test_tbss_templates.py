"""TBSS templates: phantom, ENIGMA folder, dmriharmony folder, TemplateFlow and study template.

TemplateFlow is exercised offline: each check runs in a subprocess whose ``TEMPLATEFLOW_HOME``
is a folder of small files made here, with HTTP(S) proxies pointing at a closed local port so any
download attempt fails at once with a ConnectionError (no test touches the network).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dmriharmony.errors import TemplateError
from dmriharmony.tbss.skeleton import thick_voxels
from dmriharmony.tbss.synthetic import deform, rigid_matrix
from dmriharmony.tbss.templates import (
    ENIGMA_FILES,
    enigma_template,
    load_template,
    load_template_dir,
    phantom_template,
)

SPACE = "MNI152NLin6Asym"


@pytest.fixture(scope="module")
def phantom():
    pytest.importorskip("dmriharmony.simulate.template")
    return phantom_template()


def test_phantom_template_skeleton_thin_and_covers_every_bundle(phantom):
    tpl = phantom
    assert tpl.name == "phantom" and tpl.threshold == 0.2
    assert thick_voxels(tpl.skeleton, tpl.directions).sum() == 0
    assert tpl.fa[tpl.skeleton].min() > 0.2
    for index, abbrev in zip(tpl.label_table["index"], tpl.label_table["abbreviation"]):
        on = np.sum((tpl.labels == index) & tpl.skeleton)
        assert on >= 10, f"bundle {abbrev} has only {on} skeleton voxels"
    assert np.array_equal(tpl.distance == 0, ~tpl.mask | tpl.skeleton)
    # deterministic and cached: same arrays twice
    again = phantom_template()
    assert np.array_equal(again.skeleton, tpl.skeleton)


def test_template_folder_roundtrip(phantom, tmp_path):
    folder = phantom.save(tmp_path / "tpl")
    manifest = json.loads((folder / "template.json").read_text())
    assert manifest["name"] == "phantom" and "directions" in manifest["files"]
    back = load_template(folder)
    for role in ("fa", "mask", "skeleton", "distance", "labels"):
        np.testing.assert_array_equal(getattr(back, role), getattr(phantom, role))
    np.testing.assert_array_equal(back.directions, phantom.directions)
    assert list(back.label_table["abbreviation"]) == list(phantom.label_table["abbreviation"])
    (folder / "tpl_skeleton.nii.gz").write_bytes(b"")
    with pytest.raises(TemplateError, match="tpl_skeleton.nii.gz"):
        load_template_dir(folder)


def test_enigma_template_traps(enigma_dir):
    tpl = enigma_template(enigma_dir)
    assert tpl.source == "enigma" and tpl.name == "ENIGMA"
    assert 0.85 < tpl.fa.max() < 1.0  # FA x 10^4 undone
    assert tpl.mask.sum() == 1392134 and tpl.skeleton.sum() == 117139
    assert tpl.roi_mask.sum() >= 112889  # mean_FA_skeleton used for ROI means
    assert len(tpl.label_table) == 46
    # the no-orientation mask/dst took the FA affine; the mask covers the white matter
    assert tpl.mask[tpl.fa > 0.2].mean() > 0.999
    assert np.all(tpl.mask[tpl.skeleton])
    assert load_template("enigma", enigma_dir).skeleton.sum() == tpl.skeleton.sum()


def test_enigma_folder_errors_name_the_file(enigma_dir, tmp_path):
    for role, (fname, required) in ENIGMA_FILES.items():
        if required and role != "lookup":
            os.symlink(enigma_dir / fname, tmp_path / fname)
    with pytest.raises(TemplateError, match="ENIGMA_look_up_table.txt.*ENIGMA-DTI-TBSS-Protocol"):
        enigma_template(tmp_path)
    with pytest.raises(TemplateError, match="--template-dir"):
        load_template("enigma")
    with pytest.raises(TemplateError, match="unknown template source"):
        load_template("fmrib58")
    # the distance map is optional: computed from mask and skeleton when absent
    os.symlink(enigma_dir / "ENIGMA_look_up_table.txt", tmp_path / "ENIGMA_look_up_table.txt")
    tpl = enigma_template(tmp_path)
    ref = enigma_template(enigma_dir)
    assert np.abs(tpl.distance - ref.distance).max() < 1e-5


# ---------------------------------------------------------------------------------------------
# TemplateFlow (offline)
# ---------------------------------------------------------------------------------------------
def _tf_home(root: Path, t1: np.ndarray, mask: np.ndarray, affine: np.ndarray,
             empty_mask: bool = False) -> Path:
    tdir = root / f"tpl-{SPACE}"
    tdir.mkdir(parents=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "TemplateFlow test cache", "BIDSVersion": "1.1.0"}))
    (tdir / "template_description.json").write_text(json.dumps({"Name": SPACE}))
    nib.save(nib.Nifti1Image(t1.astype(np.float32), affine),
             str(tdir / f"tpl-{SPACE}_res-02_T1w.nii.gz"))
    mpath = tdir / f"tpl-{SPACE}_res-02_desc-brain_mask.nii.gz"
    if empty_mask:
        mpath.write_bytes(b"")  # what an interrupted/offline fetch leaves behind
    else:
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), str(mpath))
    return root


def _run_offline(code: str, home: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, TEMPLATEFLOW_HOME=str(home), TEMPLATEFLOW_AUTOUPDATE="0",
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
               http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               NO_PROXY="", no_proxy="")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def phantom_t1(phantom):
    """A T1w-like image of the phantom (WM bright, GM mid, CSF dark) as the TemplateFlow T1w."""
    from dmriharmony.simulate import load_phantom_template

    tissue = np.asanyarray(load_phantom_template()["tissue"].dataobj)
    t1 = np.choose(np.clip(tissue, 0, 3).astype(int), [0.0, 200.0, 550.0, 800.0])
    return t1, phantom.mask, phantom.affine


def test_templateflow_fetch_offline_cache(phantom_t1, tmp_path):
    t1, mask, affine = phantom_t1
    home = _tf_home(tmp_path / "tf", t1, mask, affine)
    res = _run_offline(f"""
        from dmriharmony.tbss.study import fetch_templateflow
        print(fetch_templateflow("{SPACE}", 2, "T1w", None))
        print(fetch_templateflow("{SPACE}", 2, "mask", "brain"))
    """, home)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0].endswith(f"tpl-{SPACE}_res-02_T1w.nii.gz") and str(home) in lines[0]
    assert lines[1].endswith("desc-brain_mask.nii.gz")


def test_templateflow_offline_placeholder_fails_in_one_line(phantom_t1, tmp_path):
    t1, mask, affine = phantom_t1
    home = _tf_home(tmp_path / "tf", t1, mask, affine, empty_mask=True)
    res = _run_offline(f"""
        import sys
        from dmriharmony.errors import TemplateError
        from dmriharmony.tbss.study import fetch_templateflow
        try:
            fetch_templateflow("{SPACE}", 2, "mask", "brain")
        except TemplateError as exc:
            print("ERR", exc)
        # a zero-byte file handed back without an error is refused too
        from templateflow import api
        from pathlib import Path
        placeholder = Path(r"{home}") / "tpl-{SPACE}" / "tpl-{SPACE}_res-02_desc-brain_mask.nii.gz"
        placeholder.write_bytes(b"")
        api.get = lambda *a, **k: placeholder
        try:
            fetch_templateflow("{SPACE}", 2, "mask", "brain")
        except TemplateError as exc:
            print("ERR", exc)
    """, home, timeout=120)
    assert res.returncode == 0, res.stderr
    errs = [ln for ln in res.stdout.splitlines() if ln.startswith("ERR")]
    assert len(errs) == 2
    assert "ConnectionError" in errs[0] and "TEMPLATEFLOW_HOME" in errs[0]
    assert "api.get('MNI152NLin6Asym', resolution=2, suffix='mask', desc='brain')" in errs[0]
    assert "zero-byte placeholder" in errs[1] and "pre-fetch" in errs[1]


def _study_inputs(phantom, tmp_path):
    subjects = []
    for i, (rot, shift) in enumerate([((2, 0, -3), (3, -2, 1)), ((-2, 3, 1), (-2, 2, -1))]):
        fa = deform(phantom.fa, phantom.affine, rigid_matrix(rot, shift), warp_voxels=1.0,
                    seed=i)
        p = tmp_path / f"sub-{i:02d}_fa.nii.gz"
        nib.save(nib.Nifti1Image(fa.astype(np.float32), phantom.affine), str(p))
        subjects.append(str(p))
    lab = tmp_path / "labels.nii.gz"
    nib.save(nib.Nifti1Image(phantom.labels.astype(np.int16), phantom.affine), str(lab))
    lut = tmp_path / "labels.tsv"
    phantom.label_table.to_csv(lut, sep="\t", index=False)
    return subjects, lab, lut


def _build_study(phantom, phantom_t1, tmp_path, n_iterations, cfg):
    t1, mask, affine = phantom_t1
    home = _tf_home(tmp_path / "tf", t1, mask, affine)
    subjects, lab, lut = _study_inputs(phantom, tmp_path)
    out = tmp_path / "study"
    res = _run_offline(f"""
        from dmriharmony.tbss.register import RegistrationConfig
        from dmriharmony.tbss.study import build_study_template
        tpl = build_study_template({subjects!r}, r"{out}", space="{SPACE}", resolution=2,
                                   n_iterations={n_iterations}, labels=r"{lab}",
                                   label_table=r"{lut}", config=RegistrationConfig(**{cfg!r}))
        print(tpl.name, int(tpl.skeleton.sum()))
    """, home, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return load_template_dir(out), out


def test_study_template_placement_via_templateflow(phantom, phantom_t1, tmp_path):
    """Two phantom 'subjects' (phantom FA under known rigid motions + a small warp) placed
    rigidly in the (offline) TemplateFlow space by MI against its T1w and averaged."""
    tpl, out = _build_study(phantom, phantom_t1, tmp_path, 0,
                            {"affine_iters": [40, 20], "syn_iters": []})
    assert tpl.source == "study" and tpl.name == "study" and tpl.labels is not None
    assert (out / "iter-0_meanFA.nii.gz").is_file()
    brain = phantom.mask
    assert np.corrcoef(tpl.fa[brain], phantom.fa[brain])[0, 1] > 0.85
    assert thick_voxels(tpl.skeleton, tpl.directions).sum() == 0


@pytest.mark.slow
def test_study_template_iterations_via_templateflow(phantom, phantom_t1, tmp_path):
    """Placement + one FA-to-mean (affine + SyN) iteration: the study mean is the phantom."""
    tpl, out = _build_study(phantom, phantom_t1, tmp_path, 1,
                            {"affine_iters": [60, 30], "syn_iters": [10, 5]})
    assert (out / "iter-1_meanFA.nii.gz").is_file()
    brain = phantom.mask
    assert np.corrcoef(tpl.fa[brain], phantom.fa[brain])[0, 1] > 0.95
    for index in phantom.label_table["index"]:
        assert np.any((tpl.labels == index) & tpl.skeleton)


def test_study_template_input_errors(tmp_path):
    from dmriharmony.tbss.study import build_study_template

    with pytest.raises(TemplateError, match="at least 2"):
        build_study_template([tmp_path / "a.nii.gz"])
