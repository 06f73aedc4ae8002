"""Harmonizers: pure numpy/scipy/torch, no Nipype.

Submodules and estimator classes are imported lazily so that ``import dmriharmony.harmonizers``
stays cheap (torch is only imported when the VAE is used).

- :mod:`~dmriharmony.harmonizers.meta`: per-site effect sizes and inverse-variance pooling.
- :mod:`~dmriharmony.harmonizers.mixed`: mixed-effects mega-analysis, site as a random effect.
- :class:`ComBat` (:mod:`~dmriharmony.harmonizers.combat`) and its variants
  (:class:`CovBat`, :class:`ComBatGAM`).
- :class:`VoxelComBat` (:mod:`~dmriharmony.harmonizers.voxel_combat`): ComBat over template
  voxels, out of core (chunked, on-disk matrices).
- :class:`RISHHarmonizer` (:mod:`~dmriharmony.harmonizers.rish`): RISH site templates and scale
  maps (Mirzaalian et al. 2016).
- :class:`SiteInvariantVAE` (:mod:`~dmriharmony.harmonizers.vae`): site-invariant conditional VAE
  (Moyer et al. 2020), torch, imported lazily.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_SUBMODULES = {"meta", "mixed", "combat", "covbat", "gam", "rish", "vae", "voxel_combat"}
_ATTRIBUTES = {
    "ComBat": "combat",
    "CovBat": "covbat",
    "ComBatGAM": "gam",
    "VoxelComBat": "voxel_combat",
    "RISHHarmonizer": "rish",
    "SiteInvariantVAE": "vae",
}

__all__ = sorted(_SUBMODULES | set(_ATTRIBUTES))


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return import_module(f"{__name__}.{name}")
    if name in _ATTRIBUTES:
        return getattr(import_module(f"{__name__}.{_ATTRIBUTES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
