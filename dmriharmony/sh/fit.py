"""Per-shell SH fit of the b0-normalised diffusion signal, and evaluation on any gradients.

Model (Descoteaux et al., Magn Reson Med 58:497-510, 2007, eqs. 3-8): on one shell of
b-value ``b``, the normalised signal ``E(g) = S(g) / S0`` is expanded in the real symmetric SH
basis of :mod:`dmriharmony.sh.basis` (DIPY ``descoteaux07``, ``legacy=False``) and the
coefficients are the Laplace-Beltrami regularised least-squares solution
``c = (B^T B + lambda L^2)^-1 B^T E`` (DIPY :func:`~dipy.reconst.shm.smooth_pinv`).
``lambda = 0`` gives the plain least-squares fit, which reproduces any signal lying in the span
of the basis exactly.

Multi-shell data and sites with different b-values
--------------------------------------------------
Each shell is fitted separately, with its own order (chosen from its number of distinct
directions, at most 8). Shells are found by clustering b-values within ``shell_tol`` (s/mm^2).
When the signal is evaluated on another gradient table (:meth:`SHFit.predict`) or brought to
a common b-value (:func:`map_to_bvalue`), a target b-value within ``shell_tol`` of a fitted
shell **matches** that shell. Otherwise it is **mapped** by assuming, per direction, a
mono-exponential decay between the two fitted shells that bracket it (b = 0, where E = 1,
counts as a shell):

``E_b(g) = E_lo(g)^(1 - t) * E_hi(g)^t``, ``t = (b - b_lo) / (b_hi - b_lo)``,

and, beyond the outermost shell, the decay of the two outermost shells is extrapolated (one
shell: ``E_b = E_1^(b / b_1)``). This is exact for Gaussian (DTI-like) diffusion and an
approximation where the signal is not mono-exponential (high b): matching shells is the
default and mapping is only used when asked (``bvalue_mapping=True``), so that harmonization
never silently compares b = 1000 with b = 3000 data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from dipy.reconst.shm import smooth_pinv

from dmriharmony.errors import HarmonizationError
from dmriharmony.sh.basis import (
    MAX_ORDER,
    laplace_beltrami,
    n_coeffs,
    n_unique_directions,
    order_for_directions,
    order_from_ncoeffs,
    sh_matrix,
)

#: DIPY's default Laplace-Beltrami weight for Q-ball/CSA (Descoteaux et al. 2007 use 0.006).
DEFAULT_SMOOTH = 0.006
#: b-values at or below this are b = 0 volumes (DIPY's ``b0_threshold``).
B0_THRESHOLD = 50.0
#: b-values closer than this (s/mm^2) belong to the same shell.
SHELL_TOL = 100.0
#: floor on the normalised signal before a logarithm (b-value mapping).
_EPS = 1e-6


def fit_matrix(bvecs: np.ndarray, order: int, smooth: float = DEFAULT_SMOOTH) -> np.ndarray:
    """The (n_coeffs, N) matrix mapping N normalised measurements to SH coefficients."""
    if not np.isfinite(smooth) or smooth < 0:
        raise HarmonizationError(f"SH smoothing weight must be finite and >= 0, got {smooth}")
    B = sh_matrix(bvecs, order)
    if B.shape[0] < B.shape[1] and smooth == 0:
        raise HarmonizationError(
            f"order-{order} SH has {B.shape[1]} coefficients but only {B.shape[0]} directions: "
            "lower the order or use smooth > 0"
        )
    return np.asarray(smooth_pinv(B, np.sqrt(smooth) * laplace_beltrami(order)), dtype=float)


def fit_sh(
    signal: np.ndarray,
    bvecs: np.ndarray,
    order: int | None = None,
    *,
    smooth: float = DEFAULT_SMOOTH,
    max_order: int = MAX_ORDER,
) -> np.ndarray:
    """Fit SH coefficients to signals measured on one shell.

    Parameters
    ----------
    signal
        (..., N) signal (normally b0-normalised) on the N directions of ``bvecs``.
    bvecs
        (N, 3) directions of that shell.
    order
        Even SH order; ``None`` chooses it from the number of distinct directions
        (:func:`~dmriharmony.sh.basis.order_for_directions`, at most ``max_order``).
    smooth
        Laplace-Beltrami weight lambda (Descoteaux et al. 2007, eq. 8); 0 = least squares.

    Returns
    -------
    numpy.ndarray
        (..., n_coeffs) coefficients.
    """
    signal = np.asarray(signal, dtype=float)
    bvecs = np.asarray(bvecs, dtype=float)
    if signal.shape[-1:] != (bvecs.shape[0],):
        raise HarmonizationError(
            f"signal has {signal.shape[-1] if signal.ndim else 0} values per voxel but "
            f"{bvecs.shape[0]} b-vectors were given"
        )
    _check_finite(signal, "signal")
    if order is None:
        order = order_for_directions(n_unique_directions(bvecs), max_order)
    return signal @ fit_matrix(bvecs, order, smooth).T


def evaluate_sh(coeffs: np.ndarray, bvecs: np.ndarray) -> np.ndarray:
    """Evaluate SH coefficients (..., n_coeffs) on directions (N, 3): returns (..., N)."""
    coeffs = np.asarray(coeffs, dtype=float)
    order = order_from_ncoeffs(coeffs.shape[-1])
    return coeffs @ sh_matrix(bvecs, order).T


def find_shells(
    bvals: np.ndarray, *, shell_tol: float = SHELL_TOL, b0_threshold: float = B0_THRESHOLD
) -> list[tuple[float, np.ndarray]]:
    """Group diffusion-weighted volumes into shells.

    Sorted b-values start a new shell where consecutive values differ by more than
    ``shell_tol``. Returns ``[(mean b-value, volume indices), ...]`` in increasing b; b = 0
    volumes (``b <= b0_threshold``) are left out.
    """
    bvals = np.asarray(bvals, dtype=float).ravel()
    dw = np.flatnonzero(bvals > b0_threshold)
    if dw.size == 0:
        return []
    order = dw[np.argsort(bvals[dw], kind="stable")]
    groups: list[list[int]] = [[int(order[0])]]
    for prev, idx in zip(order[:-1], order[1:]):
        if bvals[idx] - bvals[prev] > shell_tol:
            groups.append([])
        groups[-1].append(int(idx))
    return [(float(np.mean(bvals[g])), np.sort(np.asarray(g))) for g in groups]


@dataclass
class ShellSH:
    """SH coefficients of the b0-normalised signal on one shell.

    Attributes
    ----------
    bvalue
        Mean b-value of the shell (s/mm^2).
    coeffs
        (..., n_coeffs) coefficients (spatial shape of the data, zero outside the mask).
    n_directions
        Distinct directions (up to sign) the fit used.
    """

    bvalue: float
    coeffs: np.ndarray
    n_directions: int

    @property
    def order(self) -> int:
        return order_from_ncoeffs(self.coeffs.shape[-1])


@dataclass
class SHFit:
    """Result of :func:`fit_shells`: the mean b0 and one :class:`ShellSH` per shell."""

    b0: np.ndarray
    shells: list[ShellSH]
    mask: np.ndarray
    smooth: float = DEFAULT_SMOOTH
    shell_tol: float = SHELL_TOL
    meta: dict = field(default_factory=dict)

    @property
    def bvalues(self) -> list[float]:
        return [s.bvalue for s in self.shells]

    def features(self) -> np.ndarray:
        """Per-voxel feature vector ``[b0, shell-1 coeffs, shell-2 coeffs, ...]`` (..., F).

        This is the per-voxel input of the VAE of Moyer et al. (2020): b0 + order-8 SH = 46
        values for one shell of 45 or more directions.
        """
        return np.concatenate([self.b0[..., None]] + [s.coeffs for s in self.shells], axis=-1)

    @classmethod
    def from_features(
        cls, features: np.ndarray, mask: np.ndarray, bvalues: list[float], orders: list[int],
        *, shell_tol: float = SHELL_TOL, smooth: float = DEFAULT_SMOOTH,
    ) -> SHFit:
        """Inverse of :meth:`features`: rebuild a fit from ``[b0, shell coeffs...]`` (..., F).

        Used to turn harmonized feature vectors (e.g. the VAE's decoded centre voxels put back
        with :func:`dmriharmony.sh.to_volume`) into DWI with :meth:`predict`.
        """
        features = np.asarray(features, dtype=float)
        widths = [n_coeffs(o) for o in orders]
        if len(bvalues) != len(orders) or features.shape[-1] != 1 + sum(widths):
            raise HarmonizationError(
                f"features of width {features.shape[-1]} do not match b0 + shells {bvalues} "
                f"at orders {orders} (width {1 + sum(widths)})"
            )
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != features.shape[:-1]:
            raise HarmonizationError(f"mask shape {mask.shape} != features {features.shape[:-1]}")
        bounds = np.cumsum([1] + widths)
        shells = [ShellSH(bvalue=float(b), coeffs=features[..., lo:hi].copy(), n_directions=0)
                  for b, lo, hi in zip(bvalues, bounds[:-1], bounds[1:])]
        return cls(b0=features[..., 0].copy(), shells=shells, mask=mask, smooth=smooth,
                   shell_tol=shell_tol)

    def normalized_signal(
        self, bvals: np.ndarray, bvecs: np.ndarray, *, bvalue_mapping: bool = False
    ) -> np.ndarray:
        """Normalised signal E = S / S0 on a gradient table (b = 0 volumes get 1)."""
        bvals = np.asarray(bvals, dtype=float).ravel()
        bvecs = np.asarray(bvecs, dtype=float)
        if bvecs.shape != (bvals.size, 3):
            raise HarmonizationError(
                f"{bvals.size} b-values but b-vectors of shape {bvecs.shape} (expected "
                f"({bvals.size}, 3))"
            )
        out = np.ones(self.b0.shape + (bvals.size,), dtype=float)
        for bval, idx in find_shells(bvals, shell_tol=self.shell_tol):
            # each target shell is evaluated at its own volumes' mean b-value
            out[..., idx] = _signal_at(self, bval, bvecs[idx], bvalue_mapping)
        out[~self.mask] = 0.0
        return out

    def predict(
        self, bvals: np.ndarray, bvecs: np.ndarray, *, b0: np.ndarray | None = None,
        bvalue_mapping: bool = False,
    ) -> np.ndarray:
        """Re-synthesise DWI ``S0 * E`` on any gradient table (..., N).

        Parameters
        ----------
        bvals, bvecs
            Target scheme (FSL layout: N b-values, (N, 3) vectors).
        b0
            S0 map to multiply with (default: the fitted mean b0).
        bvalue_mapping
            Allow target shells that match no fitted shell (mono-exponential mapping, see
            the module docstring); otherwise such a shell raises ``HarmonizationError``.
        """
        s0 = self.b0 if b0 is None else np.asarray(b0, dtype=float)
        if s0.shape != self.b0.shape:
            raise HarmonizationError(f"b0 map shape {s0.shape} != fitted shape {self.b0.shape}")
        return s0[..., None] * self.normalized_signal(bvals, bvecs, bvalue_mapping=bvalue_mapping)


def normalize_by_b0(
    data: np.ndarray, bvals: np.ndarray, mask: np.ndarray | None = None,
    b0_threshold: float = B0_THRESHOLD,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean b0 ``S0`` and ``E = S / S0``; voxels with ``S0 <= 0`` leave the mask.

    Returns ``(S0, E, mask)``; E is 0 outside the returned mask.
    """
    data = np.asarray(data, dtype=float)
    bvals = np.asarray(bvals, dtype=float).ravel()
    if data.shape[-1] != bvals.size:
        raise HarmonizationError(
            f"DWI has {data.shape[-1]} volumes but {bvals.size} b-values were given"
        )
    b0_idx = np.flatnonzero(bvals <= b0_threshold)
    if b0_idx.size == 0:
        raise HarmonizationError(
            f"no b=0 volume (b <= {b0_threshold:g}): cannot normalise the signal for SH"
        )
    mask = np.ones(data.shape[:-1], bool) if mask is None else np.asarray(mask, bool)
    if mask.shape != data.shape[:-1]:
        raise HarmonizationError(f"mask shape {mask.shape} != DWI spatial shape {data.shape[:-1]}")
    _check_finite(data[mask], "DWI inside the mask")
    s0 = data[..., b0_idx].mean(axis=-1)
    mask = mask & (s0 > 0)
    e = np.zeros_like(data)
    e[mask] = data[mask] / s0[mask, None]
    s0 = np.where(mask, s0, 0.0)
    return s0, e, mask


