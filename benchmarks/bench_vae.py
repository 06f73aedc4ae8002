"""Training cost of the site-invariant conditional VAE on CPU (Moyer et al., MRM 2020).

Data: synthetic traveling-phantom voxels (:mod:`dmriharmony.sh.synthetic`, order-8 SH at
b = 1000, 3 sites with known per-order scalings), each voxel with its 6 neighbours:
7 x (b0 + 45 SH) = 322 features, the published input. Cases:

- ``published``: the published network and weights (256-128-64, z = 32, batch 128,
  Adam 1e-4) in ``moyer`` mode (reconstruction + KL + pairwise-KL MI bound + decoder
  adversary) and in ``site_adversary`` mode (+ latent site classifier);
- ``vae-only``: the same network with the MI bound and both adversaries switched off, the
  cost floor of a plain conditional VAE (the peer implementation, dcmoyer/scanner-inv-pytorch,
  is not a package and is not copied here; its networks match ``published``);
- ``small``: :func:`dmriharmony.harmonizers.vae.small_config` (128-64-32, z = 16, batch 256).

Every case runs in a fresh subprocess (torch threads = ``--threads``) so the peak resident
memory (``ru_maxrss``) is that case's alone; the table gives epoch time, training throughput
(training voxels / epoch second, validation pass included), peak RSS, the final validation
reconstruction and the traveling subjects' latent z -> site balanced accuracy (chance 1/3).

Usage::

    .venv/bin/python benchmarks/bench_vae.py [--voxels 20000] [--epochs 3] [--threads 2]
        [--out benchmarks/results/vae.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

EFFECTS = {"A": (1.0, (1.0, 1.0, 1.0, 1.0, 1.0)),
           "B": (0.8, (1.0, 0.8, 0.6, 0.5, 0.4)),
           "C": (1.25, (1.05, 1.2, 1.3, 1.4, 1.5))}
SHAPE = (12, 12, 4)


def make_data(n_voxels: int, seed: int = 0):
    from dmriharmony.sh import neighbourhood_features
    from dmriharmony.sh.synthetic import SiteEffect, apply_site, subject_sh_volume

    per_subject = int(np.prod(SHAPE))
    n_subj = max(2, int(np.ceil(n_voxels / per_subject / len(EFFECTS))))
    X, sites, groups = [], [], []
    for k, (site, (gain, scales)) in enumerate(EFFECTS.items()):
        for j in range(n_subj):
            subj = seed * 100000 + 1000 * k + j
            f, m = subject_sh_volume(subj, shape=SHAPE, order=8)
            x = neighbourhood_features(apply_site(f, SiteEffect(gain, scales)), m)
            X.append(x)
            sites += [site] * len(x)
            groups += [subj] * len(x)
    travel = {}
    for site, (gain, scales) in EFFECTS.items():
        f, m = subject_sh_volume(999999, shape=SHAPE, order=8)
        travel[site] = neighbourhood_features(apply_site(f, SiteEffect(gain, scales)), m)
    return (np.concatenate(X).astype(np.float32), np.array(sites), np.array(groups), travel)


def run_case(name: str, n_voxels: int, epochs: int, threads: int) -> dict:
    import torch

    from dmriharmony.harmonizers._vae_data import split_validation
    from dmriharmony.harmonizers.vae import SiteInvariantVAE, VAEConfig, small_config

    torch.set_num_threads(threads)
    X, sites, groups, travel = make_data(n_voxels)
    common = dict(max_epochs=epochs, patience=epochs, seed=0)
    cfg = {
        "published-moyer": VAEConfig(mode="moyer", **common),
        "published-site_adversary": VAEConfig(mode="site_adversary", **common),
        "vae-only": VAEConfig(mode="moyer", mi_weight=0.0, adv_weight=0.0, **common),
        "small-site_adversary": small_config(mode="site_adversary", **common),
    }[name]
    t0 = time.perf_counter()
    model = SiteInvariantVAE(cfg, progress=False).fit(X, sites, groups=groups)
    wall = time.perf_counter() - t0
    secs = [h["seconds"] for h in model.history_]
    train, _ = split_validation(sites, groups, cfg.validation_fraction, cfg.seed)
    n_train = int(train.sum())
    Xt = np.concatenate(list(travel.values()))
    st = np.repeat(list(travel), len(travel["A"]))
    acc = model.latent_site_accuracy(Xt, st).balanced_accuracy
    return {
        "case": name, "n_voxels": int(len(X)), "n_train": n_train, "n_features": int(X.shape[1]),
        "epochs": len(secs), "epoch_s": float(np.median(secs)), "fit_s": wall,
        "voxels_per_s": n_train / float(np.median(secs)),
        "val_recon": model.history_[-1]["val_recon"], "latent_acc": float(acc),
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voxels", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default="vae-only,published-moyer,published-site_adversary,"
                                       "small-site_adversary")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_case(args.child, args.voxels, args.epochs, args.threads)))
        return
    rows = []
    for case in args.cases.split(","):
        cmd = [sys.executable, __file__, "--child", case, "--voxels", str(args.voxels),
               "--epochs", str(args.epochs), "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{case}: done", file=sys.stderr)
    import torch

    lines = [
        f"VAE training on CPU, {rows[0]['n_voxels']} voxels ({rows[0]['n_train']} training) x "
        f"{rows[0]['n_features']} features, {args.epochs} epochs, torch {torch.__version__}, "
        f"{args.threads} threads, {platform.processor() or platform.machine()}",
        "",
        "| case | epoch (s) | throughput (voxels/s) | fit total (s) | peak RSS (MB) "
        "| val recon | latent z->site bal. acc. |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['epoch_s']:.2f} | {r['voxels_per_s']:.0f} | "
                     f"{r['fit_s']:.1f} | {r['maxrss_mb']:.0f} | {r['val_recon']:.1f} | "
                     f"{r['latent_acc']:.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
