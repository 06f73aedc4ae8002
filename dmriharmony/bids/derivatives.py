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
BIDSIGNORE = ["*_dwimap.nii.gz", "*_dwimap.json", "*_qc.tsv", "*_qc.json", "site_table.tsv",
              "logs/", "*_qc.png", "*_roi.tsv", "*_roi.json", "*_xfm.txt", "*_xfm.npz",
              "*_xfm.json", "group"]

README = """# dmriharmony derivatives

Diffusion tensor maps fitted with DIPY by dmriharmony (participant level): per DWI run
`*_model-tensor_param-<fa|md|ad|rd|v1|tensor>_dwimap.nii.gz` (BIDS BEP016 naming), the brain
mask `*_desc-brain_mask.nii.gz` and a one-row quality-control table `*_model-tensor_qc.tsv`.
Every file has a JSON sidecar saying how it was made. `site_table.tsv` lists one row per DWI
run with its site, scanner and acquisition.

With the TBSS step (ENIGMA-style, `--template`/`--template-dir`): per run the maps in template space
(`*_space-<tpl>_model-tensor_param-<fa|md|ad|rd>_dwimap.nii.gz`), projected onto the template
skeleton (`..._desc-skeleton_dwimap.nii.gz`), the ENIGMA ROI row
(`*_space-<tpl>_desc-skeleton_roi.tsv`),
registration QC (`*_desc-tbss_qc.tsv`, `*_desc-skeleton_qc.png`) and the native-to-template
transforms (`*_from-native_to-<tpl>_mode-image_desc-<affine|syn>_xfm.*`); `group/roi_table.tsv`
joins every run's ROI row with participants.tsv and the site table.
"""

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
    source: str | Path,
    suffix: str,
    extension: str = ".nii.gz",
    *,
    space: str | None = None,
    model: str | None = None,
    param: str | None = None,
    desc: str | None = None,
) -> str:
    """File name of a derivative (entities in BIDS order).

    ``source`` is either the raw DWI file (``.../sub-01_run-1_dwi.nii.gz``) or an entity
    prefix (``sub-01_ses-A``, for inputs merged from several ``acq-`` runs).
    """
    text = str(source)
    if _SOURCE_SUFFIX.search(Path(text).name):
        prefix = source_prefix(text)
    elif re.fullmatch(r"sub-[A-Za-z0-9]+(_[a-z]+-[A-Za-z0-9]+)*", text):
        prefix = text
    else:
        raise ValueError(f"{source}: neither a BIDS DWI file nor an entity prefix")
    parts = [prefix]
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
    """Write ``dataset_description.json`` and ``.bidsignore`` of the derivatives (atomically).

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
        uri = Path(source_dir).resolve().as_uri()
        desc["SourceDatasets"] = [{"URL": uri}]
        desc["DatasetLinks"] = {"raw": uri}  # resolves the bids:raw: URIs of the sidecars
    if spatial_reference:
        desc["SpatialReference"] = spatial_reference
    path = Path(out_root) / "dataset_description.json"
    atomic_write_bytes((json.dumps(desc, indent=2) + "\n").encode(), path)
    ignore = Path(out_root) / ".bidsignore"
    atomic_write_bytes(("\n".join(BIDSIGNORE) + "\n").encode(), ignore)
    readme = Path(out_root) / "README.md"
    if not readme.exists():
        atomic_write_bytes(README.encode(), readme)
    return path


def bids_uri(path: str | Path, bids_root: str | Path | None = None,
             dataset: str = "raw") -> str:
    """``bids:raw:sub-01/dwi/sub-01_dwi.nii.gz`` (BIDS URI) or a ``file://`` URI outside it."""
    src = Path(path).resolve()
    if bids_root is not None:
        try:
            return f"bids:{dataset}:" + src.relative_to(Path(bids_root).resolve()).as_posix()
        except ValueError:
            pass
    return src.as_uri()


#: distributions whose versions every sidecar records (read from the installed metadata, so
#: that torch is never imported just to learn its version).
TOOLS = ("dipy", "nipype", "nibabel", "numpy", "scipy", "pandas", "scikit-learn", "torch")


def tool_versions() -> dict[str, str]:
    """``{"dmriharmony": ..., "dipy": ..., "torch": ...}`` (``"not installed"`` when absent)."""
    from importlib import metadata

    versions = {"dmriharmony": __version__}
    for dist in TOOLS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def provenance(
    *,
    sources: list[str | Path] | str | Path,
    description: str,
    bids_root: str | Path | None = None,
    extra: dict | None = None,
) -> dict:
    """Sidecar content saying how a derivative was made.

    ``Description``, ``Sources`` (BIDS URIs of the raw runs), ``GeneratedBy`` and
    ``ToolVersions`` (:func:`tool_versions`: dmriharmony, DIPY, Nipype, NiBabel, NumPy, SciPy,
    pandas, scikit-learn, torch), then ``extra`` (the options and fit details).
    """
    if isinstance(sources, str | Path):
        sources = [sources]
    meta = {
        "Description": description,
        "Sources": [bids_uri(s, bids_root) for s in sources],
        "GeneratedBy": {"Name": PIPELINE_NAME, "Version": __version__},
        "ToolVersions": tool_versions(),
    }
    if extra:
        meta.update(extra)
    return meta
