"""Reading, checking and selecting diffusion gradients (b-values and b-vectors).

FSL/BIDS gradient files: ``.bval`` holds one row of N b-values (s/mm^2); ``.bvec`` holds three
rows of N unit vectors (BIDS specification, "Diffusion imaging data"). Some tools write the
transpose (N rows of 3): we accept it when unambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from dipy.core.gradients import GradientTable, gradient_table

from dmriharmony.errors import BIDSInputError

#: b-values at or below this are treated as b=0 (DIPY's default ``b0_threshold``).
B0_THRESHOLD = 50.0
#: tolerance on the norm of the b-vector of a diffusion-weighted volume.
BVEC_NORM_TOL = 0.05


def read_bvals(path: str | Path) -> np.ndarray:
    """Read an FSL-style ``.bval`` file into a 1-D float array.

    Raises
    ------
    BIDSInputError
        If the file is missing, unreadable, empty or holds non-finite/negative values.
    """
    path = Path(path)
    if not path.is_file():
        raise BIDSInputError(f"{path}: b-value file not found")
    try:
        bvals = np.loadtxt(path, dtype=float, ndmin=1).ravel()
    except ValueError as exc:
        raise BIDSInputError(f"{path}: cannot parse b-values ({exc})") from None
    if bvals.size == 0:
        raise BIDSInputError(f"{path}: b-value file is empty")
    if not np.all(np.isfinite(bvals)) or np.any(bvals < 0):
        raise BIDSInputError(f"{path}: b-values must be finite and non-negative")
    return bvals


def read_bvecs(path: str | Path, n_volumes: int | None = None) -> np.ndarray:
    """Read an FSL-style ``.bvec`` file into an (N, 3) array.

    Parameters
    ----------
    path
        The ``.bvec`` file (3 rows of N values, or N rows of 3).
    n_volumes
        Expected N; used to decide the layout of a square-ish file.
    """
    path = Path(path)
    if not path.is_file():
        raise BIDSInputError(f"{path}: b-vector file not found")
    try:
        bvecs = np.loadtxt(path, dtype=float, ndmin=2)
    except ValueError as exc:
        raise BIDSInputError(f"{path}: cannot parse b-vectors ({exc})") from None
    if bvecs.shape[0] == 3 and (n_volumes is None or bvecs.shape[1] == n_volumes):
        bvecs = bvecs.T
    elif bvecs.shape[1] != 3:
        raise BIDSInputError(
            f"{path}: b-vectors must have 3 rows (x, y, z), found shape {bvecs.shape}"
        )
    # NaN/Inf are tolerated here (real files, e.g. DIPY's small_64D, carry NaN on b=0
    # volumes); check_gradients rejects them on diffusion-weighted volumes.
    return np.ascontiguousarray(bvecs)


def check_gradients(
    bvals: np.ndarray,
    bvecs: np.ndarray,
    n_volumes: int,
    *,
    bval_file: str | Path = "bval",
    bvec_file: str | Path = "bvec",
    b0_threshold: float = B0_THRESHOLD,
    require_b0: bool = True,
) -> None:
    """Check a gradient scheme against its DWI series; raise one clear error on failure.

    Checks: counts equal the 4th dimension, at least one b=0 volume and one
    diffusion-weighted volume (``require_b0``; off for one part of a series whose shells are
    split across ``acq-`` runs, checked on the whole), and every diffusion-weighted volume has
    a b-vector of unit norm (within ``BVEC_NORM_TOL``; BIDS requires unit vectors).
    """
    if bvals.shape[0] != n_volumes:
        raise BIDSInputError(
            f"{bval_file}: {bvals.shape[0]} b-values but the DWI has {n_volumes} volumes"
        )
    if bvecs.shape[0] != n_volumes:
        raise BIDSInputError(
            f"{bvec_file}: {bvecs.shape[0]} b-vectors but the DWI has {n_volumes} volumes"
        )
    b0 = bvals <= b0_threshold
    if require_b0 and not np.any(b0):
        raise BIDSInputError(
            f"{bval_file}: no b=0 volume (b <= {b0_threshold:g}); DTI needs one for S0"
        )
    if require_b0 and np.all(b0):
        raise BIDSInputError(
            f"{bval_file}: no diffusion-weighted volume (all b <= {b0_threshold:g})"
        )
    norms = np.linalg.norm(bvecs[~b0], axis=1)
    nonfinite = np.flatnonzero(~np.isfinite(norms))
    if nonfinite.size:
        vol = np.flatnonzero(~b0)[nonfinite[0]]
        raise BIDSInputError(
            f"{bvec_file}: NaN/Inf b-vector on diffusion-weighted volume {vol} (b={bvals[vol]:g})"
        )
    bad = np.flatnonzero(np.abs(norms - 1.0) > BVEC_NORM_TOL)
    if bad.size:
        vol = np.flatnonzero(~b0)[bad[0]]
        kind = "zero" if norms[bad[0]] < 1e-6 else f"non-unit (norm {norms[bad[0]]:.3f})"
        raise BIDSInputError(
            f"{bvec_file}: {kind} b-vector on diffusion-weighted volume {vol} "
            f"(b={bvals[vol]:g}); {bad.size} such volume(s)"
        )


def round_bvals(bvals: np.ndarray, step: float = 50.0) -> np.ndarray:
    """Round b-values to the nearest multiple of ``step`` (scanners report e.g. 995 for 1000).

    Values at or below ``B0_THRESHOLD`` become exactly 0.
    """
    if step <= 0:
        raise ValueError(f"b-value rounding step must be positive, got {step}")
    out = np.round(np.asarray(bvals, float) / step) * step
    out[np.asarray(bvals) <= B0_THRESHOLD] = 0.0
    return out


def shells(bvals: np.ndarray, step: float = 50.0) -> list[int]:
    """Sorted distinct rounded b-values (the shells, b=0 included)."""
    return sorted({int(b) for b in round_bvals(bvals, step)})


@dataclass(frozen=True)
class ShellSelection:
    """Result of :func:`select_shells`: which volumes are kept and the resulting scheme."""

    index: np.ndarray
    bvals: np.ndarray
    bvecs: np.ndarray
    shells: list[int]


def select_shells(
    bvals: np.ndarray,
    bvecs: np.ndarray,
    *,
    bmax: float = 1500.0,
    step: float = 50.0,
) -> ShellSelection:
    """Keep b=0 volumes and shells with rounded b <= ``bmax`` (the DTI regime).

    The Gaussian (tensor) signal model holds at low b; above ~1500 s/mm^2 kurtosis biases MD
    low (Jensen et al., MRM 2005), which is why DTI pipelines such as ENIGMA-DTI fit the
    b~1000 shell only. The original (unrounded) b-values are returned for the fit.
    """
    rounded = round_bvals(bvals, step)
    keep = rounded <= bmax
    n_dw = int(np.sum(keep & (rounded > 0)))
    if n_dw < 6:
        raise BIDSInputError(
            f"only {n_dw} diffusion-weighted volumes with b <= {bmax:g} (shells "
            f"{shells(bvals, step)}); a tensor needs at least 6: raise --bmax"
        )
    idx = np.flatnonzero(keep)
    return ShellSelection(idx, np.asarray(bvals, float)[idx], np.asarray(bvecs, float)[idx],
                          shells(np.asarray(bvals)[idx], step))


def make_gtab(bvals: np.ndarray, bvecs: np.ndarray) -> GradientTable:
    """A DIPY gradient table with b-vectors re-normalised on diffusion-weighted volumes."""
    bvecs = np.array(bvecs, float)
    dw = bvals > B0_THRESHOLD
    bvecs[dw] /= np.linalg.norm(bvecs[dw], axis=1, keepdims=True)
    bvecs[~dw] = 0.0
    return gradient_table(np.asarray(bvals, float), bvecs=bvecs, b0_threshold=B0_THRESHOLD)
