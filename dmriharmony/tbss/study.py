"""Study-specific FA template: iterative averaging of the cohort, placed in a TemplateFlow space.

TBSS's own route when no standard FA template fits the cohort (children, patients, other species;
Smith et al., NeuroImage 2006, "study-specific target"). Here:

1. the reference space is a TemplateFlow template (default ``MNI152NLin6Asym``, the space of
   FSL's FMRIB58_FA and of ENIGMA's template) fetched with the real ``templateflow.api.get``
   from its cache ``TEMPLATEFLOW_HOME`` (Ciric et al., Nat. Methods 19:1568-1571, 2022);
2. iteration 0 places every subject FA in that space by a *multimodal* rigid (optionally
   affine) registration to the template's T1w (Mattes mutual information copes with the FA/T1w
   contrast difference, white matter being bright in both) and averages;
3. each further iteration registers every FA to the current mean FA (affine + SyN, cross-
   correlation) and averages again (group-wise template building by iterative averaging,
   Guimond et al., CVIU 77:192-210, 2000);
4. the final mean FA, masked by the TemplateFlow brain mask, is skeletonised (threshold 0.2) and
   given a distance map. TemplateFlow has no FA map and no JHU labels, so ROI labels for this
   route come from the user (an image on the TemplateFlow grid) or from the phantom.

Offline, ``templateflow.api.get`` raises a ``ConnectionError`` and can leave zero-byte
placeholder files: :func:`fetch_templateflow` never trusts a file's existence and fails with one
line saying how to pre-fetch the files into ``TEMPLATEFLOW_HOME``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from tqdm import tqdm

from dmriharmony.errors import TemplateError
from dmriharmony.tbss.io import ImageLike, as_fraction, load_image, save_nifti
from dmriharmony.tbss.register import RegistrationConfig, register_to_template
from dmriharmony.tbss.templates import Template, template_from_arrays

LOGGER = logging.getLogger(__name__)

DEFAULT_SPACE = "MNI152NLin6Asym"


def _prefetch_hint(space: str, resolution: int | None, suffix: str, desc: str | None) -> str:
    home = os.environ.get("TEMPLATEFLOW_HOME", "~/.cache/templateflow")
    return (f"pre-fetch it on a machine with internet: TEMPLATEFLOW_HOME={home} python -c "
            f"\"from templateflow import api; api.get('{space}', resolution={resolution!r}, "
            f"suffix='{suffix}', desc={desc!r})\", then copy that folder to the node and set "
            "TEMPLATEFLOW_HOME")


def fetch_templateflow(space: str = DEFAULT_SPACE, resolution: int | None = 2,
                       suffix: str = "T1w", desc: str | None = None) -> Path:
    """Path of one TemplateFlow file, fetched by ``templateflow.api.get``, checked to be real.

    Raises
    ------
    TemplateError
        One line naming the file and how to pre-fetch it into ``TEMPLATEFLOW_HOME`` when the
        download fails (no network: ``ConnectionError``), the query matches nothing or several
        files, or the file is a zero-byte placeholder / not a readable NIfTI.
    """
    what = f"TemplateFlow tpl-{space} res-{resolution} desc-{desc} {suffix}"
    hint = _prefetch_hint(space, resolution, suffix, desc)
    try:
        # importing templateflow with an empty TEMPLATEFLOW_HOME already tries to download
        from templateflow import api

        found = api.get(space, resolution=resolution, suffix=suffix, desc=desc,
                        extension=".nii.gz")
    except ImportError as exc:
        raise TemplateError(f"{what}: templateflow is not installed ({exc})") from exc
    except (OSError, RuntimeError, ValueError) as exc:  # requests' ConnectionError is an OSError
        kind = type(exc).__name__
        if kind != "ConnectionError" and any(c.__name__ == "ConnectionError"
                                             for c in type(exc).__mro__):
            kind = f"ConnectionError ({kind})"
        raise TemplateError(f"{what} could not be fetched: {kind}; {hint}") from exc
    if isinstance(found, list):
        if not found:
            raise TemplateError(f"{what}: no such file in TemplateFlow; {hint}")
        raise TemplateError(f"{what}: the query matches {len(found)} files "
                            f"({', '.join(Path(f).name for f in found[:3])}); give desc/resolution")
    path = Path(found)
    if not path.is_file() or path.stat().st_size == 0:
        raise TemplateError(f"{what} is a zero-byte placeholder at {path}; {hint}")
    try:
        nib.load(str(path)).get_fdata(dtype=np.float32)
    except Exception as exc:  # a truncated download
        raise TemplateError(f"{what} at {path} is not a readable NIfTI ({exc}); {hint}") from exc
    return path


def _resample_to(img: nib.Nifti1Image, shape: tuple[int, int, int], affine: np.ndarray,
                 interpolation: str) -> np.ndarray:
    """Resample an image onto a grid of the same world space (identity transform)."""
    from dipy.align.imaffine import AffineMap

    data = np.asanyarray(img.dataobj).reshape(img.shape[:3]).astype(np.float64)
    if tuple(img.shape[:3]) == tuple(shape) and np.allclose(img.affine, affine, atol=1e-3):
        return data
    amap = AffineMap(np.eye(4), domain_grid_shape=shape, domain_grid2world=affine,
                     codomain_grid_shape=img.shape[:3], codomain_grid2world=img.affine)
    return amap.transform(data, interpolation=interpolation)


def build_study_template(
    fa_images: Sequence[ImageLike],
    out_dir: str | os.PathLike | None = None,
    space: str = DEFAULT_SPACE,
    resolution: int | None = 2,
    n_iterations: int = 2,
    labels: ImageLike | None = None,
    label_table: str | os.PathLike | pd.DataFrame | None = None,
    threshold: float = 0.2,
    config: RegistrationConfig | None = None,
    reference: tuple[ImageLike, ImageLike] | None = None,
    name: str = "study",
    placement_stages: tuple[str, ...] = ("translation", "rigid"),
) -> Template:
    """Iteratively averaged study FA template in a TemplateFlow space.

    Parameters
    ----------
    fa_images : sequence of paths or images
        The cohort's native-space FA maps (at least 2).
    out_dir : path, optional
        When given, the template folder is written there (:meth:`Template.save`) with the mean
        FA of every iteration (``iter-<k>_meanFA.nii.gz``).
    space, resolution
        TemplateFlow template and resolution index of the reference space.
    n_iterations : int
        Number of FA-to-mean (affine + SyN) iterations after the multimodal placement.
    labels, label_table : optional
        ROI label image in the TemplateFlow space and its look-up table.
    threshold : float
        Skeleton threshold (TBSS default 0.2).
    config : RegistrationConfig, optional
        Registration parameters of the FA-to-mean iterations (the placement is linear only).
    reference : (T1w, brain mask), optional
        Use these images instead of fetching ``space`` from TemplateFlow.
    name : str
        Template label used in output names (``space-<name>``).
    placement_stages : tuple of str
        Linear stages of the multimodal placement (default rigid: the template keeps the
        cohort's average size and shape, FSL's study-specific route; add ``"affine"`` to
        scale it to the TemplateFlow brain).

    Returns
    -------
    Template
    """
    if len(fa_images) < 2:
        raise TemplateError(f"a study template needs at least 2 FA maps, got {len(fa_images)}")
    if n_iterations < 0:
        raise TemplateError(f"n_iterations must be >= 0, got {n_iterations}")
    cfg = config or RegistrationConfig()
    if reference is None:
        t1_path = fetch_templateflow(space, resolution, "T1w", None)
        mask_path = fetch_templateflow(space, resolution, "mask", "brain")
    else:
        t1_path, mask_path = reference
    t1_img = load_image(t1_path, what=f"{space} T1w")
    mask_img = load_image(mask_path, reference=t1_img, what=f"{space} brain mask")
    shape, affine = tuple(t1_img.shape[:3]), t1_img.affine
    t1 = np.asanyarray(t1_img.dataobj).reshape(shape).astype(np.float64)
    brain = _resample_to(mask_img, shape, affine, "nearest") > 0
    t1 = np.where(brain, t1, 0.0)
    t1 /= max(float(np.percentile(t1[brain], 99)), 1e-6) if brain.any() else 1.0

    subjects = []
    for i, image in enumerate(fa_images):
        img = load_image(image, what=f"FA map {i}")
        data = as_fraction(np.asanyarray(img.dataobj).reshape(img.shape[:3]), what=str(image))
        subjects.append((data.astype(np.float64), img.affine))

    placement = RegistrationConfig(**{**cfg.__dict__, "syn_iters": []})
    means = []
    warped = []
    for data, aff in tqdm(subjects, desc="study template: placement in " + space, leave=False):
        reg = register_to_template(data, aff, t1, affine, placement, static_mask=brain,
                                   stages=placement_stages)
        warped.append(reg.transform(data))
    mean = np.where(brain, np.mean(warped, axis=0), 0.0)
    means.append(mean)
    LOGGER.info("study template: iteration 0 (multimodal placement) done")
    for it in range(1, n_iterations + 1):
        warped = []
        for data, aff in tqdm(subjects, desc=f"study template: iteration {it}", leave=False):
            reg = register_to_template(data, aff, mean, affine, cfg, static_mask=brain)
            warped.append(reg.transform(data))
        mean = np.where(brain, np.mean(warped, axis=0), 0.0)
        means.append(mean)
        LOGGER.info("study template: iteration %d done", it)

    lab = lut = None
    if labels is not None:
        if label_table is None:
            raise TemplateError("study template labels given without a look-up table")
        lab = np.rint(_resample_to(load_image(labels, what="study template labels"), shape,
                                   affine, "nearest")).astype(np.int32)
        lut = label_table
    mean = np.clip(mean, 0, 1).astype(np.float32)
    tpl = template_from_arrays(mean, affine, brain & (mean > 0), lab, lut, name=name,
                               threshold=threshold, source="study")
    if out_dir is not None:
        out = Path(out_dir)
        tpl.save(out)
        for k, m in enumerate(means):
            save_nifti(m.astype(np.float32), affine, out / f"iter-{k}_meanFA.nii.gz")
    return tpl
