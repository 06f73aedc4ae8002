"""BIDS-derivatives naming and dataset-level files of dmriharmony's output.

Maps follow the BIDS diffusion-derivatives proposal (BEP016):
``sub-X[_ses-Y][_acq-Z][_run-N][_space-S]_model-tensor_param-fa_dwimap.nii.gz``, the brain mask
``..._desc-brain_mask.nii.gz``. Today's validator does not know ``model``/``param``/``dwimap``,
hence a ``.bidsignore``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from dmriharmony import __version__
from dmriharmony.dti.io import atomic_write_bytes

PIPELINE_NAME = "dmriharmony"
BIDS_VERSION = "1.10.0"
BIDSIGNORE = ["*_dwimap.nii.gz", "*_dwimap.json", "*_qc.tsv", "*_qc.json", "logs/"]

_SOURCE_SUFFIX = re.compile(r"_dwi\.nii(\.gz)?$")


def source_prefix(dwi: str | Path) -> str:
    """``sub-01_ses-A_run-1`` from ``.../sub-01_ses-A_run-1_dwi.nii.gz``."""
    name = Path(dwi).name
    if not _SOURCE_SUFFIX.search(name):
        raise ValueError(f"{dwi}: not a BIDS DWI file name (*_dwi.nii[.gz])")
    return _SOURCE_SUFFIX.sub("", name)


def derivative_dir(out_root: str | Path, entities: dict) -> Path:
    """``out_root/sub-X[/ses-Y]/dwi``."""
    path = Path(out_root) / f"sub-{entities['subject']}"
    if entities.get("session") is not None:
        path = path / f"ses-{entities['session']}"
    return path / "dwi"


def derivative_name(
    dwi: str | Path,
    suffix: str,
    extension: str = ".nii.gz",
    *,
    space: str | None = None,
    model: str | None = None,
    param: str | None = None,
    desc: str | None = None,
) -> str:
    """File name of a derivative of DWI run ``dwi`` (entities in BIDS order)."""
    parts = [source_prefix(dwi)]
    for key, value in (("space", space), ("model", model), ("param", param), ("desc", desc)):
        if value is not None:
            if not re.fullmatch(r"[A-Za-z0-9]+", str(value)):
                raise ValueError(f"invalid BIDS label {key}-{value!r}")
            parts.append(f"{key}-{value}")
    return "_".join(parts) + f"_{suffix}{extension}"


def write_dataset_description(
    out_root: str | Path,
    *,
    source_dir: str | Path | None = None,
    spatial_reference: dict | None = None,
) -> Path:
    """Write ``dataset_description.json`` of the derivatives (atomically; kept if identical).

    ``GeneratedBy`` names dmriharmony and the versions of DIPY, Nipype and pybids; a custom
    template space is described by ``spatial_reference`` (BIDS ``SpatialReference``).
    """
    import bids
    import dipy
    import nipype

    desc = {
        "Name": "dmriharmony derivatives",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{
            "Name": PIPELINE_NAME,
            "Version": __version__,
            "Description": (f"DTI with DIPY {dipy.__version__}, workflow with Nipype "
                            f"{nipype.__version__}, BIDS queries with pybids {bids.__version__}"),
        }],
    }
    if source_dir is not None:
        desc["SourceDatasets"] = [{"URL": Path(source_dir).resolve().as_uri()}]
    if spatial_reference:
        desc["SpatialReference"] = spatial_reference
    path = Path(out_root) / "dataset_description.json"
    atomic_write_bytes((json.dumps(desc, indent=2) + "\n").encode(), path)
    ignore = Path(out_root) / ".bidsignore"
    atomic_write_bytes(("\n".join(BIDSIGNORE) + "\n").encode(), ignore)
    return path


def provenance(
    *,
    source: str | Path,
    description: str,
    bids_root: str | Path | None = None,
    extra: dict | None = None,
) -> dict:
    """Sidecar content saying how a derivative was made (``Sources``, software versions)."""
    import dipy
    import nipype

    src = Path(source)
    if bids_root is not None:
        try:
            src_uri = "bids:raw:" + str(src.resolve().relative_to(Path(bids_root).resolve()))
        except ValueError:
            src_uri = src.resolve().as_uri()
    else:
        src_uri = src.resolve().as_uri()
    meta = {
        "Description": description,
        "Sources": [src_uri],
        "GeneratedBy": {"Name": PIPELINE_NAME, "Version": __version__},
        "SoftwareVersions": {"dmriharmony": __version__, "dipy": dipy.__version__,
                             "nipype": nipype.__version__},
    }
    if extra:
        meta.update(extra)
    return meta