def fit_shells(
    data: np.ndarray,
    bvals: np.ndarray,
    bvecs: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    order: int | dict[float, int] | None = None,
    max_order: int = MAX_ORDER,
    smooth: float = DEFAULT_SMOOTH,
    shell_tol: float = SHELL_TOL,
    b0_threshold: float = B0_THRESHOLD,
) -> SHFit:
    """Fit SH per shell to b0-normalised DWI.

    Parameters
    ----------
    data
        (..., N) DWI (any spatial shape; a 4-D volume or a voxel list).
    bvals, bvecs
        N b-values and (N, 3) b-vectors (FSL layout, transposed).
    mask
        Voxels to fit (default all); voxels with a non-positive mean b0 are dropped.
    order
        One even order for every shell, ``{b-value: order}`` per shell (matched within
        ``shell_tol``), or ``None`` to choose each shell's order from its number of distinct
        directions (at most ``max_order``).
    smooth
        Laplace-Beltrami weight (Descoteaux et al. 2007, eq. 8).
    """
    bvals = np.asarray(bvals, dtype=float).ravel()
    bvecs = np.asarray(bvecs, dtype=float)
    if bvecs.shape != (bvals.size, 3):
        raise HarmonizationError(
            f"{bvals.size} b-values but b-vectors of shape {bvecs.shape} (expected "
            f"({bvals.size}, 3))"
        )
    s0, e, mask = normalize_by_b0(data, bvals, mask, b0_threshold)
    groups = find_shells(bvals, shell_tol=shell_tol, b0_threshold=b0_threshold)
    if not groups:
        raise HarmonizationError("no diffusion-weighted volume: nothing to fit SH to")
    shells = []
    for bval, idx in groups:
        n_dirs = n_unique_directions(bvecs[idx])
        shell_order = _shell_order(order, bval, n_dirs, max_order, shell_tol)
        coeffs = np.zeros(mask.shape + (n_coeffs(shell_order),))
        coeffs[mask] = e[mask][:, idx] @ fit_matrix(bvecs[idx], shell_order, smooth).T
        shells.append(ShellSH(bvalue=bval, coeffs=coeffs, n_directions=n_dirs))
    return SHFit(b0=s0, shells=shells, mask=mask, smooth=smooth, shell_tol=shell_tol)


