#!/usr/bin/env python3
"""Make ``docs/report_screenshot.png``: the top of a group report, for the README.

A simulated study (the ROI-table simulator of ``tests/_group_data.py``: 3 sites x 40 subjects,
12 ENIGMA ROIs, 3 traveling subjects scanned at every site) is run through the BIDS App's group
level (``dmriharmony BIDS OUT group --harmonizers combat,covbat,gam,meta,mixed``) in a temporary
folder, and headless Chromium screenshots the top 1200 x 2600 px of its ``report.html``.

So that the picture looks like a report of a real participant level, the simulated participant
outputs get what the DWI pipeline would also have written (``--plain`` skips this): the
whole-skeleton ``AverageFA`` column (here the mean of the ROIs), the ``n_directions`` column of
the site table, and simulated per-run QC tables (``*_model-tensor_qc.tsv``,
``*_desc-tbss_qc.tsv``). Every number in the picture is simulated.

Usage (from the repository root; needs ``chromium`` on PATH, or ``--chromium PATH``)::

    .venv/bin/python scripts/make_report_screenshot.py [-o docs/report_screenshot.png]
        [--keep DIR] [--width 1200] [--height 2600] [--max-kb 600]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from _group_data import make_group_input  # noqa: E402

HARMONIZERS = "combat,covbat,gam,meta,mixed"


def find_chromium(given: str | None) -> str:
    for cand in ([given] if given else []) + [os.environ.get("DMRIHARMONY_CHROMIUM"),
                                              "chromium", "chromium-browser", "google-chrome"]:
        if cand and (shutil.which(cand) or Path(cand).is_file()):
            return shutil.which(cand) or cand
    sys.exit("make_report_screenshot: no chromium on PATH (apt-get install chromium, or "
             "--chromium PATH)")


def like_participant_level(d: dict, seed: int) -> None:
    """Add what the DWI participant level writes and the ROI simulator does not (simulated)."""
    rng = np.random.default_rng(seed)
    deriv: Path = d["deriv"]
    feats = list(d["features"])
    for path in sorted(deriv.glob("sub-*/**/*_desc-skeleton_roi.tsv")):
        t = pd.read_csv(path, sep="\t", dtype={"subject": str, "session": str, "run": str},
                        keep_default_na=False)
        if "AverageFA" not in t.columns:
            t.insert(4, "AverageFA", t[feats].astype(float).mean(axis=1))
            t.to_csv(path, sep="\t", index=False, float_format="%.8g")
    sites = pd.read_csv(deriv / "site_table.tsv", sep="\t", dtype=str, keep_default_na=False)
    sites = sites.rename(columns={"n_dirs": "n_directions"})
    sites.to_csv(deriv / "site_table.tsv", sep="\t", index=False)
    snr_site = {s: 18 + 6 * k for k, s in enumerate(sorted(sites["site"].unique()))}
    for row in sites.itertuples(index=False):
        prefix = f"sub-{row.subject}" + (f"_ses-{row.session}" if row.session != "n/a" else "")
        folder = deriv / f"sub-{row.subject}" / (
            f"ses-{row.session}" if row.session != "n/a" else "") / "dwi"
        roi = pd.read_csv(folder / f"{prefix}_space-phantom_desc-skeleton_roi.tsv", sep="\t")
        fa = float(roi.loc[roi["metric"] == "FA", "AverageFA"].iloc[0])
        pd.DataFrame([{"snr": snr_site[row.site] + rng.normal(0, 2),
                       "residual_rmse": abs(rng.normal(0.045, 0.006)),
                       "outlier_fraction": abs(rng.normal(0.002, 0.001)),
                       "fa_mean": fa * 0.55 + rng.normal(0, 0.005)}]).to_csv(
            folder / f"{prefix}_model-tensor_qc.tsv", sep="\t", index=False,
            float_format="%.6g")
        pd.DataFrame([{"fa_template_corr": min(0.99, rng.normal(0.93, 0.015)),
                       "skeleton_coverage": min(1.0, rng.normal(0.975, 0.008))}]).to_csv(
            folder / f"{prefix}_space-phantom_desc-tbss_qc.tsv", sep="\t", index=False,
            float_format="%.6g")


def screenshot(chromium: str, html: Path, png: Path, width: int, height: int) -> None:
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-"))
    try:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               f"--user-data-dir={profile}", "--hide-scrollbars",
               f"--window-size={width},{height}", "--virtual-time-budget=5000",
               f"--screenshot={png}", html.as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, HOME=str(profile)))
        if proc.returncode != 0 or not png.is_file():
            sys.exit(f"make_report_screenshot: chromium failed ({proc.returncode}):\n"
                     f"{proc.stderr[-2000:]}")
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def shrink(png: Path, out: Path, max_kb: int) -> None:
    """Write ``png`` to ``out`` optimized (and palette-quantized, then downscaled, if still
    over ``max_kb``); PIL when installed, else the screenshot as is."""
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        from PIL import Image
    except ImportError:
        shutil.copyfile(png, out)
        return
    img = Image.open(png).convert("RGB")
    img.save(out, optimize=True)
    if out.stat().st_size <= max_kb * 1024:
        return
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    scale = 1.0
    while out.stat().st_size > max_kb * 1024 and scale > 0.4:
        scale *= 0.85
        small = img.resize((round(img.width * scale), round(img.height * scale)),
                           Image.Resampling.LANCZOS)
        small.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--output", type=Path, default=REPO / "docs" / "report_screenshot.png")
    p.add_argument("--keep", type=Path, default=None,
                   help="run the study in this folder and keep it (default: a temporary one)")
    p.add_argument("--chromium", default=None)
    p.add_argument("--width", type=int, default=1200)
    p.add_argument("--height", type=int, default=2600)
    p.add_argument("--max-kb", type=int, default=600)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--plain", action="store_true",
                   help="the ROI simulator's outputs as they are (no AverageFA, no QC tables)")
    args = p.parse_args(argv)
    chromium = find_chromium(args.chromium)
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    from dmriharmony.cli.run import main as app

    tmp = None
    if args.keep is not None:
        root = args.keep.resolve()
        if root.exists() and any(root.iterdir()):
            sys.exit(f"make_report_screenshot: {root} is not empty")
    else:
        tmp = tempfile.mkdtemp(prefix="dmriharmony-screenshot-")
        root = Path(tmp)
    try:
        t0 = time.perf_counter()
        d = make_group_input(root, n_sites=3, n_per_site=40, n_features=12, n_traveling=3,
                             seed=args.seed)
        if not args.plain:
            like_participant_level(d, args.seed)
        code = app([str(d["bids"]), str(d["out"]), "group", "-w", str(root / "work"),
                    "--harmonizers", HARMONIZERS, "--covariates", "age,sex", "--effect", "dx",
                    "--seed", "0"])
        if code != 0:
            return code
        report = d["deriv"] / "group" / "report.html"
        print(f"group level: {time.perf_counter() - t0:.1f} s; report {report}")
        raw = root / "screenshot_raw.png"
        screenshot(chromium, report, raw, args.width, args.height)
        shrink(raw, args.output.resolve(), args.max_kb)
        print(f"wrote {args.output} ({args.output.stat().st_size / 1024:.0f} kB)")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
