"""``python -m dmriharmony.demo OUT_DIR``: participant and group levels on the bundled example.

Runs ``dmriharmony <bids_examples/...> OUT_DIR participant --template phantom`` (the BIDS App,
in-process: DTI, then TBSS onto the bundled phantom template and ENIGMA-style ROI extraction) on
the multi-vendor example dataset shipped in the repository's ``bids_examples/`` folder, then
prints where the derivatives are, a per-run summary (site, vendor, SNR, median FA in the brain
mask, registration quality, whole-skeleton FA) and, when the dataset carries the simulator's
native ground truth (``derivatives/groundtruth``), the FA error per site and vendor
(:func:`dmriharmony.dti.accuracy.groundtruth_errors`). Then the group level (``dmriharmony ...
group --harmonizers combat,covbat,gam,meta,mixed,rish,vae``) harmonizes the ROI table, prints the
evaluation summary and the path of ``report.html``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
#: the harmonizers the demo's group level runs side by side (all ROI-table methods).
GROUP_HARMONIZERS = "combat,covbat,gam,meta,mixed,rish,vae"
EXAMPLES = REPO_ROOT / "bids_examples"


def find_example_dataset(examples: Path = EXAMPLES, name: str | None = None) -> Path:
    """The example dataset to run on: ``examples/<name>``, else the first BIDS folder there."""
    if name is not None:
        path = examples / name
        if not (path / "dataset_description.json").is_file():
            raise FileNotFoundError(f"{path}: no BIDS dataset here (dataset_description.json)")
        return path
    if (examples / "dataset_description.json").is_file():
        return examples
    found = sorted(p.parent for p in examples.glob("*/dataset_description.json"))
    if not found:
        raise FileNotFoundError(f"{examples}: no example BIDS dataset found")
    return found[0]


def summarize(out_dir: Path) -> str:
    """A markdown table: one row per fitted run of the derivatives in ``out_dir/dmriharmony``."""
    import nibabel as nib
    import pandas as pd

    deriv = out_dir / "dmriharmony"
    table = pd.read_csv(deriv / "site_table.tsv", sep="\t", dtype=str, keep_default_na=False)
    lines = ["| run | site | vendor | SNR (b0) | median FA (mask) | median MD (mask) "
             "| FA-template r | skeleton FA |",
             "|---|---|---|---|---|---|---|---|"]
    for fa_path in sorted(deriv.glob("sub-*/**/*_model-tensor_param-fa_dwimap.nii.gz")):
        if "_space-" in fa_path.name:  # template-space maps of the TBSS step
            continue
        prefix = fa_path.name.split("_model-tensor")[0]
        mask_path = fa_path.with_name(f"{prefix}_desc-brain_mask.nii.gz")
        md_path = fa_path.with_name(f"{prefix}_model-tensor_param-md_dwimap.nii.gz")
        qc = pd.read_csv(fa_path.with_name(f"{prefix}_model-tensor_qc.tsv"), sep="\t")
        mask = np.asarray(nib.load(str(mask_path)).dataobj) > 0
        fa = np.asarray(nib.load(str(fa_path)).dataobj)[mask]
        md = np.asarray(nib.load(str(md_path)).dataobj)[mask]
        sub = prefix.split("_")[0][4:]
        ses = next((p[4:] for p in prefix.split("_") if p.startswith("ses-")), "n/a")
        rows = table[(table["subject"] == sub) & (table["session"] == ses)]
        site = rows["site"].iloc[0] if len(rows) else "?"
        vendor = rows["vendor"].iloc[0] if len(rows) else "?"
        corr, skel = "n/a", "n/a"
        tbss_qc = sorted(fa_path.parent.glob(f"{prefix}_space-*_desc-tbss_qc.tsv"))
        if tbss_qc:
            q = pd.read_csv(tbss_qc[0], sep="\t")
            corr = f"{float(q['fa_template_corr'].iloc[0]):.3f}"
            skel = f"{float(q['skeleton_mean_fa'].iloc[0]):.3f}"
        lines.append(f"| {prefix} | {site} | {vendor} | {float(qc['snr'].iloc[0]):.1f} | "
                     f"{np.median(fa):.3f} | {np.median(md) * 1e3:.3f}e-3 | {corr} | {skel} |")
    return "\n".join(lines)


def _markdown(table) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in table.iterrows():
        cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the BIDS-App exit code."""
    from dmriharmony.cli.run import main as bids_app

    p = argparse.ArgumentParser(prog="python -m dmriharmony.demo",
                                description="participant and group levels on the bundled example")
    p.add_argument("out_dir", type=Path, nargs="?", default=Path("demo_output"))
    p.add_argument("--dataset", help="folder name under bids_examples/ (default: the first)")
    p.add_argument("--examples", type=Path, default=EXAMPLES, help=argparse.SUPPRESS)
    p.add_argument("--nprocs", type=int, default=1)
    p.add_argument("--no-tbss", action="store_true", help="DTI maps only (faster; no group level)")
    p.add_argument("--no-group", action="store_true", help="participant level only")
    args = p.parse_args(argv)
    try:
        bids_dir = find_example_dataset(args.examples, args.dataset)
    except FileNotFoundError as exc:
        print(f"dmriharmony demo: error: {exc}", file=sys.stderr)
        return 66  # EX_NOINPUT
    out = args.out_dir.resolve()
    print(f"dmriharmony demo: participant level on {bids_dir}")
    cmd = [str(bids_dir), str(out), "participant", "-w", str(out / "work"),
           "--nprocs", str(args.nprocs)]
    if not args.no_tbss:
        cmd += ["--template", "phantom"]
    code = bids_app(cmd)
    if code != 0:
        return code
    print(summarize(out))
    if (bids_dir / "derivatives" / "groundtruth").is_dir():
        from dmriharmony.dti.accuracy import groundtruth_errors, summarize_errors

        errors = groundtruth_errors(bids_dir, out / "dmriharmony")
        if len(errors):
            table = summarize_errors(errors, ["site", "vendor"])
            print("\nFA error against the simulator's native ground truth (white matter, "
                  "truth FA >= 0.2):")
            print(_markdown(table))
    roi_table = out / "dmriharmony" / "group" / "roi_table.tsv"
    print(f"dmriharmony demo: derivatives in {out / 'dmriharmony'} "
          f"(site table: {out / 'dmriharmony' / 'site_table.tsv'}"
          + (f"; ENIGMA-style ROI table: {roi_table}" if roi_table.is_file() else "")
          + f"); Nipype cache in {out / 'work'}")
    if args.no_tbss or args.no_group:
        return 0
    print(f"dmriharmony demo: group level ({GROUP_HARMONIZERS}) on {roi_table}")
    code = bids_app([str(bids_dir), str(out), "group", "-w", str(out / "work"),
                     "--nprocs", str(args.nprocs), "--harmonizers", GROUP_HARMONIZERS,
                     "--covariates", "age,sex", "--effect", "dx"])
    if code != 0:
        return code
    summary = out / "dmriharmony" / "group" / "evaluation_summary.tsv"
    if summary.is_file():
        import pandas as pd

        s = pd.read_csv(summary, sep="\t", na_values=["n/a"])
        cols = [c for c in ("harmonizer", "param", "site_acc_before", "site_acc_after", "chance",
                            "dx_d_before", "dx_d_after", "traveling_cv_before",
                            "traveling_cv_after") if c in s.columns]
        print("\nGroup evaluation (site prediction balanced accuracy, dx Cohen's d, "
              "traveling-subject CV %):")
        print(_markdown(s[cols]))
    print(f"dmriharmony demo: report: {out / 'dmriharmony' / 'group' / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
