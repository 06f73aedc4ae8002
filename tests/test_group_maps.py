"""Group level at ``--level voxel`` and ``--level skeleton``: the out-of-core voxel ComBat on the
participant level's template-space maps, through the CLI and its chunked MapNodes.

The maps are made here on the bundled phantom template grid: the template FA, a per-subject
age/dx effect, a per-site location and scale effect and noise (the ComBat model, Johnson et al.
2007); two traveling subjects are scanned at every site. Checked: the harmonized maps equal
ComBat fitted in memory on the same voxels, traveling subjects' between-site RMSE drops, outputs
are named and placed as BIDS derivatives with sidecars, bad options fail clearly.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from dmriharmony.cli.run import main

SITES = {"siteA": (0.00, 1.0), "siteB": (0.04, 1.4), "siteC": (-0.03, 0.7)}
N_PER_SITE = 6


def _write_map(deriv: Path, sub: str, ses: str | None, metric: str, data: np.ndarray,
               affine: np.ndarray, skeleton: bool) -> None:
    folder = deriv / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "dwi"
    folder.mkdir(parents=True, exist_ok=True)
    prefix = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
    desc = "_desc-skeleton" if skeleton else ""
    name = f"{prefix}_space-phantom_model-tensor_param-{metric}{desc}_dwimap"
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(folder / f"{name}.nii.gz"))
    (folder / f"{name}.json").write_text(json.dumps({"Template": {
        "TemplateSource": "phantom", "TemplateDir": None, "Space": "phantom"}}))


@pytest.fixture(scope="module")
def maps_study(tmp_path_factory):
    from dmriharmony.tbss.templates import load_template

    tpl = load_template("phantom", None)
    rng = np.random.default_rng(4)
    root = tmp_path_factory.mktemp("maps")
    bids, deriv = root / "bids", root / "out" / "dmriharmony"
    bids.mkdir()
    deriv.mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "maps", "BIDSVersion": "1.10.0"}')
    parts, sites = [], []
    base = np.where(tpl.mask, tpl.fa, 0.0)

    def scan(sub, ses, site, age, dx, subject_noise):
        loc, scale = SITES[site]
        biology = base * (1 - 0.002 * (age - 45) - 0.05 * dx) + subject_noise
        noise = rng.normal(0, 0.01, base.shape)
        fa = np.where(tpl.mask, biology + loc + scale * noise, 0.0)
        _write_map(deriv, sub, ses, "fa", fa, tpl.affine, skeleton=False)
        _write_map(deriv, sub, ses, "fa", np.where(tpl.skeleton, fa, 0.0), tpl.affine,
                   skeleton=True)
        sites.append({"subject": sub, "session": ses or "n/a", "run": "n/a", "site": site,
                      "vendor": "x"})

    k = 0
    for site in SITES:
        for _ in range(N_PER_SITE):
            k += 1
            age, dx = float(rng.uniform(20, 70)), int(k % 2)
            sex = "MF"[int(rng.integers(2))]
            parts.append({"participant_id": f"sub-{k:02d}", "age": age, "sex": sex,
                          "dx": dx, "traveling": "no"})
            scan(f"{k:02d}", None, site, age, dx, rng.normal(0, 0.005, base.shape))
    for t in (1, 2):
        age = float(rng.uniform(20, 70))
        parts.append({"participant_id": f"sub-T{t}", "age": age, "sex": "F", "dx": 0,
                      "traveling": "yes"})
        own = rng.normal(0, 0.005, base.shape)
        for site in SITES:
            scan(f"T{t}", site.replace("site", "s"), site, age, 0, own)
    pd.DataFrame(parts).to_csv(bids / "participants.tsv", sep="\t", index=False)
    pd.DataFrame(sites).to_csv(deriv / "site_table.tsv", sep="\t", index=False)
    return {"bids": bids, "out": root / "out", "deriv": deriv, "root": root, "template": tpl}


def _run(s, level, *extra):
    return main([str(s["bids"]), str(s["out"]), "group", "-w", str(s["root"] / "work"),
                 "--level", level, "--harmonizers", "combat", "--features", "fa",
                 "--chunk-size", "5000", *extra])


@pytest.mark.parametrize("level", ["voxel", "skeleton"])
def test_map_level_equals_in_memory_combat(maps_study, level):
    from dmriharmony.harmonizers import ComBat

    s = maps_study
    assert _run(s, level) == 0
    mask = s["template"].mask if level == "voxel" else s["template"].skeleton
    desc = "" if level == "voxel" else "_desc-skeleton"
    parts = pd.read_csv(s["bids"] / "participants.tsv", sep="\t")
    train = parts[parts["traveling"] == "no"].reset_index(drop=True)
    sites = pd.read_csv(s["deriv"] / "site_table.tsv", sep="\t").set_index("subject")
    X, out = [], []
    for pid in train["participant_id"]:
        d = s["deriv"] / pid / "dwi"
        X.append(nib.load(d / f"{pid}_space-phantom_model-tensor_param-fa{desc}_dwimap.nii.gz")
                 .get_fdata()[mask])
        harm = d / f"{pid}_space-phantom_model-tensor_param-fa_desc-{level}combat_dwimap.nii.gz"
        assert harm.is_file() and harm.with_name(harm.name.replace(".nii.gz", ".json")).is_file()
        out.append(nib.load(harm).get_fdata()[mask])
    site = [sites.loc[p[4:], "site"] for p in train["participant_id"]]
    cov = train[["age", "sex", "dx"]]
    expected = ComBat().fit_transform(np.array(X), np.array(site), cov)
    keep = np.ptp(np.array(X), axis=0) > 0  # voxels ComBat can adjust
    np.testing.assert_allclose(np.array(out)[:, keep], expected[:, keep], atol=2e-6)
    # traveling subjects: held out, harmonized with the model, between-site RMSE down
    ev = pd.read_csv(s["deriv"] / "group" / f"evaluation_desc-{level}.tsv", sep="\t")
    assert sorted(ev["subject"].astype(str)) == ["T1", "T2"]
    assert (ev["reduction"] > 0.5).all(), ev
    assert (s["deriv"] / "group" / "models" / f"{level}combat" / "fa_model.npz").is_file()
    assert not list(s["deriv"].glob(".group-*"))


def test_map_level_options_are_checked(maps_study, capsys):
    s = maps_study
    assert _run(s, "voxel", "--harmonizers", "combat,meta") == 64
    assert "--harmonizers combat" in capsys.readouterr().err
    assert _run(s, "skeleton", "--reference-site", "siteZ") == 64
    assert "siteZ" in capsys.readouterr().err
    assert main([str(s["bids"]), str(s["out"]), "group", "-w", str(s["root"] / "work"),
                 "--level", "voxel", "--harmonizers", "combat", "--features", "rd"]) == 66
    assert "no voxel-level RD maps" in capsys.readouterr().err
