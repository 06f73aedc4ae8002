"""How much of a true diagnosis effect the DTI + TBSS pipeline measures (paired counterfactual).

The preservation scores of the harmonizers (``bench_traveling.py``) compare the diagnosis
effect after harmonization with the simulator's tissue-level truth. This benchmark measures
what the unharmonized pipeline itself can recover, free of between-subject sampling error:
each simulated head (own anatomy affine, smooth warp, head pose and noise seed) is scanned
twice at a site, once as a control and once as a patient (only the diagnosis changes:
``EffectModel.dx_f`` / ``dx_d`` in the dx ROIs; same noise draw), and the paired FA difference
of every dx ROI is taken from

- *truth*: the b -> 0 tensor of the template-grid ground truth at the site's TE/TR
  (:func:`dmriharmony.simulate.groundtruth.template_metrics`), mean over the label;
- *oracle*: our DTI fit of the scan, mapped to the template with the simulator's *true*
  transform (:func:`dmriharmony.tbss.groundtruth.true_scan_to_template`), mean over the label:
  the loss from the acquisition (voxel size, b-value, noise) and the resampling alone;
- *registered*: the same fit registered with our default DIPY affine + SyN, mean over the label;
- *skeleton*: the registered FA projected onto the skeleton (TBSS search rule), ENIGMA ROI
  mean: what the ROI table holds.

Usage (2 cores: ~25 s per scan pair)::

    python benchmarks/bench_tbss_dx.py --heads 4 --sites ge,siemens,philips --seed 0

Writes ``benchmarks/results/tbss_dx.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
LEVELS = ("truth", "oracle", "registered", "skeleton")


def paired_effects(heads: int, sites: list[str], seed: int) -> pd.DataFrame:
    """One row per (head, site, ROI, level): the patient - control FA difference."""
    from dipy.core.gradients import gradient_table

    from dmriharmony.dti.fit import fit_tensor
    from dmriharmony.dti.mask import brain_mask
    from dmriharmony.simulate.acquire import render_scan
    from dmriharmony.simulate.anatomy import build_phantom
    from dmriharmony.simulate.groundtruth import site_weights, template_metrics
    from dmriharmony.simulate.scanners import get_site, protocol
    from dmriharmony.simulate.subjects import EffectModel, subject_microstructure
    from dmriharmony.simulate.transforms import (
        random_anatomy_affine,
        random_head_pose,
        random_warp,
    )
    from dmriharmony.tbss.groundtruth import skeleton_rois, true_scan_to_template
    from dmriharmony.tbss.register import register_to_template
    from dmriharmony.tbss.roi import extract_rois
    from dmriharmony.tbss.templates import phantom_template

    phantom, effects, tpl = build_phantom(), EffectModel(), phantom_template()
    rois = list(effects.dx_rois)
    micro = {dx: subject_microstructure(phantom, None, effects, individual=False, dx=dx)
             for dx in (0, 1)}
    labelled = tpl.labels > 0

    def label_means(fa: np.ndarray) -> pd.Series:
        return extract_rois(np.where(tpl.mask, fa, 0.0), labelled, tpl.labels,
                            tpl.label_table)["Average"]

    rows = []
    for h in range(heads):
        g = np.random.default_rng([seed, h])
        anatomy, warp = random_anatomy_affine(g), random_warp(g)
        for name in sites:
            site = get_site(name)
            scan_affine = anatomy @ random_head_pose(g)
            noise_seed = int(g.integers(0, 2**31 - 1))
            prot = protocol(site)
            keep = prot.bvals_applied <= 1500.0  # the participant level's default --bmax
            gtab = gradient_table(prot.bvals_applied[keep], bvecs=prot.bvecs_voxel[keep],
                                  b0_threshold=50)
            values = {}
            for dx in (0, 1):
                t0 = time.perf_counter()
                scan = render_scan(phantom, micro[dx], site, scan_affine, warp,
                                   np.random.default_rng(noise_seed))
                data = scan.data[..., keep]
                fa = fit_tensor(data, gtab, brain_mask(data, gtab.bvals)).fa
                reg = register_to_template(fa, scan.affine, tpl.fa, tpl.affine,
                                           static_mask=tpl.mask)
                warped = np.clip(reg.transform(fa), 0, 1)
                oracle = np.clip(true_scan_to_template(fa, scan.affine, tpl, scan_affine, warp),
                                 0, 1)
                truth = template_metrics(micro[dx], site_weights(site))["fa"]
                values[dx] = {
                    "truth": label_means(truth), "oracle": label_means(oracle),
                    "registered": label_means(warped),
                    "skeleton": skeleton_rois(np.where(tpl.mask, warped, 0.0),
                                              tpl)["FA"]["Average"]}
                print(f"head {h} {name} dx={dx}: {time.perf_counter() - t0:.0f} s", flush=True)
            for level in LEVELS:
                diff = values[1][level] - values[0][level]
                for roi in rois:
                    rows.append({"head": h, "site": name, "roi": roi, "level": level,
                                 "dx_effect": float(diff[roi])})
    return pd.DataFrame(rows)


def write_markdown(path: Path, table: pd.DataFrame, args, wall: float) -> None:
    mean = table.groupby(["roi", "level"])["dx_effect"].mean().unstack("level")[list(LEVELS)]
    sd = table.groupby(["roi", "level"])["dx_effect"].std().unstack("level")[list(LEVELS)]
    per_site = table.groupby(["site", "level"])["dx_effect"].mean().unstack("level")[
        list(LEVELS)]
    lines = [
        "# How much of the true dx effect the DTI + TBSS pipeline measures",
        "",
        f"Machine: {platform.machine()}, Python {platform.python_version()}; "
        f"{time.strftime('%Y-%m-%d')}; wall {wall / 60:.1f} min.",
        "",
        "Command:",
        "",
        "```",
        f"python benchmarks/bench_tbss_dx.py --heads {args.heads} --sites {args.sites} "
        f"--seed {args.seed}",
        "```",
        "",
        "Paired counterfactual: each head is scanned as a control and as a patient with the "
        "same anatomy, pose and noise draw; the patient - control FA difference of each dx "
        "ROI (see the script's docstring for the levels). Mean (SD) over "
        f"{args.heads} heads x {len(args.sites.split(','))} sites.",
        "",
        "| ROI | " + " | ".join(LEVELS) + " | skeleton / truth |",
        "|---|" + "---|" * (len(LEVELS) + 1),
    ]
    for roi in mean.index:
        cells = [f"{mean.loc[roi, lv]:+.4f} ({sd.loc[roi, lv]:.4f})" for lv in LEVELS]
        ratio = mean.loc[roi, "skeleton"] / mean.loc[roi, "truth"]
        lines.append(f"| {roi} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    lines += ["", "Mean over the dx ROIs, per site:", "",
              "| site | " + " | ".join(LEVELS) + " | skeleton / truth |",
              "|---|" + "---|" * (len(LEVELS) + 1)]
    for site in per_site.index:
        cells = [f"{per_site.loc[site, lv]:+.4f}" for lv in LEVELS]
        ratio = per_site.loc[site, "skeleton"] / per_site.loc[site, "truth"]
        lines.append(f"| {site} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--sites", default="ge,siemens,philips")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "tbss_dx.md")
    ap.add_argument("--tsv", type=Path, default=None, help="also write the per-head table")
    args = ap.parse_args(argv)
    if args.heads < 1:
        ap.error("--heads must be >= 1")
    t0 = time.perf_counter()
    table = paired_effects(args.heads, [s for s in args.sites.split(",") if s], args.seed)
    if args.tsv:
        table.to_csv(args.tsv, sep="\t", index=False)
    write_markdown(args.out, table, args, time.perf_counter() - t0)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
