"""TBSS templates: FA image, brain mask, skeleton, skeleton distance map, ROI labels, label table.

One :class:`Template` interface, three sources:

``phantom``
    The bundled phantom of :mod:`dmriharmony.simulate` (same anatomy and bundle names as the
    simulator); its skeleton and distance map are computed by :func:`skeletonise` on the fly
    (deterministic, cached per process). The default of the demo and the tests.
``enigma``
    The ENIGMA-DTI template (Jahanshad et al., NeuroImage 81:455-469, 2013), which users download
    from the ENIGMA-DTI protocol repository, https://github.com/ENIGMA-git/ENIGMA-DTI-TBSS-Protocol
    (folder ``enigmaDTI``; the JHU labels come with it or with FSL's ``JHU-ICBM-labels-1mm``).
    A ``--template-dir`` holding these names (see :data:`ENIGMA_FILES`)::

        ENIGMA_DTI_FA.nii.gz                     FA template, 1 mm MNI (stored as FA x 10^4)
        ENIGMA_DTI_FA_mask.nii.gz                its brain mask (no orientation: FA's affine used)
        ENIGMA_DTI_FA_skeleton_mask.nii.gz       binary skeleton
        ENIGMA_DTI_FA_skeleton_mask_dst.nii.gz   distance map (optional: computed if absent)
        JHU-WhiteMatter-labels-1mm.nii.gz        JHU ICBM-DTI-81 white-matter labels
        ENIGMA_look_up_table.txt                 label -> abbreviation -> name
        mean_FA_skeleton.nii.gz                  optional: the skeleton the ROI step averages on
``study``
    A study-specific FA template built from the cohort (:mod:`dmriharmony.tbss.study`), written
    as a dmriharmony template folder.

Any template can be written to a folder (:meth:`Template.save`, a ``template.json`` plus NIfTI
files) and read back by :func:`load_template_dir`, which also recognises an ENIGMA folder; the
Nipype nodes pass such folders around.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from dmriharmony.errors import TemplateError
from dmriharmony.tbss.io import as_fraction, atomic_write, load_image, same_grid, save_nifti
from dmriharmony.tbss.roi import read_lookup_table
from dmriharmony.tbss.skeleton import (
    perpendicular_directions,
    skeleton_distance_map,
    skeletonise,
    tube_directions,
)

ENIGMA_URL = "https://github.com/ENIGMA-git/ENIGMA-DTI-TBSS-Protocol"

#: ENIGMA template folder: role -> (file name, required).
ENIGMA_FILES: dict[str, tuple[str, bool]] = {
    "fa": ("ENIGMA_DTI_FA.nii.gz", True),
    "mask": ("ENIGMA_DTI_FA_mask.nii.gz", True),
    "skeleton": ("ENIGMA_DTI_FA_skeleton_mask.nii.gz", True),
    "distance": ("ENIGMA_DTI_FA_skeleton_mask_dst.nii.gz", False),
    "labels": ("JHU-WhiteMatter-labels-1mm.nii.gz", True),
    "lookup": ("ENIGMA_look_up_table.txt", True),
    "roi_skeleton": ("mean_FA_skeleton.nii.gz", False),
}

#: dmriharmony template folder: role -> file name.
NATIVE_FILES = {
    "fa": "tpl_FA.nii.gz",
    "mask": "tpl_mask.nii.gz",
    "skeleton": "tpl_skeleton.nii.gz",
    "distance": "tpl_skeleton_dst.nii.gz",
    "directions": "tpl_skeleton_dir.nii.gz",
    "labels": "tpl_labels.nii.gz",
    "lookup": "tpl_labels.tsv",
    "roi_skeleton": "tpl_roi_skeleton.nii.gz",
}
MANIFEST = "template.json"


@dataclass
class Template:
    """A TBSS template on one grid.

    Attributes
    ----------
    name : str
        Short BIDS-safe label used as ``space-<name>`` in output names.
    fa : ndarray float32
        Template FA as a fraction.
    affine : ndarray (4, 4)
        Voxel-to-world affine shared by every image.
    mask, skeleton : ndarray bool
    distance : ndarray float32
        Skeleton distance map (voxels), :func:`skeleton_distance_map`.
    labels : ndarray int or None
        ROI label image; None when the template has none (study template without labels).
    label_table : DataFrame or None
        ``index, abbreviation, name, side``.
    roi_skeleton : ndarray bool or None
        Skeleton used for ROI means (ENIGMA's ``mean_FA_skeleton``); defaults to ``skeleton``.
    threshold : float or None
        Mean-FA threshold the skeleton was made with (None when supplied by the user).
    source : str
        ``phantom``, ``enigma``, ``study`` or ``folder``.
    """

    name: str
    fa: np.ndarray
    affine: np.ndarray
    mask: np.ndarray
    skeleton: np.ndarray
    distance: np.ndarray
    labels: np.ndarray | None = None
    label_table: pd.DataFrame | None = None
    roi_skeleton: np.ndarray | None = None
    threshold: float | None = None
    source: str = "folder"
    _directions: np.ndarray | None = field(default=None, repr=False)
    _tube: list[np.ndarray] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        shape = self.fa.shape
        for role in ("mask", "skeleton", "distance", "labels", "roi_skeleton"):
            arr = getattr(self, role)
            if arr is not None and arr.shape != shape:
                raise TemplateError(f"template {self.name}: {role} grid {arr.shape} differs "
                                    f"from FA grid {shape}")
        if (self.labels is None) != (self.label_table is None):
            raise TemplateError(f"template {self.name}: a label image needs a label table "
                                "and vice versa")
        if not np.any(self.skeleton):
            raise TemplateError(f"template {self.name}: the skeleton is empty")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.fa.shape)

    @property
    def voxel_size(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @property
    def directions(self) -> np.ndarray:
        """Tract-perpendicular line index per voxel, from the template FA (computed once)."""
        if self._directions is None:
            self._directions = perpendicular_directions(self.fa, self.mask)
        return self._directions

    @property
    def search_directions(self) -> list[np.ndarray]:
        """Projection search lines: the perpendicular, plus the second one on tube-like parts."""
        if self._tube is None:
            self._tube = tube_directions(self.fa, self.skeleton, self.directions)
        return [self.directions, *self._tube]

    @property
    def roi_mask(self) -> np.ndarray:
        return self.skeleton if self.roi_skeleton is None else self.roi_skeleton

    def image(self, data: np.ndarray) -> nib.Nifti1Image:
        """A NIfTI image of ``data`` on the template grid."""
        img = nib.Nifti1Image(np.asarray(data), self.affine)
        img.set_qform(self.affine, code=1)
        img.set_sform(self.affine, code=1)
        return img

    # -- persistence --------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Write the template as a dmriharmony template folder (atomic per file)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_nifti(self.fa.astype(np.float32), self.affine, folder / NATIVE_FILES["fa"])
        save_nifti(self.mask.astype(np.uint8), self.affine, folder / NATIVE_FILES["mask"])
        save_nifti(self.skeleton.astype(np.uint8), self.affine, folder / NATIVE_FILES["skeleton"])
        save_nifti(self.distance.astype(np.float32), self.affine,
                   folder / NATIVE_FILES["distance"])
        save_nifti(self.directions.astype(np.int8), self.affine,
                   folder / NATIVE_FILES["directions"])
        files = {k: NATIVE_FILES[k] for k in ("fa", "mask", "skeleton", "distance", "directions")}
        if self.labels is not None:
            save_nifti(self.labels.astype(np.int16), self.affine, folder / NATIVE_FILES["labels"])
            table = self.label_table[["index", "abbreviation", "name", "side"]]
            atomic_write(folder / NATIVE_FILES["lookup"],
                         lambda tmp: table.to_csv(tmp, sep="\t", index=False))
            files.update(labels=NATIVE_FILES["labels"], lookup=NATIVE_FILES["lookup"])
        if self.roi_skeleton is not None:
            save_nifti(self.roi_skeleton.astype(np.uint8), self.affine,
                       folder / NATIVE_FILES["roi_skeleton"])
            files["roi_skeleton"] = NATIVE_FILES["roi_skeleton"]
        manifest = {"name": self.name, "source": self.source, "threshold": self.threshold,
                    "files": files}
        atomic_write(folder / MANIFEST,
                     lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n"))
        return folder


def _check_name(name: str) -> str:
    if not name or not name.isalnum():
        raise TemplateError(f"template name must be alphanumeric (BIDS space label): {name!r}")
    return name


def template_from_arrays(
    fa: np.ndarray,
    affine: np.ndarray,
    mask: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    label_table: pd.DataFrame | None = None,
    name: str = "study",
    threshold: float = 0.2,
    source: str = "study",
) -> Template:
    """Build a template from a mean FA: skeleton (Smith et al. 2006) and distance map.

    Parameters
    ----------
    fa : ndarray
        Mean FA (fraction, or FA x 10^4 which is rescaled).
    affine : ndarray (4, 4)
    mask : ndarray, optional
        Brain mask; defaults to ``fa > 0``.
    labels, label_table : optional
        ROI label image on the same grid and its table.
    threshold : float
        Skeleton threshold on the mean FA (TBSS default 0.2).
    """
    fa = as_fraction(np.asarray(fa), what=f"{name} template FA")
    mask = (fa > 0) if mask is None else (np.asarray(mask) != 0)
    skel, dirs = skeletonise(fa, mask, threshold=threshold, return_directions=True)
    dist = skeleton_distance_map(mask, skel)
    lut = None if label_table is None else read_lookup_table(label_table)
    lab = None if labels is None else np.rint(np.asarray(labels)).astype(np.int32)
    return Template(_check_name(name), fa.astype(np.float32), np.asarray(affine, float), mask,
                    skel, dist, lab, lut, None, threshold, source, _directions=dirs)


# ------------------------------------------------------------------------------------------
# Source 1: the bundled phantom
# ------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _phantom_cached(threshold: float) -> Template:
    try:
        from dmriharmony.simulate import load_phantom_template
    except ImportError as exc:  # pragma: no cover - depends on the simulator being installed
        raise TemplateError(f"the bundled phantom template is unavailable ({exc})") from exc
    ph = load_phantom_template()
    table = ph["label_table"]
    if not isinstance(table, pd.DataFrame):
        table = pd.DataFrame(table)

    def _arr(x: object) -> np.ndarray:
        if isinstance(x, nib.spatialimages.SpatialImage):
            return np.asanyarray(x.dataobj)
        return np.asarray(x)

    affine = ph.get("affine")
    if affine is None:
        affine = ph["fa"].affine
    return template_from_arrays(_arr(ph["fa"]), np.asarray(affine, float), _arr(ph["mask"]),
                                _arr(ph["labels"]), table, name="phantom", threshold=threshold,
                                source="phantom")


def phantom_template(threshold: float = 0.2) -> Template:
    """The simulator's phantom template, skeletonised at ``threshold`` (cached per process)."""
    tpl = _phantom_cached(float(threshold))
    return Template(tpl.name, tpl.fa, tpl.affine, tpl.mask, tpl.skeleton, tpl.distance,
                    tpl.labels, tpl.label_table, tpl.roi_skeleton, tpl.threshold, tpl.source,
                    _directions=tpl._directions)


# ------------------------------------------------------------------------------------------
# Source 2: the ENIGMA-DTI template folder
# ------------------------------------------------------------------------------------------
def is_enigma_dir(folder: str | os.PathLike) -> bool:
    return (Path(folder) / ENIGMA_FILES["fa"][0]).is_file()


def enigma_template(template_dir: str | os.PathLike, name: str = "ENIGMA") -> Template:
    """Load the ENIGMA-DTI template from a user folder (file names: :data:`ENIGMA_FILES`).

    Handles the traps of the public files: FA x 10^4 storage, and the mask and distance map
    that carry no orientation (they take the FA template's affine). A missing distance map is
    computed as the EDT of (outside the mask) + skeleton, which is how ENIGMA's was made.
    """
    folder = Path(template_dir)
    if not folder.is_dir():
        raise TemplateError(f"ENIGMA template folder not found: {folder} (download the files "
                            f"from {ENIGMA_URL})")
    paths = {}
    for role, (fname, required) in ENIGMA_FILES.items():
        p = folder / fname
        if p.is_file() and p.stat().st_size > 0:
            paths[role] = p
        elif required:
            raise TemplateError(f"ENIGMA template file missing or empty: {p} (get it from "
                                f"{ENIGMA_URL}, folder enigmaDTI)")
    fa_img = load_image(paths["fa"], what="ENIGMA FA template")
    fa = as_fraction(np.asanyarray(fa_img.dataobj), what=str(paths["fa"]))

    def _grid(role: str) -> np.ndarray:
        img = load_image(paths[role], reference=fa_img, what=f"ENIGMA {role}")
        if not same_grid(img, fa_img):
            raise TemplateError(f"{paths[role]} is not on the grid of {paths['fa']}")
        return np.asanyarray(img.dataobj)

    mask = _grid("mask") != 0
    skel = _grid("skeleton") != 0
    dist = (_grid("distance").astype(np.float32) if "distance" in paths
            else skeleton_distance_map(mask, skel))
    labels = np.rint(_grid("labels")).astype(np.int32)
    roi_skel = (_grid("roi_skeleton") != 0) if "roi_skeleton" in paths else None
    lut = read_lookup_table(paths["lookup"])
    return Template(_check_name(name), fa, fa_img.affine.astype(float), mask, skel, dist,
                    labels, lut, roi_skel, None, "enigma")


# ------------------------------------------------------------------------------------------
# Folders and the single entry point
# ------------------------------------------------------------------------------------------
def load_template_dir(folder: str | os.PathLike) -> Template:
    """Read a dmriharmony template folder (``template.json``) or an ENIGMA folder."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        if is_enigma_dir(folder):
            return enigma_template(folder)
        raise TemplateError(f"{folder} is neither a dmriharmony template folder ({MANIFEST}) "
                            f"nor an ENIGMA template folder ({ENIGMA_FILES['fa'][0]})")
    try:
        meta = json.loads(manifest.read_text())
        files = meta["files"]
    except (ValueError, KeyError) as exc:
        raise TemplateError(f"template manifest {manifest} is malformed ({exc})") from exc
    fa_img = load_image(folder / files["fa"], what="template FA")

    def _arr(role: str) -> np.ndarray | None:
        if role not in files:
            return None
        img = load_image(folder / files[role], reference=fa_img, what=f"template {role}")
        if not same_grid(img, fa_img):
            raise TemplateError(f"{folder / files[role]} is not on the template FA grid")
        return np.asanyarray(img.dataobj)

    labels = _arr("labels")
    lut = read_lookup_table(folder / files["lookup"]) if "lookup" in files else None
    roi = _arr("roi_skeleton")
    dirs = _arr("directions")
    return Template(
        _check_name(meta.get("name", "custom")),
        as_fraction(np.asanyarray(fa_img.dataobj)), fa_img.affine.astype(float),
        _arr("mask") != 0, _arr("skeleton") != 0, _arr("distance").astype(np.float32),
        None if labels is None else np.rint(labels).astype(np.int32), lut,
        None if roi is None else roi != 0, meta.get("threshold"), meta.get("source", "folder"),
        _directions=None if dirs is None else dirs.astype(np.int8))


def load_template(source: str | os.PathLike = "phantom", template_dir: str | os.PathLike
                  | None = None, threshold: float = 0.2) -> Template:
    """One entry point: ``"phantom"``, ``"enigma"`` (needs ``template_dir``), or a folder.

    The ``study`` source is built from the cohort by
    :func:`dmriharmony.tbss.study.build_study_template` and then read here as a folder.
    """
    src = str(source)
    if src == "phantom":
        return phantom_template(threshold)
    if src == "enigma":
        if template_dir is None:
            raise TemplateError(f"the ENIGMA template needs --template-dir (files from "
                                f"{ENIGMA_URL})")
        return enigma_template(template_dir)
    if src in ("study", "folder"):
        if template_dir is None:
            raise TemplateError(f"template source {src!r} needs a template folder")
        return load_template_dir(template_dir)
    if Path(src).is_dir():
        return load_template_dir(src)
    raise TemplateError(f"unknown template source {src!r} (phantom, enigma, study or a folder)")
