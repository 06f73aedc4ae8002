"""DTI science functions: gradients, shell selection, masking, tensor fit, QC, denoising.

Reference numbers: DIPY's own ``TensorModel`` (the trusted implementation we wrap) on DIPY's
real ``small_64D`` data, and closed-form FA/MD of known tensors (Basser & Pierpaoli 1996).
"""

from __future__ import annotations

import numpy as np
import pytest
from dipy.core.gradients import gradient_table
from dipy.reconst.dti import TensorModel

from dmriharmony.dti import (
    brain_mask,
    denoise,
    fit_tensor,
    make_gtab,
    read_bvals,
    read_bvecs,
    remove_gibbs,
    round_bvals,
    select_shells,
    shells,
)
from dmriharmony.dti.fit import estimate_sigma_b0
from dmriharmony.dti.gradients import check_gradients
from dmriharmony.dti.synthetic import (
    GM_EVALS,
    WM_EVALS,
    gradient_scheme,
    synth_dwi,
    tensor_fa,
    tensor_phantom,
)
from dmriharmony.errors import BIDSInputError


def test_closed_form_fa():
    # FA of (1.7, 0.3, 0.3) e-3: sqrt(1.5 * 1.30667 / 3.07) = 0.79902 (by hand)
    assert tensor_fa(WM_EVALS) == pytest.approx(0.79902, abs=1e-5)
    assert tensor_fa((1e-3, 1e-3, 1e-3)) == 0.0


@pytest.mark.parametrize("method", ["wls", "ols", "nlls", "restore"])
def test_noise_free_fit_recovers_tensor(method):
    labels = tensor_phantom((8, 8, 4))["labels"]
    bvals, bvecs = gradient_scheme(20, (1000.0,), n_b0=2)
    rng = np.random.default_rng(0)
    data, fa_true = synth_dwi(labels, bvals, bvecs, snr=1e9, seed=1)
    data = data * (1 + 1e-7 * rng.standard_normal(data.shape))  # RESTORE needs sigma > 0
    maps = fit_tensor(data, make_gtab(bvals, bvecs), labels > 0, method=method)
    wm, gm = labels == 2, labels == 1
    assert np.abs(maps.fa[wm] - fa_true[wm]).max() < 1e-4
    assert np.abs(maps.md[wm] - np.mean(WM_EVALS)).max() < 1e-7
    assert np.abs(maps.ad[wm] - WM_EVALS[0]).max() < 1e-7
    assert np.abs(maps.rd[wm] - WM_EVALS[1]).max() < 1e-7
    assert np.abs(maps.md[gm] - np.mean(GM_EVALS)).max() < 1e-7
    # fibres along x: |v1| = (1, 0, 0)
    assert np.abs(np.abs(maps.v1[wm][:, 0]) - 1).max() < 1e-5
    assert np.all(maps.fa[labels == 0] == 0)
    assert maps.tensor.shape == labels.shape + (6,)
    assert maps.qc["n_voxels"] == int((labels > 0).sum())


@pytest.mark.parametrize("method", ["wls", "ols", "nlls"])
def test_matches_dipy_on_real_small_64d(method):
    """Our maps equal a bare DIPY TensorModel fit of DIPY's real small_64D data."""
    from dipy.data import get_fnames
    from dipy.io.image import load_nifti

    fdata, fbval, fbvec = get_fnames(name="small_64D")
    data, _ = load_nifti(fdata)
    bvals, bvecs = read_bvals(fbval), read_bvecs(fbvec)
    check_gradients(bvals, bvecs, data.shape[3])
    mask = brain_mask(data, bvals)
    # a crop inside the brain: Otsu keeps the bright (CSF-rich) part; enough to compare fits
    assert 0.1 < mask.mean() <= 1.0
    maps = fit_tensor(data, make_gtab(bvals, bvecs), mask, method=method)
    bv = np.nan_to_num(bvecs)
    bv[bvals > 50] /= np.linalg.norm(bv[bvals > 50], axis=1, keepdims=True)
    ref = TensorModel(gradient_table(bvals, bvecs=bv), fit_method=method.upper()).fit(
        np.clip(data.astype(np.float64), 1e-6, None), mask=mask)
    np.testing.assert_allclose(maps.fa[mask], np.clip(ref.fa[mask], 0, 1), atol=1e-5)
    np.testing.assert_allclose(maps.md[mask], ref.md[mask], rtol=1e-4, atol=1e-9)
    # plausible real-tissue values (mm^2/s): MD of brain tissue ~0.7-3e-3
    assert 0.1 < np.median(maps.fa[mask]) < 0.6
    assert 0.4e-3 < np.median(maps.md[mask]) < 3.5e-3
    assert maps.qc["snr"] > 5 and 0 <= maps.qc["outlier_fraction"] < 0.1


