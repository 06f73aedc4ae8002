"""Skeletonisation, distance map and the TBSS projection search (dmriharmony.tbss).

References: Smith et al., NeuroImage 31:1487-1505 (2006) for the algorithm; ENIGMA's
``ENIGMA_DTI_FA_skeleton_mask_dst`` (ENIGMA-git/ENIGMA-DTI-TBSS-Protocol) for the distance map.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from dmriharmony.errors import TemplateError
from dmriharmony.tbss.io import as_fraction, load_image
from dmriharmony.tbss.project import project_onto_skeleton, search_positions
from dmriharmony.tbss.skeleton import (
    DIRECTIONS,
    perpendicular_directions,
    skeleton_distance_map,
    skeletonise,
    thick_voxels,
    tube_directions,
)


def _tubes(shape=(40, 40, 30), shift=(0.0, 0.0, 0.0)):
    """Two straight Gaussian-profile tubes (along y and along z) and a curved sheet."""
    x, y, z = np.indices(shape, dtype=float)
    x = x - shift[0]
    y = y - shift[1]
    z = z - shift[2]
    fa = 0.1 + 0.6 * np.exp(-((x - 12) ** 2 + (z - 15) ** 2) / (2 * 2.0**2))  # along y
    fa = np.maximum(fa, 0.1 + 0.5 * np.exp(-((x - 28) ** 2 + (y - 20) ** 2) / (2 * 2.0**2)))
    sheet = 8 + 0.02 * (x - 20) ** 2  # a gently curved sheet y = f(x)
    fa = np.maximum(fa, 0.1 + 0.45 * np.exp(-((y - sheet) ** 2) / (2 * 1.5**2)) * (z < 8))
    mask = np.zeros(shape, bool)
    mask[2:-2, 2:-2, 2:-2] = True
    return np.where(mask, fa, 0).astype(np.float32), mask


@pytest.fixture(scope="module")
def tubes():
    fa, mask = _tubes()
    skel, dirs = skeletonise(fa, mask, threshold=0.2, return_directions=True)
    return fa, mask, skel, dirs


def test_skeleton_is_one_voxel_thick_and_covers_each_structure(tubes):
    fa, mask, skel, dirs = tubes
    assert skel.sum() > 0
    assert thick_voxels(skel, dirs).sum() == 0
    # every structure has skeleton voxels along its length
    assert skel[12, 5:35, 15].sum() >= 25       # tube along y: its centre line
    assert skel[28, 20, 5:25].sum() >= 18       # tube along z
    lab, n = ndi.label(ndi.binary_dilation(skel, iterations=1))
    assert n <= 4
    # the skeleton sits on ridge centres: FA there is near the peaks
    assert fa[skel].min() > 0.2


def test_skeleton_perpendicular_direction_of_a_sheet():
    shape = (24, 24, 24)
    x, y, z = np.indices(shape, dtype=float)
    fa = (0.1 + 0.6 * np.exp(-((y - 12) ** 2) / (2 * 1.5**2))).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask[3:-3, 3:-3, 3:-3] = True
    skel, dirs = skeletonise(fa * mask, mask, return_directions=True)
    inner = np.zeros(shape, bool)
    inner[6:-6, :, 6:-6] = True
    assert np.array_equal(np.argwhere(skel & inner)[:, 1], np.full((skel & inner).sum(), 12))
    assert (skel & inner).sum() == 12 * 12
    # the perpendicular of a y-sheet is the y axis (direction (0, 1, 0))
    yline = int(np.flatnonzero((DIRECTIONS == (0, 1, 0)).all(axis=1))[0])
    assert np.all(dirs[skel & inner] == yline)


def test_skeleton_threshold_and_input_errors(tubes):
    fa, mask, skel, _ = tubes
    high = skeletonise(fa, mask, threshold=0.5)
    assert high.sum() < skel.sum() and fa[high].min() > 0.5
    with pytest.raises(TemplateError, match="threshold"):
        skeletonise(fa, mask, threshold=1.5)
    with pytest.raises(TemplateError, match="10\\^4"):
        skeletonise(fa * 1e4, mask)
    with pytest.raises(TemplateError, match="3-D"):
        skeletonise(fa[..., None], None)


def test_distance_map_reproduces_enigma(enigma_dir):
    fa_img = load_image(enigma_dir / "ENIGMA_DTI_FA.nii.gz")
    mask = load_image(enigma_dir / "ENIGMA_DTI_FA_mask.nii.gz", reference=fa_img).get_fdata()
    skel = nib.load(str(enigma_dir / "ENIGMA_DTI_FA_skeleton_mask.nii.gz")).get_fdata()
    ref = load_image(enigma_dir / "ENIGMA_DTI_FA_skeleton_mask_dst.nii.gz",
                     reference=fa_img).get_fdata()
    ours = skeleton_distance_map(mask, skel)
    assert np.abs(ours - ref).max() < 1e-5
    # and the FA template really is stored x 10^4
    assert as_fraction(fa_img.get_fdata()).max() == pytest.approx(0.8924, abs=1e-3)


def test_projection_undoes_perpendicular_shifts(tubes):
    fa, mask, skel, dirs = tubes
    dist = skeleton_distance_map(mask, skel)
    extra = tube_directions(fa, skel, dirs)
    lines = [dirs, *extra]
    # the tubes get extra search lines across them; the sheet (z < 8) gets none
    assert np.all(np.max([e[12, 6:34, 15] for e in extra], axis=0) >= 0)
    assert np.all(np.max([e[28, 20, 8:24] for e in extra], axis=0) >= 0)
    sheet = np.zeros_like(skel)
    sheet[8:32, :, 4:6] = skel[8:32, :, 4:6]  # the sheet's middle slices, away from its ends
    none = np.max([e[sheet] for e in extra], axis=0) == -1
    assert sheet.sum() > 20 and none.mean() > 0.8
    base = project_onto_skeleton(fa, skel, dist, lines, fwhm_mm=None)["FA"]
    # self-projection keeps the skeleton's own FA (bar a few voxels at the sheet's ends)
    assert np.mean(base[skel] == fa[skel]) > 0.97 and np.all(base[skel] >= fa[skel])
    for shift in [(2, 0, 0), (-2, 0, 0), (0, 0, 2), (0, 2, 0)]:
        moved, _ = _tubes(shift=shift)
        proj = project_onto_skeleton(moved, skel, dist, lines, fwhm_mm=None)["FA"]
        # the y-tube (x = 12, z = 15) recovers its peak exactly after any 2-voxel shift
        line = np.zeros_like(skel)
        line[12, 6:34, 15] = skel[12, 6:34, 15]
        assert np.abs(proj[line] - base[line]).max() < 1e-6
        if shift[1] == 0:  # perpendicular to that tube: unprojected, the shift hurts
            assert np.abs(moved[line] - fa[line]).max() > 0.2
        if shift[2] == 0:  # the z-tube (x = 28, y = 20) for shifts perpendicular to it
            zline = np.zeros_like(skel)
            zline[28, 20, 6:24] = skel[28, 20, 6:24]
            assert np.abs(proj[zline] - base[zline]).max() < 1e-6


def test_projection_other_maps_use_fa_positions_and_weighting(tubes):
    fa, mask, skel, dirs = tubes
    dist = skeleton_distance_map(mask, skel)
    moved, _ = _tubes(shift=(2, 0, 0))
    md = np.random.default_rng(0).uniform(0.5e-3, 1.0e-3, fa.shape).astype(np.float32)
    out = project_onto_skeleton(moved, skel, dist, dirs, {"md": md})
    pos = out["source_index"]
    np.testing.assert_array_equal(out["MD"][skel], md.ravel()[pos])
    np.testing.assert_array_equal(out["FA"][skel], moved.ravel()[pos])
    # search positions never leave the brain and stay within the distance-map limit
    assert np.all(mask.ravel()[pos])
    src = np.array(np.unravel_index(pos, fa.shape)).T
    assert np.all(np.linalg.norm(src - np.argwhere(skel), axis=1) <= dist.max() * np.sqrt(3))


def test_search_rule_stops_half_way_and_weights_distance():
    # two parallel sheets (x = 5 and x = 13) on a line of voxels: the search from x = 5 may
    # not cross the midpoint x = 9 to take the other sheet's higher FA.
    shape = (19, 3, 3)
    fa = np.full(shape, 0.1, np.float32)
    fa[5] = 0.3
    fa[13] = 0.9
    mask = np.ones(shape, bool)
    skel = np.zeros(shape, bool)
    skel[5, 1, 1] = skel[13, 1, 1] = True
    dist = skeleton_distance_map(np.pad(mask[:, 1:2, 1:2], ((1, 1), (0, 0), (0, 0)))[1:-1]
                                 .repeat(3, 1).repeat(3, 2), skel)
    xline = int(np.flatnonzero((DIRECTIONS == (1, 0, 0)).all(axis=1))[0])
    dirs = np.full(shape, xline, np.int8)
    subj = fa.copy()
    subj[8] = 0.5  # a maximum on the near side of the midpoint: allowed
    subj[10] = 0.95  # beyond the midpoint: belongs to the other sheet
    pos = search_positions(subj, skel, dist, dirs, fwhm_mm=None)
    got = np.array(np.unravel_index(pos, shape)).T[:, 0]
    assert list(got) == [8, 10]
    # the Gaussian weighting (FWHM 20 mm) prefers a near 0.50 over a 0.505 3 voxels further
    subj2 = fa.copy()
    subj2[6] = 0.5
    subj2[8] = 0.505
    pos2 = search_positions(subj2, skel, dist, dirs, voxel_size=(2, 2, 2), fwhm_mm=20.0)
    assert np.unravel_index(pos2[0], shape)[0] == 6
    pos3 = search_positions(subj2, skel, dist, dirs, voxel_size=(2, 2, 2), fwhm_mm=None)
    assert np.unravel_index(pos3[0], shape)[0] == 8


def test_projection_grid_errors(tubes):
    fa, mask, skel, dirs = tubes
    dist = skeleton_distance_map(mask, skel)
    with pytest.raises(TemplateError, match="distance map"):
        search_positions(fa, skel, dist[:-1], dirs)
    with pytest.raises(TemplateError, match="MD"):
        project_onto_skeleton(fa, skel, dist, dirs, {"MD": fa[:-1]})


def test_enigma_directions_and_projection_of_its_own_fa(enigma_dir):
    """On ENIGMA's 1 mm FA (downsampled x2 for speed) the template projects onto itself."""
    fa_img = load_image(enigma_dir / "ENIGMA_DTI_FA.nii.gz")
    fa = as_fraction(fa_img.get_fdata())[::2, ::2, ::2]
    mask = fa > 0
    dirs = perpendicular_directions(fa, mask)
    assert dirs[mask].min() >= 0 and np.all(dirs[~mask] == -1)
    skel = skeletonise(fa, mask)
    dist = skeleton_distance_map(mask, skel)
    proj = project_onto_skeleton(fa, skel, dist, dirs, voxel_size=(2, 2, 2))["FA"]
    # skeleton voxels are local maxima along their search line, so self-projection keeps them
    # (bar the few where a higher ridge lies further along the line, before the midpoint)
    same = proj[skel] == fa[skel]
    assert same.mean() > 0.99
    assert np.all(proj[skel] >= fa[skel])
