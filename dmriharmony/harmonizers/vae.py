"""Site-invariant conditional variational autoencoder (torch).

Moyer D, Ver Steeg G, Tax CMW, Thompson PM. "Scanner invariant representations for diffusion
MRI harmonization." Magn Reson Med 84:2174-2189 (2020).

Each sample is a voxel with its neighbours, each described by b0 + SH coefficients
(:func:`dmriharmony.sh.neighbourhood_features`; 7 x 46 = 322 values for order 8 and 6
neighbours, any width here). An encoder q(z | x) (tanh MLP 256-128-64 -> mean and
log-variance of a 32-dimensional z) and a decoder p(x | z, s) conditioned on a one-hot site
code ``s`` (any number of sites) are trained with (Moyer et al., eqs. 4-9)

``L = w_rec ||x - x_hat||^2 + w_kl KL[q(z|x) || N(0, I)]
     + w_mi mean_ij KL[q(z|x_i) || q(z|x_j)] + w_adv L_adv``

where the pairwise KL between the encodings of a batch bounds I(z; s) (Moyer et al., eq. 8),
and ``L_adv`` is the loss of a real/fake adversary that sees real feature vectors and vectors
decoded with the site codes of other voxels of the batch (site-swapped re-generations).
Deviations from the authors' code, on purpose: the reconstruction term is the per-sample sum
of squared errors over (standardised) features, i.e. a Gaussian log-likelihood, rather than a
mean that the summed KL would overwhelm; the generator uses the non-saturating form of the
adversarial loss (Goodfellow et al. 2014); their subject-specific "projection" loss onto each
scan's gradient table is not used (inputs here are SH features, not DWI).

``mode="site_adversary"`` adds a site classifier on the latent mean, trained in alternation
with the encoder; the encoder is pushed to make its prediction uniform over sites (confusion
loss, Alvi et al., "Turning a blind eye", ECCV Workshops 2018), since the MI bound alone can
leave z site-predictable.

Harmonization: ``transform`` encodes each voxel (latent mean) and decodes it with a chosen
target site's code or with the site-average code (every site weighted equally).

Everything random is seeded from ``config.seed`` (weights, split, batch order, noise);
training on CPU with a fixed thread count is bit-for-bit repeatable.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dmriharmony._fs import set_default_mode
from dmriharmony.errors import HarmonizationError
from dmriharmony.harmonizers._vae_config import MODES, VAEConfig, small_config
from dmriharmony.harmonizers._vae_data import (
    check_features,
    check_sites,
    site_index,
    split_validation,
)
from dmriharmony.harmonizers._vae_eval import LatentSiteAccuracy, latent_site_accuracy

__all__ = [
    "MODES",
    "LatentSiteAccuracy",
    "SiteInvariantVAE",
    "VAEConfig",
    "gaussian_kl",
    "latent_site_accuracy",
    "pairwise_gaussian_kl",
    "small_config",
]

log = logging.getLogger(__name__)

CONFIG_FILE = "vae_config.json"
WEIGHTS_FILE = "vae_weights.pt"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- networks
def _mlp(sizes: Sequence[int], final_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if final_activation or i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """q(z | x): tanh MLP, then linear heads for the mean and the log-variance."""

    def __init__(self, n_in: int, hidden: Sequence[int], n_latent: int) -> None:
        super().__init__()
        self.body = _mlp([n_in, *hidden], final_activation=True)
        self.mean = nn.Linear(hidden[-1], n_latent)
        self.logvar = nn.Linear(hidden[-1], n_latent)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.mean(h), self.logvar(h)


class Decoder(nn.Module):
    """p(x | z, s): tanh MLP on ``[z, site code]`` mirroring the encoder, linear output."""

    def __init__(self, n_latent: int, n_sites: int, hidden: Sequence[int], n_out: int) -> None:
        super().__init__()
        self.net = _mlp([n_latent + n_sites, *reversed(hidden), n_out], final_activation=False)

    def forward(self, z: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, code], dim=1))


class Critic(nn.Module):
    """A tanh MLP returning logits (real/fake adversary or latent site classifier)."""

    def __init__(self, n_in: int, hidden: Sequence[int], n_out: int) -> None:
        super().__init__()
        self.net = _mlp([n_in, *hidden, n_out], final_activation=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ----------------------------------------------------------------------------- losses
def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL[N(mean, diag exp(logvar)) || N(0, I)] per sample (Kingma & Welling 2014, App. B)."""
    return 0.5 * torch.sum(mean.pow(2) + logvar.exp() - 1.0 - logvar, dim=1)


