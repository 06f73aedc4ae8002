"""ENIGMA ROI extraction (dmriharmony.tbss.roi).

Reference: ENIGMA's own outputs for the real Subject1 (../shared/enigma/Subject1_ROIout.csv and
Subject1_ROIout_avg.csv, produced by the ENIGMA-DTI protocol's singleSubjROI_exe and
averageSubjectTracts.R, ENIGMA-git/ENIGMA-DTI-TBSS-Protocol).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from dmriharmony.errors import BIDSInputError, TemplateError
from dmriharmony.tbss.roi import (
    build_roi_table,
    combine_rois,
    extract_rois,
    read_combination_table,
    read_enigma_csv,
    read_lookup_table,
    read_roi_rows,
    roi_row,
    write_enigma_csv,
    write_roi_row,
)


@pytest.fixture(scope="module")
def subject1(enigma_dir):
    d = enigma_dir
    return {
        "values": nib.load(str(d / "Subject1_FA.nii.gz")),
        "skeleton": nib.load(str(d / "mean_FA_skeleton.nii.gz")),
        "labels": nib.load(str(d / "JHU-WhiteMatter-labels-1mm.nii.gz")),
        "lut": d / "ENIGMA_look_up_table.txt",
    }


def test_enigma_lookup_table_parsed(enigma_dir):
    lut = read_lookup_table(enigma_dir / "ENIGMA_look_up_table.txt")
    assert list(lut.columns[:4]) == ["index", "abbreviation", "name", "side"]
    assert len(lut) == 46
    assert lut.iloc[0].tolist()[:3] == [3, "GCC", "Genu of corpus callosum"]
    assert lut.set_index("abbreviation").loc["UNC-L", "index"] == 48
    # CR CR LF endings must not leak into names
    assert not lut["name"].str.contains("\r").any()
    assert lut.set_index("abbreviation").loc["ACR-L", "side"] == "left"


def test_subject1_per_label_matches_enigma(subject1, enigma_dir):
    s = subject1
    ours = extract_rois(s["values"], s["skeleton"], s["labels"], s["lut"], combine=False)
    ref = read_enigma_csv(enigma_dir / "Subject1_ROIout.csv")
    assert list(ours.index) == list(ref.index)
    np.testing.assert_array_equal(ours["nVoxels"].to_numpy(), ref["nVoxels"].to_numpy())
    np.testing.assert_allclose(ours["Average"].to_numpy(), ref["Average"].to_numpy(), atol=1e-5)
    assert ours.loc["AverageFA", "nVoxels"] == 112889


def test_subject1_combined_matches_enigma(subject1, enigma_dir):
    s = subject1
    # paths, as users call it
    d = enigma_dir
    ours = extract_rois(d / "Subject1_FA.nii.gz", d / "mean_FA_skeleton.nii.gz",
                        d / "JHU-WhiteMatter-labels-1mm.nii.gz", s["lut"], combine=True)
    ref = read_enigma_csv(enigma_dir / "Subject1_ROIout_avg.csv")
    assert list(ours.index) == list(ref.index)
    np.testing.assert_array_equal(ours["nVoxels"].to_numpy(), ref["nVoxels"].to_numpy())
    np.testing.assert_allclose(ours["Average"].to_numpy(), ref["Average"].to_numpy(), atol=1e-5)
    # spot checks of the composite rules
    assert ours.loc["IC", "nVoxels"] == 4781 and ours.loc["CR-L", "nVoxels"] == 3608
    assert "ML" not in ours.index and "CP-L" not in ours.index


def test_lookup_dataframe_and_enigma_csv_roundtrip(subject1, tmp_path):
    s = subject1
    lut = read_lookup_table(s["lut"])
    ours = extract_rois(s["values"], s["skeleton"], s["labels"], lut, combine=False)
    path = write_enigma_csv(ours, tmp_path / "roi.csv")
    back = read_enigma_csv(path)
    np.testing.assert_allclose(back["Average"], ours["Average"], rtol=1e-5)
    assert (back["nVoxels"] == ours["nVoxels"]).all()


def _toy():
    shape = (6, 5, 4)
    vals = np.zeros(shape, np.float32)
    skel = np.zeros(shape, np.float32)
    lab = np.zeros(shape, np.int16)
    # label 1 ("A-L"): three skeleton voxels, one with value 0 (ignored); one off-skeleton
    for i, v in enumerate([0.2, 0.4, 0.0]):
        skel[i, 0, 0] = 1
        lab[i, 0, 0] = 1
        vals[i, 0, 0] = v
    lab[0, 1, 0] = 1
    vals[0, 1, 0] = 0.9  # not on the skeleton: ignored
    # label 2 ("A-R"): two voxels
    for i, v in enumerate([0.6, 0.8]):
        skel[i, 2, 1] = 1
        lab[i, 2, 1] = 2
        vals[i, 2, 1] = v
    # unlabelled skeleton voxel counts only in AverageFA
    skel[5, 4, 3] = 1
    vals[5, 4, 3] = 0.5
    lut = pd.DataFrame({"index": [1, 2, 3], "abbreviation": ["A-L", "A-R", "B"],
                        "name": ["a left", "a right", "b"]})
    return vals, skel, lab, lut


def test_toy_means_weights_and_empty_label():
    vals, skel, lab, lut = _toy()
    per = extract_rois(vals, skel, lab, lut, combine=False)
    assert per.loc["A-L", "nVoxels"] == 2
    assert per.loc["A-L", "Average"] == pytest.approx(0.3)
    assert per.loc["A-R", "Average"] == pytest.approx(0.7)
    assert per.loc["B", "nVoxels"] == 0 and np.isnan(per.loc["B", "Average"])
    assert per.loc["AverageFA", "nVoxels"] == 5
    assert per.loc["AverageFA", "Average"] == pytest.approx((0.2 + 0.4 + 0.6 + 0.8 + 0.5) / 5)
    comb = combine_rois(per, {"A": ["A-L", "A-R"], "A-L": ["A-L"], "B": ["B"], "Z": ["nope"]})
    assert comb.loc["A", "Average"] == pytest.approx((0.3 * 2 + 0.7 * 2) / 4)
    assert comb.loc["A", "nVoxels"] == 4
    assert np.isnan(comb.loc["B", "Average"])
    assert "Z" not in comb.index


def test_grid_mismatch_is_an_error():
    vals, skel, lab, lut = _toy()
    with pytest.raises(TemplateError, match="different grids"):
        extract_rois(vals[:5], skel, lab, lut)


def test_combination_table_is_enigmas():
    table = read_combination_table()
    assert table["CC"] == ["GCC", "BCC", "SCC"]
    assert sorted(table["IC"]) == sorted(["ALIC-L", "ALIC-R", "PLIC-L", "PLIC-R", "RLIC-L",
                                          "RLIC-R"])
    assert table["FXST"] == ["FX/ST-L", "FX/ST-R"]
    assert len(table) == 63


def _rows():
    vals, skel, lab, lut = _toy()
    per = extract_rois(vals, skel, lab, lut, combine=False)
    md = per.copy()
    md["Average"] = md["Average"] * 1e-3
    return per, md


def test_roi_rows_and_group_table(tmp_path):
    per, md = _rows()
    p1 = write_roi_row({"FA": per, "MD": md}, tmp_path / "a.tsv", "sub-01", "ses-GE", 1)
    p2 = write_roi_row(per, tmp_path / "b.tsv", "02", None, None, metric="fa")
    rows = read_roi_rows([p1, p2])
    assert len(rows) == 3 and set(rows["metric"]) == {"FA", "MD"}
    parts = pd.DataFrame({"participant_id": ["sub-01", "sub-02"], "age": [30, 40],
                          "sex": ["F", "M"], "dx": [0, 1], "site": ["old", "old"]})
    parts.to_csv(tmp_path / "participants.tsv", sep="\t", index=False)
    sites = pd.DataFrame({"subject": ["01", "02"], "session": ["GE", None],
                          "run": ["1", None], "site": ["GE", "Siemens"],
                          "vendor": ["GE", "Siemens"]})
    table = build_roi_table([p1, p2], tmp_path / "participants.tsv", sites)
    assert list(table.columns[:4]) == ["subject", "session", "run", "metric"]
    assert table.columns[-1] == "B" and "A-L" in table.columns
    assert table.loc[table.subject == "02", "site"].tolist() == ["Siemens"]
    assert table.loc[(table.subject == "01") & (table.metric == "FA"), "age"].item() == 30
    fa01 = table.loc[(table.subject == "01") & (table.metric == "MD"), "A-L"].item()
    assert fa01 == pytest.approx(0.3e-3)


def test_group_table_errors_name_the_subject(tmp_path):
    per, _ = _rows()
    row = roi_row(per, "sub-09")
    parts = pd.DataFrame({"participant_id": ["sub-01"], "age": [30]})
    with pytest.raises(BIDSInputError, match="sub-09"):
        build_roi_table(row, parts)
    parts = pd.DataFrame({"participant_id": ["sub-09"], "age": [30]})
    sites = pd.DataFrame({"subject": ["01"], "site": ["GE"]})
    with pytest.raises(BIDSInputError, match="subject=09"):
        build_roi_table(row, parts, sites)
    with pytest.raises(BIDSInputError, match="participants.tsv not found"):
        build_roi_table(row, tmp_path / "participants.tsv")
