"""Out-of-core voxel ComBat vs in-memory ComBat and neuroCombat, side by side (issue 6).

Cases:

- equality (default 20,000 voxels x 500 subjects, 5 sites): the out-of-core
  :class:`dmriharmony.harmonizers.VoxelComBat` on an on-disk float64 matrix, our in-memory
  :class:`~dmriharmony.harmonizers.ComBat` and neuroCombat 0.2.12 on the same data: max |diff|,
  time, peak memory;
- scale (default 200,000 voxels x 2,000 subjects, float32 on disk = 1.6 GB): the out-of-core fit
  and transform (to an on-disk ``.npy``); the in-memory methods would hold several copies of the
  matrix in float64 (>= 3.2 GB each) and are not run there.

The matrix is written column chunk by column chunk into a ``.npy`` memory map (never whole in
memory), with ComBat-type site effects (location and scale), an age slope and a sex effect.
Every method runs in its own subprocess; its peak resident memory is ``VmHWM`` of that process
(:func:`peak_rss_mb`).

Usage::

    .venv/bin/python benchmarks/bench_voxel_combat.py [--quick] \
        [--out benchmarks/results/voxel_combat.md]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

SEED = 20261202


def peak_rss_mb() -> float:
    """Peak resident memory of this process (``VmHWM``), MB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def design(n: int, n_sites: int, seed: int) -> tuple[np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    sites = np.array([f"site{i % n_sites}" for i in range(n)])
    cov = pd.DataFrame({"age": rng.uniform(20, 70, n).round(1),
                        "sex": rng.integers(0, 2, n)})
    return sites, cov


def write_matrix(path: Path, n: int, p: int, n_sites: int, dtype: str, seed: int,
                 chunk: int = 10_000) -> None:
    """A subjects x voxels ``.npy`` with site location/scale effects, written by columns."""
    sites, cov = design(n, n_sites, seed)
    code = np.array([int(s[4:]) for s in sites])
    rng = np.random.default_rng(seed + 1)
    X = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, p))
    for start in range(0, p, chunk):
        stop = min(p, start + chunk)
        w = stop - start
        base = rng.uniform(0.2, 0.8, w)
        shift = rng.normal(0, 0.03, (n_sites, w))
        scale = rng.uniform(0.7, 1.4, (n_sites, w))
        noise = rng.normal(0, 0.04, (n, w))
        block = (base + (cov["age"].to_numpy()[:, None] - 45) * -0.002
                 + cov["sex"].to_numpy()[:, None] * 0.01
                 + shift[code] + scale[code] * noise)
        X[:, start:stop] = block.astype(dtype)
    X.flush()
    del X


def child(spec: dict) -> None:
    sites, cov = design(spec["n"], spec["n_sites"], spec["seed"])
    base = peak_rss_mb()
    t0 = time.perf_counter()
    method = spec["method"]
    if method == "voxel":
        from dmriharmony.harmonizers import VoxelComBat

        model = VoxelComBat(chunk_size=spec["chunk"]).fit(spec["matrix"], sites, cov)
        model.transform(spec["matrix"], sites, cov, out_path=spec["save"])
    elif method == "memory":
        from dmriharmony.harmonizers import ComBat

        X = np.load(spec["matrix"]).astype(float)
        np.save(spec["save"], ComBat().fit_transform(X, sites, cov))
    else:
        from neuroCombat import neuroCombat

        X = np.load(spec["matrix"]).astype(float)
        frame = cov.assign(site=sites)
        with contextlib.redirect_stdout(io.StringIO()), np.errstate(all="ignore"):
            out = neuroCombat(np.ascontiguousarray(X.T), frame, "site", ["sex"], ["age"])
        np.save(spec["save"], out["data"].T)
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_mb": peak_rss_mb(),
                      "start_mb": base}))


def run(spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec.get("threads", 1)))
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['method']} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_abs_diff(a: str, b: str, chunk: int = 20_000) -> float:
    A, B = np.load(a, mmap_mode="r"), np.load(b, mmap_mode="r")
    return max(float(np.max(np.abs(np.asarray(A[:, j:j + chunk], float)
                                   - np.asarray(B[:, j:j + chunk], float))))
               for j in range(0, A.shape[1], chunk))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--equal-voxels", type=int, default=20_000)
    ap.add_argument("--equal-subjects", type=int, default=500)
    ap.add_argument("--voxels", type=int, default=200_000)
    ap.add_argument("--subjects", type=int, default=2_000)
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    if args.quick:
        args.equal_voxels, args.equal_subjects = 2_000, 100
        args.voxels, args.subjects = 20_000, 200
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_voxel_") as tmp:
        tmp = Path(tmp)
        # equality case, float64 on disk
        m = tmp / "equal.npy"
        write_matrix(m, args.equal_subjects, args.equal_voxels, args.sites, "float64", SEED)
        outs = {}
        for method in ("voxel", "memory", "neurocombat"):
            outs[method] = str(tmp / f"equal_{method}.npy")
            r = run({"method": method, "matrix": str(m), "save": outs[method],
                     "n": args.equal_subjects, "n_sites": args.sites, "seed": SEED,
                     "chunk": args.chunk, "threads": args.threads})
            rows.append({"case": f"{args.equal_voxels:,} vox x {args.equal_subjects:,}",
                         "method": method, "wall_s": round(r["seconds"], 2),
                         "peak_mb": round(r["peak_mb"]), "max_abs_diff_vs_memory": ""})
        for row in rows:
            if row["method"] != "memory":
                diff = max_abs_diff(outs[row["method"]], outs["memory"])
                row["max_abs_diff_vs_memory"] = f"{diff:.2e}"
        for f in tmp.glob("equal*.npy"):
            f.unlink()
        # scale case, float32 on disk
        big = tmp / "big.npy"
        t0 = time.perf_counter()
        write_matrix(big, args.subjects, args.voxels, args.sites, "float32", SEED)
        gen = time.perf_counter() - t0
        r = run({"method": "voxel", "matrix": str(big), "save": str(tmp / "big_out.npy"),
                 "n": args.subjects, "n_sites": args.sites, "seed": SEED, "chunk": args.chunk,
                 "threads": args.threads})
        rows.append({"case": f"{args.voxels:,} vox x {args.subjects:,} (float32, "
                             f"{big.stat().st_size / 2**30:.2f} GiB on disk)",
                     "method": "voxel", "wall_s": round(r["seconds"], 1),
                     "peak_mb": round(r["peak_mb"]), "max_abs_diff_vs_memory": "not run"})
    keys = list(rows[0])
    table = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    table += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    text = "\n".join([
        "# Out-of-core voxel ComBat (issue 6)", "",
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python "
        f"{platform.python_version()}, OMP_NUM_THREADS={args.threads}, chunk {args.chunk} "
        f"voxels; matrix generation of the scale case took {gen:.0f} s (not counted).", "",
        "Command: `.venv/bin/python benchmarks/bench_voxel_combat.py"
        + (" --quick" if args.quick else "") + f" --threads {args.threads}`", "",
        *table, "",
        "voxel = `VoxelComBat` fit + transform to an on-disk `.npy`, chunk by chunk; memory = "
        "`ComBat` on the whole matrix in float64; neurocombat = neuroCombat 0.2.12 (parametric "
        "EB, the same covariates). Peak = VmHWM of the method's own process.", ""])
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
