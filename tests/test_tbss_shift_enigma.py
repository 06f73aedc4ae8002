"""TBSS projection robustness on real anatomy: the ENIGMA-DTI template at 1 mm.

Issue 4 asks that shifting a subject's FA by 2 voxels before projection change ROI means by
less than 0.01 ("that is the point of TBSS"). The subject is the ENIGMA FA template with smooth
anatomical variation (8 % SD) and voxel noise (SD 0.03)
(:func:`dmriharmony.tbss.synthetic.subject_like_fa`), projected with ENIGMA's own skeleton and
distance map, then shifted by +-2 voxels (2 mm) along x, y and z.

Measured (seed 0): median ROI change 0.005-0.008 over the 6 shifts, whole-skeleton AverageFA
change <= 0.0042; without the search (sampling the skeleton directly) the median change is
0.011-0.050. The largest single-ROI change is 0.03-0.07, in small ROIs (SFO ~95 skeleton
voxels, UNC-R 74, IFO-L 40, CGC ~300): the < 0.01 target holds for the median ROI and for
AverageFA, not for every ROI (benchmarks/results/tbss.md).
"""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def enigma_shift(enigma_dir):
    from dmriharmony.tbss.groundtruth import shift_robustness
    from dmriharmony.tbss.synthetic import subject_like_fa
    from dmriharmony.tbss.templates import enigma_template

    tpl = enigma_template(enigma_dir)
    return shift_robustness(subject_like_fa(tpl, seed=0), tpl, shift_voxels=2)


def test_two_voxel_shift_changes_median_roi_and_averagefa_below_001(enigma_shift):
    res = enigma_shift
    assert len(res) == 6
    assert np.all(res["median_change"] < 0.01), res.to_string()
    assert np.all(res["averagefa_change"] < 0.01), res.to_string()


def test_projection_search_is_what_absorbs_the_shift(enigma_shift):
    res = enigma_shift
    # along x (left-right: across the CC, cingulum, SLF) the unprojected change is 5x larger
    x = res[res["axis"] == "x"]
    assert np.all(x["unprojected_median_change"] > 3 * x["median_change"]), x.to_string()
    assert np.all(res["max_change"] < res["unprojected_max_change"]), res.to_string()
    assert np.all(res["max_change"] < 0.1), res.to_string()
