"""Out-of-core voxelwise / skeleton ComBat for thousands of subjects (Fortin et al. 2017).

Fortin et al. (2017) harmonize FA and MD voxel by voxel in template space. With thousands of
subjects the subjects x voxels matrix (200,000 voxels x 2,000 subjects = 3.2 GB in float64) is
better kept on disk. ComBat (Johnson, Li & Rabinovic 2007) is voxel-wise except for its
empirical-Bayes priors, which are moments over all voxels; so the fit runs over voxel chunks
read from a memory-mapped ``.npy``:

1. :func:`build_voxel_matrix` -- NIfTI maps on a mask's grid -> ``(n_subjects, n_voxels)`` .npy,
   subject by subject;
2. per chunk, :func:`chunk_stats` -- location/scale fit and standardised moments per voxel;
3. :func:`pool_chunks` -- priors from all voxels' estimates and the EB posteriors, with the code
   of the in-memory :class:`~dmriharmony.harmonizers.combat.ComBat` (O(sites x voxels) memory);
4. per chunk, :func:`adjust_chunk` -- the adjusted columns;
5. :func:`write_maps` -- one harmonized NIfTI per subject.

The result equals ``ComBat().fit_transform`` on the full matrix to rounding (parametric,
non-parametric, mean-only, reference site, ``eb=False``; missing values). Steps 2 and 4 take and
return file paths, so :func:`~dmriharmony.workflows.voxel_combat.init_voxel_combat_wf` runs them
as Nipype MapNodes that a cluster plugin can spread. Peak memory of one chunk step is about
``6 x 8 x n_subjects x chunk_size`` bytes (float64 copies of the chunk, residuals, mask). The
on-disk matrices are read and written by positioned file I/O, not through memory maps
(:class:`~._voxel_steps.NpyMatrix`): mapped pages would count in the resident set, and with
page-cache large folios reading one column chunk of a map made most of the file resident
(measured at 200,000 voxels x 2,000 subjects, float32: 3,542 MiB peak through maps, 1,886 MiB
with ``madvise`` after each chunk, 544 MiB with positioned I/O;
``benchmarks/bench_voxel_combat.py``).

Cost of the non-parametric EB: it needs every voxel's estimates at once (O(voxels) memory, fine)
and O(voxels^2) time per site (sva's ``int.eprior``; here ~2 ns per voxel pair, so 200,000
voxels take ~80 s per site per core): use the parametric prior at whole-brain scale.

References
----------
Johnson WE, Li C, Rabinovic A. Biostatistics 8(1):118-127, 2007.
Fortin J-P et al. Harmonization of multi-site diffusion tensor imaging data. NeuroImage 161:
149-170, 2017.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dmriharmony._fs import set_default_mode
from dmriharmony.errors import HarmonizationError
from dmriharmony.harmonizers._voxel_io import (
    build_voxel_matrix,
    load_mask,
    mask_info,
    output_name,
    write_maps,
)
from dmriharmony.harmonizers._voxel_steps import (
    Design,
    NpyMatrix,
    adjust_array,
    adjust_chunk,
    as_block_source,
    chunk_bounds,
    chunk_stats,
    chunk_stats_array,
    concat_stats,
    design_for_model,
    load_design,
    load_model,
    make_design,
    n_chunks,
    pool_chunks,
    pool_stats_arrays,
    read_columns,
    read_matrix,
    save_design,
    save_model,
    slice_model,
    write_design,
)
from dmriharmony.harmonizers.combat import ComBat

__all__ = [
    "VoxelComBat",
    "adjust_chunk",
    "build_voxel_matrix",
    "chunk_bounds",
    "chunk_stats",
    "harmonize_maps",
    "n_chunks",
    "output_name",
    "pool_chunks",
    "write_design",
    "write_maps",
]

def _as_matrix(X: Any) -> tuple[Any, Any]:
    """A path to a .npy, or a whole-file memmap of one, is read by positioned I/O
    (:class:`~._voxel_steps.NpyMatrix`: only the chunk being processed is in memory); other
    arrays are used as they are (no copy)."""
    if isinstance(X, (str, os.PathLike)):
        mm = read_matrix(X)
        return mm, np.dtype(mm.dtype)
    src = as_block_source(X)
    if isinstance(src, NpyMatrix):
        return src, np.dtype(src.dtype)
    arr = np.asarray(X) if not isinstance(X, np.memmap) else X
    if arr.ndim != 2 or arr.dtype.kind not in "fiu":
        raise HarmonizationError(
            f"the voxel matrix must be 2-D numeric (subjects x voxels), got {arr.dtype} {arr.shape}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise HarmonizationError(f"the voxel matrix is empty (shape {arr.shape})")
    return arr, (arr.dtype if arr.dtype.kind == "f" else np.dtype(float))


class VoxelComBat:
    """ComBat over template-space voxels, fitted and applied chunk by chunk.

    Same model and options as :class:`~dmriharmony.harmonizers.combat.ComBat`; the data are a
    subjects x voxels matrix on disk (``.npy``, read by positioned I/O) or in memory, and only
    ``chunk_size`` voxel columns are held at a time.

    Parameters
    ----------
    chunk_size : int
        Voxels per chunk (memory ~ ``48 * n_subjects * chunk_size`` bytes per step).
    parametric, mean_only, ref_site, eb, categorical, continuous, conv, engine
        As :class:`ComBat`.

    Attributes
    ----------
    model_ : ComBat
        The fitted ComBat over all voxels (its ``gamma_star_`` etc. are ``(sites, voxels)``).
    sites_, n_voxels_, adjusted_ : as ``model_``.
    mask_ : dict or None
        ``index`` (flat voxel indices), ``shape``, ``affine`` of the mask the matrix came from.
    """

    def __init__(
        self,
        chunk_size: int = 8192,
        parametric: bool = True,
        mean_only: bool = False,
        ref_site: str | None = None,
        eb: bool = True,
        *,
        categorical: list[str] | None = None,
        continuous: list[str] | None = None,
        conv: float = 1e-4,
        engine: str = "auto",
    ) -> None:
        self.chunk_size = chunk_size
        self.parametric = parametric
        self.mean_only = mean_only
        self.ref_site = ref_site
        self.eb = eb
        self.categorical = categorical
        self.continuous = continuous
        self.conv = conv
        self.engine = engine

    def _options(self) -> dict[str, Any]:
        return {"chunk_size": int(self.chunk_size), "parametric": self.parametric,
                "mean_only": self.mean_only, "ref_site": self.ref_site, "eb": self.eb,
                "categorical": self.categorical, "continuous": self.continuous,
                "conv": self.conv, "engine": self.engine}

    # ------------------------------------------------------------------------------------------
    def fit(
        self,
        X: Any,
        sites: Any,
        covariates: pd.DataFrame | None = None,
        *,
        mask_file: str | os.PathLike | None = None,
    ) -> VoxelComBat:
        """Fit on a subjects x voxels matrix, one chunk of columns at a time.

        Parameters
        ----------
        X : path to ``.npy`` or 2-D array / memmap, shape (n_subjects, n_voxels)
        sites : array-like (n_subjects,)
        covariates : DataFrame with n_subjects rows, optional
        mask_file : path, optional
            Mask whose voxels are the columns (stored in the model, for :meth:`transform_maps`).
        """
        Xm, _ = _as_matrix(X)
        n, p = Xm.shape
        design = make_design(sites, covariates, **self._options())
        if design.n_subjects != n:
            raise HarmonizationError(f"sites has {design.n_subjects} labels but the voxel matrix"
                                     f" has {n} subject rows")
        parts = []
        for c in range(n_chunks(p, self.chunk_size)):
            start, stop = chunk_bounds(p, self.chunk_size, c)
            parts.append(chunk_stats_array(read_columns(Xm, start, stop), design))
        arrays, meta = pool_stats_arrays(design, concat_stats(parts))
        self.model_ = ComBat.from_state(arrays, meta)
        self.mask_ = mask_info(mask_file, p) if mask_file is not None else None
        self._set_public()
        return self

    def _set_public(self) -> None:
        m = self.model_
        self.sites_ = m.sites_
        self.n_voxels_ = int(m.n_features_in_)
        self.adjusted_ = m.adjusted_
        self.mean_only_ = m.mean_only_

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise HarmonizationError("this VoxelComBat is not fitted yet; call fit()")

    def transform(
        self,
        X: Any,
        sites: Any,
        covariates: pd.DataFrame | None = None,
        out_path: str | os.PathLike | None = None,
    ) -> Any:
        """Harmonize subjects of the fitted sites (training or new ones, with their own
        covariates), chunk by chunk.

        Returns
        -------
        ndarray (n_subjects, n_voxels) in memory when ``out_path`` is None, else the Path of the
        harmonized ``.npy`` (same dtype as ``X``; written column chunk by column chunk into a
        temporary file, then renamed into place).
        """
        self._check_fitted()
        Xm, dtype = _as_matrix(X)
        n, p = Xm.shape
        if p != self.n_voxels_:
            raise HarmonizationError(
                f"the voxel matrix has {p} voxels but the model was fitted on {self.n_voxels_}"
            )
        design = design_for_model(self.model_, sites, covariates, int(self.chunk_size))
        if design.n_subjects != n:
            raise HarmonizationError(f"sites has {design.n_subjects} labels but the voxel matrix"
                                     f" has {n} subject rows")
        if out_path is None:
            out = np.empty((n, p), dtype=float)
            tmp = None
        else:
            final = Path(out_path)
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp.npy",
                                        dir=final.parent)
            os.close(fd)
            tmp = Path(name)
            out = NpyMatrix.create(tmp, (n, p), dtype)
        try:
            for c in range(n_chunks(p, self.chunk_size)):
                start, stop = chunk_bounds(p, self.chunk_size, c)
                Y = adjust_array(
                    read_columns(Xm, start, stop), slice_model(self.model_, start, stop), design)
                if tmp is None:
                    out[:, start:stop] = Y
                else:
                    out.write(start, Y)
                del Y
            if tmp is None:
                return out
            out.flush()
            set_default_mode(tmp)
            os.replace(tmp, final)
        except BaseException:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            raise
        return final

    def fit_transform(self, X: Any, sites: Any, covariates: pd.DataFrame | None = None,
                      out_path: str | os.PathLike | None = None) -> Any:
        """:meth:`fit` then :meth:`transform` of the same subjects."""
        return self.fit(X, sites, covariates).transform(X, sites, covariates, out_path)

    def transform_maps(
        self,
        in_files: Sequence[str | os.PathLike],
        sites: Any,
        covariates: pd.DataFrame | None = None,
        out_dir: str | os.PathLike = ".",
        *,
        work_dir: str | os.PathLike | None = None,
        out_names: Sequence[str] | None = None,
    ) -> list[Path]:
        """Harmonize NIfTI maps (on the grid of the mask the model was fitted with).

        Returns the paths of the harmonized maps (``out_names`` in ``out_dir``, by default
        :func:`output_name` of each input).
        """
        self._check_fitted()
        if self.mask_ is None:
            raise HarmonizationError("the model was fitted without mask_file; it cannot map"
                                     " NIfTI voxels to its columns")
        out_dir = Path(out_dir)
        with _work(work_dir, out_dir) as wd:
            mask_path = _write_mask(self.mask_, wd / "mask.nii.gz")
            matrix = build_voxel_matrix(in_files, mask_path, wd / "matrix.npy")
            harmonized = self.transform(matrix, sites, covariates, wd / "harmonized.npy")
            names = out_names if out_names is not None else [output_name(f) for f in in_files]
            return write_maps([harmonized], mask_path, [out_dir / nm for nm in names], in_files)

    # ------------------------------------------------------------------------------------------
    def to_combat(self) -> ComBat:
        """The fitted model as an in-memory :class:`ComBat` over the voxel columns."""
        self._check_fitted()
        return self.model_

    def save(self, path: str | os.PathLike) -> Path:
        """Save to ``path`` (``.npz`` with a JSON header, no pickle; atomic)."""
        self._check_fitted()
        arrays, meta = self.model_.get_state()
        meta = dict(meta, voxel_options=self._options())
        return save_model(path, arrays, meta, int(self.chunk_size), self.mask_)

    @classmethod
    def load(cls, path: str | os.PathLike) -> VoxelComBat:
        """Load a model written by :meth:`save` or by the workflow's pooling step."""
        model, chunk_size, mask = load_model(path)
        opts = {"chunk_size": chunk_size, **model._params()}
        opts.pop("backend", None)
        obj = cls(**opts)
        obj.model_ = model
        obj.mask_ = mask
        obj._set_public()
        return obj

    def __repr__(self) -> str:
        return "VoxelComBat(" + ", ".join(f"{k}={v!r}" for k, v in self._options().items()) + ")"


