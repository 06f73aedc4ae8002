"""Out-of-core voxel ComBat vs in-memory ComBat and neuroCombat, side by side (issue 6).

Cases:

- **equality** (default 20,000 voxels x 500 subjects): the out-of-core
  :class:`~dmriharmony.harmonizers.voxel_combat.VoxelComBat` (fit + transform from and to an
  on-disk ``.npy``, chunk by chunk), our in-memory :class:`~dmriharmony.harmonizers.ComBat` and
  neuroCombat 0.2.12, all on the same on-disk matrix: max |diff| of every output against the
  in-memory ComBat and against neuroCombat, wall time and peak memory of each;
- **scale** (default 200,000 voxels x 2,000 subjects = 1.6 GB float32 on disk, 3.2 GB in
  float64): the out-of-core fit and transform only, against a stated memory bound (default
  2,000 MiB). The in-memory methods hold several float64 copies of the matrix there; with
  ``--in-memory-scale`` our in-memory ComBat is run on it as well (about 10 GB), for the
  equality at full size.

Data: a float32 subjects x voxels ``.npy`` with FA-like voxel values, covariate effects (age
slope, sex, diagnosis) and ComBat-type site effects (an additive shift and a multiplicative
scale of the noise per site and voxel), sites of unequal sizes in shuffled order, site-dependent
age and diagnosis rates (not confounded with site). It is written block of subject rows by
block into the file (never the whole matrix in memory); subject ``j``'s noise comes from the
generator seeded ``(seed, j)`` so the matrix does not depend on the block size.

Every method runs in a fresh subprocess (``OMP_NUM_THREADS`` etc. set to ``--threads``); its
peak memory is ``VmHWM`` of ``/proc/self/status`` read at the end of that process -- the
high-water mark of its whole resident set: anonymous memory *and* the file pages it maps
(memory-mapped matrices count). A sampling thread also records the largest anonymous and
file-backed parts seen (``RssAnon`` / ``RssFile``, every 20 ms) to show what the peak is made
of. Generation and comparisons run in subprocesses too; the matrices go to a temporary folder
(``--tmpdir``) that is removed at the end.

Usage::

    .venv/bin/python benchmarks/bench_voxel_combat.py --out benchmarks/results/voxel_combat.md
    .venv/bin/python benchmarks/bench_voxel_combat.py --quick          # smoke run, < 1 min
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

SEED = 20240606
CATEGORICAL = ["sex", "dx"]
CONTINUOUS = ["age"]
METHOD_LABEL = {
    "voxel": "VoxelComBat (out of core)",
    "memory": "ComBat (in memory)",
    "neurocombat": "neuroCombat 0.2.12",
}


# ---------------------------------------------------------------------------------- memory
def _status_kb(*keys: str) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            name = line.split(":", 1)[0]
            if name in keys:
                out[name] = int(line.split()[1])
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process (``VmHWM``, anonymous + file-backed), MiB."""
    return _status_kb("VmHWM").get("VmHWM", 0) / 1024


