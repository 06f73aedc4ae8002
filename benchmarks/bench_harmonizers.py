"""Native ComBat vs the peer neuroCombat 0.2.12, side by side in one run.

Cases (issue 5 acceptance):

- parametric EB on 100,000 features x 500 subjects (5 sites x 100), covariates age + sex;
- non-parametric EB: neuroCombat at 200 and 2,000 features (its cost grows with features^2 *
  subjects), ours at 2,000 and 100,000 (features^2, from sufficient statistics);
- ComBat-GAM (vectorised penalised splines, per-feature GCV) and CovBat on the big table, ours
  only (neuroHarmonize cannot be installed next to numpy 2; its own figure is ~195 ms/feature).

Every method runs in its own fresh subprocess on data regenerated there from the same seed, so
the peak resident memory (``VmHWM``, see :func:`peak_rss_mb`) is that method's alone;
the table gives the peak and the increase over the process holding just the data. Outputs are
written to a temporary ``.npy`` and compared (max abs difference) between our code and
neuroCombat wherever both ran.

Usage::

    .venv/bin/python benchmarks/bench_harmonizers.py [--quick] [--out benchmarks/results/combat.md]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

SEED = 20240601


def make_table(n_per_site: int, n_sites: int, p: int, seed: int = SEED):
    """FA-like skeleton/ROI values with age/sex effects and ComBat-type site effects."""
    rng = np.random.default_rng(seed)
    sites = np.repeat([f"site{i}" for i in range(n_sites)], n_per_site)
    n = sites.shape[0]
    age = np.round(rng.uniform(20, 80, n), 1).astype(np.float32).astype(float)
    sex = rng.choice(["F", "M"], n)
    code = np.repeat(np.arange(n_sites), n_per_site)
    base = rng.uniform(0.3, 0.7, p)
    X = rng.standard_normal((n, p))
    X *= 0.03
    X += base
    X -= 0.0015 * (age - 50)[:, None]
    X[sex == "M"] += 0.005
    shift = rng.normal(0, 0.01, (n_sites, p))
    scale = rng.uniform(0.8, 1.25, (n_sites, p))
    for i in range(n_sites):
        rows = code == i
        X[rows] = base + (X[rows] - base) * scale[i] + shift[i]
    return X, sites, pd.DataFrame({"age": age, "sex": sex})


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB.

    ``VmHWM`` of ``/proc/self/status`` on Linux: it belongs to the process's own address space,
    created at ``exec``. ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (used elsewhere) keeps the
    high-water mark of the address space replaced by ``exec`` -- the parent's -- so a child of a
    large parent would report the parent's size.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def max_abs_diff(a_path: Path, b_path: Path, chunk: int = 20_000) -> float:
    """Max |a - b| of two saved arrays, column chunk by chunk (keeps this process small)."""
    a = np.load(a_path, mmap_mode="r")
    b = np.load(b_path, mmap_mode="r")
    worst = 0.0
    for j in range(0, a.shape[1], chunk):
        worst = max(worst, float(np.nanmax(np.abs(a[:, j : j + chunk] - b[:, j : j + chunk]))))
    return worst


def child(spec: dict) -> None:
    """Run one method on freshly generated data; print a JSON line with time and memory."""
    X, sites, cov = make_table(spec["n_per_site"], spec["n_sites"], spec["p"])
    base_mb = peak_rss_mb()
    method = spec["method"]
    t0 = time.perf_counter()
    if method == "neurocombat":
        from neuroCombat import neuroCombat

        frame = cov.assign(site=sites)
        with contextlib.redirect_stdout(io.StringIO()), np.errstate(all="ignore"):
            out = neuroCombat(np.ascontiguousarray(X.T), frame, "site", ["sex"], ["age"],
                              parametric=spec["parametric"])["data"].T
    else:
        from dmriharmony.harmonizers import ComBat, ComBatGAM, CovBat

        cls = {"native": ComBat, "gam": ComBatGAM, "covbat": CovBat}[method]
        kwargs = {"parametric": spec["parametric"]}
        out = cls(**kwargs).fit_transform(X, sites, cov)
    seconds = time.perf_counter() - t0
    peak_mb = peak_rss_mb()
    if spec.get("save"):
        np.save(spec["save"], np.asarray(out, dtype=float))
    print(json.dumps({"seconds": seconds, "peak_mb": peak_mb, "data_mb": base_mb,
                      "nan": bool(np.isnan(out).any())}))


def markdown_table(rows: list[dict]) -> str:
    """A GitHub markdown table of dict rows (same keys)."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def run(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run (seconds)")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    ap.add_argument("--only", choices=["parametric", "non-parametric", "gam", "covbat"],
                    help="run one group of cases")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    big = 2_000 if args.quick else 100_000
    np_peer = [200, 500] if args.quick else [200, 2_000]
    np_ours = [500, 2_000] if args.quick else [2_000, 100_000]
    cases = [("parametric", True, big, ["native", "neurocombat"])]
    for p in sorted(set(np_peer) | set(np_ours)):
        methods = (["native"] if p in np_ours or p in np_peer else [])
        methods += ["neurocombat"] if p in np_peer else []
        cases.append(("non-parametric", False, p, methods))
    cases.append(("ComBat-GAM (age smooth), parametric", True, big, ["gam"]))
    cases.append(("CovBat, parametric", True, big, ["covbat"]))

    if args.only:
        group = {"parametric": "parametric", "non-parametric": "non-parametric",
                 "gam": "ComBat-GAM", "covbat": "CovBat"}[args.only]
        cases = [c for c in cases if c[0].startswith(group)]
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_combat_"))
    try:
        for label, parametric, p, methods in cases:
            res = {}
            for method in methods:
                out = tmp / f"{method}.npy"
                spec = {"method": method, "parametric": parametric, "p": p, "n_per_site": 100,
                        "n_sites": 5, "save": str(out) if len(methods) > 1 else None}
                print(f"running {label} p={p} {method} ...", file=sys.stderr, flush=True)
                res[method] = run(spec)
            diff = ""
            if {"native", "neurocombat"} <= set(res):
                diff = f"{max_abs_diff(tmp / 'native.npy', tmp / 'neurocombat.npy'):.1e}"
            for method, r in res.items():
                peer = res.get("neurocombat")
                ratio = ""
                if peer and method != "neurocombat":
                    ratio = f"{peer['seconds'] / r['seconds']:.1f}x"
                rows.append({
                    "case": label, "features": f"{p:,}", "subjects": 500, "method": method,
                    "time_s": f"{r['seconds']:.2f}", "speed-up vs neuroCombat": ratio,
                    "peak RSS MB": f"{r['peak_mb']:.0f}",
                    "increase over data MB": f"{r['peak_mb'] - r['data_mb']:.0f}",
                    "max abs diff vs neuroCombat": diff if method != "neurocombat" else "",
                    "NaN in output": "yes" if r["nan"] else "no",
                })
                print(rows[-1], file=sys.stderr, flush=True)
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()

    table = markdown_table(rows)
    load = os.getloadavg()
    quick = (" --quick" if args.quick else "") + (f" --only {args.only}" if args.only else "")
    header = (
        "## ComBat: native vs neuroCombat 0.2.12\n\n"
        f"Command: `.venv/bin/python benchmarks/bench_harmonizers.py{quick}`"
        f"  \nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, numpy {np.__version__}; load average at the end "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (other jobs share the CPUs)\n\n"
        "Each row is a fresh subprocess; peak RSS is its `VmHWM` (Linux; `ru_maxrss` would "
        "inherit the parent's high-water mark across exec); 'increase over data' subtracts the "
        "peak once the data were generated (the data are 8 bytes x subjects x features: "
        "400 MB at 100,000 x 500).\n\n"
    )
    text = header + table + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
