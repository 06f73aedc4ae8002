"""Unit tests of the phantom simulator: anatomy, template, signal physics, scanners, noise."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from dipy.core.geometry import cart2sphere
from dipy.core.gradients import gradient_table
from dipy.reconst.dti import TensorModel, fractional_anisotropy, mean_diffusivity
from dipy.sims.voxel import multi_tensor

from dmriharmony.errors import SimulationError, TemplateError
from dmriharmony.simulate import get_site, load_phantom_template
from dmriharmony.simulate.acquire import acquisition_grid, render_scan
from dmriharmony.simulate.anatomy import (
    BUNDLE_INDEX,
    BUNDLE_NAMES,
    LABELS,
    build_phantom,
    bundle_params,
)
from dmriharmony.simulate.scanners import PRESETS, Site, protocol, sidecar
from dmriharmony.simulate.signal import (
    base_microstructure,
    cone_directions,
    d0_moments,
    mixture_signal,
)
from dmriharmony.simulate.subjects import EffectModel, draw_subject, subject_microstructure
from dmriharmony.simulate.template import template_arrays
from dmriharmony.simulate.tissue import (
    D_CSF,
    GM_POOLS,
    compartment_weights,
    relaxation_at,
    tensor_metrics,
)
from dmriharmony.simulate.transforms import (
    Warp,
    random_anatomy_affine,
    random_warp,
    rotation_part,
    scanner_to_template,
)

W3T = compartment_weights(relaxation_at(3.0), 80.0, 8000.0)


def _fib(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - i / n)
    th = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(th) * np.sin(phi), np.sin(th) * np.sin(phi), np.cos(phi)], 1)


def _scheme(shells, n=30):
    bv, bvec = [0.0], [[0.0, 0.0, 0.0]]
    for s in shells:
        bv += [float(s)] * n
        bvec += list(_fib(n))
    return np.array(bv), np.array(bvec)


@pytest.fixture(scope="module")
def phantom():
    return build_phantom()


# ------------------------------------------------------------------ template / anatomy
def test_template_loads_with_contract_keys():
    tpl = load_phantom_template()
    assert {"fa", "mask", "labels", "tissue", "label_table", "affine"} <= set(tpl)
    assert list(tpl["label_table"].columns) == ["index", "abbreviation", "name", "side"]
    shape = tpl["fa"].shape
    for k in ("mask", "labels", "tissue"):
        assert tpl[k].shape == shape
        np.testing.assert_allclose(tpl[k].affine, tpl["affine"])
    fa = tpl["fa"].get_fdata()
    assert 0.0 <= fa.min() and fa.max() < 1.0


def test_template_files_match_the_code():
    """The committed files are what the analytic phantom gives (regenerate if this fails)."""
    tpl = load_phantom_template()
    arr = template_arrays()
    np.testing.assert_allclose(tpl["fa"].get_fdata(), arr["fa"], atol=1e-6)
    for k in ("mask", "labels", "tissue"):
        np.testing.assert_array_equal(np.asarray(tpl[k].dataobj), arr[k])


def test_template_is_small(repo_root):
    files = list((repo_root / "dmriharmony" / "data" / "phantom").iterdir())
    assert sum(f.stat().st_size for f in files) < 1_000_000


def test_labels_are_enigma_compatible(enigma_dir):
    """Label values and abbreviations agree with ENIGMA's look-up table (JHU values)."""
    lut = pd.read_csv(enigma_dir / "ENIGMA_look_up_table.txt", sep="\t", header=None)
    lut = lut.dropna(axis=1, how="all")
    enigma = {int(r[0]): str(r[1]).strip() for r in lut.itertuples(index=False)}
    table = load_phantom_template()["label_table"]
    for row in table.itertuples(index=False):
        assert enigma[row.index] == row.abbreviation
    required = {"GCC", "BCC", "SCC", "CST-L", "CST-R", "CGC-L", "CGC-R", "SLF-L", "SLF-R",
                "IFO-L", "IFO-R", "UNC-L", "UNC-R", "ALIC-L", "ALIC-R", "PLIC-L", "PLIC-R"}
    assert required <= set(table["abbreviation"])


