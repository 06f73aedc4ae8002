"""A participant-level output folder made from the ROI-table simulator (no DWI processing).

Writes what the participant level leaves for the group level — ``participants.tsv`` in a BIDS
folder, ``<out>/dmriharmony/site_table.tsv`` and one ``*_space-phantom_desc-skeleton_roi.tsv``
per run with an FA and an MD row — from :func:`dmriharmony.simulate.roi_table.simulate_roi_table`
(known dx/age effects, ComBat-type site effects, traveling subjects scanned at every site).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from dmriharmony.simulate.roi_table import simulate_roi_table

VENDORS = ("GE", "Siemens", "Philips", "GE", "Siemens", "Philips")


def make_group_input(root: Path, *, n_sites: int = 3, n_per_site: int = 12, n_features: int = 6,
                     n_traveling: int = 2, seed: int = 3, first: int = 0) -> dict:
    """Create ``root/bids`` and ``root/out/dmriharmony``; return paths and the simulator info.

    ``first`` offsets the subject numbers (a later batch of the same sites).
    """
    fa, info = simulate_roi_table(n_sites=n_sites, n_per_site=n_per_site, n_features=n_features,
                                  seed=seed, n_traveling=n_traveling)
    md, _ = simulate_roi_table(n_sites=n_sites, n_per_site=n_per_site, n_features=n_features,
                               seed=seed + 100, n_traveling=n_traveling)
    feats = info["features"]
    md[feats] = md[feats] * 1e-3 + 0.3e-3
    empty = pd.DataFrame(columns=fa.columns)
    trav_fa = info["traveling"] if info["traveling"] is not None else empty
    trav_md = simulate_roi_table(n_sites=n_sites, n_per_site=n_per_site, n_features=n_features,
                                 seed=seed + 100, n_traveling=n_traveling)[1]["traveling"]
    trav_md = trav_md.copy() if trav_md is not None else empty.copy()
    trav_md[feats] = trav_md[feats].astype(float) * 1e-3 + 0.3e-3
    bids = root / "bids"
    deriv = root / "out" / "dmriharmony"
    bids.mkdir(parents=True, exist_ok=True)
    deriv.mkdir(parents=True, exist_ok=True)
    (bids / "dataset_description.json").write_text(json.dumps(
        {"Name": "simulated ROI study", "BIDSVersion": "1.10.0"}))

    def label(s: str) -> str:
        s = s.replace("sub-", "")
        return f"{int(s) + first:05d}" if s.isdigit() else s

    parts, sites = [], []
    for _, r in fa.iterrows():
        parts.append({"participant_id": f"sub-{label(r['subject'])}", "age": r["age"],
                      "sex": "M" if r["sex"] else "F", "dx": int(r["dx"]), "traveling": "no"})
    for sub in trav_fa["subject"].unique():
        r = trav_fa[trav_fa["subject"] == sub].iloc[0]
        parts.append({"participant_id": f"sub-{label(sub)}", "age": r["age"],
                      "sex": "M" if r["sex"] else "F", "dx": int(r["dx"]), "traveling": "yes"})
    pd.DataFrame(parts).to_csv(bids / "participants.tsv", sep="\t", index=False)

    def write_run(sub: str, ses: str | None, site: str, row_fa, row_md) -> None:
        folder = deriv / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "dwi"
        folder.mkdir(parents=True, exist_ok=True)
        prefix = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
        rows = []
        for metric, row in (("FA", row_fa), ("MD", row_md)):
            rows.append({"subject": sub, "session": ses or "n/a", "run": "n/a", "metric": metric,
                         **{f: row[f] for f in feats}})
        pd.DataFrame(rows).to_csv(folder / f"{prefix}_space-phantom_desc-skeleton_roi.tsv",
                                  sep="\t", index=False, float_format="%.8g")
        k = int(site.replace("site", ""))
        sites.append({"subject": sub, "session": ses or "n/a", "run": "n/a", "site": site,
                      "vendor": VENDORS[k % len(VENDORS)], "model": f"model{k}",
                      "field": 3.0, "shells": "0,1000", "n_dirs": 30,
                      "dwi": f"sub-{sub}/dwi/{prefix}_dwi.nii.gz"})

    for i in range(len(fa)):
        write_run(label(fa["subject"].iloc[i]), None, fa["site"].iloc[i], fa.iloc[i], md.iloc[i])
    for i in range(len(trav_fa)):
        site = trav_fa["site"].iloc[i]
        write_run(label(trav_fa["subject"].iloc[i]), site, site, trav_fa.iloc[i],
                  trav_md.iloc[i])
    pd.DataFrame(sites).to_csv(deriv / "site_table.tsv", sep="\t", index=False)
    return {"bids": bids, "out": root / "out", "deriv": deriv, "info": info, "fa": fa, "md": md,
            "features": feats}
