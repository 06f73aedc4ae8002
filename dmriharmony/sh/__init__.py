"""Spherical-harmonic (SH) representation of diffusion signals (numpy/DIPY only, no torch).

- :mod:`~dmriharmony.sh.basis`: DIPY ``descoteaux07`` real symmetric basis (``legacy=False``),
  order selection from the number of directions (up to 8).
- :mod:`~dmriharmony.sh.fit`: per-shell fit of the b0-normalised signal, evaluation on any
  gradient table, multi-shell matching / mono-exponential mapping between b-values.
- :mod:`~dmriharmony.sh.neighbourhood`: voxel + neighbours feature vectors for the VAE.
- :mod:`~dmriharmony.sh.rish`: rotation-invariant SH (RISH) features per order.
"""

from __future__ import annotations

from dmriharmony.sh.basis import (
    BASIS_NAME,
    n_coeffs,
    n_unique_directions,
    order_for_directions,
    order_from_ncoeffs,
    sh_matrix,
)
from dmriharmony.sh.fit import (
    ShellSH,
    SHFit,
    evaluate_sh,
    find_shells,
    fit_sh,
    fit_shells,
    map_to_bvalue,
    mono_exponential_signal,
    normalize_by_b0,
)
from dmriharmony.sh.neighbourhood import (
    centre_features,
    neighbourhood_features,
    neighbourhood_offsets,
    to_volume,
)
from dmriharmony.sh.rish import rish_features, rish_orders, scale_by_order

__all__ = [
    "BASIS_NAME",
    "SHFit",
    "ShellSH",
    "centre_features",
    "evaluate_sh",
    "find_shells",
    "fit_sh",
    "fit_shells",
    "map_to_bvalue",
    "mono_exponential_signal",
    "n_coeffs",
    "n_unique_directions",
    "neighbourhood_features",
    "neighbourhood_offsets",
    "normalize_by_b0",
    "order_for_directions",
    "order_from_ncoeffs",
    "rish_features",
    "rish_orders",
    "scale_by_order",
    "sh_matrix",
    "to_volume",
]
