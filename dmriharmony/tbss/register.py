"""Registration of a subject's FA to a template FA with DIPY (TBSS's ``tbss_2_reg`` step).

The chain follows DIPY's registration tutorials (Garyfallidis et al., Front. Neuroinform. 2014;
Avants et al., Med. Image Anal. 12:26-41, 2008, for SyN):

1. centre of mass alignment;
2. translation, rigid and affine stages, each maximising Mattes mutual information
   (Mattes et al., IEEE TMI 22:120-128, 2003) in a Gaussian pyramid;
3. symmetric diffeomorphic normalisation (SyN) with a local cross-correlation metric.

Speed choices (see ``benchmarks/results/tbss.md``): the affine stages stop at half resolution by
default (``factors`` 4, 2: the 1-voxel accuracy is left to SyN), MI is computed densely
(optionally restricted to the template mask; a seeded ``sampling_proportion`` is available) and
SyN runs fewer iterations at the finer levels.

Robustness of the linear stages: on small grids (the 2 mm phantom template is 48 x 58 x 44, so
factor 4 leaves 12 x 15 x 11 voxels) the coarsest level can settle in a wrong pose (we measured
rigid solutions 50-55 degrees off that SyN then partly hides, QC r ~ 0.87-0.9). When the
coarsest level of the configured pyramid has fewer than ``min_coarse_voxels`` along an axis, or
the linear solution rotates the head by more than ``max_rotation_deg``, the linear stages are
run again from the centre-of-mass start with a pyramid one octave finer, and the solution with
the higher full-resolution mutual information (joint histogram of the resampled subject image
and the template within the template mask; the optimiser's own criterion, measured on a common
grid so candidates from different pyramids are comparable) is kept. The chosen pyramid, both MI
values and the rotation angle are kept in :attr:`Registration.metrics` and the QC table.

Transforms are saved per run: the affine as a 4x4 text matrix (DIPY's convention: maps template
world coordinates to subject world coordinates) and the SyN map as ``.npz`` (forward and
backward displacement fields with their grids). :func:`apply_transform` carries MD/AD/RD (or
any scalar map) with the FA-derived transforms (ENIGMA's ``tbss_non_FA``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from dmriharmony.errors import TemplateError
from dmriharmony.tbss.io import atomic_write

LOGGER = logging.getLogger(__name__)


@dataclass
class RegistrationConfig:
    """Parameters of the FA -> template registration.

    Attributes
    ----------
    affine_iters, affine_factors, affine_sigmas
        Pyramid of every affine stage (translation, rigid, affine): iterations, downsampling
        factor and smoothing sigma (voxels) per level, coarse to fine.
    nbins, sampling_proportion
        Mattes MI histogram bins and fraction of voxels sampled (None = all voxels).
    syn_iters
        SyN iterations per level, coarse to fine (empty = affine only).
    cc_radius, cc_sigma_diff
        Cross-correlation window radius (voxels) and the gradient smoothing of SyN.
    seed
        Seed of MI voxel sampling (DIPY draws samples with numpy's global generator).
    mask_metric
        Restrict the affine MI to the template brain mask (slower; FA templates are already
        zero outside the brain, so off by default).
    retry_finer_pyramid
        Re-run the linear stages with a pyramid one octave finer when the configured one looks
        unreliable (see ``min_coarse_voxels`` and ``max_rotation_deg``) and keep the solution
        with the higher full-resolution MI.
    min_coarse_voxels
        Fewest template voxels along any axis at the coarsest level before the retry is made.
    max_rotation_deg
        Head rotation (degrees, polar part of the template -> subject linear map) above which the
        linear solution is checked against the finer pyramid; also flagged in the QC table.
    """

    affine_iters: list[int] = field(default_factory=lambda: [200, 100])
    affine_factors: list[int] = field(default_factory=lambda: [4, 2])
    affine_sigmas: list[float] = field(default_factory=lambda: [3.0, 1.0])
    nbins: int = 32
    sampling_proportion: float | None = None
    syn_iters: list[int] = field(default_factory=lambda: [30, 20, 5])
    cc_radius: int = 4
    cc_sigma_diff: float = 2.0
    seed: int = 0
    mask_metric: bool = False
    retry_finer_pyramid: bool = True
    min_coarse_voxels: int = 24
    max_rotation_deg: float = 30.0

    def __post_init__(self) -> None:
        if not (len(self.affine_iters) == len(self.affine_factors) == len(self.affine_sigmas)):
            raise TemplateError("registration config: affine_iters, affine_factors and "
                                "affine_sigmas need the same number of levels")
        if self.sampling_proportion is not None and not 0 < self.sampling_proportion <= 1:
            raise TemplateError("registration config: sampling_proportion must be in (0, 1]")
        if any(int(f) < 1 for f in self.affine_factors):
            raise TemplateError("registration config: affine_factors must be >= 1")


@dataclass
class Registration:
    """Result of :func:`register_to_template`: the affine and (optionally) the SyN map."""

    affine: np.ndarray
    static_shape: tuple[int, int, int]
    static_affine: np.ndarray
    moving_shape: tuple[int, int, int]
    moving_affine: np.ndarray
    syn: object | None = None  # dipy.align.imwarp.DiffeomorphicMap
    metrics: dict = field(default_factory=dict)

    def transform(self, moving: np.ndarray, interpolation: str = "linear") -> np.ndarray:
        """Resample a subject-space array onto the template grid."""
        moving = np.asarray(moving, dtype=np.float64)
        if moving.shape[:3] != tuple(self.moving_shape):
            raise TemplateError(f"map grid {moving.shape} differs from the registered FA grid "
                                f"{self.moving_shape}")
        if self.syn is not None:
            return np.asarray(self.syn.transform(moving, interpolation=interpolation))
        return np.asarray(self._affine_map().transform(moving, interpolation=interpolation))

    def transform_inverse(self, static: np.ndarray, interpolation: str = "nearest") -> np.ndarray:
        """Resample a template-space array (e.g. the label image) onto the subject grid."""
        static = np.asarray(static, dtype=np.float64)
        if static.shape[:3] != tuple(self.static_shape):
            raise TemplateError(f"map grid {static.shape} differs from the template grid "
                                f"{self.static_shape}")
        if self.syn is not None:
            return np.asarray(self.syn.transform_inverse(static, interpolation=interpolation))
        return np.asarray(
            self._affine_map().transform_inverse(static, interpolation=interpolation))

    def _affine_map(self):
        from dipy.align.imaffine import AffineMap

        return AffineMap(self.affine, domain_grid_shape=self.static_shape,
                         domain_grid2world=self.static_affine,
                         codomain_grid_shape=self.moving_shape,
                         codomain_grid2world=self.moving_affine)

    # -- persistence --------------------------------------------------------------------------
    def save(self, affine_path: str | os.PathLike,
             warp_path: str | os.PathLike | None = None) -> list[Path]:
        """Write the affine (4x4 text) and, when SyN ran, the warp (``.npz``) atomically."""
        header = ("dmriharmony affine: template world (mm) -> subject world (mm), DIPY convention"
                  f"\nstatic_shape {' '.join(map(str, self.static_shape))}"
                  f"\nmoving_shape {' '.join(map(str, self.moving_shape))}")
        written = [atomic_write(affine_path, lambda tmp: np.savetxt(tmp, self.affine,
                                                                      header=header))]
        if warp_path is not None and self.syn is not None:
            m = self.syn
            arrays = {
                "forward": np.asarray(m.forward, np.float32),
                "backward": np.asarray(m.backward, np.float32),
                "disp_shape": np.asarray(m.disp_shape), "disp_grid2world": m.disp_grid2world,
                "domain_shape": np.asarray(m.domain_shape),
                "domain_grid2world": m.domain_grid2world,
                "codomain_shape": np.asarray(m.codomain_shape),
                "codomain_grid2world": m.codomain_grid2world,
                "prealign": np.eye(4) if m.prealign is None else m.prealign,
                "is_inverse": np.asarray(bool(m.is_inverse)),
                "static_affine": self.static_affine,
                "static_shape": np.asarray(self.static_shape),
                "moving_shape": np.asarray(self.moving_shape),
                "moving_affine": self.moving_affine, "affine": self.affine,
            }

            def _w(tmp: str) -> None:
                with open(tmp, "wb") as fh:
                    np.savez_compressed(fh, **arrays)

            written.append(atomic_write(warp_path, _w))
        return written

    @classmethod
    def load(cls, affine_path: str | os.PathLike, warp_path: str | os.PathLike | None = None,
             static_img: nib.spatialimages.SpatialImage | None = None,
             moving_img: nib.spatialimages.SpatialImage | None = None) -> Registration:
        """Read transforms written by :meth:`save`.

        With a warp file the grids come from it; an affine-only transform needs the template
        and subject images (``static_img``, ``moving_img``) for its grids.
        """
        from dipy.align.imwarp import DiffeomorphicMap

        affine_path = Path(affine_path)
        if not affine_path.is_file():
            raise TemplateError(f"affine transform not found: {affine_path}")
        affine = np.loadtxt(affine_path)
        if affine.shape != (4, 4):
            raise TemplateError(f"affine transform {affine_path} is not a 4x4 matrix")
        if warp_path is not None:
            warp_path = Path(warp_path)
            if not warp_path.is_file():
                raise TemplateError(f"SyN warp not found: {warp_path}")
            z = np.load(warp_path)
            m = DiffeomorphicMap(3, tuple(z["disp_shape"]), disp_grid2world=z["disp_grid2world"],
                                 domain_shape=tuple(z["domain_shape"]),
                                 domain_grid2world=z["domain_grid2world"],
                                 codomain_shape=tuple(z["codomain_shape"]),
                                 codomain_grid2world=z["codomain_grid2world"],
                                 prealign=z["prealign"])
            m.forward = np.ascontiguousarray(z["forward"], dtype=np.float32)
            m.backward = np.ascontiguousarray(z["backward"], dtype=np.float32)
            m.is_inverse = bool(z["is_inverse"]) if "is_inverse" in z else False
            return cls(affine, tuple(int(s) for s in z["static_shape"]), z["static_affine"],
                       tuple(int(s) for s in z["moving_shape"]), z["moving_affine"], syn=m)
        if static_img is None or moving_img is None:
            raise TemplateError(f"affine-only transform {affine_path} needs the template and "
                                "subject images to know the grids")
        return cls(affine, tuple(static_img.shape[:3]), static_img.affine,
                   tuple(moving_img.shape[:3]), moving_img.affine)


def _normalise(data: np.ndarray) -> np.ndarray:
    data = np.asarray(data, dtype=np.float64).reshape(np.shape(data)[:3])
    data = np.where(np.isfinite(data), data, 0.0)
    return data


def register_to_template(
    moving: np.ndarray,
    moving_affine: np.ndarray,
    static: np.ndarray,
    static_affine: np.ndarray,
    config: RegistrationConfig | None = None,
    static_mask: np.ndarray | None = None,
    stages: tuple[str, ...] = ("translation", "rigid", "affine"),
) -> Registration:
    """Register a subject's FA (moving) to a template FA (static).

    Parameters
    ----------
    moving, moving_affine
        Subject FA (fraction) and its voxel-to-world affine.
    static, static_affine
        Template FA (fraction) and its affine.
    config : RegistrationConfig, optional
    static_mask : ndarray, optional
        Template brain mask restricting the affine MI metric (with ``config.mask_metric``) and
        the voxels that score a retried linear solution (default: template > 0).
    stages : tuple of str
        Linear stages to run, in order (subset of translation, rigid, affine).

    Returns
    -------
    Registration
        With ``metrics`` holding stage times (``*_s``), ``rotation_deg``, ``linear_pyramid``
        (``configured`` or ``finer``) and, when the finer pyramid was tried, both MI values.
    """
    from dipy.align.imaffine import (
        AffineRegistration,
        MutualInformationMetric,
        transform_centers_of_mass,
    )
    from dipy.align.transforms import (
        AffineTransform3D,
        RigidTransform3D,
        TranslationTransform3D,
    )

    cfg = config or RegistrationConfig()
    moving = _normalise(moving)
    static = _normalise(static)
    if not np.any(moving > 0):
        raise TemplateError("registration: the subject FA is empty (all zero)")
    if not np.any(static > 0):
        raise TemplateError("registration: the template FA is empty (all zero)")
    times: dict[str, float | str] = {}
    t0 = time.perf_counter()
    com = transform_centers_of_mass(static, static_affine, moving, moving_affine)
    times["com_s"] = time.perf_counter() - t0
    mask = None
    if static_mask is not None and cfg.mask_metric and cfg.sampling_proportion is None:
        mask = (np.asarray(static_mask) != 0).astype(np.int32)
    known = {"translation": TranslationTransform3D, "rigid": RigidTransform3D,
             "affine": AffineTransform3D}
    unknown = [s for s in stages if s not in known]
    if unknown:
        raise TemplateError(f"registration: unknown stage(s) {unknown} (translation, rigid, "
                            "affine)")

    def linear(factors: list[int], sigmas: list[float], iters: list[int], tag: str) -> np.ndarray:
        metric = MutualInformationMetric(nbins=cfg.nbins,
                                         sampling_proportion=cfg.sampling_proportion)
        reg = AffineRegistration(metric=metric, level_iters=list(iters), sigmas=list(sigmas),
                                 factors=list(factors), verbosity=0)
        affine = com.affine
        for name in stages:
            t = time.perf_counter()
            if cfg.sampling_proportion is not None:
                # DIPY draws sparse MI samples from numpy's legacy global generator
                np.random.seed(cfg.seed)  # noqa: NPY002
            result = reg.optimize(static, moving, known[name](), None,
                                  static_grid2world=static_affine,
                                  moving_grid2world=moving_affine, starting_affine=affine,
                                  static_mask=mask)
            affine = result.affine
            times[f"{name}{tag}_s"] = time.perf_counter() - t
            LOGGER.info("registration: %s stage%s done in %.1f s", name,
                        tag.replace("_", " "), times[f"{name}{tag}_s"])
        return affine

    affine = linear(list(cfg.affine_factors), list(cfg.affine_sigmas), list(cfg.affine_iters), "")
    rotation = rotation_angle_deg(affine)
    coarse_voxels = min(static.shape) / max(cfg.affine_factors)
    times["linear_pyramid"] = "configured"
    if (cfg.retry_finer_pyramid and stages and max(cfg.affine_factors) > 1
            and (coarse_voxels < cfg.min_coarse_voxels or rotation > cfg.max_rotation_deg)):
        score_mask = (np.asarray(static_mask) != 0 if static_mask is not None
                      else static > 0)
        factors, sigmas, iters = finer_pyramid(cfg.affine_factors, cfg.affine_iters)
        candidate = linear(factors, sigmas, iters, "_finer")
        mi_configured = _resampled_mi(affine, static, static_affine, moving, moving_affine,
                                      score_mask, cfg.nbins)
        mi_finer = _resampled_mi(candidate, static, static_affine, moving, moving_affine,
                                 score_mask, cfg.nbins)
        times["linear_mi_configured"] = mi_configured
        times["linear_mi_finer"] = mi_finer
        if mi_finer > mi_configured:
            LOGGER.info("registration: the finer pyramid %s found a better linear pose "
                        "(MI %.4f > %.4f; rotation %.1f -> %.1f deg)", factors, mi_finer,
                        mi_configured, rotation, rotation_angle_deg(candidate))
            affine = candidate
            times["linear_pyramid"] = "finer"
    times["rotation_deg"] = rotation_angle_deg(affine)
    if times["rotation_deg"] > cfg.max_rotation_deg:
        LOGGER.warning("registration: the linear transform rotates the head by %.0f degrees "
                       "(> %.0f); check the QC figure", times["rotation_deg"],
                       cfg.max_rotation_deg)
    out = Registration(affine, tuple(static.shape), static_affine, tuple(moving.shape),
                       moving_affine)
    if cfg.syn_iters:
        from dipy.align.imwarp import SymmetricDiffeomorphicRegistration
        from dipy.align.metrics import CCMetric

        t = time.perf_counter()
        sdr = SymmetricDiffeomorphicRegistration(
            CCMetric(3, sigma_diff=cfg.cc_sigma_diff, radius=cfg.cc_radius),
            level_iters=list(cfg.syn_iters))
        out.syn = sdr.optimize(static, moving, static_grid2world=static_affine,
                               moving_grid2world=moving_affine, prealign=affine)
        times["syn_s"] = time.perf_counter() - t
        LOGGER.info("registration: SyN done in %.1f s", times["syn_s"])
    times["total_s"] = time.perf_counter() - t0
    out.metrics = times
    return out


def rotation_angle_deg(affine: np.ndarray) -> float:
    """Rotation angle (degrees) of the polar decomposition ``L = R S`` of an affine's 3x3 part."""
    u, _, vt = np.linalg.svd(np.asarray(affine, dtype=np.float64)[:3, :3])
    r = u @ vt
    if np.linalg.det(r) < 0:  # a reflection: measure the rotation of its proper part
        u[:, -1] *= -1
        r = u @ vt
    return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0))))