def test_every_label_present_and_symmetric():
    tpl = load_phantom_template()
    lab = np.asarray(tpl["labels"].dataobj)
    tissue = np.asarray(tpl["tissue"].dataobj)
    for value, (abbr, _, side) in LABELS.items():
        n = int((lab == value).sum())
        assert n >= 20, f"{abbr}: only {n} template voxels"
        # labels sit in white matter
        assert (tissue[lab == value] == 3).mean() > 0.8, abbr
        if side == "L":
            right = abbr[:-1] + "R"
            mirror = lab[::-1] == {v[0]: k for k, v in LABELS.items()}[right]
            assert np.array_equal(lab == value, mirror), abbr


def test_crossing_region_and_compartments(phantom):
    cross = phantom.phi2 > 0
    assert cross.sum() > 500
    # the crossing fibres are close to perpendicular in the SCR (CST x callosal projections)
    scr = cross & np.isin(phantom.label, [25, 26])
    assert scr.sum() > 50
    cosang = np.abs((phantom.dir1[scr] * phantom.dir2[scr]).sum(axis=1))
    assert np.median(cosang) < 0.5
    tot = phantom.f_csf + phantom.f_gm + phantom.f_wm
    assert tot.max() <= 1.0 + 1e-9 and (tot > 0).all()


# ------------------------------------------------------------------ signal physics
def test_tensor_metrics_match_dipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 3, 3)) * 1e-3
    d = a @ np.transpose(a, (0, 2, 1))
    d6 = np.stack([d[:, 0, 0], d[:, 1, 1], d[:, 2, 2], d[:, 0, 1], d[:, 0, 2], d[:, 1, 2]], 1)
    m = tensor_metrics(d6)
    ev = np.linalg.eigvalsh(d)[:, ::-1]
    np.testing.assert_allclose(m["fa"], fractional_anisotropy(ev), atol=1e-10)
    np.testing.assert_allclose(m["md"], mean_diffusivity(ev), atol=1e-15)


def test_cone_second_moment_is_axisymmetric():
    rng = np.random.default_rng(1)
    n = rng.normal(size=(20, 3))
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    theta = rng.uniform(0.1, 0.8, 20)
    cone = cone_directions(n, theta)
    np.testing.assert_allclose(np.linalg.norm(cone, axis=2), 1.0, atol=1e-12)
    np.testing.assert_allclose((cone * n[:, None]).sum(-1), np.cos(theta)[:, None] * np.ones(3),
                               atol=1e-12)
    m2 = np.einsum("nki,nkj->nij", cone, cone) / 3
    expect = (np.cos(theta) ** 2)[:, None, None] * np.einsum("ni,nj->nij", n, n) + \
        (0.5 * np.sin(theta) ** 2)[:, None, None] * (np.eye(3) - np.einsum("ni,nj->nij", n, n))
    np.testing.assert_allclose(m2, expect, atol=1e-12)


def test_mixture_signal_matches_dipy_multi_tensor(phantom):
    """A pure-WM voxel equals DIPY's multi_tensor with the same seven Gaussian compartments."""
    ms = base_microstructure(phantom)
    v = int(np.flatnonzero((phantom.bundle1 == BUNDLE_INDEX["SLF-L"]) & (phantom.f_wm == 1.0)
                           & (phantom.phi2 == 0))[0])
    p = bundle_params("SLF-L")
    fi = ms.f_intra1[v]
    bv, bvec = _scheme((1000, 2500), 20)
    ours = mixture_signal(ms, np.array([v]), bv, bvec, W3T)[0]
    cone = cone_directions(phantom.dir1[v][None], np.array([p.dispersion]))[0]
    mevals, angles, frac = [], [], []
    a_i = (1 - p.f_dot) * fi * W3T["intra"] / 3
    a_e = (1 - p.f_dot) * (1 - fi) * W3T["extra"] / 3
    for k in range(3):
        _, th, ph = cart2sphere(*cone[k])
        mevals += [(p.d_intra_par, p.d_intra_perp, p.d_intra_perp),
                   (p.d_extra_par, p.d_extra_perp, p.d_extra_perp)]
        angles += [(np.degrees(th), np.degrees(ph))] * 2
        frac += [a_i, a_e]
    mevals.append((p.d_dot,) * 3)
    angles.append((0.0, 0.0))
    frac.append(p.f_dot * W3T["intra"])
    s0 = sum(frac)
    ref, _ = multi_tensor(gradient_table(bv, bvecs=bvec), np.array(mevals), S0=s0,
                          angles=angles, fractions=100 * np.array(frac) / s0, snr=None)
    np.testing.assert_allclose(ours, ref, rtol=2e-5)


