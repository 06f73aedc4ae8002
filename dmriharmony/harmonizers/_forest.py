"""Forest plot of one feature's per-site effects and their pooled estimate (matplotlib, Agg).

Layout as metafor's ``forest.rma`` (Viechtbauer 2010): one row per site with its effect size and
confidence interval (square area proportional to the pooling weight), a diamond for the pooled
estimate and its CI, and the prediction interval as a line through the diamond.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from dmriharmony._fs import set_default_mode

from ..errors import HarmonizationError


def _figure(height: float, width: float) -> Any:
    # A Figure without pyplot: no global state, works headless (Agg canvas).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_figure_atomic(fig: Any, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix: .png, .svg, .pdf) atomically.

    The figure goes to a temporary file in the same folder first, then ``os.replace`` moves it
    into place, so a reader never sees a half-written image.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in ("png", "svg", "pdf"):
        raise HarmonizationError(f"forest plot {str(path)!r}: use a .png, .svg or .pdf file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".{fmt}", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format=fmt, dpi=dpi, bbox_inches="tight")
        set_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def forest_plot(
    yi: Sequence[float],
    vi: Sequence[float],
    labels: Sequence[Any],
    pooled: Any = None,
    title: str | None = None,
    xlabel: str = "effect size",
    level: float = 0.95,
    weights: Sequence[float] | None = None,
    path: str | os.PathLike | None = None,
) -> Any:
    """Draw a forest plot; returns the matplotlib Figure (and writes it if ``path`` is given).

    Parameters
    ----------
    yi, vi, labels : per-site effect sizes, sampling variances and site names.
    pooled : PoolResult (1-D fit) or None
        Adds the pooled diamond (estimate and CI), the prediction interval and a heterogeneity
        line (tau^2, I^2, Q and its p).
    weights : per-site weights for the square sizes (default ``1 / (vi + tau2)``).
    """
    y = np.asarray(yi, dtype=float)
    v = np.asarray(vi, dtype=float)
    if y.shape != v.shape or y.ndim != 1 or len(labels) != y.size:
        raise HarmonizationError("forest plot: yi, vi and labels must be 1-D of the same length")
    keep = np.isfinite(y) & np.isfinite(v)
    y, v = y[keep], v[keep]
    labels = [str(lab) for lab, k in zip(labels, keep) if k]
    if y.size == 0:
        raise HarmonizationError(f"forest plot {title or ''}: no site has a finite effect size")
    z = stats.norm.ppf(0.5 + level / 2)
    se = np.sqrt(v)
    tau2 = float(getattr(pooled, "tau2", 0.0) or 0.0) if pooled is not None else 0.0
    w = np.asarray(weights, dtype=float)[keep] if weights is not None else 1.0 / (v + tau2)
    k = y.size
    fig = _figure(height=1.2 + 0.32 * (k + 3), width=7.5)
    ax = fig.add_subplot(1, 1, 1)
    rows = np.arange(k, 0, -1) + 1.5
    ax.hlines(rows, y - z * se, y + z * se, color="0.2", lw=1)
    area = 30 + 170 * w / w.max()
    ax.scatter(y, rows, s=area, marker="s", color="0.2", zorder=3)
    ticks, ticklabels = list(rows), labels
    if pooled is not None:
        est, lo, hi = float(pooled.estimate), float(pooled.ci_low), float(pooled.ci_high)
        ax.fill([lo, est, hi, est], [0.5, 0.75, 0.5, 0.25], color="black", zorder=3)
        pil, pih = getattr(pooled, "pi_low", np.nan), getattr(pooled, "pi_high", np.nan)
        if np.isfinite(pil) and np.isfinite(pih) and tau2 > 0:
            ax.hlines(0.5, pil, pih, color="black", lw=1, linestyles="dotted")
        ax.axvline(est, color="0.5", lw=0.8, ls="--")
        name = "FE model" if pooled.method == "FE" else f"RE model ({pooled.method})"
        ticks.append(0.5)
        ticklabels = [*labels, name]
        # heterogeneity line under the x-axis label (anchored to the label, so the two never
        # overlap whatever the figure height or tick-label size)
        ax.annotate(
            f"tau^2 = {tau2:.3g}, I^2 = {float(pooled.I2):.1f}%, Q = {float(pooled.Q):.2f} "
            f"(p = {float(pooled.Q_p):.3g})",
            xy=(0.0, 0.0), xycoords=("axes fraction", ax.xaxis.label), xytext=(0, -4),
            textcoords="offset points", fontsize=8, va="top", ha="left",
        )
        right = [f"{a:.2f} [{b:.2f}, {c:.2f}]" for a, b, c in zip(y, y - z * se, y + z * se)]
        right.append(f"{est:.2f} [{lo:.2f}, {hi:.2f}]")
    else:
        right = [f"{a:.2f} [{b:.2f}, {c:.2f}]" for a, b, c in zip(y, y - z * se, y + z * se)]
    ax.axvline(0.0, color="0.3", lw=0.8)
    ax.set_yticks(ticks)
    ax.set_yticklabels(ticklabels)
    ax.set_ylim(0, k + 2.2)
    sec = ax.secondary_yaxis("right")
    sec.set_yticks(ticks)
    sec.set_yticklabels(right, fontsize=8)
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    sec.spines["right"].set_visible(False)
    if path is not None:
        save_figure_atomic(fig, path)
    return fig
