"""The phantom template: FA, brain mask, tissue classes and bundle labels on the 2 mm grid.

The files in ``dmriharmony/data/phantom/`` are made by :func:`write_phantom_template`
(``python -m dmriharmony.simulate.template [OUT_DIR]``) and are what TBSS-style registration and
ROI extraction of simulated data use (the ENIGMA-DTI template plays that role for real data).
The template FA is the b -> 0 FA of the template subject (age 40, no individual variation)
seen by a reference 3 T acquisition (TE 80 ms, TR 8 s).

* ``phantom_FA.nii.gz``: FA (float32, 0-1; not x10^4 like ENIGMA's);
* ``phantom_mask.nii.gz``: brain mask (voxels at least half brain tissue);
* ``phantom_tissue.nii.gz``: 0 background, 1 CSF, 2 GM, 3 WM (largest fraction);
* ``phantom_labels.nii.gz``: ICBM-DTI-81 / ENIGMA label values of the bundles;
* ``phantom_label_table.tsv``: ``index, abbreviation, name, side``.
"""

from __future__ import annotations

import argparse
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from dmriharmony.errors import TemplateError
from dmriharmony.simulate import io
from dmriharmony.simulate.anatomy import (
    BLOCK,
    BRAIN_SEMI_AXES,
    FINE_SPACING,
    TEMPLATE_SHAPE,
    TEMPLATE_SPACING,
    build_phantom,
    label_table,
    template_affine,
)
from dmriharmony.simulate.groundtruth import _block_sum, template_metrics
from dmriharmony.simulate.signal import base_microstructure
from dmriharmony.simulate.tissue import compartment_weights, relaxation_at

FILES = {
    "fa": "phantom_FA.nii.gz",
    "mask": "phantom_mask.nii.gz",
    "tissue": "phantom_tissue.nii.gz",
    "labels": "phantom_labels.nii.gz",
    "label_table": "phantom_label_table.tsv",
    "description": "phantom_template.json",
}
#: Reference acquisition of the template FA.
REFERENCE_ACQUISITION = {"field_strength": 3.0, "te_ms": 80.0, "tr_ms": 8000.0}
#: A template voxel gets the most frequent bundle label of its fine voxels when at least this
#: many of its BLOCK**3 fine voxels carry it.
LABEL_MIN_COUNT = 3


def reference_weights() -> dict[str, float]:
    r = REFERENCE_ACQUISITION
    return compartment_weights(relaxation_at(r["field_strength"]), r["te_ms"], r["tr_ms"])


def template_arrays() -> dict[str, np.ndarray]:
    """Compute the template arrays (fa, mask, tissue, labels) from the analytic phantom.

    Cached: callers get copies.
    """
    return {k: v.copy() for k, v in _template_arrays().items()}


@lru_cache(maxsize=1)
def _template_arrays() -> dict[str, np.ndarray]:
    ph = build_phantom()
    fa = template_metrics(base_microstructure(ph), reference_weights())["fa"]
    nb = BLOCK**3
    f_csf = _block_sum(ph.f_csf[:, None], ph)[..., 0] / nb
    f_gm = _block_sum(ph.f_gm[:, None], ph)[..., 0] / nb
    f_wm = _block_sum(ph.f_wm[:, None], ph)[..., 0] / nb
    brain = f_csf + f_gm + f_wm
    mask = brain >= 0.5
    tissue = np.argmax(np.stack([1.0 - brain, f_csf, f_gm, f_wm], axis=-1), axis=-1)
    # labels: most frequent non-zero label of the block's fine voxels
    lab_fine = ph.to_volume(ph.label)
    nx, ny, nz = TEMPLATE_SHAPE
    blocks = lab_fine.reshape(nx, BLOCK, ny, BLOCK, nz, BLOCK).transpose(0, 2, 4, 1, 3, 5)
    blocks = blocks.reshape(nx, ny, nz, nb)
    values = np.unique(lab_fine[lab_fine > 0])
    counts = np.stack([(blocks == v).sum(axis=-1) for v in values], axis=-1)
    best = np.argmax(counts, axis=-1)
    labels = np.where(counts.max(axis=-1) >= LABEL_MIN_COUNT, values[best], 0)
    labels = np.where(mask, labels, 0)
    fa = np.where(mask, fa, 0.0)
    return {"fa": fa.astype(np.float32), "mask": mask.astype(np.uint8),
            "tissue": np.where(mask, tissue, 0).astype(np.uint8),
            "labels": labels.astype(np.int16)}


def template_images() -> dict[str, nib.Nifti1Image]:
    aff = template_affine()
    return {k: io.make_image(v, aff) for k, v in template_arrays().items()}


def write_phantom_template(out_dir: str | Path) -> Path:
    """Write the template files (deterministic bytes) to ``out_dir``; return it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for key, img in template_images().items():
        io.write_nifti(img, out / FILES[key])
    io.write_tsv(label_table(), out / FILES["label_table"])
    desc = {
        "Name": "dmriharmony phantom template",
        "Space": "phantom",
        "Shape": list(TEMPLATE_SHAPE),
        "VoxelSizeMM": TEMPLATE_SPACING,
        "FineGridSpacingMM": FINE_SPACING,
        "BrainSemiAxesMM": list(BRAIN_SEMI_AXES),
        "Affine": template_affine().tolist(),
        "FAReferenceAcquisition": REFERENCE_ACQUISITION,
        "TissueCodes": {"0": "background", "1": "CSF", "2": "GM", "3": "WM"},
        "LabelConvention": "ICBM-DTI-81 (JHU) label values with ENIGMA-DTI abbreviations",
        "Regenerate": "python -m dmriharmony.simulate.template dmriharmony/data/phantom",
    }
    io.write_text(json.dumps(desc, indent=2) + "\n", out / FILES["description"])
    return out


def _data_dir() -> Path:
    return Path(str(resources.files("dmriharmony"))) / "data" / "phantom"


def load_phantom_template(path: str | Path | None = None) -> dict:
    """Load the phantom template.

    Parameters
    ----------
    path
        Folder with the template files; default: the copy bundled in ``dmriharmony/data``.

    Returns
    -------
    dict
        ``fa``, ``mask``, ``labels``, ``tissue`` (nibabel images on the template grid),
        ``label_table`` (DataFrame: index, abbreviation, name, side), ``affine`` (4x4).

    Raises
    ------
    TemplateError
        If a file is missing (names it and how to regenerate it).
    """
    folder = Path(path) if path is not None else _data_dir()
    out: dict = {}
    for key in ("fa", "mask", "labels", "tissue"):
        f = folder / FILES[key]
        if not f.is_file():
            raise TemplateError(f"{f}: phantom template file missing; regenerate with "
                                f"'python -m dmriharmony.simulate.template {folder}'")
        out[key] = nib.load(str(f))
    f = folder / FILES["label_table"]
    if not f.is_file():
        raise TemplateError(f"{f}: phantom label table missing; regenerate with "
                            f"'python -m dmriharmony.simulate.template {folder}'")
    out["label_table"] = pd.read_csv(f, sep="\t", dtype={"index": int, "abbreviation": str,
                                                          "name": str, "side": str},
                                     keep_default_na=False)
    out["affine"] = out["fa"].affine.copy()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write the phantom template files.")
    ap.add_argument("out_dir", nargs="?", default=str(_data_dir()))
    args = ap.parse_args(argv)
    print(write_phantom_template(args.out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
