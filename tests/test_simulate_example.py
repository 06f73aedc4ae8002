"""The committed example dataset bids_examples/phantom_multivendor: valid, and reproducible."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from dmriharmony.simulate.cli import main as cli_main

NAME = "phantom_multivendor"


@pytest.fixture(scope="module")
def example(repo_root) -> Path:
    root = repo_root / "bids_examples" / NAME
    if not (root / "dataset_description.json").is_file():
        pytest.fail(f"{root}: the example dataset is missing (see bids_examples/README.md)")
    return root


def _command(repo_root: Path) -> list[str]:
    text = (repo_root / "bids_examples" / "README.md").read_text()
    m = re.search(r"^dmriharmony-simulate bids_examples/" + NAME + r" .*$", text, re.M)
    assert m, "bids_examples/README.md must give the regeneration command"
    return shlex.split(m.group(0))


def test_example_is_small_and_complete(example):
    size = sum(f.stat().st_size for f in example.rglob("*") if f.is_file())
    assert size < 20e6
    runs = sorted(example.glob("sub-*/ses-*/dwi/*_dwi.nii.gz"))
    vendors = set()
    for run in runs:
        stem = str(run)[: -len(".nii.gz")]
        n = nib.load(run).shape[3]
        assert np.loadtxt(stem + ".bval").size == n
        assert np.loadtxt(stem + ".bvec").shape == (3, n)
        vendors.add(json.loads(Path(stem + ".json").read_text())["Manufacturer"])
    assert vendors == {"GE", "Siemens", "Philips"}
    p = pd.read_csv(example / "participants.tsv", sep="\t", keep_default_na=False)
    assert (p["traveling"] == "yes").sum() >= 1
    assert p[p.traveling == "no"].groupby("site").size().min() >= 3
    trav = p.loc[p.traveling == "yes", "participant_id"].iloc[0]
    assert len(list((example / trav).glob("ses-*/dwi/*_dwi.nii.gz"))) == 3
    assert (example / "derivatives" / "groundtruth" / "effects.tsv").is_file()


def test_example_indexes_with_pybids(example):
    from bids import BIDSLayout

    layout = BIDSLayout(str(example), validate=True)
    assert len(layout.get(suffix="dwi", extension=".nii.gz")) == 12


def test_readme_command_is_the_cli(repo_root):
    cmd = _command(repo_root)
    assert "--seed" in cmd and "--overwrite" in cmd


@pytest.mark.slow
def test_example_regenerates_byte_for_byte(repo_root, example, tmp_path, monkeypatch):
    cmd = _command(repo_root)
    args = cmd[1:]
    args[0] = str(tmp_path / NAME)
    monkeypatch.chdir(repo_root)
    assert cli_main(args + ["--quiet"]) == 0

    def hashes(root: Path) -> dict[str, str]:
        return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
                for f in sorted(root.rglob("*")) if f.is_file()}

    new, old = hashes(tmp_path / NAME), hashes(example)
    assert sorted(new) == sorted(old)
    changed = [k for k in new if new[k] != old[k]]
    assert changed == [], f"{len(changed)} files differ, e.g. {changed[:5]}"
