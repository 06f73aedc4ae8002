"""BIDS input: pybids queries, inheritance, acq-split shells, site table, filters, database."""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("NIPYPE_NO_ET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dmriharmony.bids import (  # noqa: E402
    NoMatchingDataError,
    collect_dwi_runs,
    derivative_name,
    group_dti_inputs,
    load_layout,
    normalize_vendor,
    scanner_key,
    site_table,
    validate_inputs,
)
from dmriharmony.bids.exceptions import InvalidDatasetError  # noqa: E402
from dmriharmony.bids.layout import database_dir  # noqa: E402
from dmriharmony.dti.synthetic import write_bids_dataset  # noqa: E402
from dmriharmony.errors import BIDSInputError  # noqa: E402

SMALL = {"shape": (10, 10, 4), "n_dirs": 12}


def test_inherited_gradients_and_sidecar(tmp_path):
    root = tmp_path / "ds"
    write_bids_dataset(root, ("01", "02"), inherit=True, **SMALL)
    assert not list(root.glob("sub-01/dwi/*.bval"))
    runs = collect_dwi_runs(load_layout(root))
    assert [r.subject for r in runs] == ["01", "02"]
    for run in runs:
        assert run.bval == root / "dwi.bval" and run.bvec == root / "dwi.bvec"
        assert run.metadata["Manufacturer"] == "Siemens"
    validate_inputs(group_dti_inputs(runs))
    table = site_table(runs, root)
    # no site column, no session, no acq: the scanner key, model stripped of its trailing space
    assert list(table["site"]) == ["Siemens_Prisma_3T"] * 2
    assert list(table["site_source"]) == ["scanner"] * 2
    assert list(table["model"]) == ["Prisma", "Prisma"]
    assert list(table["shells"]) == ["0 1000"] * 2
    assert list(table["n_directions"]) == [12, 12]
    assert list(table["n_volumes"]) == [15, 15]
    assert list(table["voxel_size"]) == ["2x2x2"] * 2


