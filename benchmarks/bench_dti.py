"""DTI stage of the participant workflow vs a bare DIPY ``TensorModel.fit``, same data, one run.

Rows (each measured in its own fresh Python subprocess, so that peak memory is the process's
maximum resident set size, ``resource.getrusage(...).ru_maxrss``):

- ``dipy TensorModel.fit``: the peer baseline -- load the NIfTI, build the gradient table,
  ``TensorModel(gtab, fit_method=...).fit(data, mask)``, read FA/MD/AD/RD;
- ``dmriharmony fit_tensor``: our science function on the same arrays (adds the noise estimate,
  the predicted signal for QC, outlier fraction, chunking);
- ``dmriharmony FitTensor node``: the workflow's DTI stage as Nipype runs it -- a Node with the
  ``FitTensor`` interface: read files, shell selection, fit, write six maps + QC TSV + JSON;
- ``dmriharmony participant wf``: the whole per-run graph (mask, fit, derivatives sinks).

The "fit time" column times the call shown: for the two Nipype rows that is the whole stage
(NIfTI reading and gzip writing, masking in the workflow row), for the others the fit alone.
All rows fit the same synthetic brain-sized volume (ellipsoid of grey matter with a white
matter band, Rician noise, ``dmriharmony.dti.synthetic``) and the same brain mask (the
median_otsu mask of the workflow, computed once up front). FA agreement with DIPY is
reported as the largest absolute difference over the mask.

With ``--accuracy`` it also re-simulates the bundled example dataset
(``bids_examples/phantom_multivendor``: seed 42, the sites of
``bids_examples/phantom_multivendor_sites.json``, 3 subjects per site + 1 traveling subject)
with the simulator's native ground truth, at the sites' SNR and at SNR 200, runs the
participant level on both and reports the FA error over white matter per site and vendor.

Usage::

    .venv/bin/python benchmarks/bench_dti.py [--shape 96 96 60] [--ndirs 64] [--method wls] \
        [--repeats 2] [--accuracy] [--quick] [--out benchmarks/results/dti.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NIPYPE_NO_ET", "1")

import numpy as np  # noqa: E402

ROWS = ["dipy", "ours", "node", "workflow"]
#: the data are written by a subprocess too: Linux keeps ru_maxrss across fork/exec, so the
#: parent process must stay small for the children's peaks to be theirs.
MAKE = "make"
LABELS = {"dipy": "dipy TensorModel.fit (peer)", "ours": "dmriharmony fit_tensor",
          "node": "dmriharmony FitTensor node", "workflow": "dmriharmony participant wf"}


def make_data(folder: Path, shape: tuple[int, int, int], ndirs: int, seed: int) -> dict:
    """Write the benchmark DWI (b=0 x 5 + one b=1000 shell) and its median_otsu mask."""
    import nibabel as nib

    from dmriharmony.dti.mask import brain_mask
    from dmriharmony.dti.synthetic import gradient_scheme, synth_dwi, tensor_phantom

    labels = tensor_phantom(shape)["labels"]
    bvals, bvecs = gradient_scheme(ndirs, (1000.0,), n_b0=5)
    data, _ = synth_dwi(labels, bvals, bvecs, snr=30, seed=seed)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), str(folder / "dwi.nii.gz"))
    np.savetxt(folder / "dwi.bval", bvals[None], fmt="%g")
    np.savetxt(folder / "dwi.bvec", bvecs.T, fmt="%.6f")
    mask = brain_mask(data, bvals)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), str(folder / "mask.nii.gz"))
    return {"n_voxels": int(mask.sum()), "n_volumes": int(len(bvals))}


def worker(row: str, folder: Path, method: str, tag: str = "0") -> dict:
    """Run one row in this process; return timings, peak RSS and FA."""
    import nibabel as nib

    from dmriharmony.dti.gradients import make_gtab, read_bvals, read_bvecs

    out: dict = {}
    t_all = time.perf_counter()
    if row in ("dipy", "ours"):
        img = nib.load(str(folder / "dwi.nii.gz"))
        data = np.asarray(img.dataobj, np.float32)
        mask = np.asarray(nib.load(str(folder / "mask.nii.gz")).dataobj) > 0
        bvals = read_bvals(folder / "dwi.bval")
        bvecs = read_bvecs(folder / "dwi.bvec", len(bvals))
        gtab = make_gtab(bvals, bvecs)
        t0 = time.perf_counter()
        if row == "dipy":
            from dipy.reconst.dti import TensorModel

            fit = TensorModel(gtab, fit_method=method.upper()).fit(data, mask=mask)
            fa = np.clip(np.nan_to_num(fit.fa), 0, 1)
            _ = (fit.md, fit.ad, fit.rd)
        else:
            from dmriharmony.dti.fit import fit_tensor

            fa = fit_tensor(data, gtab, mask, method=method).fa
        out["fit_s"] = time.perf_counter() - t0
        np.save(folder / f"fa_{row}.npy", fa)
    elif row == "node":
        from nipype.pipeline import engine as pe

        from dmriharmony.interfaces.dti import FitTensor

        node = pe.Node(FitTensor(dwi_file=str(folder / "dwi.nii.gz"),
                                 bval_file=str(folder / "dwi.bval"),
                                 bvec_file=str(folder / "dwi.bvec"),
                                 mask_file=str(folder / "mask.nii.gz"), method=method),
                       name="fit_tensor", base_dir=str(folder / f"work_node_{tag}"))
        t0 = time.perf_counter()
        res = node.run()
        out["fit_s"] = time.perf_counter() - t0
        np.save(folder / f"fa_{row}.npy", np.asarray(nib.load(res.outputs.fa).dataobj))
    else:
        from dmriharmony.workflows.participant import (
            ParticipantOptions,
            init_participant_wf,
        )

        wf = init_participant_wf(options=ParticipantOptions(fit_method=method))
        wf.base_dir = str(folder / f"work_wf_{tag}")
        wf.inputs.inputnode.dwi_file = str(folder / "dwi.nii.gz")
        wf.inputs.inputnode.bval_file = str(folder / "dwi.bval")
        wf.inputs.inputnode.bvec_file = str(folder / "dwi.bvec")
        t0 = time.perf_counter()
        wf.run()
        out["fit_s"] = time.perf_counter() - t0
        fa_file = next((folder / f"work_wf_{tag}").glob("**/fit_tensor/dti_fa.nii.gz"))
        np.save(folder / f"fa_{row}.npy", np.asarray(nib.load(str(fa_file)).dataobj))
    out["total_s"] = time.perf_counter() - t_all
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return out


def accuracy_tables(folder: Path, nprocs: int = 2) -> str:
    """FA/MD error vs native ground truth on the example dataset's design (two SNR levels)."""
    from dmriharmony.cli.run import main as bids_app
    from dmriharmony.dti.accuracy import groundtruth_errors, summarize_errors
    from dmriharmony.simulate.dataset import simulate_dataset

    repo = Path(__file__).resolve().parents[1]
    sites = json.loads((repo / "bids_examples" / "phantom_multivendor_sites.json").read_text())
    parts = []
    for label, snr in (("the sites' own SNR (as in bids_examples)", "site"),
                       ("SNR 200", 200.0)):
        tag = "site" if snr == "site" else "hi"
        root = simulate_dataset(folder / f"sim_{tag}", seed=42, subjects_per_site=3,
                                traveling_subjects=1, sites=sites, snr=snr,
                                native_groundtruth=True, progress=False)
        out = folder / f"out_{tag}"
        t0 = time.perf_counter()
        code = bids_app([str(root), str(out), "participant", "--nprocs", str(nprocs)])
        wall = time.perf_counter() - t0
        if code != 0:
            raise RuntimeError(f"participant level failed with exit code {code}")
        rows = []
        for metric in ("fa", "md"):
            err = groundtruth_errors(root, out / "dmriharmony", metric=metric)
            tab = summarize_errors(err, ["site", "vendor"])
            tab.insert(0, "metric", metric)
            rows.append(tab)
        import pandas as pd

        tab = pd.concat(rows, ignore_index=True)
        lines = [f"Participant level at {label}: {len(err)} runs in {wall:.0f} s "
                 f"(--nprocs {nprocs}); median over runs of each run's median error over WM "
                 "(truth FA >= 0.2); snr = our QC estimate.", "",
                 "| metric | site | vendor | runs | QC SNR | median abs error | bias "
                 "| worst run |", "|---|---|---|---|---|---|---|---|"]
        for _, r in tab.iterrows():
            scale = 1.0 if r["metric"] == "fa" else 1e3
            unit = "" if r["metric"] == "fa" else " e-3"
            lines.append(f"| {r['metric']} | {r['site']} | {r['vendor']} | {r['runs']} | "
                         f"{r['snr']:.1f} | {r['median_abs_error'] * scale:.4f}{unit} | "
                         f"{r['bias'] * scale:+.4f}{unit} | {r['worst_run'] * scale:.4f}{unit} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def run_row(row: str, folder: Path, method: str, tag: str = "0",
            extra: list[str] | None = None) -> dict:
    """Run ``row`` in a fresh subprocess (fresh Nipype work folder per ``tag``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "NIPYPE_NO_ET": "1"}
    proc = subprocess.run([sys.executable, __file__, "--worker", row, "--folder", str(folder),
                           "--method", method, "--tag", tag, *(extra or [])],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{row} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", type=int, nargs=3, default=[96, 96, 60])
    p.add_argument("--ndirs", type=int, default=64)
    p.add_argument("--method", default="wls", choices=["wls", "ols", "nlls", "restore"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="runs per row (best time kept)")
    p.add_argument("--quick", action="store_true", help="small volume (smoke test)")
    p.add_argument("--accuracy", action="store_true",
                   help="also the ground-truth error per site/vendor on the example design")
    p.add_argument("--out", type=Path)
    p.add_argument("--worker", choices=ROWS + [MAKE], help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--tag", default="0", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shape = (32, 32, 20) if args.quick else tuple(args.shape)
    if args.worker == MAKE:
        print(json.dumps(make_data(args.folder, shape, args.ndirs, args.seed)))
        return 0
    if args.worker:
        print(json.dumps(worker(args.worker, args.folder, args.method, args.tag)))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_dti_") as tmp:
        folder = Path(tmp)
        info = run_row(MAKE, folder, args.method, extra=[
            "--shape", *map(str, shape), "--ndirs", str(args.ndirs), "--seed", str(args.seed)])
        results = {}
        for row in ROWS:
            best = None
            for rep in range(args.repeats):
                r = run_row(row, folder, args.method, tag=str(rep))
                if best is None or r["fit_s"] < best["fit_s"]:
                    best = r
            results[row] = best
        ref = np.load(folder / "fa_dipy.npy")
        import nibabel as nib

        mask = np.asarray(nib.load(str(folder / "mask.nii.gz")).dataobj) > 0
        for row in ROWS:
            fa = np.load(folder / f"fa_{row}.npy")
            results[row]["fa_maxdiff"] = float(np.max(np.abs(fa[mask] - ref[mask])))
        accuracy = accuracy_tables(folder) if args.accuracy else ""
    nvox = info["n_voxels"]
    base = results["dipy"]
    lines = [
        f"DTI fit ({args.method.upper()}), volume {shape[0]}x{shape[1]}x{shape[2]}, "
        f"{info['n_volumes']} volumes (5 b=0 + {args.ndirs} at b=1000), {nvox} mask voxels, "
        "single thread (OMP/BLAS = 1), best of "
        f"{args.repeats}.",
        "",
        "| implementation | fit time (s) | voxels/s | time ratio vs DIPY | process total (s) "
        "| peak RSS (MiB) | max abs FA diff vs DIPY |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        r = results[row]
        lines.append(
            f"| {LABELS[row]} | {r['fit_s']:.2f} | {nvox / r['fit_s']:,.0f} | "
            f"{r['fit_s'] / base['fit_s']:.2f} | {r['total_s']:.2f} | {r['maxrss_mb']:.0f} | "
            f"{r['fa_maxdiff']:.1e} |")
    table = "\n".join(lines)
    load = os.getloadavg()
    note = (f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}; load average at the end "
            f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (other jobs share the CPUs).\n")
    cmd = "`.venv/bin/python benchmarks/bench_dti.py " + " ".join(argv or sys.argv[1:]) + "`"
    text = f"# DTI stage benchmark\n\nCommand: {cmd}\n\n## Speed and memory\n\n{table}\n{note}"
    if accuracy:
        text += f"\n## Accuracy against the simulator's ground truth\n\n{accuracy}\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
