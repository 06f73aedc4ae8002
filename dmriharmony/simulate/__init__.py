"""Multi-vendor diffusion MRI phantom: ground-truth anatomy -> scanner-specific DWI -> BIDS.

Public API::

    from dmriharmony.simulate import simulate_dataset, load_phantom_template
    root = simulate_dataset("phantom_bids", seed=0, subjects_per_site=3, traveling_subjects=1)
    tpl = load_phantom_template()   # fa, mask, labels, tissue, label_table, affine

``simulate_roi_table`` (ROI-level synthetic data for harmonizer tests) lives in
:mod:`dmriharmony.simulate.roi_table`.
"""

from __future__ import annotations

from dmriharmony.simulate.dataset import simulate_dataset
from dmriharmony.simulate.scanners import DEFAULT_SITES, PRESETS, Site, get_site
from dmriharmony.simulate.subjects import EffectModel
from dmriharmony.simulate.template import load_phantom_template, write_phantom_template
from dmriharmony.simulate.transforms import (
                                             load_scan_transform,
                                             resample_to_scan,
                                             scanner_to_template,
)

__all__ = [
    "DEFAULT_SITES",
    "PRESETS",
    "EffectModel",
    "Site",
    "get_site",
    "load_phantom_template",
    "load_scan_transform",
    "resample_to_scan",
    "scanner_to_template",
    "simulate_dataset",
    "write_phantom_template",
]