def test_site_from_participants_then_sessions(tmp_path):
    root = tmp_path / "ds"
    write_bids_dataset(root, ("01", "02"), sites={"01": "Oxford ", "02": "n/a"},
                       sessions=("scan1",), **SMALL)
    table = site_table(collect_dwi_runs(load_layout(root)), root)
    assert list(table["site"]) == ["Oxford", "scan1"]
    assert list(table["site_source"]) == ["participants.tsv", "session"]
    # a sessions.tsv site column wins over participants.tsv (traveling subjects)
    (root / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tSite\nses-scan1\tBoston\n")
    table = site_table(collect_dwi_runs(load_layout(root)), root)
    assert table.loc[0, "site"] == "Boston" and table.loc[0, "site_source"] == "sessions.tsv"


def test_split_shells_are_fitted_together(tmp_path):
    root = tmp_path / "ds"
    write_bids_dataset(root, ("01",), bvalues=(1000.0, 2500.0), split_shells=True,
                       inherit=True, **SMALL)
    runs = collect_dwi_runs(load_layout(root))
    assert sorted(r.entities["acquisition"] for r in runs) == ["highb", "lowb"]
    assert {r.bval.name for r in runs} == {"acq-highb_dwi.bval", "acq-lowb_dwi.bval"}
    inputs = group_dti_inputs(runs)
    assert len(inputs) == 1 and inputs[0].merged
    assert inputs[0].prefix == "sub-01"
    validate_inputs(inputs)
    # acq- splits shells here: it is not a site label
    table = site_table(runs, root)
    assert set(table["site_source"]) == {"scanner"}
    assert sorted(table["shells"]) == ["0 1000", "2500"]
    # the high shell alone has no b=0: an error naming its .bval
    high = [r for r in runs if r.entities["acquisition"] == "highb"]
    from dmriharmony.bids.runs import DTIInput

    with pytest.raises(BIDSInputError, match="acq-highb_dwi.bval"):
        validate_inputs([DTIInput(high, dict(high[0].entities))])


def test_acq_on_different_grids_stays_separate(tmp_path):
    root = tmp_path / "ds"
    write_bids_dataset(root, ("01",), **SMALL)
    other = tmp_path / "other"
    write_bids_dataset(other, ("01",), shape=(8, 8, 4), n_dirs=12)
    d = root / "sub-01" / "dwi"
    for ext in ("nii.gz", "bval", "bvec", "json"):
        (d / f"sub-01_dwi.{ext}").rename(d / f"sub-01_acq-a_dwi.{ext}")
        (other / "sub-01" / "dwi" / f"sub-01_dwi.{ext}").rename(d / f"sub-01_acq-b_dwi.{ext}")
    inputs = group_dti_inputs(collect_dwi_runs(load_layout(root)))
    assert [i.prefix for i in inputs] == ["sub-01_acq-a", "sub-01_acq-b"]
    assert not any(i.merged for i in inputs)


def test_philips_sidecar_without_pe_fields(tmp_path):
    root = tmp_path / "ds"
    write_bids_dataset(root, ("01",), sidecar={
        "Manufacturer": "Philips Medical Systems", "ManufacturersModelName": "Achieva dStream",
        "MagneticFieldStrength": 3, "DeviceSerialNumber": "42 ",
        "PhaseEncodingDirection": None, "TotalReadoutTime": None}, **SMALL)
    meta = json.loads((root / "sub-01" / "dwi" / "sub-01_dwi.json").read_text())
    assert "PhaseEncodingDirection" not in meta and "TotalReadoutTime" not in meta
    runs = collect_dwi_runs(load_layout(root))
    validate_inputs(group_dti_inputs(runs))
    table = site_table(runs, root)
    assert table.loc[0, "vendor"] == "Philips"
    assert table.loc[0, "site"] == "Philips_AchievadStream_3T_42"


@pytest.mark.parametrize("text, vendor", [
    ("SIEMENS", "Siemens"), ("Siemens Healthineers", "Siemens"), ("GE MEDICAL SYSTEMS", "GE"),
    ("Philips", "Philips"), ("  philips medical systems ", "Philips"), ("n/a", None),
    (None, None), ("Bruker", "Bruker"),
])
def test_normalize_vendor(text, vendor):
    assert normalize_vendor(text) == vendor


def test_scanner_key_parts():
    assert scanner_key({"Manufacturer": "GE MEDICAL SYSTEMS",
                        "ManufacturersModelName": "DISCOVERY MR750 ",
                        "MagneticFieldStrength": 1.5}) == "GE_DISCOVERYMR750_1p5T"
    assert scanner_key({}) is None


def test_participant_and_session_filters(tmp_path):
    root = tmp_path / "ds"
    write_bids_dataset(root, ("01", "02", "03"), sessions=("A", "B"), **SMALL)
    layout = load_layout(root)
    assert len(collect_dwi_runs(layout)) == 6
    runs = collect_dwi_runs(layout, ["sub-02", "03"], ["ses-B"])
    assert [(r.subject, r.session) for r in runs] == [("02", "B"), ("03", "B")]
    with pytest.raises(NoMatchingDataError, match="participant label.*: 09"):
        collect_dwi_runs(layout, ["09"])
    with pytest.raises(NoMatchingDataError, match="session label.*: C"):
        collect_dwi_runs(layout, None, ["C"])


def test_layout_database_is_reused(tmp_path):
    root = tmp_path / "ds"
    write_bids_dataset(root, ("01", "02"), **SMALL)
    work = tmp_path / "work"
    t0 = time.perf_counter()
    first = load_layout(root, work_dir=work)
    t_index = time.perf_counter() - t0
    db = database_dir(work, root)
    assert db.is_dir() and any(db.iterdir())
    stamps = {f: f.stat().st_mtime_ns for f in db.iterdir()}
    t0 = time.perf_counter()
    second = load_layout(root, work_dir=work)
    t_reload = time.perf_counter() - t0
    assert sorted(second.get(return_type="filename")) == sorted(first.get(return_type="filename"))
    assert t_reload < max(t_index, 0.5)
    assert {f: f.stat().st_mtime_ns for f in db.iterdir()} == stamps  # not re-indexed
    # a subject added after indexing is seen: the stale index is rebuilt
    write_bids_dataset(tmp_path / "more", ("03",), **SMALL)
    (tmp_path / "more" / "sub-03").rename(root / "sub-03")
    assert "03" in load_layout(root, work_dir=work).get_subjects()
    assert "03" in load_layout(root, work_dir=work, reset_database=True).get_subjects()


def test_invalid_dataset_folder(tmp_path):
    with pytest.raises(InvalidDatasetError, match="does not exist"):
        load_layout(tmp_path / "nope")
    (tmp_path / "sub-01").mkdir()
    with pytest.raises(InvalidDatasetError, match="dataset_description.json"):
        load_layout(tmp_path)


def test_pybids_config_knows_param(tmp_path):
    """The bundled pybids config parses model-/param-/desc- of our derivatives."""
    root = tmp_path / "deriv"
    d = root / "sub-01" / "dwi"
    d.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "d", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
         "GeneratedBy": [{"Name": "dmriharmony"}]}))
    for param in ("fa", "md"):
        name = derivative_name("sub-01", "dwimap", model="tensor", param=param)
        (d / name).write_bytes(b"")
    layout = load_layout(root)
    found = layout.get(param="fa", model="tensor", suffix="dwimap", return_type="filename")
    assert [os.path.basename(f) for f in found] == ["sub-01_model-tensor_param-fa_dwimap.nii.gz"]


