"""One self-contained ``report.html`` of the group level (figures embedded, no external files).

Sections, in the order a PI reads them: the sites (vendor, model, field, shells, directions,
runs), QC per run, the ROI distributions per site before and after each harmonizer, the effect
of interest per ROI by every method side by side, forest plots of the meta-analysis, site
prediction before/after, traveling-subject agreement, and the notes (what could not be
evaluated and why). Everything comes from the files the participant and group levels wrote, so
the report can be rebuilt from a finished output folder (:func:`build_report`).
"""

from __future__ import annotations

import base64
import html
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dmriharmony import __version__
from dmriharmony.reports import figures

__all__ = ["build_report", "render_report"]

LOGGER = logging.getLogger(__name__)

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;line-height:1.4}
h1{font-size:1.6em;border-bottom:2px solid #4c72b0}h2{font-size:1.25em;margin-top:1.8em;
border-bottom:1px solid #ddd}h3{font-size:1.05em}
table{border-collapse:collapse;font-size:0.82em;margin:0.6em 0}
th,td{border:1px solid #ddd;padding:2px 6px;text-align:right}th{background:#f3f5f9}
td:first-child,th:first-child{text-align:left}
.fig{margin:0.5em 0}.fig img{max-width:100%}.note{color:#8a4b00}.small{font-size:0.8em;color:#666}
.scroll{max-height:360px;overflow:auto;display:inline-block}
"""

_SCRIPT = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images', imgs.length);
  document.body.setAttribute('data-images-loaded', ok);
});
</script>
"""


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode()
    return (f'<div class="fig"><img alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{data}"></div>')


def _table(df: pd.DataFrame, floatfmt: str = "{:.4g}", scroll: bool = False) -> str:
    def fmt(v):
        if isinstance(v, float | np.floating):
            return "" if np.isnan(v) else floatfmt.format(float(v))
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in row) + "</tr>"
                   for row in df.itertuples(index=False))
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    return f'<div class="scroll">{table}</div>' if scroll else table


def _read(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    return pd.read_csv(path, sep="\t", na_values=["n/a"], dtype={"subject": str,
                                                                  "session": str, "run": str})


def _site_summary(site_table: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in ("vendor", "model", "field", "shells", "n_directions", "voxel_size")
            if c in site_table.columns]
    rows = []
    for site, g in site_table.groupby("site", sort=True):
        row = {"site": site}
        for c in cols:
            row[c] = ", ".join(sorted({str(v) for v in g[c].dropna()}))
        row["runs"] = len(g)
        row["subjects"] = g["subject"].nunique()
        rows.append(row)
    return pd.DataFrame(rows)


def _qc_table(deriv: Path) -> pd.DataFrame | None:
    rows = []
    for path in sorted(deriv.glob("sub-*/**/*_model-tensor_qc.tsv")):
        run = path.name.split("_model-tensor_qc.tsv")[0]
        qc = pd.read_csv(path, sep="\t").iloc[0].to_dict()
        row = {"run": run, **{k: qc.get(k) for k in ("snr", "residual_rmse",
                                                       "outlier_fraction", "fa_mean")}}
        tb = next(iter(path.parent.glob(f"{run}_space-*_desc-tbss_qc.tsv")), None)
        if tb is not None:
            t = pd.read_csv(tb, sep="\t").iloc[0].to_dict()
            row["fa_template_corr"] = t.get("fa_template_corr")
            row["skeleton_coverage"] = t.get("skeleton_coverage")
            if "rotation_deg" in t:
                row["rotation_deg"] = t.get("rotation_deg")
        rows.append(row)
    return pd.DataFrame(rows) if rows else None


def _option_text(value) -> str:
    """An option as a reader writes it: lists joined, None as a dash, dicts as key: value."""
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "-"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_option_text(v)}" for k, v in value.items())
    return str(value)


def _shown_features(wanted: Sequence[str], harmonized: dict[str, pd.DataFrame],
                    effects: dict[str, pd.DataFrame]) -> list[str]:
    """The wanted ROIs that exist; else the first ROI of the effect tables (always one figure)."""
    have = {c for t in harmonized.values() for c in t.columns}
    shown = [f for f in wanted if f in have]
    if shown:
        return shown
    for df in effects.values():
        if "feature" in df.columns and len(df):
            return [str(df["feature"].iloc[0])]
    return []


def render_report(
    *,
    title: str,
    site_summary: pd.DataFrame | None,
    qc: pd.DataFrame | None,
    harmonized: dict[str, pd.DataFrame],
    effects: dict[str, pd.DataFrame],
    site_effects: pd.DataFrame | None,
    summary: pd.DataFrame | None,
    notes: Sequence[str] = (),
    options: dict | None = None,
    effect: str = "dx",
    distribution_features: Sequence[str] = ("AverageFA",),
    forest_features: Sequence[str] = ("AverageFA",),
    signal_level: pd.DataFrame | None = None,
    latent: dict | None = None,
) -> str:
    """The report's HTML text from the group-level tables (see :func:`build_report`).

    ``harmonized``: name -> long ROI table (``metric`` column; ``none`` = raw); ``effects``:
    method -> effects table (``metric``, ``feature`` columns).
    """
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p class='small'>dmriharmony {html.escape(__version__)} group report. "
             "Figures are embedded; this file needs nothing else.</p>"]
    if options:
        opt = pd.DataFrame({"option": list(options),
                            "value": [_option_text(v) for v in options.values()]})
        parts += ["<h2>Options</h2>", _table(opt)]
    parts.append("<h2>Sites</h2>")
    parts.append(_table(site_summary) if site_summary is not None else
                 "<p class='note'>no site table found</p>")
    parts.append("<h2>Quality control per run</h2>")
    parts.append(_table(qc, scroll=True) if qc is not None else
                 "<p class='note'>no participant QC files found</p>")

    # the maps the group level harmonized (the raw table also has the maps it left alone)
    metrics = sorted({m for n, t in harmonized.items() if n != "none"
                      for m in t["metric"].unique()} | {m for e in effects.values()
                                                         for m in e["metric"].unique()})
    if not metrics:
        metrics = sorted({m for t in harmonized.values() for m in t["metric"].unique()})
    distribution_features = _shown_features(distribution_features, harmonized, effects)
    forest_features = _shown_features(forest_features, harmonized, effects)
    parts.append("<h2>ROI values per site, before and after each harmonizer</h2>")
    for metric in metrics:
        for feat in distribution_features:
            tabs = {n: t[t["metric"] == metric] for n, t in harmonized.items()
                    if feat in t.columns}
            if not tabs:
                continue
            label = f"{metric.upper()}, whole-skeleton mean" if feat == "AverageFA" else \
                f"{metric.upper()} {feat}"
            parts.append(_img(figures.site_distributions_png(
                tabs, feat, title=label),
                f"{metric} {feat} per site"))

    parts.append(f"<h2>Effect of {html.escape(effect)} per ROI, by method</h2>")
    parts.append("<p>Cohen's d: pooled linear model on the raw (<i>none</i>) and harmonized "
                 "data, the REML random-effects pooled d of the meta-analysis, and the mixed "
                 "model's d (random site intercept).</p>")
    dcol = {"meta": "d_pooled"}
    for metric in metrics:
        eff = {}
        for name, df in effects.items():
            sub = df[(df["metric"] == metric)]
            if "model" in sub.columns and name == "none":
                sub = sub[sub["model"] == "pooled"]
            col = dcol.get(name, "d")
            if col in sub.columns and len(sub):
                eff[name] = sub[["feature", col]]
        if not eff:
            continue
        feats = list(dict.fromkeys(next(iter(eff.values()))["feature"]))
        parts.append(f"<h3>{metric.upper()}</h3>")
        parts.append(_img(figures.effect_sizes_png(eff, {n: dcol.get(n, "d") for n in eff},
                                                   feats), f"{metric} effect sizes"))
        wide = pd.DataFrame({"ROI": feats})
        for name, df in eff.items():
            wide[name] = df.set_index("feature").reindex(feats)[dcol.get(name, "d")].to_numpy()
        parts.append(_table(wide, "{:.3f}", scroll=True))

    if site_effects is not None and len(site_effects):
        parts.append("<h2>Meta-analysis: forest plots</h2>")
        for metric in sorted(site_effects["metric"].unique()):
            se = site_effects[site_effects["metric"] == metric]
            for feat in forest_features:
                if feat in set(se["feature"]):
                    parts.append(f"<h3>{metric.upper()} {html.escape(feat)}</h3>")
                    parts.append(_img(figures.forest_png(se, feat), f"forest {metric} {feat}"))

    if summary is not None and len(summary):
        parts.append("<h2>Is the scanner gone? Site prediction before and after</h2>")
        parts.append("<p>Cross-validated balanced accuracy of predicting the site from the ROI "
                     "values (covariates regressed out; each harmonizer fitted inside the "
                     "training folds" + (", except RISH and the VAE, which re-process the DWI "
                                          "once for all runs: their 'after' is the leaky kind"
                                          if {"rish", "vae"} & set(summary["harmonizer"])
                                          else "") + "). Chance is 1/number of sites.</p>")
        for param in sorted(summary["param"].unique()):
            s = summary[summary["param"] == param]
            if s["site_acc_after"].notna().any():
                parts.append(f"<h3>{param.upper()}</h3>")
                parts.append(_img(figures.site_prediction_png(s), f"site prediction {param}"))
        cols = [c for c in ("harmonizer", "param", "site_acc_before", "site_acc_after", "chance",
                            f"{effect}_d_before", f"{effect}_d_after", "traveling_cv_before",
                            "traveling_cv_after") if c in summary.columns]
        parts.append(_table(summary[cols], "{:.3f}"))
        if "traveling_cv_after" in summary.columns and summary["traveling_cv_after"].notna().any():
            parts.append("<h2>Traveling subjects: between-site agreement</h2>")
            for param in sorted(summary["param"].unique()):
                s = summary[summary["param"] == param]
                if s["traveling_cv_after"].notna().any():
                    parts.append(f"<h3>{param.upper()}</h3>")
                    parts.append(_img(figures.traveling_png(s), f"traveling {param}"))
    if signal_level is not None and len(signal_level):
        parts.append("<h2>Signal-level harmonizers (RISH, VAE): traveling subjects' maps</h2>")
        parts.append("<p>Between-site error of each traveling subject's FA in template white "
                     "matter before and after re-synthesising the DWI and refitting the tensor: "
                     "voxelwise pairwise RMSE, and the RMSE of its ROI means about its "
                     "across-site mean.</p>")
        parts.append(_table(signal_level, "{:.4g}"))
    if latent:
        parts.append("<p>VAE latent code: cross-validated z &rarr; site balanced accuracy "
                     f"{latent.get('balanced_accuracy', float('nan')):.3f} (chance "
                     f"{latent.get('chance', float('nan')):.3f}) on held-out voxels.</p>")
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(
            f"<li class='note'>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append(_SCRIPT)
    parts.append("</body></html>")
    return "\n".join(parts)


def build_report(group_dir: str | Path, deriv_dir: str | Path, out_file: str | Path, *,
                 harmonizers: Sequence[str], effect: str = "dx", notes: Sequence[str] = (),
                 options: dict | None = None, title: str = "dmriharmony group report",
                 roi_table: str | Path | None = None) -> Path:
    """Read the group and participant outputs and write ``out_file`` atomically.

    Parameters
    ----------
    group_dir : folder with ``roi_table*.tsv``, ``effects_desc-*.tsv``,
        ``site_effects_desc-meta.tsv`` and ``evaluation_summary.tsv``.
    deriv_dir : the derivatives root (``site_table.tsv``, per-run QC TSVs).
    harmonizers : methods to show (``none`` is always added).
    roi_table : the raw ROI table (default ``group_dir/roi_table.tsv``, else
        ``deriv_dir/group/roi_table.tsv``).
    """
    from dmriharmony.dti.io import atomic_write_bytes

    group_dir, deriv_dir = Path(group_dir), Path(deriv_dir)
    site_table = _read(deriv_dir / "site_table.tsv")
    raw = _read(Path(roi_table)) if roi_table is not None else _read(group_dir / "roi_table.tsv")
    if raw is None:
        raw = _read(deriv_dir / "group" / "roi_table.tsv")
    harmonized: dict[str, pd.DataFrame] = {}
    if raw is not None:
        raw["metric"] = raw["metric"].astype(str).str.lower()
        harmonized["none"] = raw
    effects: dict[str, pd.DataFrame] = {}
    for name in ["none", *harmonizers]:
        t = _read(group_dir / f"roi_table_desc-{name}.tsv")
        if t is not None:
            harmonized[name] = t
        e = _read(group_dir / f"effects_desc-{name}.tsv")
        if e is not None:
            effects[name] = e
    summary = _read(group_dir / "evaluation_summary.tsv")
    signal = [t.assign(harmonizer=name) for name in ("rish", "vae") if name in harmonizers
              and (t := _read(group_dir / f"evaluation_desc-{name}.tsv")) is not None]
    signal_level = None
    if signal:
        cols = ["harmonizer", "subject", "metric", "n_sites", "pairwise_rmse_before",
                "pairwise_rmse_after", "reduction", "roi_rmse_before", "roi_rmse_after",
                "roi_reduction", "within_rmse_before", "site_rmse_before", "site_rmse_after",
                "site_reduction", "roi_site_reduction"]
        both = pd.concat(signal, ignore_index=True)
        signal_level = both[[c for c in cols if c in both.columns]]
    latent_file = group_dir / "vae_latent_site_accuracy.json"
    latent = json.loads(latent_file.read_text()) if "vae" in harmonizers and \
        latent_file.is_file() else None
    text = render_report(
        title=title,
        site_summary=_site_summary(site_table) if site_table is not None else None,
        qc=_qc_table(deriv_dir), harmonized=harmonized, effects=effects,
        site_effects=_read(group_dir / "site_effects_desc-meta.tsv"), summary=summary,
        notes=notes, options=options, effect=effect, signal_level=signal_level, latent=latent)
    out_file = Path(out_file)
    atomic_write_bytes(text.encode(), out_file)
    LOGGER.info("report: %s", out_file)
    return out_file
