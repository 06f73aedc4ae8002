"""VAE building blocks: published architecture, config I/O, split, latent accuracy, phantom."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dmriharmony.errors import HarmonizationError  # noqa: E402
from dmriharmony.harmonizers._vae_data import split_validation  # noqa: E402
from dmriharmony.harmonizers.vae import (  # noqa: E402
    SiteInvariantVAE,
    VAEConfig,
    latent_site_accuracy,
    small_config,
)
from dmriharmony.sh import neighbourhood_features, rish_features  # noqa: E402
from dmriharmony.sh.synthetic import SiteEffect, apply_site, subject_sh_volume  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_published_architecture_on_322_features(tmp_path):
    """Moyer et al. 2020: 7 x 46 inputs, encoder 256-128-64 -> 32, one-hot code of K sites."""
    feats, mask = subject_sh_volume(3, shape=(6, 6, 3), order=8)
    X = np.concatenate([neighbourhood_features(apply_site(feats, SiteEffect(g, (1.0,) * 5)),
                                               mask) for g in (1.0, 0.9, 1.1, 1.2)])
    sites = np.repeat(["s1", "s2", "s3", "s4"], int(mask.sum()))
    assert X.shape == (432, 322)
    cfg = VAEConfig(max_epochs=1)
    assert (cfg.latent_dim, cfg.encoder_hidden, cfg.batch_size, cfg.lr) == (32, (256, 128, 64),
                                                                             128, 1e-4)
    assert (cfg.kl_weight, cfg.mi_weight, cfg.adv_weight) == (1.0, 0.01, 10.0)
    model = SiteInvariantVAE(cfg, progress=False).fit(X, sites)
    shapes = [tuple(p.shape) for p in model.encoder.parameters()]
    assert shapes[:6] == [(256, 322), (256,), (128, 256), (128,), (64, 128), (64,)]
    assert shapes[6:] == [(32, 64), (32,), (32, 64), (32,)]
    dec = [tuple(p.shape) for p in model.decoder.parameters() if p.ndim == 2]
    assert dec == [(64, 36), (128, 64), (256, 128), (322, 256)]  # z (32) + 4 one-hot sites
    assert model.encode(X[:5]).shape == (5, 32)
    assert model.transform(X[:5], ["s1"] * 5, target_site="s4").shape == (5, 322)
    model.save(tmp_path)
    meta = json.loads((tmp_path / "vae_config.json").read_text())
    assert meta["sites"] == ["s1", "s2", "s3", "s4"] and meta["n_features"] == 322
    assert meta["config"]["encoder_hidden"] == [256, 128, 64]


def test_config_round_trip_and_small_config():
    cfg = small_config(mode="site_adversary")
    assert VAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.encoder_hidden == (128, 64, 32) and cfg.latent_dim == 16
    with pytest.raises(HarmonizationError, match="unknown VAE settings in config: bogus"):
        VAEConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    for bad in (dict(lr=0), dict(latent_dim=0), dict(validation_fraction=1.0),
                dict(mi_weight=-1), dict(encoder_hidden=())):
        with pytest.raises(HarmonizationError, match="VAE setting"):
            VAEConfig(**bad)


def test_validation_split_holds_out_whole_subjects_per_site():
    sites = np.repeat(["A", "B"], 100)
    groups = np.repeat([f"sub{i}" for i in range(10)], 20)
    train, val = split_validation(sites, groups, 0.2, seed=0)
    assert not np.any(train & val) and np.all(train | val)
    for g in np.unique(groups):
        assert len(set(val[groups == g])) == 1  # a subject is entirely on one side
    for s in ("A", "B"):
        assert val[sites == s].sum() == 20 and train[sites == s].sum() == 80
    # without groups: voxels, per site; fraction 0 keeps everything for training
    train, val = split_validation(sites, None, 0.1, seed=0)
    assert val[sites == "A"].sum() == 10
    assert split_validation(sites, None, 0.0, 0)[1].sum() == 0
    assert not np.array_equal(split_validation(sites, groups, 0.2, 1)[1],
                              split_validation(sites, groups, 0.2, 0)[1])


def test_latent_site_accuracy_chance_and_signal():
    rng = np.random.default_rng(0)
    sites = np.repeat(["a", "b", "c", "d"], 150)
    z = rng.normal(size=(600, 4))
    res = latent_site_accuracy(z, sites, seed=0)
    assert res.chance == 0.25 and res.n_sites == 4 and len(res.fold_scores) == 5
    assert abs(res.balanced_accuracy - 0.25) < 0.08
    z[:, 0] += 6.0 * (np.arange(600) // 150)  # site-separable along one axis
    assert latent_site_accuracy(z, sites).balanced_accuracy > 0.9
    groups = np.tile(np.repeat(np.arange(5), 30), 4)
    assert latent_site_accuracy(z, sites, groups=groups).balanced_accuracy > 0.9
    sub = latent_site_accuracy(z, sites, max_samples=200)
    assert sub.n_samples == 200
    with pytest.raises(HarmonizationError, match="at least 2 sites"):
        latent_site_accuracy(z, ["a"] * 600)
    with pytest.raises(HarmonizationError, match="NaN"):
        latent_site_accuracy(np.full((600, 2), np.nan), sites)


def test_phantom_site_effect_is_a_per_order_scaling():
    feats, mask = subject_sh_volume(11, shape=(5, 5, 2), order=6)
    assert feats.shape == (5, 5, 2, 29) and mask.all()
    effect = SiteEffect(0.7, (1.0, 0.9, 0.8, 0.6))
    scanned = apply_site(feats, effect)
    np.testing.assert_allclose(scanned[..., 0], 0.7 * feats[..., 0])
    np.testing.assert_allclose(rish_features(scanned[..., 1:]),
                               rish_features(feats[..., 1:]) * np.square(effect.scales))
    # normalised DTI signal: c_00 = sqrt(4 pi) * mean signal, between exp(-b * 2e-3) and 1
    c00 = feats[..., 1] / np.sqrt(4 * np.pi)
    assert np.all((c00 > np.exp(-2.0)) & (c00 < 1.0))
    with pytest.raises(HarmonizationError, match="site effect does not fit"):
        apply_site(feats, SiteEffect(1.0, (1.0, 1.0)))
    np.testing.assert_array_equal(subject_sh_volume(11, shape=(5, 5, 2), order=6)[0], feats)


def test_explicit_validation_set_and_no_validation():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(600, 10)).astype(np.float32)
    X[300:] *= 1.5
    sites = np.repeat(["a", "b"], 300)
    cfg = VAEConfig(latent_dim=4, encoder_hidden=(16, 8, 8), max_epochs=3, lr=1e-3)
    m = SiteInvariantVAE(cfg, progress=False).fit(X[::2], sites[::2], X_val=X[1::2],
                                                  sites_val=sites[1::2])
    assert len(m.history_) == 3 and "val_loss" in m.history_[0]
    with pytest.raises(HarmonizationError, match="sites_val.*site 'c' was not seen|site 'c'"):
        SiteInvariantVAE(cfg, progress=False).fit(X[::2], sites[::2], X_val=X[1::2],
                                                  sites_val=["c"] * 300)
    m0 = SiteInvariantVAE(cfg.replace(validation_fraction=0.0, patience=0),
                          progress=False).fit(X, sites)
    assert len(m0.history_) == 3 and "val_loss" not in m0.history_[0]
    # early stopping: no epoch beats the first by min_delta -> stop after `patience` more
    es = SiteInvariantVAE(cfg.replace(max_epochs=10, patience=2, min_delta=1e9),
                          progress=False).fit(X, sites)
    assert len(es.history_) == 3 and es.best_epoch_ == 0


def test_measured_shell_mapped_to_the_common_bvalue():
    """The residual conversions add the VAE's change to the run's measured shell, mapped to the
    common b-value by the mono-exponential rule when the b-values differ (Philips b=800 ->
    1000): exact for a mono-exponential signal, the identity when the b-values agree."""
    from dmriharmony.group.vae import _measured_at

    rng = np.random.default_rng(0)
    adc = rng.uniform(0.3e-3, 2.5e-3, (4, 3, 2, 15))
    b0 = rng.uniform(500, 1500, (4, 3, 2))
    mask = np.ones((4, 3, 2), bool)
    mask[0, 0, 0] = False
    at800 = b0[..., None] * np.exp(-800 * adc)
    mapped = _measured_at(at800, b0, 800.0, 1000.0, mask)
    np.testing.assert_allclose(mapped[mask], (b0[..., None] * np.exp(-1000 * adc))[mask],
                               rtol=1e-10)
    assert np.all(mapped[~mask] == 0)
    same = _measured_at(at800, b0, 1003.0, 1000.0, mask)  # within 1 %: as measured
    np.testing.assert_array_equal(same, at800)
