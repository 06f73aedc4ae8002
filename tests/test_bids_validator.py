"""The inputs we write and the derivatives we produce pass the BIDS validator.

Uses ``bids-validator-deno`` (PyPI, the official validator compiled with Deno; runs offline
with its bundled schema). Derivatives use BEP016 names (``model-``/``param-``, ``dwimap``)
that today's schema does not know: our ``.bidsignore`` lists them.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("NIPYPE_NO_ET", "1")

import pytest  # noqa: E402

from dmriharmony.bids.validate import bids_validator_errors  # noqa: E402
from dmriharmony.cli.run import main  # noqa: E402
from dmriharmony.dti.synthetic import write_bids_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def validate(path: Path) -> list[dict]:
    """Validator errors for ``path``; skips the test when the validator is not installed."""
    try:
        return bids_validator_errors(path)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


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