def finer_pyramid(factors: list[int], iters: list[int]) -> tuple[list[int], list[float],
                                                                   list[int]]:
    """The pyramid one octave finer: factors halved (at least 1), sigma = factor - 1 voxels.

    Repeated levels (several factors that halve to 1) are merged, keeping the first level's
    iteration count. ``sigma = factor - 1`` is the smoothing of DIPY's tutorial pyramid
    (factors 4, 2, 1 with sigmas 3, 1, 0).
    """
    out_f: list[int] = []
    out_i: list[int] = []
    for f, n in zip(factors, iters):
        g = max(1, int(f) // 2)
        if out_f and out_f[-1] == g:
            continue
        out_f.append(g)
        out_i.append(int(n))
    return out_f, [float(f - 1) for f in out_f], out_i


def histogram_mi(a: np.ndarray, b: np.ndarray, nbins: int = 32) -> float:
    """Mutual information (nats) of two samples from their joint histogram (``nbins`` squared).

    Shannon MI of the binned intensities (Maes et al., IEEE TMI 16:187-198, 1997), used to
    compare linear solutions on one grid.
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    joint, _, _ = np.histogram2d(a, b, bins=nbins)
    p = joint / joint.sum()
    pa = p.sum(axis=1, keepdims=True)
    pb = p.sum(axis=0, keepdims=True)
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] / (pa @ pb)[nz])))


def _resampled_mi(affine: np.ndarray, static: np.ndarray, static_affine: np.ndarray,
                  moving: np.ndarray, moving_affine: np.ndarray, mask: np.ndarray,
                  nbins: int) -> float:
    from dipy.align.imaffine import AffineMap

    amap = AffineMap(affine, domain_grid_shape=static.shape, domain_grid2world=static_affine,
                     codomain_grid_shape=moving.shape, codomain_grid2world=moving_affine)
    warped = np.asarray(amap.transform(moving))
    return histogram_mi(warped[mask], static[mask], nbins)


def config_to_dict(cfg: RegistrationConfig) -> dict:
    """The registration parameters as a plain dict (for provenance sidecars)."""
    return asdict(cfg)