class RssSampler:
    """Largest ``RssAnon`` and ``RssFile`` of this process, sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.anon = self.file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        kb = _status_kb("RssAnon", "RssFile")
        self.anon = max(self.anon, kb.get("RssAnon", 0))
        self.file = max(self.file, kb.get("RssFile", 0))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# ------------------------------------------------------------------------------------ data
def make_design(n: int, n_sites: int, seed: int) -> tuple[np.ndarray, pd.DataFrame]:
    """Site labels (unequal sizes, shuffled order) and covariates age / sex / dx."""
    rng = np.random.default_rng([seed, 0])
    weights = np.linspace(0.6, 1.4, n_sites)
    sizes = np.maximum(3, np.floor(n * weights / weights.sum()).astype(int))
    sizes[-1] = n - sizes[:-1].sum()
    if sizes[-1] < 3:
        raise SystemExit(f"{n} subjects are too few for {n_sites} sites")
    code = rng.permutation(np.repeat(np.arange(n_sites), sizes))
    sites = np.array([f"site{i:02d}" for i in code])
    mean_age = np.linspace(35, 60, n_sites)[code]
    # ages as neuroCombat stores them (float32) so that every method sees the same design
    age = np.clip(rng.normal(mean_age, 12), 18, 90).round(1).astype(np.float32).astype(float)
    sex = rng.choice(np.array(["F", "M"]), n)
    dx = np.where(rng.random(n) < np.linspace(0.25, 0.5, n_sites)[code], "PT", "HC")
    return sites, pd.DataFrame({"age": age, "sex": sex, "dx": dx})


def generate(spec: dict) -> dict:
    """Write the subjects x voxels ``.npy`` (little-endian ``spec["dtype"]``) block of rows by
    block with plain writes (no memory map)."""
    n, p, k, seed = spec["n"], spec["p"], spec["n_sites"], spec["seed"]
    sites, cov = make_design(n, k, seed)
    code = np.searchsorted(np.unique(sites), sites)
    rng = np.random.default_rng([seed, 1])
    base = rng.uniform(0.3, 0.7, p)  # FA-like voxel means
    sd = rng.uniform(0.02, 0.04, p)
    b_age = rng.normal(-0.0015, 0.0005, p)
    b_sex = rng.normal(0.005, 0.003, p)
    b_dx = rng.normal(-0.01, 0.005, p)
    shift = rng.normal(0.0, 0.01, (k, p))  # additive site effect
    scale = rng.uniform(0.8, 1.25, (k, p))  # multiplicative site effect on the noise
    age = cov["age"].to_numpy() - 50.0
    male = (cov["sex"] == "M").to_numpy(float)
    pt = (cov["dx"] == "PT").to_numpy(float)
    rows = max(1, int(spec.get("block_mb", 64) * 2**20 // (8 * p)))
    dtype = np.dtype(spec.get("dtype", "float32")).newbyteorder("<")
    t0 = time.perf_counter()
    with RssSampler() as rs, open(spec["matrix"], "wb") as fh:
        np.lib.format.write_array_header_1_0(
            fh, {"descr": dtype.str, "fortran_order": False, "shape": (n, p)})
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            block = np.stack([np.random.default_rng([seed, 2, j]).standard_normal(p)
                              for j in range(r0, r1)])
            block *= sd
            block *= scale[code[r0:r1]]
            block += shift[code[r0:r1]]
            block += base
            block += age[r0:r1, None] * b_age
            block += male[r0:r1, None] * b_sex
            block += pt[r0:r1, None] * b_dx
            fh.write(block.astype(dtype).tobytes())
    np.savez(spec["design"], sites=sites.astype(str), age=cov["age"].to_numpy(float),
             sex=cov["sex"].to_numpy(str), dx=cov["dx"].to_numpy(str))
    return {"seconds": time.perf_counter() - t0, "peak_mb": peak_rss_mb(),
            "anon_mb": rs.anon / 1024, "file_mb": rs.file / 1024}


def load_design(path: str) -> tuple[np.ndarray, pd.DataFrame]:
    with np.load(path, allow_pickle=False) as z:
        return z["sites"], pd.DataFrame({"age": z["age"], "sex": z["sex"], "dx": z["dx"]})


# --------------------------------------------------------------------------------- methods
def run_method(spec: dict) -> dict:
    """One method on the on-disk matrix; its output goes to ``spec["save"]`` (.npy)."""
    sites, cov = load_design(spec["design"])
    method = spec["method"]
    times = {}
    with RssSampler() as rs:
        t0 = time.perf_counter()
        if method == "voxel":
            from dmriharmony.harmonizers.voxel_combat import VoxelComBat

            model = VoxelComBat(chunk_size=spec["chunk"], categorical=CATEGORICAL,
                                continuous=CONTINUOUS)
            model.fit(spec["matrix"], sites, cov)
            times["fit_s"] = time.perf_counter() - t0
            model.transform(spec["matrix"], sites, cov, out_path=spec["save"])
        elif method == "memory":
            from dmriharmony.harmonizers import ComBat

            X = np.load(spec["matrix"]).astype(float)
            times["load_s"] = time.perf_counter() - t0
            out = ComBat(categorical=CATEGORICAL, continuous=CONTINUOUS).fit_transform(
                X, sites, cov)
            del X
        elif method == "neurocombat":
            from neuroCombat import neuroCombat

            X = np.load(spec["matrix"]).astype(float)
            times["load_s"] = time.perf_counter() - t0
            frame = cov.assign(site=sites)
            with contextlib.redirect_stdout(io.StringIO()), np.errstate(all="ignore"):
                res = neuroCombat(np.ascontiguousarray(X.T), frame, "site", CATEGORICAL,
                                  CONTINUOUS)
            del X
            out = res["data"].T
        else:
            raise SystemExit(f"unknown method {method!r}")
        seconds = time.perf_counter() - t0
    peak = peak_rss_mb()  # taken before saving: writing the output is not part of the method
    if method != "voxel":
        np.save(spec["save"], out)
    return {"seconds": seconds, "peak_mb": peak, "anon_mb": rs.anon / 1024,
            "file_mb": rs.file / 1024, **times}


def compare(spec: dict) -> dict:
    """Max |a - b| of saved outputs (float64), column block by column block."""
    a = np.load(spec["a"], mmap_mode="r")
    b = np.load(spec["b"], mmap_mode="r")
    worst = 0.0
    step = max(1, int(2**26 // (8 * a.shape[0])))
    for j in range(0, a.shape[1], step):
        d = np.abs(np.asarray(a[:, j:j + step], float) - np.asarray(b[:, j:j + step], float))
        worst = max(worst, float(np.nanmax(d)))
    return {"max_abs_diff": worst}


def child(spec: dict) -> None:
    task = spec.pop("task")
    res = {"generate": generate, "method": run_method, "compare": compare}[task](spec)
    print(json.dumps(res))


def run(spec: dict, threads: int) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                           json.dumps(spec)], capture_output=True, text=True, env=env,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ main
def markdown_table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def run_case(label: str, n: int, p: int, methods: list[str], args: argparse.Namespace,
             tmp: Path, notes: list[str], dtype: str = "float32") -> list[dict]:
    matrix, design = tmp / f"{label}_matrix.npy", tmp / f"{label}_design.npz"
    tag = f"{label} ({dtype})"
    log(f"[{tag}] generating {p:,} voxels x {n:,} subjects ({dtype}) ...")
    gen = run({"task": "generate", "n": n, "p": p, "n_sites": args.sites, "seed": args.seed,
               "matrix": str(matrix), "design": str(design), "dtype": dtype}, args.threads)
    gb = matrix.stat().st_size / 1e9
    notes.append(f"{tag}: matrix {p:,} voxels x {n:,} subjects, {dtype}, {gb:.2f} GB on "
                 f"disk, generated in {gen['seconds']:.1f} s with a peak of "
                 f"{gen['peak_mb']:.0f} MiB")
    res, outs = {}, {}
    for method in methods:
        outs[method] = tmp / f"{label}_{method}.npy"
        log(f"[{tag}] {method} ...")
        res[method] = run({"task": "method", "method": method, "matrix": str(matrix),
                           "design": str(design), "save": str(outs[method]),
                           "chunk": args.chunk_size}, args.threads)
        log(f"[{tag}] {method}: {json.dumps(res[method])}")
    matrix.unlink()
    diffs = {}
    for a in methods:
        for b in ("memory", "neurocombat"):
            if a != b and b in methods:
                diffs[a, b] = run({"task": "compare", "a": str(outs[a]), "b": str(outs[b])},
                                  args.threads)["max_abs_diff"]
    for f in outs.values():
        f.unlink(missing_ok=True)
    rows = []
    ref = res.get("memory")
    for method in methods:
        r = res[method]
        extra = ""
        if "fit_s" in r:
            extra = f" (fit {r['fit_s']:.2f} + transform {r['seconds'] - r['fit_s']:.2f})"
        elif "load_s" in r:
            extra = f" (load {r['load_s']:.2f})"
        rows.append({
            "case": f"{label}: {p:,} vox x {n:,} subj, {dtype}",
            "method": METHOD_LABEL[method],
            "wall s": f"{r['seconds']:.2f}{extra}",
            "peak MiB": f"{r['peak_mb']:,.0f}",
            "max RssAnon / RssFile MiB": f"{r['anon_mb']:,.0f} / {r['file_mb']:,.0f}",
            "wall ratio vs in-memory": (f"{r['seconds'] / ref['seconds']:.2f}x" if ref else ""),
            "peak ratio vs in-memory": (f"{r['peak_mb'] / ref['peak_mb']:.2f}x" if ref else ""),
            "max abs diff vs in-memory": (f"{diffs[method, 'memory']:.1e}"
                                          if (method, "memory") in diffs else ""),
            "max abs diff vs neuroCombat": (f"{diffs[method, 'neurocombat']:.1e}"
                                            if (method, "neurocombat") in diffs else ""),
        })
    if ("voxel", "memory") in diffs:
        d = diffs["voxel", "memory"]
        notes.append(f"{tag}: out-of-core vs in-memory max |diff| {d:.1e} "
                     f"({'<=' if d <= 1e-6 else '>'} 1e-6)")
    if label.startswith("scale"):
        peak = res["voxel"]["peak_mb"]
        ok = peak < args.bound_mb
        notes.append(f"{tag}: out-of-core peak {peak:,.0f} MiB "
                     f"{'<' if ok else '>='} bound {args.bound_mb:,.0f} MiB: "
                     f"{'met' if ok else 'NOT met'}")
    return rows


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voxels", type=int, default=200_000, help="scale case voxels")
    ap.add_argument("--subjects", type=int, default=2_000, help="scale case subjects")
    ap.add_argument("--eq-voxels", type=int, default=20_000, help="equality case voxels")
    ap.add_argument("--eq-subjects", type=int, default=500, help="equality case subjects")
    ap.add_argument("--sites", type=int, default=10, help="number of sites")
    ap.add_argument("--chunk-size", type=int, default=8192, help="VoxelComBat voxels per chunk")
    ap.add_argument("--eq-dtypes", default="float32,float64",
                    help="on-disk dtypes of the equality case (comma list)")
    ap.add_argument("--scale-dtype", default="float32", help="on-disk dtype of the scale case")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads per method")
    ap.add_argument("--bound-mb", type=float, default=2000.0,
                    help="peak-memory bound of the out-of-core scale case, MiB")
    ap.add_argument("--cases", default="equality,scale", help="comma list: equality,scale")
    ap.add_argument("--in-memory-scale", action="store_true",
                    help="also run the in-memory ComBat on the scale case (~10 GB)")
    ap.add_argument("--tmpdir", type=Path, default=None, help="folder for the temporary matrices")
    ap.add_argument("--quick", action="store_true", help="small sizes, smoke run (< 1 min)")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    if args.quick:
        args.eq_voxels, args.eq_subjects = 2_000, 120
        args.voxels, args.subjects = 20_000, 300
        args.sites = min(args.sites, 5)
        args.chunk_size = min(args.chunk_size, 2_048)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    t_all = time.perf_counter()
    rows, notes = [], []
    tmp = Path(tempfile.mkdtemp(prefix="bench_voxel_combat_", dir=args.tmpdir))
    try:
        if "equality" in cases:
            for dt in [d.strip() for d in args.eq_dtypes.split(",") if d.strip()]:
                rows += run_case("equality", args.eq_subjects, args.eq_voxels,
                                 ["voxel", "memory", "neurocombat"], args, tmp, notes, dt)
        if "scale" in cases:
            methods = ["voxel"] + (["memory"] if args.in_memory_scale else [])
            rows += run_case("scale", args.subjects, args.voxels, methods, args, tmp, notes,
                             args.scale_dtype)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    load = os.getloadavg()
    cmd = " ".join(["benchmarks/bench_voxel_combat.py", *(argv if argv is not None
                                                          else sys.argv[1:])])
    text = "\n".join([
        "## Voxel ComBat out of core (issue 6)", "",
        f"Command: `OMP_NUM_THREADS={args.threads} .venv/bin/python {cmd}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, numpy {np.__version__}; {args.threads} BLAS thread(s) "
        f"per method; {args.sites} sites; chunk {args.chunk_size:,} voxels; seed {args.seed}; "
        f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; total "
        f"{time.perf_counter() - t_all:.0f} s", "",
        markdown_table(rows), "",
        *[f"- {note}" for note in notes], "",
        "Methods: VoxelComBat = `VoxelComBat(chunk_size).fit(path.npy)` then `.transform(path.npy,"
        " out_path=...)`, reading and writing float32 `.npy` files chunk of voxel columns by"
        " chunk; ComBat (in memory) = `ComBat().fit_transform` on the whole matrix loaded in"
        " float64; neuroCombat = `neuroCombat(X.T, ...)` (parametric EB). Covariates age"
        " (continuous), sex and dx (categorical) for all. Each method runs in its own"
        " subprocess; peak = `VmHWM` of that process (anonymous + mapped file pages), the"
        " RssAnon / RssFile columns are the largest values sampled every 20 ms. The out-of-core"
        " output is stored as float32 (the input's dtype), so its difference to the float64"
        " outputs of a float32 case includes float32 rounding (~3e-8 at FA values); with float64"
        " on disk it is the algorithmic difference. In-memory wall times include loading the"
        " matrix (`load`).", ""])
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