def test_gm_and_csf_signal():
    ph = build_phantom()
    ms = base_microstructure(ph)
    v = int(np.flatnonzero(ph.f_csf > 0.999)[0])
    bv = np.array([0.0, 500.0, 1000.0])
    g = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0.0]])
    s = mixture_signal(ms, np.array([v]), bv, g, W3T)[0]
    np.testing.assert_allclose(s, W3T["csf"] * np.exp(-bv * D_CSF), rtol=1e-6)
    v = int(np.flatnonzero(ph.f_gm > 0.999)[0])
    s = mixture_signal(ms, np.array([v]), bv, g, W3T)[0]
    e = sum(p * np.exp(-bv * d) for p, d in GM_POOLS)
    np.testing.assert_allclose(s, W3T["gm"] * e, rtol=1e-6)


def test_d0_is_the_low_b_limit_of_a_dti_fit(phantom):
    """The ground-truth tensor is what DTI converges to as b -> 0 (first cumulant)."""
    ms = base_microstructure(phantom)
    sel = np.flatnonzero(phantom.f_wm > 0.3)[::97]
    num, den = d0_moments(ms, sel, W3T)
    truth = tensor_metrics(num / den[:, None])
    bv, bvec = _scheme((10.0,), 30)
    s = mixture_signal(ms, sel, bv, bvec, W3T)
    fit = TensorModel(gradient_table(bv, bvecs=bvec, b0_threshold=1)).fit(s)
    assert np.max(np.abs(fit.fa - truth["fa"])) < 2e-3
    np.testing.assert_allclose(fit.md, truth["md"], rtol=5e-3)


def test_non_gaussian_signal_md_falls_with_b(phantom):
    """Kurtosis: the DTI MD of the same tissue is lower at higher b (Jensen et al. 2005)."""
    ms = base_microstructure(phantom)
    sel = np.flatnonzero(phantom.f_wm > 0.99)[::50]
    md = []
    for shells in ((800,), (1000,), (1000, 2000)):
        bv, bvec = _scheme(shells, 30)
        s = mixture_signal(ms, sel, bv, bvec, W3T)
        md.append(np.median(TensorModel(gradient_table(bv, bvecs=bvec)).fit(s).md))
    assert md[0] > md[1] > md[2]
    assert md[0] / md[2] > 1.1


def test_echo_time_changes_apparent_fa(phantom):
    """Intra-axonal water has the longer T2: longer TE weights it more -> higher FA."""
    ms = base_microstructure(phantom)
    sel = np.flatnonzero((phantom.bundle1 == BUNDLE_INDEX["CC"]) & (phantom.f_wm > 0.99))
    fa = []
    for te in (60.0, 110.0):
        w = compartment_weights(relaxation_at(3.0), te, 8000.0)
        num, den = d0_moments(ms, sel, w)
        fa.append(np.median(tensor_metrics(num / den[:, None])["fa"]))
    assert fa[1] > fa[0] + 0.01


def test_effects_shift_microstructure_where_declared(phantom):
    eff = EffectModel()
    base = subject_microstructure(phantom, None, eff, individual=False)
    dx = subject_microstructure(phantom, None, eff, individual=False, dx=1)
    changed = np.flatnonzero(dx.f_intra1 != base.f_intra1)
    labels = {LABELS[v][0] for v in np.unique(phantom.label[changed])}
    assert labels == set(eff.dx_rois)
    np.testing.assert_allclose((dx.f_intra1 - base.f_intra1)[changed], eff.dx_f)
    old = subject_microstructure(phantom, None, eff, individual=False, age=eff.age0 + 10)
    wm = phantom.bundle1 == BUNDLE_INDEX["WM"]
    np.testing.assert_allclose((old.f_intra1 - base.f_intra1)[wm], 10 * eff.age_f, atol=1e-12)
    with pytest.raises(SimulationError, match="dx_rois"):
        EffectModel(dx_rois=("XYZ-L",))