def test_chunking_does_not_change_results():
    labels = tensor_phantom((8, 8, 4))["labels"]
    bvals, bvecs = gradient_scheme(15, (1000.0,))
    data, _ = synth_dwi(labels, bvals, bvecs, snr=20, seed=3)
    gtab = make_gtab(bvals, bvecs)
    a = fit_tensor(data, gtab, labels > 0)
    b = fit_tensor(data, gtab, labels > 0, chunk_voxels=7)
    np.testing.assert_array_equal(a.fa, b.fa)
    assert a.qc == pytest.approx(b.qc)
    # the chunked QC equals tensor_qc on the whole arrays
    from dmriharmony.dti.fit import tensor_qc

    mask = labels > 0
    signal = np.clip(data[mask].astype(np.float64), 1e-6, None)
    tfit = TensorModel(gtab, return_S0_hat=True).fit(signal)
    pred = tfit.predict(gtab, S0=tfit.S0_hat)
    ref = tensor_qc(signal, pred, gtab, a.qc["sigma"])
    for k, v in ref.items():
        assert a.qc[k] == pytest.approx(v, rel=1e-6), k


def test_sigma_and_snr_from_b0_repeats():
    labels = tensor_phantom((24, 24, 12))["labels"]
    bvals, bvecs = gradient_scheme(20, (1000.0,), n_b0=6)
    data, _ = synth_dwi(labels, bvals, bvecs, snr=40, s0=1000.0, seed=5)
    sigma = estimate_sigma_b0(data, bvals, labels > 0)
    assert sigma == pytest.approx(25.0, rel=0.1)  # S0 / SNR
    maps = fit_tensor(data, make_gtab(bvals, bvecs), labels > 0)
    assert maps.qc["sigma_method"] == "b0-repeats"
    assert maps.qc["snr"] == pytest.approx(40, rel=0.12)
    # Gaussian-like residuals: ~0.27 % beyond 3 sigma (plus some Rician/model misfit)
    assert maps.qc["outlier_fraction"] < 0.02


def test_single_b0_uses_wls_residuals():
    labels = tensor_phantom((10, 10, 4))["labels"]
    bvals, bvecs = gradient_scheme(30, (1000.0,), n_b0=1)
    data, _ = synth_dwi(labels, bvals, bvecs, snr=50, seed=2)
    maps = fit_tensor(data, make_gtab(bvals, bvecs), labels > 0, method="restore")
    assert maps.qc["sigma_method"] == "wls-residuals"
    assert maps.qc["sigma"] == pytest.approx(20.0, rel=0.35)


def test_shell_selection_and_rounding():
    bvals = np.array([0, 5, 995, 1000, 1005, 990, 1010, 1000, 2000, 2010, 1500, 1490])
    assert list(round_bvals(bvals)) == [0, 0, 1000, 1000, 1000, 1000, 1000, 1000, 2000, 2000,
                                        1500, 1500]
    assert shells(bvals) == [0, 1000, 1500, 2000]
    bvecs = np.tile([1.0, 0, 0], (len(bvals), 1))
    sel = select_shells(bvals, bvecs)
    assert list(sel.index) == [0, 1, 2, 3, 4, 5, 6, 7, 10, 11]
    assert sel.shells == [0, 1000, 1500]
    assert sel.bvals[2] == 995  # the fit uses the true b-values, not the rounded ones
    sel = select_shells(bvals, bvecs, bmax=1000)
    assert sel.shells == [0, 1000]
    with pytest.raises(BIDSInputError, match="at least 6"):
        select_shells(bvals, bvecs, bmax=500)


