"""The inputs we write and the derivatives we produce pass the BIDS validator.

Uses ``bids-validator-deno`` (PyPI, the official validator compiled with Deno; runs offline
with its bundled schema). Derivatives use BEP016 names (``model-``/``param-``, ``dwimap``)
that today's schema does not know: our ``.bidsignore`` lists them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("NIPYPE_NO_ET", "1")

import pytest  # noqa: E402

from dmriharmony.cli.run import main  # noqa: E402
from dmriharmony.dti.synthetic import write_bids_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _validator() -> str:
    exe = Path(sys.executable).parent / "bids-validator-deno"
    found = str(exe) if exe.exists() else shutil.which("bids-validator-deno")
    if not found:
        pytest.skip("bids-validator-deno not installed (pip install '.[test]')")
    return found


def validate(path: Path) -> list[dict]:
    """Errors (not warnings) reported by the validator for the dataset at ``path``."""
    proc = subprocess.run([_validator(), str(path), "--format", "json"], capture_output=True,
                          text=True, timeout=180)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise AssertionError(
            f"validator output not JSON: {proc.stdout[:500]} {proc.stderr}") from None
    issues = report["issues"]["issues"]
    return [i for i in issues if i["severity"] == "error"]


def test_validator_catches_a_broken_dataset(tmp_path):
    """The check can fail: a DWI without its .bval is reported."""
    root = tmp_path / "ds"
    write_bids_dataset(root, ("01",), shape=(8, 8, 4), n_dirs=8)
    (root / "sub-01" / "dwi" / "sub-01_dwi.bval").unlink()
    assert validate(root)


def test_inputs_and_derivatives_are_valid(tmp_path):
    root = tmp_path / "ds"
    write_bids_dataset(root, ("01", "02"), sessions=("A",), inherit=True,
                       bvalues=(1000.0, 2500.0), split_shells=True,
                       shape=(10, 10, 4), n_dirs=12)
    assert validate(root) == []
    out = tmp_path / "out"
    assert main([str(root), str(out), "participant"]) == 0
    deriv = out / "dmriharmony"
    assert validate(deriv) == []
    ignore = (deriv / ".bidsignore").read_text().split()
    assert "*_dwimap.nii.gz" in ignore
    # without the .bidsignore the BEP016 names are rejected: the ignore file is needed
    (deriv / ".bidsignore").unlink()
    assert validate(deriv)


def test_bundled_examples_are_valid():
    datasets = sorted(p.parent for p in (REPO / "bids_examples").glob("*/dataset_description.json"))
    if not datasets:
        pytest.skip("no bundled dataset under bids_examples/ yet")
    for ds in datasets:
        assert validate(ds) == [], ds