def mono_exponential_signal(signal: np.ndarray, s0: np.ndarray, from_b: float, to_b: float,
                            mask: np.ndarray) -> np.ndarray:
    """Measured DWI of one shell moved from b-value ``from_b`` to ``to_b`` direction by
    direction, ``S0 (S / S0)^(to_b / from_b)`` -- the mono-exponential rule of
    :func:`map_to_bvalue`, applied to the measured signal instead of its SH fit.

    ``signal`` is (..., n_directions), ``s0`` the b=0 signal (...), ``mask`` the voxels to map
    (others are 0 in the result; voxels with ``S0 <= 0`` too).
    """
    signal = np.asarray(signal, dtype=float)
    s0 = np.asarray(s0, dtype=float)
    ok = np.asarray(mask, bool) & (s0 > 0)
    out = np.zeros_like(signal)
    e = np.clip(signal[ok] / s0[ok][:, None], _EPS, None)
    out[ok] = s0[ok][:, None] * e ** (float(to_b) / float(from_b))
    return out


def map_to_bvalue(
    fit: SHFit, bvalue: float, *, order: int | None = None, sphere_dirs: np.ndarray | None = None,
) -> ShellSH:
    """SH coefficients of the normalised signal at ``bvalue`` (match or map, see module doc).

    A matching shell is returned as is (re-truncated to ``order`` if given). Otherwise the
    signal is evaluated on a dense sphere (DIPY ``repulsion724`` unless ``sphere_dirs``),
    mapped per direction with the mono-exponential rule and refitted (least squares) at
    ``order`` (default: the highest order of the two shells used).
    """
    matched = _match_shell(fit, bvalue)
    if matched is not None:
        shell = fit.shells[matched]
        if order is None or order == shell.order:
            return shell
        if order > shell.order:
            raise HarmonizationError(
                f"shell b={shell.bvalue:g} was fitted at order {shell.order}, "
                f"cannot raise it to {order}"
            )
        return ShellSH(bvalue=shell.bvalue, coeffs=shell.coeffs[..., : n_coeffs(order)].copy(),
                       n_directions=shell.n_directions)
    if sphere_dirs is None:
        from dipy.data import get_sphere

        sphere_dirs = get_sphere(name="repulsion724").vertices
    lo, hi, _ = _bracket(fit, bvalue)
    used = [fit.shells[i].order for i in (lo, hi) if i is not None]
    order = max(used) if order is None else order
    signal = _signal_at(fit, bvalue, sphere_dirs, True)
    coeffs = np.zeros(fit.mask.shape + (n_coeffs(order),))
    coeffs[fit.mask] = signal[fit.mask] @ fit_matrix(sphere_dirs, order, 0.0).T
    return ShellSH(bvalue=float(bvalue), coeffs=coeffs, n_directions=len(sphere_dirs))