def pairwise_gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Matrix ``K[i, j] = KL[q(z|x_i) || q(z|x_j)]`` for diagonal Gaussians (B, B).

    ``KL = 1/2 sum_d [log v_j - log v_i + (v_i + (m_i - m_j)^2) / v_j - 1]``; its batch mean
    is the upper bound on I(z; s) of Moyer et al. (2020), eq. 8.
    """
    var = logvar.exp()
    inv = 1.0 / var
    trace = var @ inv.T
    sq = (mean.pow(2) @ inv.T) - 2.0 * (mean @ (mean * inv).T) + (mean.pow(2) * inv).sum(1)[None]
    logdet = logvar.sum(1)
    return 0.5 * (trace + sq + logdet[None, :] - logdet[:, None] - mean.shape[1])


# ----------------------------------------------------------------------------- model
class SiteInvariantVAE:
    """Conditional VAE harmonizer with adversarial site invariance (Moyer et al. 2020).

    Parameters
    ----------
    config
        Hyper-parameters (:class:`VAEConfig`; default: the published configuration).
    device
        ``"cpu"`` (default), ``"cuda"``/``"cuda:N"``, or ``"auto"`` (CUDA when available).
    progress
        Show a tqdm progress bar over epochs.

    Attributes (after ``fit``)
    --------------------------
    sites_ : list of str
        Training sites, sorted; site ``k`` has one-hot code ``e_k``.
    n_features_ : int
    history_ : list of dict
        Per-epoch training and validation losses.
    best_epoch_ : int
        Epoch whose weights were kept (lowest validation VAE loss).
    residual_sd_ : ndarray (n_sites, n_features)
        Per site, the RMS of what the autoencoder does not reconstruct, ``x - D(z, site)``
        (standardized units; held-out scans when every site has some), used by the
        location-scale conversion (:meth:`transform`).
    """

    def __init__(self, config: VAEConfig | None = None, *, device: str = "cpu",
                 progress: bool = True) -> None:
        self.config = copy.deepcopy(config) if config is not None else VAEConfig()
        self.config.validate()
        self.device = _resolve_device(device)
        self.progress = progress
        self.sites_: list[str] | None = None
        self.n_features_: int | None = None
        self.history_: list[dict] = []
        self.best_epoch_: int | None = None
        self.residual_sd_: np.ndarray | None = None

    # -- construction ----------------------------------------------------------------
    def _build(self, n_features: int, n_sites: int) -> None:
        cfg = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.encoder = Encoder(n_features, cfg.encoder_hidden, cfg.latent_dim)
            self.decoder = Decoder(cfg.latent_dim, n_sites, cfg.encoder_hidden, n_features)
            self.discriminator = Critic(n_features, cfg.discriminator_hidden, 1)
            self.classifier = Critic(cfg.latent_dim, cfg.classifier_hidden, n_sites)
        for net in self._nets().values():
            net.to(self.device)
        self.mean_ = torch.zeros(n_features, device=self.device)
        self.scale_ = torch.ones(n_features, device=self.device)

    def _nets(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "decoder": self.decoder,
                "discriminator": self.discriminator, "classifier": self.classifier}

    def _check_fitted(self) -> None:
        if self.sites_ is None:
            raise HarmonizationError("the VAE is not trained: call fit() or load() first")

    # -- training --------------------------------------------------------------------
    def fit(
        self,
        X: np.ndarray,
        sites: Sequence | np.ndarray,
        *,
        groups: Sequence | np.ndarray | None = None,
        X_val: np.ndarray | None = None,
        sites_val: Sequence | np.ndarray | None = None,
    ) -> SiteInvariantVAE:
        """Train on voxel samples of many subjects and sites.

        Parameters
        ----------
        X
            (n_voxels, n_features) samples (e.g. neighbourhood SH features of all scans).
        sites
            Site label of each voxel (at least 2 sites).
        groups
            Subject/scan label of each voxel: the validation split then holds out whole scans.
        X_val, sites_val
            An explicit validation set (overrides ``config.validation_fraction``).
        """
        cfg = self.config
        X = check_features(X)
        labels = check_sites(sites, X.shape[0])
        site_list = sorted(set(labels.tolist()))
        if len(site_list) < 2:
            raise HarmonizationError(
                f"the VAE needs voxels of at least 2 sites, got only {site_list}"
            )
        grp = None if groups is None else np.asarray(groups).astype(str).ravel()
        if grp is not None and grp.size != X.shape[0]:
            raise HarmonizationError(f"groups has {grp.size} labels for {X.shape[0]} voxels")
        if X_val is not None:
            if sites_val is None:
                raise HarmonizationError("X_val was given without sites_val")
            Xv = check_features(X_val, X.shape[1], "X_val")
            lv = check_sites(sites_val, Xv.shape[0], site_list, "sites_val")
            Xt, lt = X, labels
        else:
            train, val = split_validation(labels, grp, cfg.validation_fraction, cfg.seed)
            Xt, lt, Xv, lv = X[train], labels[train], X[val], labels[val]
        self.sites_ = site_list
        self.n_features_ = int(X.shape[1])
        self._build(self.n_features_, len(site_list))
        if cfg.standardize:
            mean = Xt.mean(axis=0, dtype=np.float64)
            sd = Xt.std(axis=0, dtype=np.float64)
            sd[sd < 1e-8 * max(1.0, float(np.abs(mean).max()))] = 1.0
            self.mean_ = torch.as_tensor(mean, dtype=torch.float32, device=self.device)
            self.scale_ = torch.as_tensor(sd, dtype=torch.float32, device=self.device)
        self._train(Xt, site_index(lt, site_list), Xv, site_index(lv, site_list))
        yv = site_index(lv, site_list)
        held_out = len(Xv) and np.bincount(yv, minlength=len(site_list)).min() >= 20
        self.residual_sd_ = (self._residual_sd(Xv, yv) if held_out
                             else self._residual_sd(Xt, site_index(lt, site_list)))
        return self

    @torch.no_grad()
    def _residual_sd(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per site and feature, the RMS of ``x - D(z, own site)`` (standardized units)."""
        k = len(self.sites_)
        sq = np.zeros((k, self.n_features_))
        count = np.zeros(k)
        for net in self._nets().values():
            net.eval()
        for start in range(0, len(X), 8192):
            x = self._standardize(torch.from_numpy(X[start:start + 8192]).to(self.device))
            yy = torch.from_numpy(y[start:start + 8192]).to(self.device)
            mean, _lv = self.encoder(x)
            r = (x - self.decoder(mean, F.one_hot(yy, k).float())).double() ** 2
            idx = yy.cpu().numpy()
            np.add.at(sq, idx, r.cpu().numpy())
            count += np.bincount(idx, minlength=k)
        if (count == 0).any():
            missing = [self.sites_[i] for i in np.flatnonzero(count == 0)]
            raise HarmonizationError(f"no voxels of site(s) {missing} to estimate the "
                                     "residual scale from")
        return np.sqrt(sq / count[:, None])

    def _train(self, Xt: np.ndarray, yt: np.ndarray, Xv: np.ndarray, yv: np.ndarray) -> None:
        cfg = self.config
        n_sites = len(self.sites_)
        data = torch.utils.data.TensorDataset(torch.from_numpy(np.ascontiguousarray(Xt)),
                                              torch.from_numpy(yt))
        loader_gen = torch.Generator().manual_seed(cfg.seed)
        loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, shuffle=True,
                                             generator=loader_gen, drop_last=False)
        noise = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        perm_gen = torch.Generator().manual_seed(cfg.seed + 2)
        vae_params = list(self.encoder.parameters()) + list(self.decoder.parameters())
        opt = torch.optim.Adam(vae_params, lr=cfg.lr)
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.adv_lr)
        opt_c = torch.optim.Adam(self.classifier.parameters(), lr=cfg.adv_lr)
        use_clf = cfg.mode == "site_adversary"
        best, best_state, stale = np.inf, None, 0
        self.history_ = []
        bar = tqdm(range(cfg.max_epochs), desc="VAE", unit="epoch", disable=not self.progress)
        for epoch in bar:
            t0 = time.perf_counter()
            adversarial = epoch >= cfg.adv_warmup_epochs
            for net in self._nets().values():
                net.train()
            sums: dict[str, float] = {}
            for xb, yb in loader:
                x = self._standardize(xb.to(self.device))
                code = F.one_hot(yb.to(self.device), n_sites).float()
                swapped = code[torch.randperm(code.shape[0], generator=perm_gen).to(self.device)]
                # 1) adversaries on detached encodings/decodings
                with torch.no_grad():
                    mean, logvar = self.encoder(x)
                    fake = self.decoder(self._sample(mean, logvar, noise), swapped)
                d_real, d_fake = self.discriminator(x), self.discriminator(fake)
                loss_d = (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                          + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
                opt_d.zero_grad()
                loss_d.backward()
                opt_d.step()
                terms = {"adv_d": loss_d.detach()}
                if use_clf:
                    yd = yb.to(self.device)
                    for _ in range(cfg.classifier_steps):
                        loss_c = F.cross_entropy(self.classifier(mean), yd)
                        opt_c.zero_grad()
                        loss_c.backward()
                        opt_c.step()
                    terms["site_clf"] = loss_c.detach()
                # 2) encoder/decoder
                mean, logvar = self.encoder(x)
                z = self._sample(mean, logvar, noise)
                recon = ((self.decoder(z, code) - x) ** 2).sum(dim=1).mean()
                kl = gaussian_kl(mean, logvar).mean()
                loss = cfg.recon_weight * recon + cfg.kl_weight * kl
                terms.update(recon=recon.detach(), kl=kl.detach())
                if cfg.mi_weight > 0:
                    mi = pairwise_gaussian_kl(mean, logvar).mean()
                    loss = loss + cfg.mi_weight * mi
                    terms["mi"] = mi.detach()
                if adversarial and cfg.adv_weight > 0:
                    g_fake = self.discriminator(self.decoder(z, swapped))
                    adv = F.binary_cross_entropy_with_logits(g_fake, torch.ones_like(g_fake))
                    loss = loss + cfg.adv_weight * adv
                    terms["adv_g"] = adv.detach()
                if use_clf and adversarial and cfg.site_weight > 0:
                    logp = F.log_softmax(self.classifier(mean), dim=1)
                    confusion = -logp.mean(dim=1).mean() - float(np.log(n_sites))
                    loss = loss + cfg.site_weight * confusion
                    terms["site_conf"] = confusion.detach()
                opt.zero_grad()
                loss.backward()
                opt.step()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * xb.shape[0]
            row = {"epoch": epoch, **{k: v / len(data) for k, v in sums.items()}}
            if len(Xv):
                row.update(self._evaluate(Xv, yv))
            row["seconds"] = time.perf_counter() - t0
            self.history_.append(row)
            monitor = row.get("val_loss", row["recon"] + row["kl"])
            bar.set_postfix(recon=f"{row['recon']:.3g}", val=f"{monitor:.3g}")
            log.info("VAE epoch %d: %s", epoch,
                     ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
            if monitor < best - cfg.min_delta:
                best, stale = monitor, 0
                best_state = {k: copy.deepcopy(n.state_dict()) for k, n in self._nets().items()}
                self.best_epoch_ = epoch
            else:
                stale += 1
                if len(Xv) and stale >= cfg.patience:
                    log.info("VAE early stop at epoch %d (best %d)", epoch, self.best_epoch_)
                    break
        bar.close()
        if best_state is not None:
            for k, net in self._nets().items():
                net.load_state_dict(best_state[k])
        for net in self._nets().values():
            net.eval()

    def _sample(self, mean: torch.Tensor, logvar: torch.Tensor,
                gen: torch.Generator) -> torch.Tensor:
        eps = torch.randn(mean.shape, generator=gen, device=mean.device, dtype=mean.dtype)
        return mean + eps * torch.exp(0.5 * logvar)

    @torch.no_grad()
    def _evaluate(self, Xv: np.ndarray, yv: np.ndarray) -> dict[str, float]:
        """Validation reconstruction (latent mean, own site code) and KL, per voxel."""
        for net in self._nets().values():
            net.eval()
        recon = kl = 0.0
        n_sites = len(self.sites_)
        for start in range(0, len(Xv), 4096):
            x = self._standardize(torch.from_numpy(Xv[start:start + 4096]).to(self.device))
            code = F.one_hot(torch.from_numpy(yv[start:start + 4096]).to(self.device),
                             n_sites).float()
            mean, logvar = self.encoder(x)
            recon += float(((self.decoder(mean, code) - x) ** 2).sum())
            kl += float(gaussian_kl(mean, logvar).sum())
        recon, kl = recon / len(Xv), kl / len(Xv)
        cfg = self.config
        return {"val_recon": recon, "val_kl": kl,
                "val_loss": cfg.recon_weight * recon + cfg.kl_weight * kl}

    # -- inference -------------------------------------------------------------------
    def _standardize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean_) / self.scale_

    def _site_code(self, target_site: str | None, n: int) -> torch.Tensor:
        k = len(self.sites_)
        if target_site is None:
            return torch.full((n, k), 1.0 / k, device=self.device)
        if str(target_site) not in self.sites_:
            raise HarmonizationError(
                f"target site {target_site!r} was not seen in training (trained on {self.sites_})"
            )
        code = torch.zeros((n, k), device=self.device)
        code[:, self.sites_.index(str(target_site))] = 1.0
        return code

    @torch.no_grad()
    def _run(self, X: np.ndarray, fn, batch: int = 8192) -> np.ndarray:
        for net in self._nets().values():
            net.eval()
        out = []
        for start in range(0, X.shape[0], batch):
            x = self._standardize(torch.from_numpy(X[start:start + batch]).to(self.device))
            out.append(fn(x, start).cpu().numpy())
        return np.concatenate(out, axis=0)

    def encode(self, X: np.ndarray, *,
               return_logvar: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Latent means (n, latent_dim) of voxel samples (and log-variances if asked)."""
        self._check_fitted()
        X = check_features(X, self.n_features_)
        mean = self._run(X, lambda x, _: self.encoder(x)[0])
        if return_logvar:
            return mean, self._run(X, lambda x, _: self.encoder(x)[1])
        return mean

    def decode(self, z: np.ndarray, target_site: str | None = None) -> np.ndarray:
        """Feature vectors decoded from latent codes with a site's code (or the average)."""
        self._check_fitted()
        z = check_features(z, self.config.latent_dim, "z")
        return self._run_latent(z, lambda zz: self.decoder(zz, self._site_code(target_site,
                                                                                len(zz))))

    @torch.no_grad()
    def _run_latent(self, z: np.ndarray, fn, batch: int = 8192) -> np.ndarray:
        for net in self._nets().values():
            net.eval()
        out = []
        for start in range(0, z.shape[0], batch):
            zz = torch.from_numpy(z[start:start + batch]).to(self.device)
            out.append((fn(zz) * self.scale_ + self.mean_).cpu().numpy())
        return np.concatenate(out, axis=0)

    def transform(self, X: np.ndarray, sites: Sequence | np.ndarray,
                  target_site: str | None = None, *, residual: bool = False,
                  scale_residual: bool = False) -> np.ndarray:
        """Harmonized features: encode, then decode with ``target_site``'s code.

        Parameters
        ----------
        X
            (n, n_features) samples of training sites (new subjects are fine).
        sites
            Their site labels (checked: a site unseen in training raises).
        target_site
            Site whose code is used for decoding; ``None`` uses the site-average code
            (each training site weighted 1 / n_sites).
        residual
            ``False`` (Moyer et al. 2020): the output is the decoded signal
            ``D(z, target)``. ``True``: the measured signal plus the decoder's site
            difference, ``x + D(z, target) - D(z, source)``; what the autoencoder cannot
            reconstruct (noise, detail beyond a small latent code) is kept instead of being
            smoothed away, and only the learned change of scanner is applied. Not in the
            paper; it keeps each scan's own noise and anatomy, so maps stay as sharp as the
            measured ones (documented deviation).
        scale_residual
            With ``residual``: the *location-scale* conversion
            ``D(z, target) + (x - D(z, source)) * r_target / r_source``, where ``r_site``
            (:attr:`residual_sd_`, per feature) is the RMS of what the autoencoder leaves
            unexplained at that site -- mostly measurement noise. ComBat's location/scale model
            (Johnson et al. 2007; Fortin et al. 2017) carried into the VAE: the decoder moves
            the site's mean signal, and the residual is rescaled to the target site's noise
            level, so that noise-driven biases of nonlinear maps (FA rises with noise) match
            too. For the site-average code, ``r_target`` is the root mean square of the sites'
            ``r``. Not in Moyer et al. (2020): our extension, experimental. Measured on the
            traveling-subject phantom (``benchmarks/results/traveling.md``) it made the FA site
            effect worse (ROI means -236 %): the encoder keeps part of a noisy site's noise in
            z, so ``r_site`` follows what the autoencoder cannot reconstruct rather than the
            noise level. Not offered on the command line.
        """
        self._check_fitted()
        if scale_residual and not residual:
            raise HarmonizationError("scale_residual needs residual=True (the location-scale "
                                     "conversion rescales the residual x - D(z, source))")
        if scale_residual and self.residual_sd_ is None:
            raise HarmonizationError("this VAE has no residual scales (a checkpoint saved before "
                                     "they existed): retrain it for the location-scale "
                                     "conversion")
        X = check_features(X, self.n_features_)
        labels = check_sites(sites, X.shape[0], self.sites_)
        code = self._site_code(target_site, 1)
        own = ratio = None
        if residual:
            idx = torch.from_numpy(site_index(labels, self.sites_)).to(self.device)
            own = F.one_hot(idx, len(self.sites_)).float()
            if scale_residual:
                sd = np.maximum(np.asarray(self.residual_sd_, dtype=np.float64), 1e-12)
                tgt = (np.sqrt(np.mean(sd ** 2, axis=0)) if target_site is None
                       else sd[self.sites_.index(str(target_site))])
                ratio = torch.as_tensor(tgt[None, :] / sd, dtype=torch.float32,
                                        device=self.device)[idx]

        def run(x: torch.Tensor, start: int) -> torch.Tensor:
            mean, _lv = self.encoder(x)
            target = self.decoder(mean, code.expand(x.shape[0], -1))
            if own is None:
                return target * self.scale_ + self.mean_
            source = self.decoder(mean, own[start:start + x.shape[0]])
            if ratio is not None:
                r = ratio[start:start + x.shape[0]]
                return (target + (x - source) * r) * self.scale_ + self.mean_
            return x * self.scale_ + self.mean_ + (target - source) * self.scale_

        return self._run(X, run)

    def reconstruct(self, X: np.ndarray, sites: Sequence | np.ndarray) -> np.ndarray:
        """Decode each voxel with its own site's code (the autoencoder's reconstruction)."""
        self._check_fitted()
        X = check_features(X, self.n_features_)
        idx = torch.from_numpy(site_index(check_sites(sites, X.shape[0], self.sites_),
                                          self.sites_)).to(self.device)
        codes = F.one_hot(idx, len(self.sites_)).float()

        def run(x: torch.Tensor, start: int) -> torch.Tensor:
            mean, _lv = self.encoder(x)
            return (self.decoder(mean, codes[start:start + x.shape[0]]) * self.scale_
                    + self.mean_)

        return self._run(X, run)

    def latent_site_accuracy(self, X: np.ndarray, sites: Sequence | np.ndarray,
                             **kwargs) -> LatentSiteAccuracy:
        """Cross-validated z -> site balanced accuracy (see :func:`latent_site_accuracy`)."""
        return latent_site_accuracy(self.encode(X), sites, **kwargs)

    # -- persistence -----------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``vae_config.json`` and ``vae_weights.pt`` (state_dicts) into folder ``path``.

        Both files are written to temporary names in the same folder and renamed into place.
        """
        self._check_fitted()
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        weights = {k: net.state_dict() for k, net in self._nets().items()}
        weights["scaler"] = {"mean": self.mean_.cpu(), "scale": self.scale_.cpu()}
        if self.residual_sd_ is not None:
            weights["residual_sd"] = torch.as_tensor(np.asarray(self.residual_sd_))
        meta = {
            "format_version": FORMAT_VERSION,
            "model": "SiteInvariantVAE",
            "reference": "Moyer et al., Magn Reson Med 84:2174-2189 (2020)",
            "config": self.config.to_dict(),
            "sites": self.sites_,
            "n_features": self.n_features_,
            "best_epoch": self.best_epoch_,
            "history": self.history_,
            "torch_version": torch.__version__,
        }
        _atomic_write(folder / WEIGHTS_FILE, lambda f: torch.save(weights, f))
        _atomic_write(folder / CONFIG_FILE,
                      lambda f: f.write(json.dumps(meta, indent=2).encode()))
        return folder

    @classmethod
    def load(cls, path: str | Path, *, device: str = "cpu",
             progress: bool = True) -> SiteInvariantVAE:
        """Rebuild a trained model saved by :meth:`save` (``torch.load(weights_only=True)``)."""
        folder = Path(path)
        cfg_file, w_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        for f in (cfg_file, w_file):
            if not f.is_file():
                raise HarmonizationError(f"{f}: VAE checkpoint file not found")
        try:
            meta = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as exc:
            raise HarmonizationError(f"{cfg_file}: not valid JSON ({exc})") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise HarmonizationError(
                f"{cfg_file}: unsupported VAE checkpoint version {meta.get('format_version')}"
            )
        model = cls(VAEConfig.from_dict(meta["config"]), device=device, progress=progress)
        model.sites_ = [str(s) for s in meta["sites"]]
        model.n_features_ = int(meta["n_features"])
        model.best_epoch_ = meta.get("best_epoch")
        model.history_ = meta.get("history", [])
        model._build(model.n_features_, len(model.sites_))
        weights = torch.load(w_file, map_location=model.device, weights_only=True)
        try:
            for k, net in model._nets().items():
                net.load_state_dict(weights[k])
        except (KeyError, RuntimeError) as exc:
            raise HarmonizationError(f"{w_file}: weights do not match {cfg_file} ({exc})") from None
        model.mean_ = weights["scaler"]["mean"].to(model.device)
        model.scale_ = weights["scaler"]["scale"].to(model.device)
        if "residual_sd" in weights:
            model.residual_sd_ = weights["residual_sd"].cpu().numpy().astype(np.float64)
        for net in model._nets().values():
            net.eval()
        return model


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise HarmonizationError(f"unknown torch device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HarmonizationError(f"device {device!r} requested but CUDA is not available")
    return dev


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        set_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
