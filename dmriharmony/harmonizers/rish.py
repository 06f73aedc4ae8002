"""RISH harmonization of the diffusion signal (Mirzaalian et al., MICCAI 2015; *NeuroImage* 2016;
Cetin Karayumak et al., *NeuroImage* 2019).

The rotation-invariant SH features ``E_l = ||C_l||^2`` of each even order (:mod:`dmriharmony.sh.
rish`) carry the scanner's signature (b-value, TE, SNR) but not the fibre orientations. Per
site, the template-space mean of every scan's ``E_l`` maps is the site template; the scale map
of a target site is ``sqrt(E_ref,l / E_site,l)`` (2016, eq. 4), smoothed and clipped, and each
target scan's order-``l`` coefficients are multiplied by its scale map warped back to the scan
(:func:`harmonize_dwi`). The signal is then re-synthesised on the scan's own gradient table
and the tensor refitted, which is what makes it a *signal-level* harmonizer: every later model
(DTI, DKI, tractography) sees harmonized data. By default the re-synthesised DWI is the
measured one plus the change of the fitted SH signal (``resynthesis="residual"``; the papers
write the scaled SH signal itself, ``"projection"``, which with few directions also drops real
signal: see :func:`harmonize_dwi`).

Shells and b-values (documented choice): RISH compares like with like, so each target shell is
matched to the reference site's shell of nearest b-value (within ``bvalue_tol`` relative); its
scaled signal then *is* the reference shell's, and :func:`harmonize_dwi` writes it with the
reference b-value so that a refit sees the b it carries (e.g. Philips b=800 mapped onto GE
b=1000); optionally the shell is first mapped onto the reference b-value with the
mono-exponential rule (:func:`map_shells`, Cetin Karayumak et al. 2019; off by default, as it
did worse on the traveling-subject phantom). Target shells with no reference shell within
tolerance (e.g. Siemens' b=2000 against a
single-shell b=1000 reference) are left as they are and reported. Orders above the lowest order
fitted at a site for that shell are left unscaled.

Pure numpy/scipy: no Nipype, no registration here (the caller warps the maps with the
participant level's transforms, :mod:`dmriharmony.group.rish`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from dmriharmony.errors import HarmonizationError
from dmriharmony.sh.fit import (
    B0_THRESHOLD,
    SHELL_TOL,
    SHFit,
    find_shells,
    fit_shells,
    mono_exponential_signal,
)
from dmriharmony.sh.rish import rish_features, scale_by_order

__all__ = ["RESYNTHESIS", "RISHHarmonizer", "harmonize_dwi", "map_shells", "rish_maps",
           "signal_classes"]

LOGGER = logging.getLogger(__name__)


def rish_maps(fit: SHFit, order: int | None = None) -> dict[float, np.ndarray]:
    """RISH feature maps ``{b-value: (..., n_orders)}`` of an SH fit (orders 0..``order``)."""
    out = {}
    for shell in fit.shells:
        coeffs = shell.coeffs
        if order is not None and shell.order > order:
            from dmriharmony.sh.basis import n_coeffs

            coeffs = coeffs[..., :n_coeffs(order)]
        out[float(shell.bvalue)] = rish_features(coeffs)
    return out


def _smooth_in_mask(values: np.ndarray, mask: np.ndarray, sigma_vox: float) -> np.ndarray:
    """Gaussian smoothing that ignores voxels outside ``mask`` (normalised convolution)."""
    if sigma_vox <= 0:
        return values
    w = ndimage.gaussian_filter(mask.astype(float), sigma_vox)
    out = np.empty_like(values)
    for k in range(values.shape[-1]):
        num = ndimage.gaussian_filter(np.where(mask, values[..., k], 0.0), sigma_vox)
        out[..., k] = np.where(w > 1e-6, num / np.maximum(w, 1e-6), 1.0)
    return out


def signal_classes(reference_e0: np.ndarray, mask: np.ndarray, ratio: float = 0.25
                   ) -> np.ndarray:
    """Split the mask into tissue (1) and free-water-like (2) voxels by the reference L0 energy.

    At b ~ 1000 s/mm^2 the b0-normalised signal of CSF (D = 3e-3 mm^2/s) is ~0.05 against
    ~0.4-0.6 in brain tissue, so its order-0 RISH energy ``E_0`` is tens of times lower. A voxel
    is free-water-like when ``E_0 < ratio * median(E_0)`` over the mask (``ratio`` 0.25: half
    the median signal amplitude). Scale factors differ between the two classes (the b-value and
    TE act differently on free and hindered water), so the smoothing of the scale maps must not
    mix them (:func:`_smooth_by_class`). 0 outside the mask.
    """
    mask = np.asarray(mask, bool)
    e0 = np.asarray(reference_e0, dtype=float)
    out = np.zeros(mask.shape, dtype=np.uint8)
    if not mask.any():
        return out
    med = float(np.median(e0[mask]))
    low = e0 < ratio * med
    out[mask & ~low] = 1
    out[mask & low] = 2
    return out


def _smooth_by_class(values: np.ndarray, classes: np.ndarray, sigma_vox: float) -> np.ndarray:
    """:func:`_smooth_in_mask` within each class of ``classes`` separately (1 outside all)."""
    out = np.ones_like(values)
    for c in np.unique(classes[classes > 0]):
        sel = classes == c
        out[sel] = _smooth_in_mask(values, sel, sigma_vox)[sel]
    return out


class RISHHarmonizer:
    """Site templates of RISH features and the scale maps that map a site onto the reference.

    Parameters
    ----------
    reference_site : str, optional
        Site the others are mapped to (default: the site with most scans; ties by name).
    smoothing_fwhm : float
        FWHM (mm) of the Gaussian smoothing of the scale maps (Mirzaalian et al. 2016 smooth
        the scale maps; default 4 mm).
    clip : (float, float)
        Bounds of the scale factors (guards against division by near-zero energies).
    bvalue_tol : float
        Relative b-value difference within which a target shell is matched to a reference
        shell (default 0.25).
    min_energy : float
        Voxels whose site template energy is below this (relative to the order's median) get
        scale 1.
    tissue_aware : bool
        Smooth the scale maps separately within tissue and free-water-like voxels
        (:func:`signal_classes`, from the reference site's ``E_0`` template) instead of across
        the whole mask. Our choice, not in the papers: with one smoothing over the mask, CSF
        scales leak into neighbouring white matter and bias its MD (measured in
        ``benchmarks/results/traveling.md``).
    """

    def __init__(self, reference_site: str | None = None, *, smoothing_fwhm: float = 4.0,
                 clip: tuple[float, float] = (0.5, 2.0), bvalue_tol: float = 0.25,
                 min_energy: float = 1e-3, tissue_aware: bool = True) -> None:
        self.reference_site = reference_site
        self.tissue_aware = bool(tissue_aware)
        self.smoothing_fwhm = float(smoothing_fwhm)
        self.clip = (float(clip[0]), float(clip[1]))
        self.bvalue_tol = float(bvalue_tol)
        self.min_energy = float(min_energy)

    # ------------------------------------------------------------------ fitting
    def fit(self, features: Sequence[Mapping[float, np.ndarray]], sites: Sequence[str],
            mask: np.ndarray, voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
            covariates: np.ndarray | None = None,
            covariate_names: Sequence[str] | None = None) -> RISHHarmonizer:
        """Site templates from template-space RISH maps.

        Parameters
        ----------
        features : one ``{b-value: (X, Y, Z, n_orders)}`` per scan, on the template grid
            (:func:`rish_maps`, then warped).
        sites : site of each scan.
        mask : template mask (voxels with a template and a scale).
        voxel_size : template voxel size (mm), for the smoothing.
        covariates : (n_scans, k) numeric array, optional
            Biological covariates of the scans (age, sex coded 0/1, diagnosis, ...). Without
            them a site template is the plain mean of its scans' RISH maps (Mirzaalian et al.
            2016, who require age- and sex-matched groups). With them, every voxel and order
            gets the linear model ``E_il = a_site(i),l + x_i' b_l + e_il`` fitted by least
            squares over all scans of the matched shell, with ``x`` centred on the pooled mean;
            the site template is ``a_site,l``, the site's energy at the pooled covariates (a
            covariate-adjusted, "least-squares" site mean). The scale map then compares sites
            at equal age, sex and diagnosis, so that a site whose participants are older (or
            more often patients) is not "corrected" for its biology -- the same protection
            ComBat gives its covariates (Johnson et al. 2007; Fortin et al. 2017). Without
            covariate imbalance both templates coincide.
        covariate_names : names of the covariate columns (for messages and the saved model).
        """
        sites = [str(s) for s in sites]
        if len(sites) != len(features):
            raise HarmonizationError(f"{len(sites)} site labels for {len(features)} scans")
        mask = np.asarray(mask, bool)
        counts = {s: sites.count(s) for s in sorted(set(sites))}
        if len(counts) < 2:
            raise HarmonizationError(f"RISH needs at least two sites, got {list(counts)}")
        ref = self.reference_site
        if ref is None:
            ref = self.default_reference(sites)
        if ref not in counts:
            raise HarmonizationError(f"reference site {ref!r} is not one of the sites "
                                     f"{', '.join(counts)}")
        cov = None
        if covariates is not None:
            cov = np.asarray(covariates, dtype=float)
            if cov.ndim == 1:
                cov = cov[:, None]
            if cov.shape[0] != len(sites):
                raise HarmonizationError(f"{cov.shape[0]} covariate rows for {len(sites)} scans")
            names = list(covariate_names) if covariate_names is not None else \
                [f"covariate {k + 1}" for k in range(cov.shape[1])]
            if len(names) != cov.shape[1]:
                raise HarmonizationError(f"{len(names)} covariate names for {cov.shape[1]} "
                                         "covariate columns")
            bad = [names[k] for k in range(cov.shape[1]) if not np.all(np.isfinite(cov[:, k]))]
            if bad:
                raise HarmonizationError(f"covariate {bad[0]!r} has missing or non-numeric "
                                         "values")
            self.covariate_names_ = names
        else:
            self.covariate_names_ = []
        self.reference_site_ = ref
        ref_b = sorted({b for f, s in zip(features, sites, strict=True) if s == ref for b in f})
        self.reference_bvalues_ = ref_b
        self.unmatched_: dict[str, list[float]] = {}
        # scans per reference shell: (scan index, site, maps)
        entries: dict[float, list[tuple[int, str, np.ndarray]]] = {}
        for i, (f, site) in enumerate(zip(features, sites, strict=True)):
            for b, maps in f.items():
                if maps.shape[:3] != mask.shape:
                    raise HarmonizationError(f"site {site!r}: RISH map grid {maps.shape[:3]} "
                                             f"differs from the template mask {mask.shape}")
                rb = self.match_bvalue(b)
                if rb is None:
                    self.unmatched_.setdefault(site, [])
                    if b not in self.unmatched_[site]:
                        self.unmatched_[site].append(b)
                    continue
                entries.setdefault(rb, []).append((i, site, maps))
        templates: dict[str, dict[float, np.ndarray]] = {s: {} for s in counts}
        for rb, items in entries.items():
            if cov is None:
                for site in counts:
                    maps = [m for _, s, m in items if s == site]
                    if maps:
                        n_orders = min(m.shape[-1] for m in maps)
                        templates[site][rb] = np.mean([m[..., :n_orders] for m in maps], axis=0)
            else:
                for site, arr in _adjusted_templates(items, cov, self.covariate_names_, mask,
                                                     rb).items():
                    templates[site][rb] = arr
        self.templates_ = templates
        self.mask_ = mask
        self.sites_ = list(counts)
        self.voxel_size_ = tuple(float(v) for v in voxel_size)
        self.scales_ = {s: self._scales(s) for s in counts}
        for site, bs in self.unmatched_.items():
            LOGGER.warning("RISH: site %s shell(s) b=%s have no reference shell (reference "
                           "b-values %s): left unharmonized", site, bs, ref_b)
        return self

    @staticmethod
    def default_reference(sites: Sequence[str]) -> str:
        """The site with most scans (ties: the first by name): the default reference."""
        counts = {s: list(sites).count(s) for s in sorted(set(map(str, sites)))}
        if not counts:
            raise HarmonizationError("no scans to choose a RISH reference site from")
        return max(sorted(counts), key=lambda s: counts[s])

    def match_bvalue(self, bvalue: float) -> float | None:
        """The reference shell a target shell of ``bvalue`` is mapped to (None: no match)."""
        if not getattr(self, "reference_bvalues_", None):
            raise HarmonizationError("RISHHarmonizer is not fitted")
        ref = min(self.reference_bvalues_, key=lambda r: abs(r - bvalue))
        return ref if abs(ref - bvalue) <= self.bvalue_tol * ref else None

    def _scales(self, site: str) -> dict[float, np.ndarray]:
        ref = self.templates_[self.reference_site_]
        sigma = self.smoothing_fwhm / 2.3548 / float(np.mean(self.voxel_size_))
        out = {}
        for b, tgt in self.templates_[site].items():
            if b not in ref:
                continue
            n = min(tgt.shape[-1], ref[b].shape[-1])
            t, r = tgt[..., :n], ref[b][..., :n]
            floor = self.min_energy * np.maximum(np.median(t[self.mask_], axis=0), 1e-30)
            ok = self.mask_[..., None] & (t > floor) & (r > 0)
            scale = np.ones_like(t)
            scale[ok] = np.sqrt(r[ok] / t[ok])
            if self.tissue_aware:
                classes = signal_classes(r[..., 0], self.mask_)
                scale = _smooth_by_class(scale, classes, sigma)
            else:
                scale = _smooth_in_mask(scale, self.mask_, sigma)
            scale = np.clip(scale, *self.clip)
            scale[~self.mask_] = 1.0
            out[b] = scale
        return out

    def scale_maps(self, site: str) -> dict[float, np.ndarray]:
        """``{reference b-value: (X, Y, Z, n_orders)}`` scale maps of ``site`` (template grid);
        all ones for the reference site."""
        if not hasattr(self, "scales_"):
            raise HarmonizationError("RISHHarmonizer is not fitted")
        if str(site) not in self.scales_:
            raise HarmonizationError(f"site {site!r} was not in the data RISH was fitted on "
                                     f"({', '.join(self.sites_)})")
        return self.scales_[str(site)]

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Save the scale maps and templates (``.npz``) with a JSON header."""
        path = Path(path)
        arrays: dict[str, Any] = {"mask": self.mask_}
        for site in self.sites_:
            for b, arr in self.templates_[site].items():
                arrays[f"template|{site}|{b:g}"] = arr.astype(np.float32)
            for b, arr in self.scales_[site].items():
                arrays[f"scale|{site}|{b:g}"] = arr.astype(np.float32)
        meta = {"reference_site": self.reference_site_, "sites": self.sites_,
                "reference_bvalues": self.reference_bvalues_, "voxel_size": self.voxel_size_,
                "smoothing_fwhm": self.smoothing_fwhm, "clip": self.clip,
                "bvalue_tol": self.bvalue_tol, "min_energy": self.min_energy,
                "tissue_aware": self.tissue_aware,
                "unmatched": {k: v for k, v in self.unmatched_.items()},
                "covariates": list(getattr(self, "covariate_names_", []))}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> RISHHarmonizer:
        path = Path(path)
        if not path.is_file():
            raise HarmonizationError(f"RISH model not found: {path}")
        with np.load(path) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            self = cls(meta["reference_site"], smoothing_fwhm=meta["smoothing_fwhm"],
                       clip=tuple(meta["clip"]), bvalue_tol=meta["bvalue_tol"],
                       min_energy=meta["min_energy"],
                       tissue_aware=meta.get("tissue_aware", False))
            self.reference_site_ = meta["reference_site"]
            self.sites_ = list(meta["sites"])
            self.reference_bvalues_ = [float(b) for b in meta["reference_bvalues"]]
            self.voxel_size_ = tuple(meta["voxel_size"])
            self.unmatched_ = {k: list(v) for k, v in meta["unmatched"].items()}
            self.covariate_names_ = list(meta.get("covariates", []))
            self.mask_ = z["mask"].astype(bool)
            self.templates_ = {s: {} for s in self.sites_}
            self.scales_ = {s: {} for s in self.sites_}
            for key in z.files:
                if "|" not in key:
                    continue
                kind, site, b = key.split("|")
                target = self.templates_ if kind == "template" else self.scales_
                target[site][float(b)] = z[key].astype(float)
        return self


