"""Multi-vendor diffusion MRI phantom: ground-truth anatomy -> scanner-specific DWI -> BIDS.

Public API::

    from dmriharmony.simulate import simulate_dataset, load_phantom_template
    root = simulate_dataset("phantom_bids", seed=0, subjects_per_site=3, traveling_subjects=1)
    tpl = load_phantom_template()   # fa, mask, labels, tissue, label_table, affine

``simulate_roi_table`` (ROI-level synthetic data for harmonizer tests) lives in
:mod:`dmriharmony.simulate.roi_table`. The names below are imported lazily (PEP 562), so that
``import dmriharmony.simulate.roi_table`` stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "simulate_dataset": "dmriharmony.simulate.dataset",
    "DEFAULT_SITES": "dmriharmony.simulate.scanners",
    "PRESETS": "dmriharmony.simulate.scanners",
    "Site": "dmriharmony.simulate.scanners",
    "get_site": "dmriharmony.simulate.scanners",
    "EffectModel": "dmriharmony.simulate.subjects",
    "load_phantom_template": "dmriharmony.simulate.template",
    "write_phantom_template": "dmriharmony.simulate.template",
    "load_scan_transform": "dmriharmony.simulate.transforms",
    "resample_to_scan": "dmriharmony.simulate.transforms",
    "scanner_to_template": "dmriharmony.simulate.transforms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dmriharmony.simulate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
