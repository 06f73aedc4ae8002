"""Where the simulated FA site effect comes from: protocol physics vs noise bias (issue 6).

On the phantom's white-matter voxels (fine grid: no resampling, registration or partial volume
between sites), the signal of each scanner preset (its b-values, gradient directions, TE/TR and
field strength) is computed noise-free and, ``--draws`` times, with Rician noise at the preset's
SNR; the tensor is fitted (DIPY WLS, shells b <= 1500 as at the participant level) and FA
compared between sites:

- *noise-free*: the protocol's own FA difference (b-value, echo time, direction set);
- *expected under noise*: the mean FA over the noise draws, i.e. the FA a site measures on
  average; its difference from the noise-free FA is the noise bias (FA rises with noise, more
  at lower SNR and with fewer directions; Jones & Basser, MRM 2004);
- *one scan*: the RMS difference of single noisy scans, what a rescan shows.

A site mapping (RISH, the VAE, ComBat) is a deterministic function of each scan; the part of
the between-site difference it can remove is the difference of the expected maps, not the
scan-to-scan noise. Usage::

    python benchmarks/bench_site_sources.py --voxels 4000 --draws 20 \\
        --out benchmarks/results/site_sources.md
"""

from __future__ import annotations

import argparse
import platform
import time
from itertools import combinations
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def site_fa(name: str, sel: np.ndarray, ms, draws: int, rng: np.random.Generator) -> dict:
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    from dmriharmony.sh.fit import find_shells
    from dmriharmony.simulate.scanners import PRESETS, protocol
    from dmriharmony.simulate.signal import mixture_signal
    from dmriharmony.simulate.tissue import compartment_weights, relaxation_at

    site = PRESETS[name]
    prot = protocol(site)
    b, g = prot.bvals_applied, prot.bvecs_voxel
    weights = compartment_weights(relaxation_at(site.field_strength), site.te_ms, site.tr_ms)
    signal = mixture_signal(ms, sel, b, g, weights)
    use = b <= 1500
    b, g, signal = b[use], g[use], signal[:, use]
    dw = b > 50
    gtab = gradient_table(np.where(dw, b, 0.0), bvecs=np.where(dw[:, None], g, [1.0, 0, 0]))
    model = TensorModel(gtab)
    clean = model.fit(signal).fa
    sigma = signal[:, ~dw].mean() / site.snr  # SNR of the mean WM b0, as the simulator
    noisy = []
    for _ in range(draws):
        re = signal + rng.normal(0.0, sigma, signal.shape)
        im = rng.normal(0.0, sigma, signal.shape)
        noisy.append(model.fit(np.sqrt(re ** 2 + im ** 2)).fa)
    noisy = np.array(noisy)
    return {"clean": clean, "expected": noisy.mean(axis=0), "draws": noisy,
            "snr": site.snr, "n_dirs": int(dw.sum()),
            "shells": [int(round(v)) for v, _ in find_shells(b)]}


def main(argv=None) -> int:
    from dmriharmony.simulate.anatomy import build_phantom
    from dmriharmony.simulate.signal import base_microstructure

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", default="ge,siemens,philips")
    ap.add_argument("--voxels", type=int, default=4000)
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--min-wm", type=float, default=0.8,
                    help="white-matter fraction of the phantom voxels used (default 0.8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "site_sources.md")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    phantom = build_phantom()
    ms = base_microstructure(phantom)
    wm = np.flatnonzero(phantom.f_wm >= args.min_wm)
    sel = np.sort(rng.choice(wm, min(args.voxels, wm.size), replace=False))
    sites = [s for s in args.sites.split(",") if s]
    res = {s: site_fa(s, sel, ms, args.draws, rng) for s in sites}

    def rms(a, b):
        return float(np.sqrt(np.mean((a - b) ** 2)))

    lines = ["# Sources of the simulated FA site effect (issue 6)", "",
             f"Machine: {platform.machine()}, Python {platform.python_version()}; measured "
             f"{time.strftime('%Y-%m-%d')}; {time.perf_counter() - t0:.0f} s.", "",
             "Command:", "", "```",
             f"python benchmarks/bench_site_sources.py --sites {args.sites} --voxels "
             f"{args.voxels} --draws {args.draws} --min-wm {args.min_wm} --seed {args.seed}",
             "```", "",
             f"{len(sel)} phantom voxels with WM fraction >= {args.min_wm} (fine grid, no "
             "resampling); tensor fit (DIPY WLS) on b <= 1500; Rician noise at each preset's "
             f"b0 SNR, {args.draws} draws.", "",
             "| site | shells (b <= 1500) | directions | SNR | mean FA noise-free | mean FA "
             "under noise | noise bias |", "|---|---|---|---|---|---|---|"]
    for s, r in res.items():
        lines.append(f"| {s} | {', '.join(map(str, r['shells']))} | {r['n_dirs']} | "
                     f"{r['snr']:g} | {r['clean'].mean():.4f} | {r['expected'].mean():.4f} | "
                     f"{(r['expected'] - r['clean']).mean():+.4f} |")
    lines += ["", "Voxelwise RMS FA difference between sites:", "",
              "| pair | noise-free (protocol) | expected under noise (protocol + noise bias) | "
              "one scan each (what a rescan adds) |", "|---|---|---|---|"]
    for a, b in combinations(sites, 2):
        one = np.mean([rms(res[a]["draws"][k], res[b]["draws"][k])
                       for k in range(args.draws)])
        lines.append(f"| {a}-{b} | {rms(res[a]['clean'], res[b]['clean']):.4f} | "
                     f"{rms(res[a]['expected'], res[b]['expected']):.4f} | {one:.4f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
