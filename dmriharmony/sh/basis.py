"""Real symmetric spherical-harmonic (SH) basis used throughout dmriharmony.

We use DIPY's ``descoteaux07`` basis with ``legacy=False`` (:func:`dipy.reconst.shm.
real_sh_descoteaux`): the real, *orthonormal*, symmetric (even orders only) basis of
Descoteaux et al., "Regularized, fast, and robust analytical Q-ball imaging", Magn Reson Med
58:497-510 (2007), eq. 3, with the sign convention fixed in DIPY 1.x. Coefficients are ordered
by order ``l`` (0, 2, 2, 2, 2, 2, 4, ...) and, within an order, by ``m = -l .. l`` (DIPY's
:func:`~dipy.reconst.shm.sph_harm_ind_list`). A maximal order ``L`` has
``(L + 1)(L + 2) / 2`` coefficients (1, 6, 15, 28, 45 for L = 0, 2, 4, 6, 8).

Because the basis is orthonormal and each order spans an irreducible representation of the
rotation group, a rotation acts on the coefficients of one order by an orthogonal matrix: the
energy per order (RISH features, :mod:`dmriharmony.sh.rish`) is rotation invariant.
"""

from __future__ import annotations

import numpy as np
from dipy.core.geometry import cart2sphere
from dipy.reconst.shm import real_sh_descoteaux, sph_harm_ind_list

from dmriharmony.errors import HarmonizationError

#: DIPY basis name and flag used for every fit/evaluation in this package.
BASIS_NAME = "descoteaux07"
LEGACY = False
#: Highest SH order we fit (Moyer et al. 2020 and RISH practice use order 8).
MAX_ORDER = 8
#: Two directions closer than this angle (degrees, up to sign) count as one direction.
DIRECTION_TOL_DEG = 1.0


def n_coeffs(order: int) -> int:
    """Number of coefficients of the symmetric real SH basis up to even ``order``."""
    _check_order(order)
    return (order + 1) * (order + 2) // 2


def order_from_ncoeffs(n: int) -> int:
    """Inverse of :func:`n_coeffs`; raises if ``n`` is not 1, 6, 15, 28, 45, ..."""
    order = int(round((-3.0 + np.sqrt(1.0 + 8.0 * n)) / 2.0))
    if order < 0 or order % 2 or n_coeffs(order) != n:
        raise HarmonizationError(
            f"{n} SH coefficients does not match any even order (expected 1, 6, 15, 28, 45, ...)"
        )
    return order


def degrees(order: int) -> np.ndarray:
    """Order ``l`` of each coefficient up to ``order`` (DIPY's ``l_values``)."""
    _check_order(order)
    _, l_values = sph_harm_ind_list(order)
    return np.asarray(l_values, dtype=int)


def n_unique_directions(bvecs: np.ndarray, tol_deg: float = DIRECTION_TOL_DEG) -> int:
    """Number of distinct gradient directions, antipodal pairs counted once.

    The symmetric basis cannot tell ``g`` from ``-g``, so only directions distinct up to sign
    constrain the fit.
    """
    g = _unit(bvecs)
    cos_tol = np.cos(np.deg2rad(tol_deg))
    kept: list[np.ndarray] = []
    for v in g:
        if not kept or np.max(np.abs(np.asarray(kept) @ v)) < cos_tol:
            kept.append(v)
    return len(kept)


def order_for_directions(n_directions: int, max_order: int = MAX_ORDER) -> int:
    """Largest even order ``L <= max_order`` with ``n_coeffs(L) <= n_directions``.

    E.g. 6 directions -> 2, 15-27 -> 4, 28-44 -> 6, 45 or more -> 8 (with ``max_order=8``).
    This is the usual "no more unknowns than measurements" rule (Descoteaux et al. 2007,
    sec. 2.3); the Laplace-Beltrami regularisation of :func:`~dmriharmony.sh.fit.fit_sh` keeps
    the exactly determined case well conditioned.
    """
    _check_order(max_order)
    if n_directions < 1:
        raise HarmonizationError("an SH fit needs at least one gradient direction")
    order = 0
    while order + 2 <= max_order and n_coeffs(order + 2) <= n_directions:
        order += 2
    return order


def sh_matrix(bvecs: np.ndarray, order: int) -> np.ndarray:
    """Basis matrix ``B`` (n_directions, n_coeffs): ``signal = B @ coeffs``.

    Parameters
    ----------
    bvecs
        (N, 3) gradient directions (normalised here; must be non-zero).
    order
        Even maximal SH order.
    """
    _check_order(order)
    g = _unit(bvecs)
    _, theta, phi = cart2sphere(g[:, 0], g[:, 1], g[:, 2])
    B, _, _ = real_sh_descoteaux(order, theta, phi, full_basis=False, legacy=LEGACY)
    return np.asarray(B, dtype=float)


def laplace_beltrami(order: int) -> np.ndarray:
    """Diagonal ``l (l + 1)`` of the Laplace-Beltrami operator on each coefficient.

    Descoteaux et al. (2007), eq. 7: the regularised fit minimises
    ``||B c - s||^2 + lambda ||diag(l (l + 1)) c||^2``.
    """
    lv = degrees(order).astype(float)
    return lv * (lv + 1.0)


def _unit(bvecs: np.ndarray) -> np.ndarray:
    g = np.asarray(bvecs, dtype=float)
    if g.ndim != 2 or g.shape[1] != 3:
        raise HarmonizationError(f"b-vectors must be an (N, 3) array, got shape {g.shape}")
    norms = np.linalg.norm(g, axis=1)
    if not np.all(np.isfinite(norms)) or np.any(norms < 1e-6):
        bad = int(np.flatnonzero(~np.isfinite(norms) | (norms < 1e-6))[0])
        raise HarmonizationError(
            f"b-vector {bad} is zero or not finite: SH needs diffusion-weighted directions only"
        )
    return g / norms[:, None]


def _check_order(order: int) -> None:
    if int(order) != order or order < 0 or order % 2:
        raise HarmonizationError(f"SH order must be a non-negative even integer, got {order!r}")