def _adjusted_templates(items: list[tuple[int, str, np.ndarray]], cov: np.ndarray,
                        names: Sequence[str], mask: np.ndarray, bvalue: float,
                        chunk: int = 200_000) -> dict[str, np.ndarray]:
    """Covariate-adjusted site templates of one reference shell (see :meth:`RISHHarmonizer.fit`).

    Order by order (a site contributes the orders all its scans have), least squares of the
    scans' energies on site indicators and centred covariates, voxel chunk by voxel chunk.
    """
    site_orders: dict[str, int] = {}
    for _, s, m in items:
        site_orders[s] = min(site_orders.get(s, m.shape[-1]), m.shape[-1])
    nvox = int(np.prod(mask.shape))
    out = {s: np.zeros((nvox, n)) for s, n in site_orders.items()}
    idx = np.flatnonzero(mask.ravel())
    for k in range(max(site_orders.values())):
        use = [(i, s, m) for i, s, m in items if site_orders[s] > k]
        sites_k = sorted({s for _, s, _ in use})
        rows = np.array([i for i, _, _ in use])
        x = cov[rows] - cov[rows].mean(axis=0)
        design = np.hstack([np.array([[s == t for t in sites_k] for _, s, _ in use], float), x])
        rank = np.linalg.matrix_rank(design)
        if rank < design.shape[1] or len(use) <= design.shape[1]:
            # name the covariate that the site indicators (and the others) already explain
            culprit = next((names[j] for j in range(x.shape[1])
                            if np.linalg.matrix_rank(design[:, :len(sites_k) + j + 1])
                            < len(sites_k) + j + 1), None)
            what = (f"covariate {culprit!r} is constant within sites or confounded with site"
                    if culprit is not None else
                    f"{len(use)} scans for {design.shape[1]} parameters")
            raise HarmonizationError(
                f"RISH templates, shell b={bvalue:g}, order {2 * k}: the covariate-adjusted "
                f"site means cannot be estimated ({what}); drop it from the RISH covariates "
                "or give plain site means (no covariates)")
        solve = np.linalg.pinv(design)[:len(sites_k)]  # site rows of (X'X)^-1 X'
        for start in range(0, idx.size, chunk):
            vox = idx[start:start + chunk]
            y = np.stack([m.reshape(nvox, -1)[vox, k] for _, _, m in use])
            a = solve @ y
            for j, s in enumerate(sites_k):
                out[s][vox, k] = a[j]
    return {s: v.reshape(mask.shape + (v.shape[-1],)) for s, v in out.items()}