def test_gradient_file_layouts(tmp_path):
    (tmp_path / "a.bval").write_text("0 1000 1000 1000\n")
    (tmp_path / "a.bvec").write_text("0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    (tmp_path / "b.bvec").write_text("0 0 0\n1 0 0\n0 1 0\n0 0 1\n")  # N x 3 (transposed)
    b = read_bvals(tmp_path / "a.bval")
    v1 = read_bvecs(tmp_path / "a.bvec", 4)
    v2 = read_bvecs(tmp_path / "b.bvec", 4)
    np.testing.assert_array_equal(v1, v2)
    np.testing.assert_array_equal(v1[1], [1, 0, 0])
    check_gradients(b, v1, 4)
    (tmp_path / "bad.bval").write_text("0 x 1000\n")
    with pytest.raises(BIDSInputError, match="bad.bval"):
        read_bvals(tmp_path / "bad.bval")
    (tmp_path / "neg.bval").write_text("0 -1000\n")
    with pytest.raises(BIDSInputError, match="neg.bval"):
        read_bvals(tmp_path / "neg.bval")
    with pytest.raises(BIDSInputError, match="missing.bvec"):
        read_bvecs(tmp_path / "missing.bvec")


@pytest.mark.parametrize("bvals, bvecs, match", [
    ([0, 1000], [[0, 0, 0], [1, 0, 0]], "3 volumes"),
    ([1000, 1000, 1000], [[1, 0, 0]] * 3, "no b=0"),
    ([0, 0, 0], [[0, 0, 0]] * 3, "no diffusion-weighted"),
    ([0, 1000, 1000], [[0, 0, 0], [1, 0, 0], [0, 0, 0]], "zero b-vector"),
    ([0, 1000, 1000], [[0, 0, 0], [1, 0, 0], [0.5, 0, 0]], "non-unit"),
    ([0, 1000, 1000], [[0, 0, 0], [1, 0, 0], [np.nan, 0, 0]], "NaN"),
])
def test_check_gradients_errors(bvals, bvecs, match):
    with pytest.raises(BIDSInputError, match=match):
        check_gradients(np.asarray(bvals, float), np.asarray(bvecs, float), 3,
                        bval_file="x.bval", bvec_file="x.bvec")


def test_brain_mask_covers_phantom():
    labels = tensor_phantom((16, 16, 8))["labels"]
    bvals, bvecs = gradient_scheme(12, (1000.0,))
    data, _ = synth_dwi(labels, bvals, bvecs, snr=30, seed=0)
    mask = brain_mask(data, bvals)
    inside = labels > 0
    dice = 2 * np.sum(mask & inside) / (mask.sum() + inside.sum())
    assert dice > 0.85


def test_mppca_reduces_noise_and_gibbs_keeps_shape():
    labels = tensor_phantom((12, 12, 8))["labels"]
    bvals, bvecs = gradient_scheme(20, (1000.0,))
    clean, _ = synth_dwi(labels, bvals, bvecs, snr=1e9, seed=0)
    noisy, _ = synth_dwi(labels, bvals, bvecs, snr=15, seed=0)
    den = denoise(noisy, bvals, "mppca", mask=labels > 0)
    inside = labels > 0
    err_noisy = np.sqrt(np.mean((noisy[inside] - clean[inside]) ** 2))
    err_den = np.sqrt(np.mean((den[inside] - clean[inside]) ** 2))
    assert err_den < 0.8 * err_noisy
    assert np.all(np.isfinite(den))
    out = remove_gibbs(noisy[..., :4])  # DIPY's Gibbs removal is slow: a few volumes suffice
    assert out.shape == noisy[..., :4].shape and out.dtype == np.float32
    assert np.all(np.isfinite(out))
    with pytest.raises(ValueError, match="unknown denoising"):
        denoise(noisy, bvals, "bm4d")


def test_patch2self_reduces_noise():
    labels = tensor_phantom((12, 12, 8))["labels"]
    bvals, bvecs = gradient_scheme(20, (1000.0,))
    clean, _ = synth_dwi(labels, bvals, bvecs, snr=1e9, seed=0)
    noisy, _ = synth_dwi(labels, bvals, bvecs, snr=15, seed=0)
    den = denoise(noisy, bvals, "patch2self")
    inside = labels > 0
    err_noisy = np.sqrt(np.mean((noisy[inside] - clean[inside]) ** 2))
    err_den = np.sqrt(np.mean((den[inside] - clean[inside]) ** 2))
    assert err_den < 0.8 * err_noisy
    assert den.shape == noisy.shape and den.dtype == np.float32


def test_gibbs_removal_reduces_ringing():
    """A square imaged at 64x64 from a truncated spectrum rings at the edges (Gibbs);
    Kellner's sub-voxel shift method damps the ringing (Kellner et al., MRM 2016)."""
    hi, lo = 256, 64
    obj = np.zeros((hi, hi))
    obj[80:176, 90:166] = 100.0
    k = np.fft.fftshift(np.fft.fft2(obj))
    c = hi // 2
    k_lo = k[c - lo // 2:c + lo // 2, c - lo // 2:c + lo // 2] * (lo / hi) ** 2
    ringing = np.real(np.fft.ifft2(np.fft.ifftshift(k_lo)))
    vol = np.repeat(ringing[:, :, None, None], 3, axis=2).repeat(2, axis=3).astype(np.float32)
    out = remove_gibbs(vol)[:, :, 1, 0]
    rows = np.s_[26:38]
    profile_in = ringing[rows, 24:40].mean(axis=0)   # across the left edge at x = 22.5
    profile_out = out[rows, 24:40].mean(axis=0)
    # overshoot next to the edge and oscillation inside the square, before vs after
    assert np.std(profile_out) < 0.7 * np.std(profile_in)
    assert abs(float(np.median(out[28:36, 30:36])) - 100.0) < 3.0