def test_individual_offsets_differ_between_subjects(phantom):
    eff = EffectModel()
    a = draw_subject("a", "ge", np.random.default_rng(1), age=40, sex="F", dx=0, effects=eff)
    b = draw_subject("b", "ge", np.random.default_rng(2), age=40, sex="F", dx=0, effects=eff)
    assert len(a.offset_bundle) == len(BUNDLE_NAMES)
    ma = subject_microstructure(phantom, a, eff)
    mb = subject_microstructure(phantom, b, eff)
    assert np.abs(ma.f_intra1 - mb.f_intra1).mean() > 1e-3


# ------------------------------------------------------------------ scanners
def test_presets_cover_the_vendors_and_quirks():
    vendors = {s.vendor for s in PRESETS.values()}
    assert vendors == {"GE", "Siemens", "Philips"}
    ph = protocol(PRESETS["philips"])
    dw = ph.bvals_written > 50
    assert set(np.unique(ph.bvals_written[dw])) - {800.0} and \
        np.all(np.abs(ph.bvals_written[dw] - 800) <= 15)
    assert np.all(ph.bvals_written[dw] % 5 == 0)
    sm = protocol(PRESETS["siemens"])
    b0 = sm.bvals_written < 50
    assert b0.sum() == 2 and np.all(sm.bvals_written[b0] == 5) and not b0[-1] and b0[0]
    assert set(np.unique(sm.bvals_written[~b0])) == {1000.0, 2000.0}
    ge = protocol(PRESETS["ge"])
    assert ge.bvals_written[0] == 0 and set(np.unique(ge.bvals_written[1:])) == {1000.0}
    for p in (ph, sm, ge):
        g = p.bvecs_voxel[p.bvals_written > 50]
        np.testing.assert_allclose(np.linalg.norm(g, axis=1), 1.0, atol=1e-9)


def test_sidecars_carry_vendor_fields():
    need = {"Manufacturer", "ManufacturersModelName", "MagneticFieldStrength",
            "DeviceSerialNumber", "SoftwareVersions", "EchoTime", "RepetitionTime"}
    for name in ("ge", "siemens"):
        d = sidecar(PRESETS[name], slice_thickness=2.5, n_slices=40)
        assert need | {"PhaseEncodingDirection", "TotalReadoutTime"} <= set(d)
        assert len(d["SliceTiming"]) == 40 and max(d["SliceTiming"]) < d["RepetitionTime"]
    d = sidecar(PRESETS["philips"], slice_thickness=3.0, n_slices=30)
    assert need <= set(d)
    assert "TotalReadoutTime" not in d and "PhaseEncodingDirection" not in d
    assert d["PhaseEncodingAxis"] == "j" and d["EchoTime"] == pytest.approx(0.070)


@pytest.mark.parametrize("bad,match", [
    (dict(vendor="Toshiba"), "vendor"),
    (dict(name="site_1"), "alphanumeric"),
    (dict(shells=(1000.0,), directions=(3,)), ">= 6"),
    (dict(orientation="LAX"), "orientation"),
    (dict(te_ms=9000.0), "TE < TR"),
    (dict(snr=-1.0), "snr"),
])
def test_bad_site_raises(bad, match):
    with pytest.raises(SimulationError, match=match):
        PRESETS["ge"].with_(**bad)


def test_get_site_from_dict_and_errors():
    s = get_site({"preset": "siemens", "name": "s2", "voxel_size": [3, 3, 3]})
    assert isinstance(s, Site) and s.voxel_size == (3, 3, 3) and s.vendor == "Siemens"
    with pytest.raises(SimulationError, match="unknown site preset"):
        get_site("hitachi")
    with pytest.raises(SimulationError, match="s3"):
        get_site({"preset": "ge", "name": "s3", "colour": "red"})


