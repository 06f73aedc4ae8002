"""Robustness of the linear registration stages: the finer-pyramid retry and its pieces.

The regression case is a simulated GE scan (head 3 of ``bench_tbss_dx.py --seed 0``) whose
rigid solution with the default pyramid (factors 4, 2 on the 48 x 58 x 44 phantom template)
lands about 37 degrees off the true pose; the finer pyramid (2, 1) finds it within 2 degrees.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from dmriharmony.errors import TemplateError
from dmriharmony.tbss.register import (
    RegistrationConfig,
    finer_pyramid,
    histogram_mi,
    register_to_template,
    rotation_angle_deg,
)
from dmriharmony.tbss.templates import phantom_template


def test_finer_pyramid_halves_factors_and_merges_repeats():
    assert finer_pyramid([4, 2], [200, 100]) == ([2, 1], [1.0, 0.0], [200, 100])
    assert finer_pyramid([8, 4, 2, 1], [50, 40, 30, 20]) == ([4, 2, 1], [3.0, 1.0, 0.0],
                                                              [50, 40, 30])
    assert finer_pyramid([2, 1], [10, 5]) == ([1], [0.0], [10])


def test_rotation_angle_ignores_scaling_and_translation():
    m = np.eye(4)
    m[:3, :3] = Rotation.from_euler("xyz", [40, 0, 0], degrees=True).as_matrix() @ np.diag(
        [1.1, 0.9, 1.05])
    m[:3, 3] = [5, -3, 2]
    assert rotation_angle_deg(m) == pytest.approx(40.0, abs=1e-6)
    assert rotation_angle_deg(np.eye(4)) == pytest.approx(0.0, abs=1e-6)


def test_histogram_mi_ranks_aligned_above_shuffled():
    rng = np.random.default_rng(0)
    a = rng.random(5000)
    assert histogram_mi(a, a) > 1.0
    assert histogram_mi(a, rng.permutation(a)) < 0.2
    assert histogram_mi(a, np.zeros_like(a)) == 0.0


def test_config_rejects_zero_factor():
    with pytest.raises(TemplateError, match="affine_factors"):
        RegistrationConfig(affine_factors=[0, 1])


def _rotation_error(true_affine: np.ndarray, estimated: np.ndarray) -> float:
    # true: scanner -> template (anatomy); estimated: template world -> subject world
    return rotation_angle_deg(true_affine @ estimated)


@pytest.fixture(scope="module")
def bad_pose_scan():
    """The simulated scan whose coarse rigid level fails (see the module docstring)."""
    from dipy.core.gradients import gradient_table

    from dmriharmony.dti.fit import fit_tensor
    from dmriharmony.dti.mask import brain_mask
    from dmriharmony.simulate.acquire import render_scan
    from dmriharmony.simulate.anatomy import build_phantom
    from dmriharmony.simulate.scanners import get_site, protocol
    from dmriharmony.simulate.subjects import EffectModel, subject_microstructure
    from dmriharmony.simulate.transforms import (
        random_anatomy_affine,
        random_head_pose,
        random_warp,
    )

    phantom = build_phantom()
    micro = subject_microstructure(phantom, None, EffectModel(), individual=False, dx=0)
    g = np.random.default_rng([0, 3])
    anatomy, warp = random_anatomy_affine(g), random_warp(g)
    scan_affine = anatomy @ random_head_pose(g)
    noise_seed = int(g.integers(0, 2**31 - 1))
    site = get_site("ge")
    prot = protocol(site)
    keep = prot.bvals_applied <= 1500
    gtab = gradient_table(prot.bvals_applied[keep], bvecs=prot.bvecs_voxel[keep],
                          b0_threshold=50)
    scan = render_scan(phantom, micro, site, scan_affine, warp,
                       np.random.default_rng(noise_seed))
    data = scan.data[..., keep]
    fa = fit_tensor(data, gtab, brain_mask(data, gtab.bvals)).fa
    return fa, scan.affine, scan_affine


def test_finer_pyramid_rescues_a_wrong_coarse_pose(bad_pose_scan):
    fa, affine, true_affine = bad_pose_scan
    tpl = phantom_template()
    reg = register_to_template(fa, affine, tpl.fa, tpl.affine,
                               RegistrationConfig(syn_iters=[]), static_mask=tpl.mask)
    assert _rotation_error(true_affine, reg.affine) < 10.0
    m = reg.metrics
    # 44 / 4 = 11 voxels at the coarsest level (< 24): the finer pyramid is always tried here
    assert {"linear_mi_configured", "linear_mi_finer"} <= set(m)
    assert m["linear_pyramid"] == ("finer" if m["linear_mi_finer"] > m["linear_mi_configured"]
                                   else "configured")
    assert m["rotation_deg"] == pytest.approx(rotation_angle_deg(reg.affine))


def test_no_retry_when_the_configured_pyramid_is_trusted(bad_pose_scan):
    fa, affine, _ = bad_pose_scan
    tpl = phantom_template()
    cfg = RegistrationConfig(syn_iters=[], retry_finer_pyramid=False,
                             affine_iters=[50, 20])
    reg = register_to_template(fa, affine, tpl.fa, tpl.affine, cfg, static_mask=tpl.mask)
    assert reg.metrics["linear_pyramid"] == "configured"
    assert "linear_mi_finer" not in reg.metrics