# ----------------------------------------------------------------------------------------------
class _work:
    """A work folder: the given one (kept), or a temporary one inside ``out_dir`` (removed)."""

    def __init__(self, work_dir: str | os.PathLike | None, out_dir: Path) -> None:
        self.given = work_dir
        self.out_dir = out_dir

    def __enter__(self) -> Path:
        if self.given is not None:
            self.path = Path(self.given)
            self.path.mkdir(parents=True, exist_ok=True)
        else:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=".voxel_combat.", dir=self.out_dir))
        return self.path

    def __exit__(self, *exc: Any) -> None:
        if self.given is None:
            shutil.rmtree(self.path, ignore_errors=True)


def _write_mask(mask: dict[str, Any], path: Path) -> Path:
    import nibabel as nib

    vol = np.zeros(int(np.prod(mask["shape"])), dtype=np.uint8)
    vol[mask["index"]] = 1
    nib.save(nib.Nifti1Image(vol.reshape(mask["shape"]), np.asarray(mask["affine"])), str(path))
    return path


def harmonize_maps(
    in_files: Sequence[str | os.PathLike],
    mask_file: str | os.PathLike,
    sites: Any,
    covariates: pd.DataFrame | None = None,
    out_dir: str | os.PathLike = ".",
    *,
    chunk_size: int = 8192,
    model_file: str | os.PathLike | None = None,
    work_dir: str | os.PathLike | None = None,
    out_names: Sequence[str] | None = None,
    dtype: Any = np.float32,
    **options: Any,
) -> list[Path]:
    """Voxelwise ComBat of NIfTI maps, out of core: matrix -> chunked fit -> maps.

    Parameters
    ----------
    in_files : sequence of paths
        One 3-D map per subject (FA, MD, ... or skeletonised maps) on the mask's grid.
    mask_file : path
        Template brain mask or skeleton mask; its nonzero voxels are harmonized.
    sites : array-like (n_subjects,)
    covariates : DataFrame (n_subjects rows, same order as ``in_files``), optional
    out_dir : path
        Folder of the harmonized maps (named by :func:`output_name` unless ``out_names``).
    chunk_size : int
        Voxels per chunk.
    model_file : path, optional
        Also save the fitted model here (:meth:`VoxelComBat.load` harmonizes later subjects).
    work_dir : path, optional
        Where the on-disk matrices go (kept); default a temporary folder in ``out_dir``,
        removed at the end.
    dtype : numpy dtype
        Storage type of the on-disk matrices.
    **options
        ``parametric``, ``mean_only``, ``ref_site``, ``eb``, ``categorical``, ``continuous``,
        ``conv``, ``engine`` (as :class:`ComBat`).

    Returns
    -------
    list of Path, one harmonized map per input, in input order.
    """
    out_dir = Path(out_dir)
    model = VoxelComBat(chunk_size=chunk_size, **options)
    with _work(work_dir, out_dir) as wd:
        matrix = build_voxel_matrix(in_files, mask_file, wd / "matrix.npy", dtype=dtype)
        model.fit(matrix, sites, covariates, mask_file=mask_file)
        harmonized = model.transform(matrix, sites, covariates, wd / "harmonized.npy")
        names = out_names if out_names is not None else [output_name(f) for f in in_files]
        outs = write_maps([harmonized], mask_file, [out_dir / nm for nm in names], in_files)
    if model_file is not None:
        model.save(model_file)
    return outs


# re-exported for the interfaces / workflow (file-path steps) and for tests
__all__ += ["Design", "load_design", "load_mask", "load_model", "make_design", "save_design"]
