"""Ground truth on the template grid: b -> 0 tensor maps, ROI means and true effects.

The ground-truth tensor of a template voxel is the signal-weighted mean of the compartment
tensors of the 2x2x2 fine voxels it contains (first cumulant of their summed signal, see
:mod:`dmriharmony.simulate.signal`): the tensor a DTI fit of that voxel's signal converges to as
b -> 0 (Basser & Pierpaoli, JMR B 1996 for FA/MD/AD/RD). It depends on the acquisition through
the relaxation weights (TE, TR, field), so every scan has its own ground truth.

True effects are computed counterfactually on the template subject (no individual offsets):
the change of each label's mean FA/MD/AD/RD when only the diagnosis, sex or age changes, for each
site's acquisition and for the relaxation-free tissue (TE -> 0, TR -> infinity).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dmriharmony.simulate.anatomy import BLOCK, LABELS, TEMPLATE_SHAPE, Phantom
from dmriharmony.simulate.scanners import Site
from dmriharmony.simulate.signal import Microstructure, d0_moments
from dmriharmony.simulate.subjects import EffectModel, subject_microstructure
from dmriharmony.simulate.tissue import compartment_weights, relaxation_at, tensor_metrics

METRICS = ("fa", "md", "ad", "rd")


def tissue_weights(field_strength: float = 3.0) -> dict[str, float]:
    """Relaxation-free weights (proton density only): TE -> 0, TR -> infinity."""
    return compartment_weights(relaxation_at(field_strength), 1e-9, 1e12)


def site_weights(site: Site) -> dict[str, float]:
    return compartment_weights(relaxation_at(site.field_strength), site.te_ms, site.tr_ms)


def _block_index(phantom: Phantom) -> np.ndarray:
    """Flat template-grid index (C order) of the block holding each phantom voxel."""
    if "block" not in phantom.extra:
        ijk = np.stack(np.unravel_index(phantom.index, phantom.shape), axis=1) // BLOCK
        phantom.extra["block"] = np.ravel_multi_index(ijk.T, TEMPLATE_SHAPE)
    return phantom.extra["block"]


def _block_sum(values: np.ndarray, phantom: Phantom, sel: np.ndarray | None = None) -> np.ndarray:
    """Sum per-voxel values (n, ...) of phantom voxels ``sel`` over the template-grid blocks."""
    block = _block_index(phantom)
    if sel is not None:
        block = block[sel]
    values = np.asarray(values, dtype=float)
    size = int(np.prod(TEMPLATE_SHAPE))
    flat = values.reshape(values.shape[0], -1)
    out = np.stack([np.bincount(block, weights=flat[:, c], minlength=size)
                    for c in range(flat.shape[1])], axis=-1)
    return out.reshape(TEMPLATE_SHAPE + values.shape[1:])


def template_tensor(ms: Microstructure, weights: dict[str, float],
                    mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """b -> 0 tensor (X, Y, Z, 6) on the template grid and its signal weight (X, Y, Z).

    With ``mask`` (template grid, bool) only the fine voxels of masked blocks are used.
    """
    ph = ms.phantom
    sel = np.arange(ph.n)
    if mask is not None:
        sel = np.flatnonzero(np.asarray(mask).ravel()[_block_index(ph)])
    num, den = d0_moments(ms, sel, weights)
    n_t = _block_sum(num, ph, sel)
    d_t = _block_sum(den, ph, sel)
    with np.errstate(invalid="ignore", divide="ignore"):
        d0 = np.where(d_t[..., None] > 0, n_t / np.where(d_t > 0, d_t, 1.0)[..., None], 0.0)
    return d0, d_t


def template_metrics(ms: Microstructure, weights: dict[str, float],
                     mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """FA/MD/AD/RD maps of the b -> 0 tensor on the template grid (0 outside the brain).

    ``mask`` (template grid, bool) restricts the computation to those voxels.
    """
    d0, den = template_tensor(ms, weights, mask)
    sel = den > 0
    out = {m: np.zeros(TEMPLATE_SHAPE) for m in METRICS}
    met = tensor_metrics(d0[sel])
    for m in METRICS:
        out[m][sel] = met[m]
    return out


def roi_means(maps: dict[str, np.ndarray], labels: np.ndarray) -> pd.DataFrame:
    """Mean of each metric over every label of ``labels`` (rows: labels; + ``AverageWM``)."""
    rows = []
    for value, (abbr, _, _) in sorted(LABELS.items()):
        m = labels == value
        if m.any():
            rows.append({"roi": abbr, **{k: float(maps[k][m].mean()) for k in METRICS}})
    m = labels > 0
    rows.append({"roi": "AverageWM", **{k: float(maps[k][m].mean()) for k in METRICS}})
    return pd.DataFrame(rows)


def true_effects(phantom: Phantom, labels: np.ndarray, effects: EffectModel,
                 sites: list[Site]) -> pd.DataFrame:
    """Counterfactual effects of dx, sex and age on each label's mean FA/MD/AD/RD.

    Returns a long table: ``term`` (dx: patients - controls; sex: M - F; age: per year),
    ``site`` (each site's acquisition, and ``tissue`` for TE -> 0), ``roi``, ``metric``,
    ``value``.
    """
    mask = labels > 0
    acquisitions = [("tissue", tissue_weights())] + [(s.name, site_weights(s)) for s in sites]
    cases = {
        "base": dict(age=effects.age0, sex="F", dx=0),
        "dx": dict(age=effects.age0, sex="F", dx=1),
        "sex": dict(age=effects.age0, sex="M", dx=0),
        "age_lo": dict(age=effects.age0 - 5.0, sex="F", dx=0),
        "age_hi": dict(age=effects.age0 + 5.0, sex="F", dx=0),
    }
    micro = {k: subject_microstructure(phantom, None, effects, individual=False, **v)
             for k, v in cases.items()}
    rows = []
    for acq, w in acquisitions:
        r = {k: roi_means(template_metrics(ms, w, mask), labels).set_index("roi")
             for k, ms in micro.items()}
        diffs = {"dx": r["dx"] - r["base"], "sex": r["sex"] - r["base"],
                 "age": (r["age_hi"] - r["age_lo"]) / 10.0}
        for term, df in diffs.items():
            for roi, row in df.iterrows():
                for metric in METRICS:
                    rows.append({"term": term, "site": acq, "roi": roi, "metric": metric,
                                 "value": float(row[metric]),
                                 "baseline": float(r["base"].loc[roi, metric])})
    return pd.DataFrame(rows, columns=["term", "site", "roi", "metric", "value", "baseline"])
