"""Synthetic SH feature volumes with a known per-order site effect (tests and benchmarks).

Each subject is a small volume of single-tensor voxels whose fibre direction turns smoothly
across the volume (a subject-specific pattern), with subject-specific diffusivities. The
noise-free normalised signal on a 724-direction sphere at one b-value is fitted with order-L
SH (:func:`dmriharmony.sh.fit_sh`). A *site* then multiplies the b0 by ``b0_gain`` and the
order-``l`` coefficients by ``scales[l // 2]``: exactly the multiplicative per-order site
effect that RISH harmonization assumes (Mirzaalian et al. 2016, eq. 3). The same subject
"scanned" at two sites differs only by that effect (a traveling subject).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from dipy.data import get_sphere

from dmriharmony.errors import HarmonizationError
from dmriharmony.sh.fit import fit_sh
from dmriharmony.sh.rish import scale_by_order


@dataclass(frozen=True)
class SiteEffect:
    """A site's multiplicative effect: b0 gain and one SH scale factor per even order."""

    b0_gain: float
    scales: tuple[float, ...]


def subject_sh_volume(
    subject_seed: int, shape: tuple[int, int, int] = (12, 12, 4), order: int = 4,
    bvalue: float = 1000.0, step_deg: float = 15.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Site-free features (X, Y, Z, 1 + n_coeffs) = [b0, SH of E] and a full mask.

    The fibre direction has polar angle ``theta = step * x + phase`` and azimuth
    ``phi = step * (y + z) + phase`` (``step_deg`` per voxel), so a 12-voxel-wide volume spans
    every orientation while neighbouring voxels stay alike, as in tissue. Diffusivities and
    b0 vary smoothly with subject-specific levels.
    """
    rng = np.random.default_rng(subject_seed)
    x, y, z = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    step = np.deg2rad(step_deg)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    theta = (step * x + phase[0]).ravel()
    phi = (step * (y + z) + phase[1]).ravel()
    axis = np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)],
                    -1)
    ramp = 0.5 + 0.5 * np.sin(step * (x - y) + phase[2]).ravel()
    l1 = rng.uniform(1.4e-3, 1.8e-3) + 2e-4 * ramp
    l2 = rng.uniform(0.3e-3, 0.5e-3) + 2e-4 * (1 - ramp)
    dirs = get_sphere(name="repulsion724").vertices
    cos2 = (axis @ dirs.T) ** 2
    adc = l2[:, None] + (l1 - l2)[:, None] * cos2
    coeffs = fit_sh(np.exp(-bvalue * adc), dirs, order=order, smooth=0.0)
    b0 = rng.uniform(800, 1200) * (1 + 0.02 * z.ravel())
    feats = np.concatenate([b0[:, None], coeffs], axis=1).reshape(shape + (-1,))
    return feats, np.ones(shape, dtype=bool)


def apply_site(features: np.ndarray, effect: SiteEffect) -> np.ndarray:
    """Apply a site's b0 gain and per-order SH scales to ``[b0, SH]`` features (..., F)."""
    features = np.asarray(features, dtype=float)
    scales = np.asarray(effect.scales, dtype=float)
    out = np.empty_like(features)
    out[..., 0] = effect.b0_gain * features[..., 0]
    try:
        out[..., 1:] = scale_by_order(features[..., 1:], scales)
    except HarmonizationError as exc:
        raise HarmonizationError(f"site effect does not fit the features: {exc}") from None
    return out