def _shell_order(order: int | dict[float, int] | None, bval: float, n_dirs: int,
                 max_order: int, shell_tol: float) -> int:
    if order is None:
        return order_for_directions(n_dirs, max_order)
    if isinstance(order, dict):
        hits = [o for b, o in order.items() if abs(float(b) - bval) <= shell_tol]
        if not hits:
            raise HarmonizationError(f"no SH order given for shell b={bval:g} in {order}")
        return int(hits[0])
    return int(order)


def _match_shell(fit: SHFit, bvalue: float) -> int | None:
    diffs = [abs(s.bvalue - bvalue) for s in fit.shells]
    best = int(np.argmin(diffs))
    return best if diffs[best] <= fit.shell_tol else None


def _bracket(fit: SHFit, bvalue: float) -> tuple[int | None, int | None, float]:
    """Indices of the shells below/above ``bvalue`` (None = the b = 0 "shell") and t."""
    bs = np.array(fit.bvalues)
    if bvalue <= bs[0]:
        return None, 0, bvalue / bs[0]
    if bvalue >= bs[-1]:
        if len(bs) == 1:
            return None, 0, bvalue / bs[0]
        lo, hi = len(bs) - 2, len(bs) - 1
    else:
        hi = int(np.searchsorted(bs, bvalue))
        lo = hi - 1
    return lo, hi, (bvalue - bs[lo]) / (bs[hi] - bs[lo])


def _signal_at(fit: SHFit, bvalue: float, dirs: np.ndarray, mapping: bool) -> np.ndarray:
    matched = _match_shell(fit, bvalue)
    if matched is not None:
        return evaluate_sh(fit.shells[matched].coeffs, dirs)
    if not mapping:
        raise HarmonizationError(
            f"target b={bvalue:g} matches no fitted shell {fit.bvalues} (tolerance "
            f"{fit.shell_tol:g}); pass bvalue_mapping=True to map between b-values"
        )
    lo, hi, t = _bracket(fit, bvalue)
    e_hi = np.clip(evaluate_sh(fit.shells[hi].coeffs, dirs), _EPS, None)
    if lo is None:
        log_e = t * np.log(e_hi)
    else:
        e_lo = np.clip(evaluate_sh(fit.shells[lo].coeffs, dirs), _EPS, None)
        log_e = (1.0 - t) * np.log(e_lo) + t * np.log(e_hi)
    return np.exp(log_e)


def _check_finite(values: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(values)):
        raise HarmonizationError(f"{what} contains NaN or infinite values")
