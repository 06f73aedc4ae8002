"""``dmriharmony-simulate``: write a simulated multi-vendor DWI dataset in BIDS.

Example::

    dmriharmony-simulate phantom_bids --seed 0 --subjects-per-site 3 --traveling-subjects 1 \\
        --sites ge siemens philips --voxel-size 2.5

``--rescans N`` also scans every traveling subject N more times at every site (sessions
``ses-<site>rescan1`` ... ``ses-<site>rescanN``, own head pose and noise, site in
``sub-<label>_sessions.tsv``): the same-site noise floor of traveling-subject evaluation.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from dmriharmony.errors import SimulationError
from dmriharmony.simulate.dataset import simulate_dataset
from dmriharmony.simulate.scanners import DEFAULT_SITES, PRESETS
from dmriharmony.simulate.subjects import EffectModel


def _snr(text: str) -> float | str | None:
    t = text.strip().lower()
    if t == "site":
        return "site"
    if t in ("none", "inf", "infinity", "noise-free"):
        return None
    try:
        v = float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--snr: expected a number, 'site' or 'inf', "
                                         f"got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError("--snr must be > 0")
    return v


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dmriharmony-simulate",
        description="Simulate a multi-vendor diffusion MRI phantom dataset (BIDS) with its "
                    "ground truth in derivatives/groundtruth.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("out_dir", type=Path, help="dataset folder to create")
    ap.add_argument("--seed", type=int, default=0, help="master random seed")
    ap.add_argument("--subjects-per-site", type=int, default=3, help="single-site subjects")
    ap.add_argument("--traveling-subjects", type=int, default=1,
                    help="subjects scanned at every site (one session per site)")
    ap.add_argument("--rescans", type=int, default=0, metavar="N",
                    help="same-site rescans of every traveling subject at every site (extra "
                         "sessions ses-<site>rescan1..N: own head pose and noise)")
    ap.add_argument("--sites", nargs="+", default=list(DEFAULT_SITES),
                    help=f"site presets: {', '.join(sorted(PRESETS))}")
    ap.add_argument("--site-config", type=Path, default=None,
                    help="JSON list of site definitions (dicts of Site fields; 'preset' starts "
                         "from a preset); replaces --sites")
    ap.add_argument("--voxel-size", type=float, nargs="+", default=None, metavar="MM",
                    help="override every site's voxel size (1 value: isotropic, or 3)")
    ap.add_argument("--snr", type=_snr, default="site",
                    help="b0 WM SNR of every site ('site': each site's own; 'inf': noise-free)")
    ap.add_argument("--snr-scale", type=float, default=1.0, help="multiply every site's SNR")
    ap.add_argument("--dx-rois", nargs="+", default=None, metavar="ROI",
                    help="ENIGMA labels carrying the diagnosis effect (default: "
                         f"{' '.join(EffectModel().dx_rois)})")
    ap.add_argument("--dx-effect", type=float, default=None,
                    help="diagnosis shift of the intra-axonal fraction (default "
                         f"{EffectModel().dx_f})")
    ap.add_argument("--native-groundtruth", action="store_true",
                    help="also write each scan's b->0 FA/MD/AD/RD on its own grid")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        sites = list(args.sites)
        if args.site_config is not None:
            try:
                sites = json.loads(args.site_config.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise SimulationError(f"{args.site_config}: cannot read site config ({exc})") \
                    from None
            if not isinstance(sites, list):
                raise SimulationError(f"{args.site_config}: expected a JSON list of sites")
        voxel = None
        if args.voxel_size is not None:
            if len(args.voxel_size) not in (1, 3):
                raise SimulationError("--voxel-size takes 1 or 3 values")
            voxel = args.voxel_size[0] if len(args.voxel_size) == 1 else args.voxel_size
        kw = {}
        if args.dx_rois is not None:
            kw["dx_rois"] = tuple(args.dx_rois)
        if args.dx_effect is not None:
            kw["dx_f"] = args.dx_effect
        effects = EffectModel(**kw)
        out = simulate_dataset(args.out_dir, seed=args.seed,
                               subjects_per_site=args.subjects_per_site,
                               traveling_subjects=args.traveling_subjects, sites=sites,
                               voxel_size=voxel, snr=args.snr, snr_scale=args.snr_scale,
                               effects=effects, native_groundtruth=args.native_groundtruth,
                               rescans=args.rescans, overwrite=args.overwrite,
                               progress=not args.quiet)
    except SimulationError as exc:
        print(f"dmriharmony-simulate: error: {exc}", file=sys.stderr)
        return 2
    print(f"BIDS dataset: {out}")
    print(f"ground truth: {out / 'derivatives' / 'groundtruth'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