# ------------------------------------------------------------------ geometry and noise
def test_acquisition_grid_orientation_and_bvec_convention(phantom):
    rng = np.random.default_rng(3)
    aff = random_anatomy_affine(rng)
    ms = base_microstructure(phantom)
    site = PRESETS["philips"].with_(voxel_size=(4.0, 4.0, 4.0))
    scan = render_scan(phantom, ms, site, aff, None, rng, noise=False)
    assert nib.aff2axcodes(scan.affine) == ("R", "A", "S")
    assert np.linalg.det(scan.affine[:3, :3]) > 0
    # FSL convention: neurological storage -> x flipped relative to the voxel frame
    dw = scan.protocol.bvals_written > 50
    np.testing.assert_allclose(scan.bvecs_written[dw, 0], -scan.protocol.bvecs_voxel[dw, 0])
    site2 = PRESETS["ge"].with_(voxel_size=(4.0, 4.0, 4.0))
    aff2, shape2 = acquisition_grid(site2, aff)
    assert nib.aff2axcodes(aff2) == ("L", "A", "S") and np.linalg.det(aff2[:3, :3]) < 0


def test_brain_inside_field_of_view(phantom):
    rng = np.random.default_rng(4)
    aff = random_anatomy_affine(rng, rotation_deg=10, translation_mm=8)
    warp = random_warp(rng)
    site = PRESETS["ge"].with_(voxel_size=(4.0, 4.0, 4.0), zero_background=False)
    scan = render_scan(phantom, base_microstructure(phantom), site, aff, warp, rng, noise=False)
    b0 = scan.data[..., 0]
    # no brain signal on the faces of the field of view
    for ax in range(3):
        for idx in (0, -1):
            assert np.take(b0, idx, axis=ax).max() == 0.0


def test_rician_noise_level(phantom):
    rng = np.random.default_rng(5)
    site = PRESETS["siemens"].with_(voxel_size=(4.0, 4.0, 4.0), snr=10.0)
    ms = base_microstructure(phantom)
    scan = render_scan(phantom, ms, site, np.eye(4), None, rng)
    bg = scan.data[~scan.head_mask]
    # Rayleigh background: mean = sigma sqrt(pi/2), E[x^2] = 2 sigma^2
    assert np.mean(bg) == pytest.approx(scan.sigma * np.sqrt(np.pi / 2), rel=0.03)
    assert np.mean(bg**2) == pytest.approx(2 * scan.sigma**2, rel=0.03)
    assert scan.sigma == pytest.approx(scan.ref_signal / 10.0)


def test_transform_rotation_and_inverse_consistency():
    rng = np.random.default_rng(6)
    a = random_anatomy_affine(rng)
    r = rotation_part(a)
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0)
    warp = random_warp(rng)
    pts = rng.uniform(-40, 40, (100, 3))
    t = scanner_to_template(pts, a, warp)
    d = np.linalg.norm(t - scanner_to_template(pts, a, None), axis=1)
    assert 0.1 < d.mean() < 4.0
    # the warp is smooth and folds nowhere: Jacobian determinant of T stays positive
    eps = 0.5
    jac = np.stack([(scanner_to_template(pts + eps * e, a, warp) - t) / eps
                    for e in np.eye(3)], axis=2)
    det = np.linalg.det(jac) / np.linalg.det(a[:3, :3])
    assert det.min() > 0.5 and det.max() < 1.5
    # the written warp is exactly the one the simulation used
    back = Warp.from_image(nib.Nifti1Image.from_bytes(warp.to_image().to_bytes()))
    np.testing.assert_array_equal(back.field, warp.field)
    np.testing.assert_array_equal(back.affine, warp.affine)


def test_template_error_when_files_missing(tmp_path):
    with pytest.raises(TemplateError, match="phantom_FA"):
        load_phantom_template(tmp_path)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_renders(phantom, name):
    site = PRESETS[name].with_(voxel_size=(5.0, 5.0, 5.0))
    scan = render_scan(phantom, base_microstructure(phantom), site, np.eye(4), None,
                       np.random.default_rng(0))
    assert scan.data.shape[3] == site.n_volumes == scan.bvecs_written.shape[0]
    b0 = scan.data[..., scan.protocol.bvals_written < 50].mean(axis=-1)
    dw = scan.data[..., scan.protocol.bvals_written > 50].mean(axis=-1)
    brain = b0 > 5 * scan.sigma
    assert brain.sum() > 100 and np.all(np.isfinite(scan.data))
    assert np.median(dw[brain] / b0[brain]) < 0.9  # diffusion weighting attenuates
