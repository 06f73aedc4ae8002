"""The group level's voxel and skeleton inputs: template-space maps of every run, their sites and
covariates, the mask, and which runs are traveling subjects.

``--level voxel`` harmonizes every template-brain-mask voxel of the warped maps
(``*_space-<tpl>_model-tensor_param-<m>_dwimap.nii.gz``); ``--level skeleton`` every skeleton
voxel of the TBSS-projected maps (``..._param-<m>_desc-skeleton_dwimap.nii.gz``), the voxelwise
analogue of the ENIGMA ROI table. Both with the out-of-core voxel ComBat
(:mod:`dmriharmony.harmonizers.voxel_combat`; Fortin et al., *NeuroImage* 2017, applied
voxelwise as in their DTI paper). Traveling subjects are held out of the fit, as at the ROI level
(:mod:`dmriharmony.group.table`), and harmonized with the fitted model afterwards.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from dmriharmony.errors import HarmonizationError

__all__ = ["LEVELS", "MapSet", "MissingMapsError", "collect_maps", "write_level_mask"]

LEVELS = ("voxel", "skeleton")
#: output ``desc-`` of the harmonized maps per level.
OUTPUT_DESC = {"voxel": "voxelcombat", "skeleton": "skeletoncombat"}
_ENT = re.compile(r"(sub|ses|acq|run)-([A-Za-z0-9]+)")


class MissingMapsError(HarmonizationError):
    """The participant level left no maps of the requested metric/level."""


@dataclass
class MapSet:
    """One metric's maps at one level.

    Attributes
    ----------
    table : DataFrame
        One row per run: ``subject, session, run, site, path, traveling``, the covariates.
    space : str
    template : dict
        The ``Template`` record of the participant level's sidecars (source, folder, space).
    """

    metric: str
    level: str
    table: pd.DataFrame
    space: str
    template: dict

    @property
    def train(self) -> pd.DataFrame:
        return self.table[~self.table["traveling"]].reset_index(drop=True)

    @property
    def traveling(self) -> pd.DataFrame:
        return self.table[self.table["traveling"]].reset_index(drop=True)


def _entities(path: Path) -> dict[str, str]:
    ents = dict(_ENT.findall(path.name.split("_space-")[0]))
    return {"subject": ents.get("sub"), "session": ents.get("ses"), "run": ents.get("run")}


def collect_maps(deriv_dir: str | Path, participants_tsv: str | Path, *, metric: str,
                 level: str, covariates: Sequence[str], effect: str, site: str = "site",
                 traveling_column: str = "traveling", min_per_site: int = 2) -> MapSet:
    """The template-space maps of ``metric`` for ``level``, joined with sites and covariates.

    Raises
    ------
    HarmonizationError
        No maps, several template spaces, a run without site/covariates (naming it), a site
        with too few subjects.
    """
    from dmriharmony.group.table import _traveling_mask
    from dmriharmony.tbss.roi import build_roi_table

    if level not in LEVELS:
        raise HarmonizationError(f"level {level!r}: one of {', '.join(LEVELS)}")
    deriv_dir = Path(deriv_dir)
    pattern = f"sub-*_space-*_model-tensor_param-{metric}_dwimap.nii.gz" if level == "voxel" \
        else f"sub-*_space-*_model-tensor_param-{metric}_desc-skeleton_dwimap.nii.gz"
    files = sorted(f for f in deriv_dir.glob(f"sub-*/**/{pattern}")
                   if level == "skeleton" or "_desc-" not in f.name)
    if not files:
        raise MissingMapsError(f"{deriv_dir}: no {level}-level {metric.upper()} maps "
                                 f"({pattern}); run the participant level with --template")
    spaces = sorted({f.name.split("_space-")[1].split("_")[0] for f in files})
    if len(spaces) > 1:
        raise HarmonizationError(f"{deriv_dir}: {metric} maps in several spaces "
                                 f"({', '.join(spaces)})")
    side = files[0].with_name(files[0].name.replace(".nii.gz", ".json"))
    template = json.loads(side.read_text()).get("Template", {}) if side.is_file() else {}
    rows = pd.DataFrame([{**_entities(f), "metric": metric, "path": str(f)} for f in files])
    table = build_roi_table(rows, participants_tsv, deriv_dir / "site_table.tsv")
    covs = list(dict.fromkeys([*covariates, effect]))
    for col in [site, *covs]:
        if col not in table.columns:
            raise HarmonizationError(f"column {col!r} is not in participants.tsv or the site "
                                     "table")
        bad = table[col].isna()
        if bad.any():
            raise HarmonizationError(f"sub-{table.loc[bad, 'subject'].iloc[0]}: {col!r} is "
                                     "missing (n/a)")
    table[site] = table[site].astype(str)
    table["traveling"] = _traveling_mask(table, site, traveling_column)
    counts = table.loc[~table["traveling"], site].value_counts()
    if len(counts) < 2:
        raise HarmonizationError("fewer than two sites among the non-traveling runs")
    if (counts < min_per_site).any():
        raise HarmonizationError(f"site {counts.idxmin()!r} has {int(counts.min())} "
                                 f"non-traveling subject(s); ComBat needs {min_per_site}")
    return MapSet(metric=metric, level=level, table=table, space=spaces[0], template=template)


def write_level_mask(maps: MapSet, path: str | Path) -> Path:
    """The voxels harmonized: the template brain mask (voxel) or its skeleton (skeleton).

    The template is the participant level's (from the maps' sidecars); without that record,
    the voxels non-zero in every training map.
    """
    from dmriharmony.tbss.templates import load_template

    ref = nib.load(maps.table["path"].iloc[0])
    mask = None
    if maps.template.get("TemplateSource"):
        tpl = load_template(maps.template["TemplateSource"], maps.template.get("TemplateDir"))
        mask = tpl.mask if maps.level == "voxel" else tpl.skeleton
        if mask.shape != ref.shape[:3]:
            raise HarmonizationError(f"template {tpl.name} grid {mask.shape} differs from the "
                                     f"maps' {ref.shape[:3]}")
    if mask is None:
        mask = np.ones(ref.shape[:3], bool)
        for p in maps.train["path"]:
            mask &= np.asarray(nib.load(p).dataobj) != 0
    path = Path(path)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), ref.affine), str(path))
    return path
