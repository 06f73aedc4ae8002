"""Site-adversarial VAE harmonization of a whole study from the participant level's outputs
(Moyer et al., *Magn Reson Med* 2020; the model is :class:`dmriharmony.harmonizers.vae.
SiteInvariantVAE`).

Representation (documented choice): the sites of a study rarely share their shells, so every run
is first put on one common shell — its SH fit of the b0-normalised signal evaluated at
``bvalue`` (default 1000 s/mm^2; a matching shell is used as it is, another one is mapped with
the mono-exponential rule of :func:`dmriharmony.sh.fit.map_to_bvalue`) at the highest SH order
every run supports there. A voxel's input is its b0 and those coefficients, with its 6 face
neighbours (Moyer et al.: 7 x (1 + n_coeffs) values); the b0 relative to the run's brain
median, since its stored scale is the vendor's receiver gain.

Training: seeded, on up to ``voxels_per_run`` brain voxels of every non-traveling run (the
validation split holds out whole runs; early stopping keeps the best epoch). Conversion: every
run's voxels are encoded and decoded with the code of ``target_site`` (default: the site-average
code); the decoded centre coefficients are re-synthesised on the run's own directions of that
shell at the common b-value, with the run's own b0, and the tensor is refitted (same shells and
fit as the participant level). The latent code's site predictability is measured on held-out
voxels (cross-validated balanced accuracy against chance).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from dmriharmony.errors import HarmonizationError

__all__ = ["CONVERSIONS", "vae_study"]

#: How a run is converted: ``decode`` (Moyer et al. 2020), ``residual`` (measured signal plus
#: the decoder's change of site code), ``location-scale`` (the residual also rescaled to the
#: target site's residual level; experimental, API only: on the traveling-subject phantom it
#: made the FA site effect worse, ``benchmarks/results/traveling.md``):
#: :meth:`dmriharmony.harmonizers.vae.SiteInvariantVAE.transform`.
CONVERSIONS = ("decode", "residual", "location-scale")

LOGGER = logging.getLogger(__name__)


def _common_order(fits, bvalue: float, max_order: int) -> int:
    from dmriharmony.sh.fit import _match_shell

    orders = []
    for fit in fits:
        m = _match_shell(fit, bvalue)
        orders.append(fit.shells[m].order if m is not None else
                      max(s.order for s in fit.shells))
    return int(min(max_order, *orders)) if len(orders) > 1 else int(min(max_order, orders[0]))


def _measured_at(signal: np.ndarray, b0: np.ndarray, measured_b: float, bvalue: float,
                 mask: np.ndarray) -> np.ndarray:
    """A shell's measured DWI at ``bvalue``: as it is when the b-values agree (within 1 %),
    else mapped with :func:`dmriharmony.sh.fit.mono_exponential_signal` (0 outside ``mask``)."""
    from dmriharmony.sh.fit import mono_exponential_signal

    if abs(measured_b - bvalue) <= 0.01 * bvalue:
        return np.asarray(signal, dtype=float)
    return mono_exponential_signal(signal, b0, measured_b, bvalue, mask)


def vae_study(bids_dir: str | Path, deriv_dir: str | Path, *, target_site: str | None = None,
              template_source: str = "phantom", template_dir: str | None = None,
              bvalue: float = 1000.0, max_order: int = 8, voxels_per_run: int = 4000,
              config=None, seed: int = 0, device: str = "cpu", bmax: float = 1500.0,
              b_round: float = 50.0, fit_method: str = "wls", conversion: str = "decode",
              model=None, resynthesis: str = "projection",
              write: Callable[[Path, nib.Nifti1Image], None] | None = None,
              progress: bool = True, roi_dir: str | Path | None = None) -> dict:
    """Train the VAE on the study and harmonize every run (see the module docstring).

    ``conversion``: ``"decode"`` (Moyer et al. 2020) writes the decoded signal
    ``D(z, target)``; ``"residual"`` writes the measured signal plus the decoder's change of
    site code, ``x + D(z, target) - D(z, source)``
    (:meth:`~dmriharmony.harmonizers.vae.SiteInvariantVAE.transform`);
    ``"location-scale"`` writes ``D(z, target) + (x - D(z, source)) r_target / r_source``, the
    residual rescaled to the target site's unexplained level (experimental, see
    :data:`CONVERSIONS`). ``model``: a fitted
    :class:`~dmriharmony.harmonizers.vae.SiteInvariantVAE` (e.g. loaded from a checkpoint) to
    convert with instead of training one; it must know the study's sites and representation.

    ``resynthesis`` (residual conversions only; ``decode`` always writes ``B C_out``, as
    published): ``"projection"`` (default) writes the harmonized SH signal ``B C_out`` on the
    run's directions, so every run is refitted from the same common low-order representation;
    ``"residual"`` writes the run's measured shell (mapped to ``bvalue`` when its b-value
    differs) plus the change of the SH signal, ``S + B (C_out - C)``, which keeps what the
    representation cannot hold (at order 2, a single fibre's order >= 4 signal: dropping it
    lowers the refitted FA by ~0.01-0.03) but also each gradient table's own sampling of it.
    On the traveling study (``benchmarks/results/traveling.md``) the projection removed more of
    the FA site effect: the common representation also takes away the part of the site effect
    that comes from fitting the tensor to a non-Gaussian signal on different direction sets.

    Returns ``{"model": SiteInvariantVAE, "runs": DataFrame, "traveling": DataFrame,
    "roi_files": [...], "latent": dict (balanced accuracy, chance), "notes": [...]}``.
    """
    from tqdm import tqdm

    from dmriharmony.group.rish import HarmonizedOutputs, _load, _refit, _registration
    from dmriharmony.group.rish import collect_rish_runs as collect_runs
    from dmriharmony.harmonizers._vae_config import small_config
    from dmriharmony.harmonizers.vae import SiteInvariantVAE
    from dmriharmony.sh.fit import SHFit, find_shells, fit_shells, map_to_bvalue
    from dmriharmony.sh.neighbourhood import neighbourhood_features
    from dmriharmony.tbss.templates import load_template

    def _save(path: Path, img: nib.Nifti1Image) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(path))

    if resynthesis not in ("projection", "residual"):
        raise HarmonizationError(f"VAE re-synthesis must be 'projection' or 'residual', got "
                                 f"{resynthesis!r}")
    if conversion not in CONVERSIONS:
        raise HarmonizationError(f"VAE conversion must be one of {', '.join(CONVERSIONS)}, got "
                                 f"{conversion!r}")
    runs = collect_runs(bids_dir, deriv_dir)
    template = load_template(template_source, template_dir)
    rng = np.random.default_rng(seed)
    fits = []
    for run in tqdm(runs, desc="VAE: SH fits", disable=not progress):
        dwi, mask = _load(run)
        fits.append(fit_shells(dwi.data, dwi.bvals, dwi.bvecs, mask, max_order=max_order))
    order = _common_order(fits, bvalue, max_order)
    notes = [f"vae: common representation b={bvalue:g} at SH order {order}; conversion "
             f"{conversion}"]
    volumes = []
    for run, fit in zip(runs, fits, strict=True):
        shell = map_to_bvalue(fit, bvalue, order=order)
        # the b0's intensity scale is the receiver's, not the tissue's: each run's b0 enters
        # relative to its brain median (the decoded b0 is not used: the output keeps the run's
        # own b0 volumes), so that the stored scale of a vendor does not identify the site
        b0 = fit.b0[fit.mask]
        scale = float(np.median(b0[b0 > 0])) if np.any(b0 > 0) else 0.0
        if not scale > 0:
            raise HarmonizationError(f"{run.dwi}: the b0 is zero in the whole brain mask")
        volumes.append(np.concatenate([fit.b0[..., None] / scale, shell.coeffs], axis=-1))
    n_per_voxel = volumes[0].shape[-1]

    X, sites, groups, X_hold, sites_hold = [], [], [], [], []
    for k, (run, vol, fit) in enumerate(zip(runs, volumes, fits, strict=True)):
        if run.traveling:
            continue
        samples = neighbourhood_features(vol, fit.mask, 6)
        pick = rng.permutation(len(samples))
        take = pick[:voxels_per_run]
        hold = pick[voxels_per_run:voxels_per_run + max(200, voxels_per_run // 4)]
        X.append(samples[take])
        sites += [run.site] * len(take)
        groups += [str(k)] * len(take)
        X_hold.append(samples[hold])
        sites_hold += [run.site] * len(hold)
    if len(set(sites)) < 2:
        raise HarmonizationError("the VAE needs non-traveling runs from at least two sites")
    if model is None:
        cfg = config if config is not None else small_config(seed=seed)
        model = SiteInvariantVAE(cfg, device=device, progress=progress)
        model.fit(np.vstack(X).astype(np.float32), sites, groups=groups)
    else:
        unseen = sorted(set(sites) - set(model.sites_))
        if unseen or model.n_features_ != X[0].shape[1]:
            raise HarmonizationError(
                f"the given VAE model was trained on sites {model.sites_} with "
                f"{model.n_features_} features per voxel; this study has sites "
                f"{sorted(set(sites))} and {X[0].shape[1]} (b={bvalue:g}, SH order {order})")
        notes.append("vae: converted with a given (pre-trained) model")
    latent = {}
    Xh = np.vstack(X_hold).astype(np.float32)
    if len(Xh) and len(set(sites_hold)) > 1:
        acc = model.latent_site_accuracy(Xh, sites_hold)
        latent = {"balanced_accuracy": float(acc.balanced_accuracy), "chance": float(acc.chance)}
        notes.append(f"vae: latent z -> site balanced accuracy {acc.balanced_accuracy:.3f} "
                     f"(chance {acc.chance:.3f}) on {len(Xh)} held-out voxels")
    if target_site is not None and target_site not in model.sites_:
        raise HarmonizationError(f"VAE target site {target_site!r} is not one of the sites "
                                 f"{', '.join(model.sites_)}")

    outputs = HarmonizedOutputs("vae", template, write or _save, roi_dir)
    for run, vol, fit in tqdm(list(zip(runs, volumes, fits, strict=True)),
                              desc="VAE: convert", disable=not progress):
        dwi, mask = _load(run)
        samples = neighbourhood_features(vol, fit.mask, 6).astype(np.float32)
        decoded = model.transform(samples, [run.site] * len(samples), target_site,
                                  residual=conversion != "decode",
                                  scale_residual=conversion == "location-scale")
        centre = np.zeros(fit.mask.shape + (n_per_voxel,))
        centre[fit.mask] = decoded[:, :n_per_voxel]
        # the run's directions of its shell nearest to the common b-value, at that b-value
        groups_b = find_shells(dwi.bvals, shell_tol=fit.shell_tol)
        near_b, idx = min(groups_b, key=lambda g: abs(g[0] - bvalue))
        b0_idx = np.flatnonzero(dwi.bvals < 50)
        bvals = np.r_[dwi.bvals[b0_idx], np.full(len(idx), bvalue)]
        bvecs = np.vstack([dwi.bvecs[b0_idx], dwi.bvecs[idx]])
        if conversion == "decode" or resynthesis == "projection":  # the harmonized SH signal
            harmonized = SHFit.from_features(centre, fit.mask, [bvalue], [order])
            signal = harmonized.predict(bvals[len(b0_idx):], bvecs[len(b0_idx):], b0=fit.b0)
        else:  # the measured signal plus the change of the SH signal (see the docstring)
            change = SHFit.from_features(centre - vol, fit.mask, [bvalue], [order])
            signal = (_measured_at(dwi.data[..., idx], fit.b0, near_b, bvalue, fit.mask)
                      + change.predict(bvals[len(b0_idx):], bvecs[len(b0_idx):], b0=fit.b0))
        data = np.concatenate([dwi.data[..., b0_idx], np.clip(signal, 0, None)], axis=-1)
        data[~fit.mask] = 0.0
        if abs(near_b - bvalue) > 0.25 * bvalue:
            notes.append(f"vae: {run.prefix}: nearest shell b={near_b:g} re-synthesised at "
                         f"b={bvalue:g}")
        tm = _refit(data, bvals, bvecs, mask, bmax, b_round, fit_method)
        outputs.add(run, tm, dwi.affine, _registration(run, template))
    return {"model": model, "runs": outputs.runs(), "traveling": outputs.traveling(),
            "roi_files": outputs.roi_files, "latent": latent, "notes": notes}
