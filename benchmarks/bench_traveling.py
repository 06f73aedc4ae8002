"""Traveling-subject evaluation of the signal-level harmonizers (issue 6): RISH and the VAE.

One simulated study (``dmriharmony-simulate``: GE b=1000, Siemens b=1000+2000, Philips b=800,
each at its own SNR) with several traveling subjects, each scanned at every site and rescanned
once at every site. After the participant level (DTI, registration, TBSS), every variant is run
through the Python API on the same derivatives and scored on:

- the traveling subjects' FA and MD in template white matter (FA >= 0.2), voxelwise and as ROI
  means: between-site RMSE, the scan-rescan RMSE of the same site (noise, head pose,
  registration: what no site mapping can remove) and the site-attributable RMSE
  ``sqrt(between^2 - rescan^2)`` (:func:`dmriharmony.evaluation.traveling_maps.
  scan_rescan_rmse`), before and after;
- the diagnosis effect on FA in the phantom's dx ROIs (pooled OLS on the TBSS ROI table of the
  single-site subjects: FA ~ dx + age + sex [+ site before harmonization]) before and after,
  against the simulator's truth;
- the VAE latent code's site predictability (cross-validated balanced accuracy).

Usage (times on 2 cores: simulation ~1 min, participant level ~25 min, each variant 2-6 min)::

    python benchmarks/bench_traveling.py --workdir /tmp/bench_traveling \\
        --subjects-per-site 15 --traveling 2 --rescans 1 --seed 5

Writes ``benchmarks/results/traveling.md`` (``--out``) and ``<workdir>/traveling_scores.tsv``.
Steps already done in ``--workdir`` (dataset, participant level) are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent

VARIANTS = {
    "rish-plain": dict(kind="rish", covariates=()),
    "rish-published": dict(kind="rish", covariates=(), resynthesis="projection"),
    "rish-bvalue-map": dict(kind="rish", covariates=(), bvalue_mapping=True),
    "rish-adjusted": dict(kind="rish", covariates=("age", "sex", "dx")),
    "rish-controls": dict(kind="rish", covariates=("age", "sex"), template_subjects="dx=0"),
    "rish-plain-8mm": dict(kind="rish", covariates=(), smoothing_fwhm=8.0),
    "rish-adjusted-8mm": dict(kind="rish", covariates=("age", "sex", "dx"), smoothing_fwhm=8.0),
    "voxel-combat": dict(kind="combat"),
    "voxel-combat-n5": dict(kind="combat", per_site=5),
    "voxel-combat-n10": dict(kind="combat", per_site=10),
    "vae-decode": dict(kind="vae", conversion="decode"),
    "vae-residual": dict(kind="vae", conversion="residual"),
    "vae-location-scale": dict(kind="vae", conversion="location-scale"),
    "vae-residual-signal": dict(kind="vae", conversion="residual", resynthesis="residual"),
    "vae-moyer-residual": dict(kind="vae", conversion="residual", mode="moyer"),
    "vae-location-scale-signal": dict(kind="vae", conversion="location-scale",
                                      resynthesis="residual"),
}


#: What each variant is (written under the tables).
LEGEND = {
    "rish-plain": "RISH, plain site means (as published), residual re-synthesis S + B(C' - C) "
                  "(the default)",
    "rish-published": "RISH as published: re-synthesis of the scaled SH signal B C' itself",
    "rish-bvalue-map": "rish-plain with the b-value mapping (b=800 -> 1000, mono-exponential) "
                       "before the features and the scaling",
    "rish-adjusted": "rish-plain with site templates adjusted for age, sex, dx",
    "rish-controls": "rish-plain with site templates from the controls (dx=0) only, adjusted "
                     "for age and sex",
    "rish-plain-8mm": "rish-plain with 8 mm scale-map smoothing",
    "rish-adjusted-8mm": "rish-adjusted with 8 mm scale-map smoothing",
    "voxel-combat": "voxel ComBat (out of core, parametric EB; age, sex, dx protected) of the "
                    "template-space FA/MD, fitted on the single-site runs",
    "voxel-combat-n5": "voxel-combat fitted on 5 single-site runs per site (sample-size check)",
    "voxel-combat-n10": "voxel-combat fitted on 10 single-site runs per site",
    "vae-decode": "VAE, decoded signal D(z, site average) (Moyer et al. 2020, the default)",
    "vae-residual": "VAE, x + D(z, t) - D(z, s), re-synthesised from the common SH "
                    "representation",
    "vae-location-scale": "VAE, D(z, t) + (x - D(z, s)) r_t / r_s (residual rescaled to the "
                          "target's noise level), from the common SH representation",
    "vae-residual-signal": "vae-residual written as the measured shell plus the SH change",
    "vae-moyer-residual": "vae-residual with the published loss only (--vae-mode moyer: MI "
                          "bound and decoder adversary, no latent site classifier)",
    "vae-location-scale-signal": "vae-location-scale written as the measured shell plus the "
                                 "SH change",
}


def _run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def prepare(work: Path, args) -> dict:
    """Simulate and run the participant level (reused when present)."""
    ds, out = work / "ds", work / "out"
    times = {}
    if not (ds / "participants.tsv").is_file():
        times["simulate"] = _run([str(BIN / "dmriharmony-simulate"), str(ds), "--seed",
                                  str(args.seed), "--subjects-per-site",
                                  str(args.subjects_per_site), "--traveling-subjects",
                                  str(args.traveling), "--rescans", str(args.rescans),
                                  "--quiet"], work / "simulate.log")
    deriv = out / "dmriharmony"
    if not list(deriv.glob("sub-*/**/*_desc-skeleton_roi.tsv")):
        times["participant"] = _run([str(BIN / "dmriharmony"), str(ds), str(out),
                                     "participant", "-w", str(work / "work"), "--template",
                                     "phantom", "--nprocs", str(args.nprocs)],
                                    work / "participant.log")
    return {"ds": ds, "deriv": deriv, "times": times}


def _roi_table(roi_files, ds: Path, deriv: Path) -> pd.DataFrame:
    from dmriharmony.tbss.roi import build_roi_table

    t = build_roi_table([str(f) for f in roi_files], ds / "participants.tsv",
                        deriv / "site_table.tsv")
    return t[t["metric"].astype(str).str.lower() == "fa"]


def dx_effects(table: pd.DataFrame, ds: Path, harmonized: bool) -> pd.Series:
    """dx beta on FA per dx ROI (single-site subjects; site as fixed effect when raw)."""
    from dmriharmony.evaluation.effects import effect_estimates

    eff = json.loads((ds / "derivatives/groundtruth/effects.json").read_text())
    rois = list(eff["EffectModel"]["dx_rois"])
    t = table[table["traveling"].astype(str).str.lower() != "yes"].copy()
    t["sex"] = t["sex"].astype(str)
    est = effect_estimates(t, rois, "dx", ("age", "sex"), site=None if harmonized else "site")
    return est["dx_beta"]


def true_dx(ds: Path) -> pd.Series:
    eff = pd.read_csv(ds / "derivatives/groundtruth/effects.tsv", sep="\t")
    rois = json.loads((ds / "derivatives/groundtruth/effects.json").read_text())[
        "EffectModel"]["dx_rois"]
    t = eff[(eff["term"] == "dx") & (eff["site"] == "tissue") & (eff["metric"] == "fa")]
    return t.set_index("roi").loc[rois, "value"]


def run_variant(name: str, spec: dict, ds: Path, deriv: Path, work: Path, seed: int,
                vae_models: dict) -> dict:
    import torch

    from dmriharmony.group.rish import rish_study
    from dmriharmony.group.vae import vae_study
    from dmriharmony.harmonizers._vae_config import small_config

    vdir = work / "variants" / name

    def write(path: Path, img) -> None:
        dst = vdir / "maps" / Path(path).relative_to(deriv)
        dst.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(dst))

    t0 = time.perf_counter()
    if spec["kind"] == "combat":
        res = voxel_combat_variant(ds, deriv, spec.get("per_site"), seed)
        res["wall_s"] = time.perf_counter() - t0
        return res
    if spec["kind"] == "rish":
        res = rish_study(ds, deriv, covariates=list(spec["covariates"]),
                         template_subjects=spec.get("template_subjects"),
                         smoothing_fwhm=spec.get("smoothing_fwhm", 4.0),
                         resynthesis=spec.get("resynthesis", "residual"),
                         bvalue_mapping=spec.get("bvalue_mapping", False), write=write,
                         progress=False, roi_dir=vdir / "tbss")
    else:
        torch.manual_seed(seed)
        mode = spec.get("mode", "site_adversary")
        res = vae_study(ds, deriv, seed=seed, config=small_config(seed=seed, mode=mode),
                        conversion=spec["conversion"], model=vae_models.get(mode),
                        resynthesis=spec.get("resynthesis", "projection"),
                        write=write, progress=False, roi_dir=vdir / "tbss")
        vae_models.setdefault(mode, res["model"])
        res["latent"] = {**res["latent"], "mode": mode} if res["latent"] else {}
    wall = time.perf_counter() - t0
    res["wall_s"] = wall
    res["roi_table"] = _roi_table(res["roi_files"], ds, deriv)
    return res


def _covariates(table: pd.DataFrame) -> pd.DataFrame:
    """age, sex (M = 1) and dx of the runs, numeric (all protected by ComBat)."""
    return pd.DataFrame({"age": table["age"].astype(float),
                         "sex": (table["sex"].astype(str).str.upper() == "M").astype(float),
                         "dx": table["dx"].astype(float)})


def voxel_combat_variant(ds: Path, deriv: Path, per_site: int | None = None,
                         seed: int = 0) -> dict:
    """Voxel ComBat (Fortin et al. 2017) on the template-space maps, scored like RISH/VAE.

    The out-of-core :class:`~dmriharmony.harmonizers.voxel_combat.VoxelComBat` (parametric EB;
    age, sex and dx protected) is fitted on the single-site runs' template-space FA and MD
    inside the template brain mask and applied to the traveling subjects' runs as new subjects
    of the seen sites (the group level's ``--level voxel``); the traveling scores use the same
    code as RISH and the VAE (:class:`dmriharmony.group.rish.HarmonizedOutputs`). The dx
    effect comes from a second fit on the TBSS skeleton maps (``--level skeleton``), whose
    harmonized values give the ENIGMA ROI means of the single-site runs. ``per_site``: fit on
    that many single-site runs per site only (drawn with ``seed``), to see how the per-voxel
    estimates' sampling error limits the voxelwise result.
    """
    from dmriharmony.group.maps import collect_maps
    from dmriharmony.group.rish import HarmonizedOutputs
    from dmriharmony.harmonizers.voxel_combat import VoxelComBat
    from dmriharmony.tbss.roi import extract_rois
    from dmriharmony.tbss.templates import load_template

    tpl = load_template("phantom", None)
    scores = HarmonizedOutputs("voxelcombat", tpl, write=None, roi_dir=None)
    parts = ds / "participants.tsv"
    roi_rows = None
    for level in ("voxel", "skeleton"):
        for metric in ("fa", "md") if level == "voxel" else ("fa",):
            maps = collect_maps(deriv, parts, metric=metric, level=level,
                                covariates=["age", "sex"], effect="dx")
            t = maps.table
            mask = tpl.mask if level == "voxel" else tpl.skeleton
            X = np.vstack([np.asarray(nib.load(f).dataobj, dtype=np.float64)[mask]
                           for f in t["path"]])
            cov = _covariates(t)
            train = ~t["traveling"].to_numpy(bool)
            if per_site is not None:
                pick = np.zeros_like(train)
                gen = np.random.default_rng(seed)
                for site in sorted(t["site"][train].unique()):
                    rows = np.flatnonzero(train & (t["site"] == site).to_numpy())
                    pick[gen.choice(rows, min(per_site, rows.size), replace=False)] = True
                train = pick
            model = VoxelComBat().fit(X[train], t["site"][train].to_numpy(), cov[train])
            if level == "voxel":
                trav = ~train
                Xh = model.transform(X[trav], t["site"][trav].to_numpy(), cov[trav])
                for k, (_, r) in enumerate(t[trav].iterrows()):
                    key = str(r["session"])
                    before = np.zeros(tpl.mask.shape)
                    after = np.zeros(tpl.mask.shape)
                    before[mask], after[mask] = X[trav][k], Xh[k]
                    scores.before[metric].setdefault(r["subject"], {})[key] = before
                    scores.after[metric].setdefault(r["subject"], {})[key] = after
                    scores.session_site.setdefault(r["subject"], {})[key] = str(r["site"])
            else:
                Xh = model.transform(X[train], t["site"][train].to_numpy(), cov[train])
                rows = []
                for k, (_, r) in enumerate(t[train].iterrows()):
                    vol = np.zeros(mask.shape)
                    vol[mask] = Xh[k]
                    rois = extract_rois(vol, tpl.roi_mask, tpl.labels, tpl.label_table)
                    rows.append({**r.drop(labels=["path"]).to_dict(),
                                 **rois["Average"].to_dict()})
                roi_rows = pd.DataFrame(rows)
                roi_rows["traveling"] = "no"
    return {"traveling": scores.traveling(), "roi_table": roi_rows, "latent": {},
            "roi_files": []}


def _fmt(v: float, pct: bool = False) -> str:
    if v is None or not np.isfinite(v):
        return "n/a"
    return f"{100 * v:.1f} %" if pct else f"{v:.4f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--subjects-per-site", type=int, default=15)
    ap.add_argument("--traveling", type=int, default=2)
    ap.add_argument("--rescans", type=int, default=1)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--variants", default=",".join(v for v in VARIANTS if "8mm" not in v),
                    help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "traveling.md")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other variants' rows of an earlier run in <workdir> and "
                         "replace only those run now")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the table from <workdir>/traveling_*.tsv of an earlier run")
    args = ap.parse_args(argv)
    if args.report_only:
        work = args.workdir.resolve()
        meta = json.loads((work / "traveling_meta.json").read_text())
        write_markdown(args, pd.read_csv(work / "traveling_scores.tsv", sep="\t"),
                       pd.read_csv(work / "traveling_dx.tsv", sep="\t"), meta["walls"],
                       meta["latent"], meta["times"], work / "ds")
        print(f"wrote {args.out}")
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    prep = prepare(work, args)
    ds, deriv = prep["ds"], prep["deriv"]
    raw_rows = sorted(deriv.glob("sub-*/**/sub-*_desc-skeleton_roi.tsv"))
    raw = _roi_table(raw_rows, ds, deriv)
    truth = true_dx(ds)
    before_dx = dx_effects(raw, ds, harmonized=False)
    rows, dx_rows, walls, latent = [], [], {}, {}
    vae_models: dict = {}
    for name in [v for v in args.variants.split(",") if v]:
        res = run_variant(name, VARIANTS[name], ds, deriv, work, args.seed, vae_models)
        walls[name] = res["wall_s"]
        trav = res["traveling"].assign(variant=name)
        rows.append(trav)
        after_dx = dx_effects(res["roi_table"], ds, harmonized=True)
        dx_rows.append(pd.DataFrame({"variant": name, "roi": truth.index,
                                     "truth": truth.to_numpy(),
                                     "before": before_dx.loc[truth.index].to_numpy(),
                                     "after": after_dx.loc[truth.index].to_numpy()}))
        if res.get("latent"):
            latent[res["latent"]["mode"]] = res["latent"]
        print(f"{name}: {res['wall_s']:.0f} s", flush=True)
    scores = pd.concat(rows, ignore_index=True)
    dx = pd.concat(dx_rows, ignore_index=True)
    if args.merge and (work / "traveling_scores.tsv").is_file():
        done = set(scores["variant"])
        old = pd.read_csv(work / "traveling_scores.tsv", sep="\t")
        old_dx = pd.read_csv(work / "traveling_dx.tsv", sep="\t")
        scores = pd.concat([old[~old["variant"].isin(done)], scores], ignore_index=True)
        dx = pd.concat([old_dx[~old_dx["variant"].isin(done)], dx], ignore_index=True)
        meta = json.loads((work / "traveling_meta.json").read_text())
        walls = {**{k: v for k, v in meta["walls"].items() if k not in done}, **walls}
        old_latent = meta.get("latent", {})
        if "balanced_accuracy" in old_latent:  # an earlier run's single (site_adversary) entry
            old_latent = {"site_adversary": {**old_latent, "mode": "site_adversary"}}
        latent = {**old_latent, **latent}
        prep["times"] = prep["times"] or meta.get("times", {})
    scores.to_csv(work / "traveling_scores.tsv", sep="\t", index=False)
    dx.to_csv(work / "traveling_dx.tsv", sep="\t", index=False)
    (work / "traveling_meta.json").write_text(json.dumps(
        {"walls": walls, "latent": latent, "times": prep["times"]}, indent=1))
    write_markdown(args, scores, dx, walls, latent, prep["times"], ds)
    print(f"wrote {args.out}")
    return 0


def write_markdown(args, scores, dx, walls, latent, times, ds) -> None:
    import torch

    n_runs = len(list((ds).glob("sub-*/ses-*/dwi/*_dwi.nii.gz")))
    lines = [
        "# Traveling-subject evaluation of RISH and the VAE (issue 6)", "",
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}; measured "
        f"{time.strftime('%Y-%m-%d')}.", "",
        "Command:", "", "```",
        f"python benchmarks/bench_traveling.py --workdir WORK --subjects-per-site "
        f"{args.subjects_per_site} --traveling {args.traveling} --rescans {args.rescans} "
        f"--seed {args.seed}", "```", "",
        f"Study: {args.subjects_per_site} single-site subjects per site (GE, Siemens, Philips "
        f"presets, each at its own SNR), {args.traveling} traveling subjects scanned at every "
        f"site and rescanned {args.rescans}x at every site ({n_runs} DWI runs). "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()) + "."
        + (" Rows of several invocations on the same workdir (``--merge``): each variant was "
           "run on the same participant-level outputs; the VAE variants of one invocation "
           "share one trained model, those of different invocations are retrained with the "
           "same seed." if getattr(args, "merge", False) else ""), "",
        "Traveling subjects in template white matter (FA >= 0.2). *between*: RMSE between "
        "sessions at different sites; *rescan*: between sessions at the same site (noise, "
        "head pose, registration); *site*: the site-attributable RMSE sqrt(between^2 - "
        "rescan^2); *reduction*: 1 - after/before of the site-attributable RMSE. Voxelwise and "
        "on the means of the phantom's ROIs (within WM). Mean over traveling subjects.", "",
        "| variant | map | level | between before | after | rescan before | after | "
        "site before | site after | site reduction | between reduction |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (variant, metric), g in scores.groupby(["variant", "metric"], sort=False):
        for level, p in (("voxel", ""), ("ROI", "roi_")):
            col = f"{p}site_rmse_before"
            if col not in g:
                continue
            m = g.mean(numeric_only=True)
            bb, ba = m[f"{p}between_rmse_before"], m[f"{p}between_rmse_after"]
            sb, sa = m[f"{p}site_rmse_before"], m[f"{p}site_rmse_after"]
            scale = 1e3 if metric == "md" else 1.0
            lines.append(
                f"| {variant} | {metric}{' (x1e-3)' if metric == 'md' else ''} | {level} | "
                f"{_fmt(bb * scale)} | {_fmt(ba * scale)} | "
                f"{_fmt(m[f'{p}within_rmse_before'] * scale)} | "
                f"{_fmt(m[f'{p}within_rmse_after'] * scale)} | {_fmt(sb * scale)} | "
                f"{_fmt(sa * scale)} | {_fmt(1 - sa / sb, True)} | "
                f"{_fmt(1 - ba / bb, True)} |")
    lines += ["", "Variants:", ""] + [f"- *{v}*: {LEGEND.get(v, v)}" for v in
                                      dict.fromkeys(scores["variant"])]
    rois = list(dx["roi"].unique())
    lines += ["", "Diagnosis effect on FA (beta of dx, patients - controls) in the dx ROIs, "
              "pooled OLS on the single-site subjects' TBSS ROI values (before: with site as "
              "a fixed effect); *truth*: the simulator's tissue-level effect on the ROI mean "
              "(the skeleton's maximum-FA projection need not equal it). *moved*: "
              "|after - before| of the mean over the dx ROIs, relative to |before| and to "
              "|truth|; *CGC moved*: the same over CGC-L/R, the only dx ROIs where the "
              "unharmonized TBSS values show the effect (UNC and SLF: see the note below).", "",
              "| variant | " + " | ".join(rois) + " | mean | moved (vs before) | "
              "moved (vs truth) | CGC moved (vs before) |",
              "|---|" + "---|" * (len(rois) + 4)]
    first = True
    cgc = [r for r in rois if r.startswith("CGC")]
    for variant, g in dx.groupby("variant", sort=False):
        g = g.set_index("roi").loc[rois]
        if first:
            lines.append("| truth | " + " | ".join(f"{v:.4f}" for v in g["truth"]) +
                         f" | {g['truth'].mean():.4f} | | | |")
            lines.append("| none (site fixed effect) | " + " | ".join(
                f"{v:.4f}" for v in g["before"]) + f" | {g['before'].mean():.4f} | | | |")
            first = False
        shift = abs(g["after"].mean() - g["before"].mean())
        c_shift = abs(g.loc[cgc, "after"].mean() - g.loc[cgc, "before"].mean())
        lines.append(f"| {variant} | " + " | ".join(f"{v:.4f}" for v in g["after"]) +
                     f" | {g['after'].mean():.4f} | "
                     f"{100 * shift / abs(g['before'].mean()):.1f} % | "
                     f"{100 * shift / abs(g['truth'].mean()):.1f} % | "
                     f"{100 * c_shift / abs(g.loc[cgc, 'before'].mean()):.1f} % |")
    if latent:
        if "balanced_accuracy" in latent:
            latent = {"site_adversary": latent}
        lines += ["", "VAE latent code z -> site balanced accuracy on held-out voxels: " +
                  "; ".join(f"{mode} mode {v['balanced_accuracy']:.3f}"
                            for mode, v in sorted(latent.items())) +
                  f" (chance {next(iter(latent.values()))['chance']:.3f})."]
    lines += ["", "Wall time per variant (SH fits, harmonization, DTI refit, TBSS projection; "
              "the VAE variants share one trained model): " +
              ", ".join(f"{k} {v / 60:.1f} min" for k, v in walls.items()) + ".", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