def test_derivative_names():
    assert derivative_name("/x/sub-01_ses-A_run-1_dwi.nii.gz", "dwimap", model="tensor",
                           param="fa") == "sub-01_ses-A_run-1_model-tensor_param-fa_dwimap.nii.gz"
    assert derivative_name("sub-01", "mask", desc="brain") == "sub-01_desc-brain_mask.nii.gz"
    with pytest.raises(ValueError):
        derivative_name("sub-01", "dwimap", param="f_a")
    with pytest.raises(ValueError):
        derivative_name("notbids.nii.gz", "dwimap")


def test_run_numbers_are_ints(tmp_path):
    root = tmp_path / "ds"
    write_bids_dataset(root, ("01",), **SMALL)
    d = root / "sub-01" / "dwi"
    for ext in ("nii.gz", "bval", "bvec", "json"):
        (d / f"sub-01_dwi.{ext}").rename(d / f"sub-01_run-02_dwi.{ext}")
    runs = collect_dwi_runs(load_layout(root))
    inputs = group_dti_inputs(runs)
    assert inputs[0].prefix == "sub-01_run-02"  # zero padding kept in derivative names
    assert site_table(runs, root).loc[0, "run"] == 2
    assert np.issubdtype(type(site_table(runs, root).loc[0, "run"]), np.integer)


def test_dataset_description_generated_by_and_spatial_reference(tmp_path):
    from dmriharmony import __version__
    from dmriharmony.bids import write_dataset_description

    ref = {"enigma": {"URI": "bids:templates:ENIGMA_DTI_FA.nii.gz"}}
    path = write_dataset_description(tmp_path / "d", source_dir=tmp_path / "raw",
                                     spatial_reference=ref)
    desc = json.loads(path.read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0] == {**desc["GeneratedBy"][0], "Name": "dmriharmony",
                                      "Version": __version__}
    assert desc["SpatialReference"] == ref
    assert desc["DatasetLinks"]["raw"].startswith("file://")
    assert "*_dwimap.nii.gz" in (tmp_path / "d" / ".bidsignore").read_text().split()
    # no temporary files left behind by the atomic writes
    assert not [p for p in (tmp_path / "d").iterdir() if p.name.endswith(".tmp")]
