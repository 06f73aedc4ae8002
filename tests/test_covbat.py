"""CovBat (Chen et al., Hum Brain Mapp 2022) against the authors' R algorithm, rebuilt here
from neuroCombat (for both ComBat steps) and a numpy PCA (``prcomp`` semantics)."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pandas as pd
import pytest
from neuroCombat import neuroCombat
from test_combat import SITES, make_data

from dmriharmony.errors import HarmonizationError
from dmriharmony.harmonizers import CovBat


def r_covbat(X, sites, cov, percent_var=0.95, n_pc=None, std_var=True):
    """The steps of CovBat's R ``covbat()`` (CovBat_Harmonization, R/covbat.R), with the
    ComBat steps done by neuroCombat (sva's algorithm)."""
    frame = cov.assign(site=sites)
    with contextlib.redirect_stdout(io.StringIO()):
        out = neuroCombat(X.T.copy(), frame, "site", ["sex"], ["age"])
    mean = (out["estimates"]["stand.mean"] + out["estimates"]["mod.mean"]).T
    resid = out["data"].T - mean
    center = resid.mean(axis=0)
    scale = resid.std(axis=0, ddof=1) if std_var else np.ones(resid.shape[1])
    Z = (resid - center) / scale
    U, s, Vt = np.linalg.svd(Z, full_matrices=False)
    full = U * s
    npc = n_pc or int(np.flatnonzero(np.cumsum(s**2) / np.sum(s**2) > percent_var)[0]) + 1
    with contextlib.redirect_stdout(io.StringIO()):
        harmonized = neuroCombat(full[:, :npc].T.copy(), pd.DataFrame({"site": sites}), "site",
                                 eb=False)["data"].T
    full[:, :npc] = harmonized
    return (full @ Vt) * scale + center + mean, npc


@pytest.mark.parametrize("kwargs", [{}, {"n_pc": 3}, {"percent_var": 0.5, "std_var": False}])
def test_matches_r_algorithm(kwargs):
    X, sites, cov = make_data(p=30)
    ref, npc = r_covbat(X, sites, cov, **kwargs)
    model = CovBat(**kwargs)
    ours = model.fit_transform(X, sites, cov)
    assert model.n_pc_ == npc
    assert np.abs(ours - ref).max() < 1e-6


def site_covariance_gap(Y, sites, cov):
    design = np.column_stack([np.ones(len(sites)), cov["age"], cov["sex"] == "M"])
    resid = Y - design @ np.linalg.lstsq(design, Y, rcond=None)[0]
    covs = [np.cov(resid[sites == s].T) for s in SITES]
    pooled = np.mean(covs, axis=0)
    return np.mean([np.linalg.norm(c - pooled) for c in covs]) / np.linalg.norm(pooled)


def test_removes_site_specific_covariance():
    """Sites with different correlation structure: CovBat narrows the gap ComBat leaves."""
    from dmriharmony.harmonizers import ComBat

    X, sites, cov = make_data(n_per=(100, 100, 100), p=12, seed=7)
    rng = np.random.default_rng(7)
    loading = rng.normal(0, 1.0, (1, 12))
    for s, strength in zip(SITES, (0.2, 1.0, 2.0)):  # scanner-dependent shared component
        rows = sites == s
        X[rows] += rng.normal(size=(rows.sum(), 1)) * strength * loading
    gap_raw = site_covariance_gap(X, sites, cov)
    gap_combat = site_covariance_gap(ComBat().fit_transform(X, sites, cov), sites, cov)
    gap_covbat = site_covariance_gap(CovBat().fit_transform(X, sites, cov), sites, cov)
    assert gap_covbat < 0.5 * gap_combat and gap_combat < gap_raw


def test_transform_new_subjects_and_roundtrip(tmp_path):
    X, sites, cov = make_data(p=15)
    assert not hasattr(CovBat(), "gamma_star_")
    model = CovBat().fit(X, sites, cov)
    np.testing.assert_array_equal(model.gamma_star_, model.combat_.gamma_star_)
    full = model.transform(X, sites, cov)
    idx = np.arange(0, len(sites), 7)
    part = model.transform(X[idx], sites[idx], cov.iloc[idx].reset_index(drop=True))
    np.testing.assert_allclose(part, full[idx], atol=1e-10)
    model.save(tmp_path / "covbat.npz")
    again = CovBat.load(tmp_path / "covbat.npz")
    np.testing.assert_array_equal(again.transform(X, sites, cov), full)
    with pytest.raises(HarmonizationError, match="holds a 'CovBat' model"):
        from dmriharmony.harmonizers import ComBat

        ComBat.load(tmp_path / "covbat.npz")


def test_missing_values_named():
    X, sites, cov = make_data(p=6)
    X[4, 2] = np.nan
    df = pd.DataFrame(X, columns=[f"roi{j}" for j in range(6)])
    with pytest.raises(HarmonizationError, match="'roi2' has missing"):
        CovBat().fit(df, sites, cov)
    with pytest.raises(HarmonizationError, match="n_pc"):
        CovBat(n_pc=99).fit(np.nan_to_num(X), sites, cov)


@pytest.mark.parametrize("block", [64, 8192])
def test_more_features_than_subjects_blockwise(monkeypatch, block):
    """The dual (Gram-matrix) PCA path, computed by feature blocks, equals the R algorithm."""
    import dmriharmony.harmonizers.covbat as covbat_module

    monkeypatch.setattr(covbat_module, "_BLOCK", block)
    X, sites, cov = make_data(n_per=(20, 25, 15), p=200, seed=11)
    ref, npc = r_covbat(X, sites, cov, percent_var=0.8)
    model = CovBat(percent_var=0.8)
    ours = model.fit_transform(X, sites, cov)
    assert model.n_pc_ == npc
    assert np.abs(ours - ref).max() < 1e-6
    with pytest.raises(HarmonizationError, match="rank"):
        CovBat(n_pc=60).fit(X, sites, cov)  # 60 subjects: centred residuals have rank <= 59