def _predict_shell(fit: SHFit, shell, coeffs: np.ndarray, bvals: np.ndarray,
                   bvecs: np.ndarray) -> np.ndarray:
    """DWI ``S0 * B C`` of one shell's (scaled) coefficients on the given directions."""
    single = SHFit(b0=fit.b0, shells=[type(shell)(bvalue=shell.bvalue, coeffs=coeffs,
                                                  n_directions=shell.n_directions)],
                   mask=fit.mask, smooth=fit.smooth, shell_tol=fit.shell_tol)
    return single.predict(bvals, bvecs)


def map_shells(data: np.ndarray, bvals: np.ndarray, mask: np.ndarray, target_bvalue,
               *, shell_tol: float = SHELL_TOL, rel_tol: float = 0.01,
               ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Map each shell onto the reference b-value it is matched to (mono-exponential rule).

    A shell of b-value ``b`` whose reference shell ``b_ref = target_bvalue(b)`` differs by more
    than ``rel_tol`` (relative) gets ``S0 (S / S0)^(b_ref / b)`` per direction inside ``mask``
    (``S0``: the scan's mean b=0 signal), and ``b_ref`` as its b-value: the b-value mapping of
    Cetin Karayumak et al. (*NeuroImage* 2019), done before the RISH features are computed
    and before the scaling, so that the scale maps only carry what the b-value does not
    explain (exact for a mono-exponential signal, which the per-order scaling alone cannot
    follow). Shells without a reference (``None``) and shells already at their reference
    b-value are left as they are. Optional (``bvalue_mapping``): off by default, see
    :func:`harmonize_dwi`.

    Returns the mapped DWI (float), the new b-values and notes.
    """
    data = np.asarray(data, dtype=float)
    bvals = np.asarray(bvals, dtype=float).ravel()
    mask = np.asarray(mask, bool)
    b0 = bvals <= B0_THRESHOLD
    if not b0.any():
        raise HarmonizationError("b-value mapping needs b=0 volumes (none found)")
    s0 = data[..., b0].mean(axis=-1)
    ok = mask & (s0 > 0)
    out, new_bvals, notes = data, bvals.copy(), []
    for b, idx in find_shells(bvals, shell_tol=shell_tol):
        ref = target_bvalue(b)
        if ref is None or abs(ref - b) <= rel_tol * ref:
            continue
        if out is data:
            out = data.copy()
        block = out[..., idx]
        block[ok] = mono_exponential_signal(data[..., idx], s0, b, ref, ok)[ok]
        out[..., idx] = block
        new_bvals[idx] = ref
        notes.append(f"shell b={b:g} mapped to b={ref:g} (mono-exponential)")
    return out, new_bvals, notes


#: How :func:`harmonize_dwi` writes the scaled signal: ``projection`` (as published) or
#: ``residual`` (the measured signal plus the change of the fitted SH signal).
RESYNTHESIS = ("residual", "projection")


def harmonize_dwi(data: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray, mask: np.ndarray,
                  scales: Mapping[float, np.ndarray], match_bvalue,
                  *, max_order: int = 8, smooth: float = 0.0, resynthesis: str = "residual",
                  bvalue_mapping: bool = False,
                  ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Scale a scan's SH coefficients order by order and re-synthesise its DWI.

    Parameters
    ----------
    data : (X, Y, Z, N) DWI; bvals, bvecs : its gradient table (N, and (N, 3)).
    mask : brain mask of the scan.
    scales : ``{reference b-value: (X, Y, Z, n_orders)}`` scale maps *on the scan's grid*
        (:meth:`RISHHarmonizer.scale_maps` warped back with the scan's inverse transform).
    match_bvalue : callable b -> reference b or None (:meth:`RISHHarmonizer.match_bvalue`).
    max_order : highest SH order fitted (each shell's order follows its directions).
    smooth : Laplace-Beltrami regularisation of the fit that is re-synthesised (default 0:
        the re-synthesised signal keeps the measured anisotropy; regularising lowers FA).
    resynthesis : ``"residual"`` (default) or ``"projection"``
        ``projection`` writes the scaled SH signal ``B C'`` itself (Mirzaalian et al. 2016;
        Cetin Karayumak et al. 2019). It also drops everything the shell's SH fit does not
        hold, which with few directions is signal, not only noise: at 12 directions (order 2)
        the projection lowers the refitted FA of a noise-free single fibre by ~0.026 at FA 0.8
        and ~0.011 at FA 0.57, a bias of the projection that differs between gradient tables
        (none at 15-20 directions, order 4), i.e. a new site effect. ``residual`` writes the
        measured signal plus the change of the fitted signal, ``S + B (C' - C)``: unit scales
        return the scan unchanged, and only the RISH scaling is applied. Our choice, not in the
        papers (``tests/test_rish.py`` measures the projection bias).
    bvalue_mapping : map matched shells onto their reference b-value first (:func:`map_shells`).
        Default False: the scaling alone takes a shell to the reference b-value (on the
        traveling-subject phantom the mono-exponential mapping of b=800 onto 1000 left more of
        the FA site effect: tissue signal is not mono-exponential, and the mapping changes the
        noise too; ``benchmarks/results/traveling.md``).

    Returns
    -------
    harmonized DWI (float32, same shape; b=0 volumes and voxels outside the mask unchanged),
    the b-values to write with it (matched shells take the reference b-value), notes.
    """
    if resynthesis not in RESYNTHESIS:
        raise HarmonizationError(f"RISH re-synthesis must be one of {', '.join(RESYNTHESIS)}, "
                                 f"got {resynthesis!r}")
    data = np.asarray(data, dtype=float)
    bvals = np.asarray(bvals, dtype=float).ravel()
    mask = np.asarray(mask, bool)
    notes = []
    if bvalue_mapping:
        data, bvals, notes = map_shells(data, bvals, mask, match_bvalue)
    fit = fit_shells(data, bvals, bvecs, mask, max_order=max_order, smooth=smooth)
    out = data.copy()
    new_bvals = bvals.copy()
    from dmriharmony.sh.fit import find_shells

    groups = dict((round(b, 6), idx) for b, idx in find_shells(bvals, shell_tol=fit.shell_tol))
    for shell in fit.shells:
        ref_b = match_bvalue(shell.bvalue)
        idx = groups.get(round(shell.bvalue, 6))
        if idx is None:
            continue
        if ref_b is None or ref_b not in scales:
            notes.append(f"shell b={shell.bvalue:g} not harmonized (no reference shell)")
            continue
        scale = np.asarray(scales[ref_b], dtype=float)
        n_orders = shell.order // 2 + 1
        if scale.shape[-1] < n_orders:  # higher orders than the template: left unscaled
            pad = np.ones(scale.shape[:-1] + (n_orders - scale.shape[-1],))
            scale = np.concatenate([scale, pad], axis=-1)
        scaled = scale_by_order(shell.coeffs, scale[..., :n_orders])

        signal = _predict_shell(fit, shell, scaled, bvals[idx], np.asarray(bvecs)[idx])
        if resynthesis == "residual":
            signal = data[..., idx] + signal - _predict_shell(
                fit, shell, shell.coeffs, bvals[idx], np.asarray(bvecs)[idx])
        vox = fit.mask
        block = out[..., idx]
        block[vox] = np.clip(signal[vox], 0.0, None)
        out[..., idx] = block
        new_bvals[idx] = ref_b
    return out.astype(np.float32), new_bvals, notes
