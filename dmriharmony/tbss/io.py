"""Image input/output helpers shared by the TBSS modules.

Real template files have traps that the TBSS steps must not trip over (checked on the public
ENIGMA-DTI files, Jahanshad et al., NeuroImage 2013):

* FA stored as FA x 10^4 (``ENIGMA_DTI_FA``, ``mean_FA_skeleton``): :func:`as_fraction` rescales;
* images without orientation (qform and sform codes 0): nibabel then invents an affine centred on
  the grid, ~18 mm away from the others. :func:`load_image` with ``reference=`` adopts the
  reference's affine when the grids match.

Outputs are written atomically (temporary file in the same folder, then ``os.replace``) so an
interrupted run never leaves a half-written image or table behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from dmriharmony._fs import set_default_mode
from dmriharmony.errors import TemplateError

ImageLike = str | os.PathLike | nib.spatialimages.SpatialImage

#: FA maps whose maximum exceeds this are taken to be stored as FA x 10^4.
FA_SCALE_DETECT = 2.0
FA_SCALE = 1.0e4


def has_orientation(img: nib.spatialimages.SpatialImage) -> bool:
    """Whether a NIfTI image carries a real orientation (qform or sform code > 0)."""
    header = img.header
    if not hasattr(header, "get_qform"):
        return True
    return int(header["qform_code"]) > 0 or int(header["sform_code"]) > 0


def load_image(
    image: ImageLike,
    reference: nib.spatialimages.SpatialImage | None = None,
    what: str = "image",
) -> nib.Nifti1Image:
    """Load a NIfTI image from a path (or pass an image through), fixing missing orientation.

    Parameters
    ----------
    image : path or nibabel image
    reference : nibabel image, optional
        When ``image`` has no orientation (qform and sform codes 0) and the same grid shape as
        ``reference``, the reference's affine is used instead of nibabel's default one.
    what : str
        Name used in error messages.

    Returns
    -------
    nibabel.Nifti1Image
    """
    if isinstance(image, nib.spatialimages.SpatialImage):
        img = image
        name = what
    else:
        path = Path(image)
        name = str(path)
        if not path.is_file() or path.stat().st_size == 0:
            raise TemplateError(f"{what} not found or empty: {path}")
        try:
            img = nib.load(str(path))
        except Exception as exc:  # nibabel raises several types for broken files
            raise TemplateError(f"{what} cannot be read as NIfTI: {path} ({exc})") from exc
    if reference is not None and not has_orientation(img):
        if tuple(img.shape[:3]) != tuple(reference.shape[:3]):
            raise TemplateError(
                f"{name} has no orientation (qform/sform codes 0) and its grid {img.shape[:3]} "
                f"differs from the reference grid {reference.shape[:3]}"
            )
        data = np.asanyarray(img.dataobj)
        fixed = nib.Nifti1Image(data, reference.affine)
        fixed.header.set_data_dtype(img.get_data_dtype())
        img = fixed
    if not isinstance(img, nib.Nifti1Image):
        img = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine)
    return img


def as_fraction(data: np.ndarray, what: str = "FA") -> np.ndarray:
    """Return FA as a fraction in [0, 1], undoing FA x 10^4 storage when detected.

    ENIGMA's template and mean skeleton are stored as FA x 10^4 (max ~8,950). Any map whose
    maximum exceeds :data:`FA_SCALE_DETECT` is divided by 10^4; other values pass unchanged.
    """
    data = np.asarray(data, dtype=np.float32)
    finite = data[np.isfinite(data)]
    if finite.size and float(finite.max()) > FA_SCALE_DETECT:
        data = data / np.float32(FA_SCALE)
        if float(np.nanmax(data)) > FA_SCALE_DETECT:
            raise TemplateError(f"{what} values exceed FA x 10^4 range (max {finite.max():g})")
    return data


def same_grid(a: nib.spatialimages.SpatialImage, b: nib.spatialimages.SpatialImage,
              atol: float = 1e-3) -> bool:
    """Whether two images share shape (first 3 axes) and affine."""
    return tuple(a.shape[:3]) == tuple(b.shape[:3]) and np.allclose(a.affine, b.affine, atol=atol)


def atomic_write(path: str | os.PathLike, writer: Callable[[str], None]) -> Path:
    """Call ``writer(tmp_path)`` then move the temporary file onto ``path``.

    The temporary file keeps the final suffixes (``.nii.gz``, ``.tsv``) so writers that infer
    the format from the name behave the same.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}-", suffix=suffix,
                               dir=str(path.parent))
    os.close(fd)
    try:
        writer(tmp)
        set_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_nifti(data: np.ndarray, affine: np.ndarray, path: str | os.PathLike,
               dtype: np.dtype | type | None = None) -> Path:
    """Write ``data`` as NIfTI (sform and qform set to ``affine``) atomically."""
    arr = np.asarray(data)
    if dtype is not None:
        arr = arr.astype(dtype)
    elif arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    elif arr.dtype == bool:
        arr = arr.astype(np.uint8)
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return atomic_write(path, lambda tmp: nib.save(img, tmp))


def stack_images(paths: list[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Stack 3-D images of one grid into a 4-D image (TBSS's ``all_FA_skeletonised``)."""
    if not paths:
        raise TemplateError("no images to stack")
    first = load_image(paths[0], what="skeletonised map")
    vols = []
    for p in paths:
        img = load_image(p, what="skeletonised map")
        if not same_grid(img, first):
            raise TemplateError(f"{p} is not on the grid of {paths[0]}")
        vols.append(np.asanyarray(img.dataobj).reshape(img.shape[:3]).astype(np.float32))
    return save_nifti(np.stack(vols, axis=-1), first.affine, out)
