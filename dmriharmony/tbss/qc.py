"""Quality control of the TBSS step: a registration-quality number and a skeleton-overlay figure.

The registration-quality number is the Pearson correlation of the warped subject FA with the
template FA inside the template brain mask (the usual visual TBSS check, "does the warped FA
look like the template", made a number; values near 1 mean a good match). The figure shows
three orthogonal slices of the warped FA with the template skeleton in red.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from dmriharmony.tbss.io import atomic_write


def fa_correlation(warped: np.ndarray, template_fa: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of warped FA and template FA within ``mask`` (NaN if degenerate)."""
    m = (np.asarray(mask) != 0) & np.isfinite(warped) & np.isfinite(template_fa)
    a = np.asarray(warped, dtype=np.float64)[m]
    b = np.asarray(template_fa, dtype=np.float64)[m]
    if a.size < 3 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def qc_metrics(warped: np.ndarray, template_fa: np.ndarray, mask: np.ndarray,
               skeleton: np.ndarray, projected: np.ndarray) -> dict[str, float]:
    """QC numbers of one run: FA correlation, skeleton coverage and mean skeleton FA."""
    skel = np.asarray(skeleton) != 0
    proj = np.asarray(projected)[skel]
    return {
        "fa_template_corr": fa_correlation(warped, template_fa, mask),
        "skeleton_voxels": int(skel.sum()),
        "skeleton_coverage": float(np.mean(proj > 0)) if proj.size else float("nan"),
        "skeleton_mean_fa": float(proj[proj > 0].mean()) if np.any(proj > 0) else float("nan"),
    }


def write_qc_tsv(metrics: dict, path: str | os.PathLike, **ids: object) -> Path:
    """One-row QC TSV (identifiers first), written atomically."""
    row = {**{k: v for k, v in ids.items()}, **metrics}
    df = pd.DataFrame([row])
    return atomic_write(path, lambda tmp: df.to_csv(tmp, sep="\t", index=False, na_rep="n/a",
                                                    float_format="%.6g"))


def skeleton_overlay_png(warped: np.ndarray, skeleton: np.ndarray, path: str | os.PathLike,
                         title: str = "", voxel_size: np.ndarray | None = None) -> Path:
    """Three orthogonal slices (through the skeleton's centre) of the warped FA + skeleton."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    skel = np.asarray(skeleton) != 0
    fa = np.asarray(warped, dtype=np.float32)
    centre = (np.argwhere(skel).mean(axis=0).round().astype(int) if skel.any()
              else np.array(fa.shape) // 2)
    vox = np.ones(3) if voxel_size is None else np.asarray(voxel_size, float)
    views = [
        ("sagittal", fa[centre[0], :, :], skel[centre[0], :, :], vox[2] / vox[1]),
        ("coronal", fa[:, centre[1], :], skel[:, centre[1], :], vox[2] / vox[0]),
        ("axial", fa[:, :, centre[2]], skel[:, :, centre[2]], vox[1] / vox[0]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2), facecolor="black")
    for ax, (name, img, sk, aspect) in zip(axes, views):
        ax.imshow(img.T, origin="lower", cmap="gray", vmin=0, vmax=0.8, aspect=aspect,
                  interpolation="nearest")
        overlay = np.ma.masked_where(~sk.T, sk.T.astype(float))
        ax.imshow(overlay, origin="lower", cmap="autumn", alpha=0.9, aspect=aspect,
                  interpolation="nearest")
        ax.set_title(name, color="white", fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, color="white", fontsize=10)
    fig.tight_layout()

    def _w(tmp: str) -> None:
        fig.savefig(tmp, dpi=80, facecolor="black", format="png")

    try:
        return atomic_write(path, _w)
    finally:
        plt.close(fig)
