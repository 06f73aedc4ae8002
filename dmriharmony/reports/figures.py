"""Figures of the group report, drawn with matplotlib (Agg) and returned as PNG bytes.

Each function takes the tidy tables the group level writes and returns PNG bytes; nothing is
written to disk here (the report embeds them as base64).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = ["effect_sizes_png", "forest_png", "site_distributions_png", "site_prediction_png",
           "to_png", "traveling_png"]

_COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3",
           "#8c8c8c", "#ccb974", "#64b5cd"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def to_png(fig, dpi: int = 110) -> bytes:
    """Render and close a figure; PNG bytes without a timestamp (identical reruns)."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def site_distributions_png(tables: Mapping[str, pd.DataFrame], feature: str, site: str = "site",
                           title: str = "") -> bytes:
    """Box plots of one ROI per site, one panel per harmonizer (raw data first)."""
    plt = _plt()
    names = list(tables)
    sites = sorted({str(s) for t in tables.values() for s in t[site]})
    fig, axes = plt.subplots(1, len(names), figsize=(2.1 * len(names) + 1, 2.8), sharey=True,
                             squeeze=False)
    for ax, name in zip(axes[0], names):
        t = tables[name]
        data = [t.loc[t[site].astype(str) == s, feature].dropna().to_numpy() for s in sites]
        bp = ax.boxplot(data, patch_artist=True, widths=0.6)
        for patch, color in zip(bp["boxes"], _COLORS):
            patch.set_facecolor(color)
            patch.set_alpha(0.7)
        ax.set_xticks(range(1, len(sites) + 1), sites, rotation=45, fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel(title or feature)
    fig.suptitle(title or feature, fontsize=10, y=1.03)
    return to_png(fig)


def effect_sizes_png(effects: Mapping[str, pd.DataFrame], column: Mapping[str, str],
                     features: Sequence[str], xlabel: str = "Cohen's d") -> bytes:
    """Dot plot of the effect size per ROI, one colour per method."""
    plt = _plt()
    feats = list(features)
    fig, ax = plt.subplots(figsize=(6.5, 0.28 * len(feats) + 1.2))
    y = np.arange(len(feats))
    n = len(effects)
    for i, (name, df) in enumerate(effects.items()):
        col = column[name]
        vals = df.set_index("feature").reindex(feats)[col].to_numpy(float)
        ax.plot(vals, y + (i - (n - 1) / 2) * 0.1, "o", ms=4, label=name,
                color=_COLORS[i % len(_COLORS)])
    ax.axvline(0, color="k", lw=0.6)
    ax.set_yticks(y, feats, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="best", ncol=2)
    return to_png(fig)


def forest_png(site_effects: pd.DataFrame, feature: str) -> bytes:
    """Forest plot of one ROI (per-site d and the REML pooled estimate)."""
    from dmriharmony.harmonizers.meta import forest

    fig = forest(site_effects, feature, method="REML")
    return to_png(fig)


def site_prediction_png(summary: pd.DataFrame) -> bytes:
    """Site balanced accuracy before vs after per harmonizer (chance as a line)."""
    plt = _plt()
    s = summary.dropna(subset=["site_acc_after"])
    fig, ax = plt.subplots(figsize=(5.5, 2.8))
    x = np.arange(len(s))
    ax.bar(x - 0.2, s["site_acc_before"], 0.4, label="before", color="#8c8c8c")
    ax.bar(x + 0.2, s["site_acc_after"], 0.4, label="after (fitted in-fold)", color="#4c72b0")
    if s["chance"].notna().any():
        ax.axhline(float(s["chance"].dropna().iloc[0]), color="#c44e52", ls="--", lw=1,
                   label="chance")
    ax.set_xticks(x, s["harmonizer"], rotation=30, fontsize=8)
    ax.set_ylabel("site balanced accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside, not on bars
    return to_png(fig)


def traveling_png(summary: pd.DataFrame) -> bytes:
    """Traveling-subject between-site CV (%) before/after per harmonizer."""
    plt = _plt()
    s = summary.dropna(subset=["traveling_cv_after"])
    fig, ax = plt.subplots(figsize=(5.5, 2.6))
    x = np.arange(len(s))
    ax.bar(x - 0.2, s["traveling_cv_before"], 0.4, label="before", color="#8c8c8c")
    ax.bar(x + 0.2, s["traveling_cv_after"], 0.4, label="after", color="#55a868")
    ax.set_xticks(x, s["harmonizer"], rotation=30, fontsize=8)
    ax.set_ylabel("between-site CV (%)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return to_png(fig)
