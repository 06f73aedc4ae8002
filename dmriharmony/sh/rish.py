"""Rotation-invariant spherical-harmonic (RISH) features.

Mirzaalian et al., "Harmonizing diffusion MRI data across multiple sites and scanners",
MICCAI 2015, eq. 2, and NeuroImage 2016: for each even order ``l`` the energy
``||C_l||^2 = sum_m c_lm^2`` of the SH coefficients of that order. With an orthonormal real
basis (ours: DIPY ``descoteaux07``, ``legacy=False``) a rotation of the signal multiplies the
order-``l`` coefficients by an orthogonal matrix, so ``||C_l||^2`` does not change.
"""

from __future__ import annotations

import numpy as np

from dmriharmony.errors import HarmonizationError
from dmriharmony.sh.basis import degrees, order_from_ncoeffs


def rish_orders(order: int) -> np.ndarray:
    """The orders ``0, 2, ..., order`` that :func:`rish_features` returns, in that order."""
    return np.arange(0, order + 1, 2)


def rish_features(coeffs: np.ndarray) -> np.ndarray:
    """RISH features ``||C_l||^2`` (..., n_orders) from coefficients (..., n_coeffs).

    Column ``k`` is order ``l = 2 k`` (see :func:`rish_orders`).
    """
    coeffs = np.asarray(coeffs, dtype=float)
    if coeffs.ndim == 0:
        raise HarmonizationError("SH coefficients must have a last axis of coefficients")
    order = order_from_ncoeffs(coeffs.shape[-1])
    lv = degrees(order)
    sq = coeffs**2
    return np.stack([sq[..., lv == ell].sum(axis=-1) for ell in rish_orders(order)], axis=-1)


def scale_by_order(coeffs: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Multiply the order-``l`` coefficients by ``scale[..., l // 2]``.

    RISH harmonization multiplies each order by ``sqrt(E_ref,l / E_tgt,l)`` (Mirzaalian et al.
    2016, eq. 4); ``scale`` broadcasts over the spatial axes.
    """
    coeffs = np.asarray(coeffs, dtype=float)
    order = order_from_ncoeffs(coeffs.shape[-1])
    scale = np.asarray(scale, dtype=float)
    if scale.shape[-1] != order // 2 + 1:
        raise HarmonizationError(
            f"{scale.shape[-1]} scale factors for SH order {order} "
            f"(needs {order // 2 + 1}, one per even order)"
        )
    return coeffs * scale[..., degrees(order) // 2]
