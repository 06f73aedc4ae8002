"""``python -m dmriharmony.demo`` (what ``make demo`` runs) on the bundled example dataset."""

from __future__ import annotations

import os

os.environ.setdefault("NIPYPE_NO_ET", "1")

import pytest  # noqa: E402

from dmriharmony import demo  # noqa: E402
from dmriharmony.dti.synthetic import write_bids_dataset  # noqa: E402


def test_demo_runs_on_a_dataset_folder(tmp_path, capsys):
    examples = tmp_path / "examples"
    write_bids_dataset(examples / "tiny", ("01", "02"), shape=(10, 10, 4), n_dirs=12,
                       sites={"01": "A", "02": "B"})
    out = tmp_path / "out"
    assert demo.main([str(out), "--examples", str(examples), "--no-tbss"]) == 0
    text = capsys.readouterr().out
    assert "sub-01" in text and "sub-02" in text and "| A |" in text and "| B |" in text
    assert str(out / "dmriharmony") in text
    assert len(list(out.glob("dmriharmony/sub-*/dwi/*_param-fa_dwimap.nii.gz"))) == 2


def test_demo_without_examples(tmp_path, capsys):
    assert demo.main([str(tmp_path / "out"), "--examples", str(tmp_path / "none")]) == 66
    assert "no example BIDS dataset" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_on_bundled_examples(tmp_path, capsys):
    """``make demo``: every run of bids_examples fitted, the group level run with its report;
    the derivatives pass the validator."""
    try:
        bids_dir = demo.find_example_dataset()
    except FileNotFoundError:
        pytest.skip("no bundled dataset under bids_examples/ yet")
    out = tmp_path / "out"
    assert demo.main([str(out)]) == 0
    n_runs = len(list(bids_dir.glob("sub-*/**/dwi/*_dwi.nii*")))
    fa = [p for p in out.glob("dmriharmony/sub-*/**/*_model-tensor_param-fa_dwimap.nii.gz")
          if "_space-" not in p.name]
    assert len(fa) == n_runs
    skeletons = list(out.glob("dmriharmony/sub-*/**/*_space-phantom_*param-fa_desc-skeleton_"
                              "dwimap.nii.gz"))
    assert len(skeletons) == n_runs
    text = capsys.readouterr().out
    assert "derivatives in" in text and "ENIGMA-style ROI table" in text
    # the group level ran and the report's path was printed
    report = out / "dmriharmony" / "group" / "report.html"
    assert f"report: {report}" in text and report.is_file()
    assert (out / "dmriharmony" / "group" / "roi_table_desc-combat.tsv").is_file()
    import pandas as pd

    table = pd.read_csv(out / "dmriharmony" / "group" / "roi_table.tsv", sep="\t")
    assert len(table) == 4 * n_runs  # FA, MD, AD, RD per run
    assert set(table["vendor"]) == {"GE", "Siemens", "Philips"}
    from dmriharmony.bids.validate import bids_validator_errors

    try:
        assert bids_validator_errors(out / "dmriharmony") == []
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
