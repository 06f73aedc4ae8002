"""The steps of out-of-core voxel ComBat: design, per-chunk statistics, pooling, adjustment.

ComBat (Johnson, Li & Rabinovic 2007; Fortin et al. 2017) is feature-wise except for one step:
the empirical-Bayes hyper-parameters (``gamma_bar``, ``t2``, ``a_prior``, ``b_prior`` per site,
Johnson et al. 2007 section 3.1) are moments of the site estimates across *all* features, and
the parametric EB iteration stops by a rule over all features (sva's ``it.sol``). So the fit
splits into

1. :func:`chunk_stats_array` -- per voxel chunk (only its columns of the subjects x voxels
   matrix are read): the location model ``B_hat`` (site block + covariates, OLS), the pooled
   variance ``sigma_v^2`` and, per site, the sufficient statistics of the standardised data
   ``z`` (number of observed values, mean, sum of squared deviations); ``gamma_hat`` and
   ``delta_hat`` follow from them (Johnson et al. 2007 eqs. 2.2-2.3);
2. :func:`pool_stats_arrays` -- all voxels' statistics (O(sites x voxels) memory, never
   subjects x voxels) go through exactly the empirical-Bayes code of the in-memory
   :class:`~dmriharmony.harmonizers.combat.ComBat` (:mod:`~dmriharmony.harmonizers._combat_eb`);
   the result is the state of a fitted ``ComBat`` over every voxel;
3. :func:`adjust_array` -- per chunk, the ComBat adjustment (Johnson et al. 2007 eq. 2.4) with
   the model's columns of that chunk, by ``ComBat``'s own code.

Each step also exists as a function of file paths (:func:`write_design`, :func:`chunk_stats`,
:func:`pool_chunks`, :func:`adjust_chunk`) returning file paths, so that a Nipype ``MapNode``
can spread the chunks over processes or cluster jobs. Every file is written atomically.

The per-chunk statistics mirror ``ComBat._fit_native`` line by line (the regression, residual,
pooled-variance and adjustability helpers are imported from :mod:`.combat`), so the result equals
the in-memory fit to rounding (measured below 1e-12, see ``tests/test_voxel_combat.py``).
"""

from __future__ import annotations

import logging
import mmap
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dmriharmony._fs import set_default_mode
from dmriharmony.errors import HarmonizationError
from dmriharmony.harmonizers import _combat_eb as ebm
from dmriharmony.harmonizers._combat_io import read_model, write_model
from dmriharmony.harmonizers._design import (
    CovariateEncoder,
    as_site_labels,
    check_design_rank,
    site_onehot,
)
from dmriharmony.harmonizers.combat import (
    ComBat,
    _adjustable_features,
    _mean_square,
    _ols,
    _regress,
    _rows,
)

__all__ = [
    "Design",
    "NpyMatrix",
    "adjust_array",
    "adjust_chunk",
    "chunk_bounds",
    "chunk_stats",
    "chunk_stats_array",
    "make_design",
    "n_chunks",
    "pool_chunks",
    "pool_stats_arrays",
    "read_matrix",
    "release_pages",
    "write_design",
]

log = logging.getLogger(__name__)

DESIGN_CLASS = "VoxelComBatDesign"
STATS_CLASS = "VoxelComBatChunkStats"
MODEL_CLASS = "VoxelComBat"
_STAT_ARRAYS = ("adjustable", "grand", "beta", "var_pooled", "n_obs", "means", "ss")


# ----------------------------------------------------------------------------------------------
def n_chunks(n_voxels: int, chunk_size: int) -> int:
    """Number of voxel chunks of ``chunk_size`` columns (the last one may be shorter)."""
    if int(chunk_size) < 1:
        raise HarmonizationError(f"chunk_size must be >= 1, got {chunk_size}")
    return -(-int(n_voxels) // int(chunk_size))


def chunk_bounds(n_voxels: int, chunk_size: int, index: int) -> tuple[int, int]:
    """Column range ``[start, stop)`` of chunk ``index``."""
    total = n_chunks(n_voxels, chunk_size)
    if not 0 <= int(index) < total:
        raise HarmonizationError(
            f"chunk index {index} out of range: {n_voxels} voxels in {total} chunk(s) of"
            f" {chunk_size}"
        )
    start = int(index) * int(chunk_size)
    return start, min(start + int(chunk_size), int(n_voxels))


class NpyMatrix:
    """A 2-D float ``.npy`` on disk, read and written by blocks with positioned file I/O.

    Not a memory map on purpose: every mapped page a process touches counts in its resident set,
    and with page-cache large folios (Linux 6.x on ext4/xfs) one read fault maps a whole folio,
    so reading one column chunk of a C-order subjects x voxels map made most of the file
    resident (1.5 GB of a 1.6 GB matrix, 200,000 voxels x 2,000 subjects; ``madvise`` afterwards
    does not lower the peak). Reading or writing row segments with ``seek`` + ``readinto`` /
    ``write`` keeps the memory at the block itself; the data stay in the page cache, outside
    the process.

    Attributes
    ----------
    path : Path
    shape : (n_rows, n_cols)
    dtype : numpy dtype (as stored, any byte order)
    offset : int
        Byte offset of the data (after the ``.npy`` header).
    fortran : bool
        Column-major storage.
    """

    ndim = 2

    def __init__(self, path: str | os.PathLike, shape: tuple[int, int], dtype: Any,
                 offset: int, fortran: bool = False) -> None:
        self.path = Path(path)
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(dtype)
        self.offset = int(offset)
        self.fortran = bool(fortran)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    @classmethod
    def create(cls, path: str | os.PathLike, shape: tuple[int, int], dtype: Any) -> NpyMatrix:
        """A new C-order ``.npy`` of ``shape`` (header written, data zero-filled sparsely)."""
        dtype = np.dtype(dtype)
        with open(path, "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, {
                "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                "shape": (int(shape[0]), int(shape[1]))})
            offset = fh.tell()
            fh.truncate(offset + int(shape[0]) * int(shape[1]) * dtype.itemsize)
        return cls(path, shape, dtype, offset)

    def _runs(self, start: int, stop: int, rows: bool) -> tuple[int, int, int, int]:
        """(count, bytes per run, position of the first run, stride) of the contiguous runs
        holding rows (or columns) ``[start, stop)``."""
        n, p = self.shape
        size = self.dtype.itemsize
        width = stop - start
        if rows != self.fortran:  # rows of a C matrix / columns of a Fortran one: contiguous
            line = p if rows else n
            return 1, width * line * size, self.offset + start * line * size, 0
        count, line = (p, n) if rows else (n, p)
        return count, width * size, self.offset + start * size, line * size

    def _block(self, start: int, stop: int, rows: bool) -> np.ndarray:
        n, p = self.shape
        shape = (stop - start, p) if rows else (n, stop - start)
        return np.empty(shape[::-1] if self.fortran else shape, dtype=self.dtype)

    def read(self, start: int, stop: int, rows: bool = False) -> np.ndarray:
        """Columns (or, ``rows=True``, rows) ``[start, stop)`` as an array of the stored dtype."""
        buf = self._block(start, stop, rows)
        count, nb, pos, stride = self._runs(start, stop, rows)
        view = memoryview(buf.reshape(-1).view(np.uint8))
        with open(self.path, "rb", buffering=0) as fh:
            for r in range(count):
                fh.seek(pos + r * stride)
                done = r * nb
                while done < (r + 1) * nb:  # a read returns at most ~2 GiB
                    got = fh.readinto(view[done:(r + 1) * nb])
                    if not got:
                        raise HarmonizationError(f"voxel matrix {self.path} is truncated")
                    done += got
        return buf.T if self.fortran else buf

    def write(self, start: int, block: np.ndarray, rows: bool = False) -> None:
        """Write ``block`` as columns (or rows) ``start ...`` (cast to the stored dtype)."""
        block = np.asarray(block, dtype=self.dtype)
        stop = start + (block.shape[0] if rows else block.shape[1])
        data = np.ascontiguousarray(block.T if self.fortran else block)
        count, nb, pos, stride = self._runs(start, stop, rows)
        view = memoryview(data.reshape(-1).view(np.uint8))
        with open(self.path, "r+b", buffering=0) as fh:
            for r in range(count):
                fh.seek(pos + r * stride)
                done = r * nb
                while done < (r + 1) * nb:
                    done += fh.write(view[done:(r + 1) * nb])

    def flush(self) -> None:
        """Push written data to the disk (``fsync``)."""
        with open(self.path, "r+b") as fh:
            os.fsync(fh.fileno())

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self.read(0, self.shape[1])
        return arr if dtype is None else arr.astype(dtype)

    def __repr__(self) -> str:
        return f"NpyMatrix({str(self.path)!r}, shape={self.shape}, dtype={self.dtype})"


def _read_header(path: Path) -> NpyMatrix:
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError(f".npy format version {version} is not supported")
        offset = fh.tell()
    if len(shape) != 2 or dtype.kind != "f":
        raise HarmonizationError(
            f"voxel matrix {path} must be a 2-D float array (subjects x voxels), got"
            f" {dtype} {shape}"
        )
    mat = NpyMatrix(path, shape, dtype, offset, fortran)
    if path.stat().st_size < offset + mat.nbytes:
        raise HarmonizationError(
            f"voxel matrix {path} is truncated ({path.stat().st_size} bytes for a"
            f" {shape[0]} x {shape[1]} {dtype} array)"
        )
    return mat


def read_matrix(matrix_file: str | os.PathLike) -> NpyMatrix:
    """Open a subjects x voxels ``.npy`` for reading by blocks (:class:`NpyMatrix`; only its
    header is read)."""
    path = Path(matrix_file)
    if not path.is_file():
        raise HarmonizationError(f"voxel matrix {path} does not exist")
    try:
        return _read_header(path)
    except HarmonizationError:
        raise
    except (OSError, ValueError) as exc:
        raise HarmonizationError(f"voxel matrix {path} is not a .npy array ({exc})") from exc


def as_block_source(X: Any) -> Any:
    """A caller's whole-file memory map (e.g. ``np.load(path, mmap_mode="r")``) as the
    :class:`NpyMatrix` of its file, so that it is read by positioned I/O instead of through the
    map (see :class:`NpyMatrix`); anything else unchanged. Copy-on-write maps (``mode="c"``)
    and views stay arrays: their content may differ from the file."""
    if (isinstance(X, np.memmap) and isinstance(X.base, mmap.mmap) and X.ndim == 2
            and getattr(X, "filename", None) and X.mode in ("r", "r+", "w+")
            and (X.flags.c_contiguous or X.flags.f_contiguous)):
        return NpyMatrix(X.filename, X.shape, X.dtype, X.offset,
                         fortran=not X.flags.c_contiguous)
    return X


def release_pages(X: np.ndarray) -> None:
    """Drop a memory map's pages from this process's resident set after a block was read (they
    stay in the page cache; dirty pages of a writable map are flushed first). Only for maps that
    cannot be read as an :class:`NpyMatrix` (views, copy-on-write): it bounds the growth over
    the chunks, not the peak within one read."""
    base = getattr(X, "_mmap", None)
    if base is None or not hasattr(mmap, "MADV_DONTNEED") or not hasattr(base, "madvise"):
        return
    if getattr(X, "mode", "r") != "r":
        X.flush()
    try:
        base.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):  # not supported for this mapping: memory stays as it is
        pass


def read_columns(X: Any, start: int, stop: int) -> np.ndarray:
    """Columns ``[start, stop)`` of ``X`` (:class:`NpyMatrix`, memmap or array) as a float64
    copy; checks infinities."""
    if isinstance(X, NpyMatrix):
        block = np.array(X.read(start, stop), dtype=float)
    else:
        block = np.array(X[:, start:stop], dtype=float)
        release_pages(X)
    if np.isinf(block).any():
        col = start + int(np.flatnonzero(np.isinf(block).any(axis=0))[0])
        row = int(np.flatnonzero(np.isinf(block[:, col - start]))[0])
        raise HarmonizationError(f"the voxel matrix has an infinite value at subject row {row},"
                                 f" voxel column {col}")
    return block


# ----------------------------------------------------------------------------------------------
@dataclass
class Design:
    """Everything about the subjects that every chunk step needs (the same for all chunks).

    ``codes`` index ``sites`` (sorted labels); ``C`` is the encoded covariate block; ``counts``
    the subjects per site *of the fitted model*; ``params`` the ComBat options.
    """

    sites: list[str]
    codes: np.ndarray
    counts: np.ndarray
    C: np.ndarray
    encoder: dict[str, Any]
    covariate_names: list[str]
    ref_index: int | None
    mean_only: bool
    params: dict[str, Any]
    chunk_size: int
    n_voxels: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_subjects(self) -> int:
        return int(self.codes.shape[0])


def _params(
    parametric: bool, mean_only: bool, ref_site: str | None, eb: bool,
    categorical: list[str] | None, continuous: list[str] | None, conv: float, engine: str,
) -> dict[str, Any]:
    return {
        "parametric": bool(parametric), "mean_only": bool(mean_only),
        "ref_site": None if ref_site is None else str(ref_site), "eb": bool(eb),
        "backend": "native",
        "categorical": None if categorical is None else [str(c) for c in categorical],
        "continuous": None if continuous is None else [str(c) for c in continuous],
        "conv": float(conv), "engine": str(engine),
    }


def make_design(
    sites: Any,
    covariates: pd.DataFrame | None = None,
    *,
    chunk_size: int = 8192,
    parametric: bool = True,
    mean_only: bool = False,
    ref_site: str | None = None,
    eb: bool = True,
    categorical: list[str] | None = None,
    continuous: list[str] | None = None,
    conv: float = 1e-4,
    engine: str = "auto",
) -> Design:
    """Validate sites and covariates and encode them as ``ComBat.fit`` does.

    Same checks and messages as :meth:`ComBat.fit`: at least two sites, a known reference site,
    covariates not confounded with site; a site with a single subject switches to the mean-only
    model with a warning (sva's rule).
    """
    n_chunks(1, chunk_size)  # validates chunk_size
    labels = as_site_labels(sites)
    n = labels.shape[0]
    levels, codes = np.unique(labels, return_inverse=True)
    if levels.shape[0] < 2:
        raise HarmonizationError(f"ComBat needs at least 2 sites, got only {levels[0]!r}")
    ref_index = None
    if ref_site is not None:
        if str(ref_site) not in levels:
            raise HarmonizationError(
                f"reference site {ref_site!r} is not among the sites {list(levels)}"
            )
        ref_index = int(np.flatnonzero(levels == str(ref_site))[0])
    counts = np.bincount(codes, minlength=levels.shape[0])
    enc = CovariateEncoder(categorical, continuous)
    enc.fit(covariates, n)
    C = enc.transform(covariates, n)
    check_design_rank(site_onehot(codes, levels.shape[0], ref_index), C, enc.design_names_,
                      list(levels))
    eff_mean_only = bool(mean_only)
    if counts.min() < 2:
        if ref_index is not None and counts[ref_index] < 2:
            raise HarmonizationError(
                f"reference site {levels[ref_index]!r} has {counts[ref_index]} subject; the"
                " pooled variance is estimated on the reference site alone and needs at least 2"
            )
        if not eff_mean_only:
            single = [str(s) for s in levels[counts < 2]]
            warnings.warn(
                f"site(s) {single} have a single subject: using the mean-only ComBat for all"
                " sites (as sva::ComBat)",
                stacklevel=3,
            )
        eff_mean_only = True
    return Design(
        sites=[str(s) for s in levels], codes=codes.astype(np.int64), counts=counts, C=C,
        encoder=enc.to_dict(), covariate_names=list(enc.design_names_), ref_index=ref_index,
        mean_only=eff_mean_only,
        params=_params(parametric, mean_only, ref_site, eb, categorical, continuous, conv,
                       engine),
        chunk_size=int(chunk_size),
    )


def design_for_model(
    model: ComBat, sites: Any, covariates: pd.DataFrame | None, chunk_size: int
) -> Design:
    """Design of (new) subjects to be harmonized with a fitted model: their sites must be among
    the model's (an unseen site is an error naming it) and their covariates are encoded with the
    model's encoder."""
    n_chunks(1, chunk_size)
    labels = as_site_labels(sites)
    unseen = sorted(set(labels) - set(model.sites_))
    if unseen:
        raise HarmonizationError(
            f"site(s) {unseen} were not seen when fitting (known: {list(model.sites_)});"
            " ComBat cannot harmonize a site it has no estimates for"
        )
    codes = np.searchsorted(model.sites_, labels).astype(np.int64)
    C = model.encoder_.transform(covariates, labels.shape[0])
    return Design(
        sites=[str(s) for s in model.sites_], codes=codes, counts=np.asarray(model.n_per_site_),
        C=C, encoder=model.encoder_.to_dict(), covariate_names=list(model.covariate_names_),
        ref_index=model.ref_index_, mean_only=bool(model.mean_only_), params=model._params(),
        chunk_size=int(chunk_size), n_voxels=int(model.n_features_in_),
    )


def save_design(design: Design, path: str | os.PathLike) -> Path:
    """Write a :class:`Design` (``.npz`` + JSON header, atomic)."""
    arrays = {"codes": design.codes, "counts": design.counts, "C": design.C}
    meta = {
        "class": DESIGN_CLASS, "sites": design.sites, "encoder": design.encoder,
        "covariate_names": design.covariate_names, "ref_index": design.ref_index,
        "mean_only": design.mean_only, "params": design.params, "chunk_size": design.chunk_size,
        "n_voxels": design.n_voxels, "extra": design.extra,
    }
    return write_model(path, arrays, meta)


def load_design(path: str | os.PathLike) -> Design:
    """Read a design written by :func:`save_design`."""
    arrays, meta = read_model(path, DESIGN_CLASS)
    return Design(
        sites=list(meta["sites"]), codes=arrays["codes"].astype(np.int64),
        counts=arrays["counts"].astype(np.int64), C=arrays["C"].astype(float),
        encoder=meta["encoder"], covariate_names=list(meta["covariate_names"]),
        ref_index=meta["ref_index"], mean_only=bool(meta["mean_only"]), params=meta["params"],
        chunk_size=int(meta["chunk_size"]), n_voxels=meta.get("n_voxels"),
        extra=meta.get("extra", {}),
    )


def write_design(
    sites: Any, covariates: pd.DataFrame | None, out_file: str | os.PathLike, **options: Any
) -> Path:
    """File step 0: encode sites/covariates (:func:`make_design`) and save them to ``out_file``.

    ``options`` are those of :func:`make_design` (``chunk_size``, ``parametric``, ...).
    """
    return save_design(make_design(sites, covariates, **options), out_file)


# ----------------------------------------------------------------------------------------------
def chunk_stats_array(X: np.ndarray, design: Design) -> dict[str, np.ndarray]:
    """Pass 1 on one chunk: location/scale fit and standardised-data moments per voxel.

    Mirrors the statistics part of ``ComBat._fit_native`` (Johnson et al. 2007 eqs. 2.1-2.3):
    OLS of each voxel on ``[site one-hot | covariates]`` over its observed values, the pooled
    variance ``sigma_v^2`` (mean squared residual, over the reference site with ``ref_site``),
    ``z = (y - alpha_v - x'beta_v) / sigma_v`` and per site its count, mean and sum of squared
    deviations. Voxels ComBat cannot adjust (constant within a site, missing at a site, not
    estimable, zero pooled variance) are flagged in ``adjustable`` and their statistics are NaN.

    Parameters
    ----------
    X : ndarray (n_subjects, w)
        The chunk's columns, float64, NaN = missing.
    design : Design

    Returns
    -------
    dict with ``adjustable`` (w,), ``grand`` (w,), ``beta`` (q, w), ``var_pooled`` (w,),
    ``n_obs``, ``means``, ``ss`` (k, w).
    """
    n, w = X.shape
    if n != design.n_subjects:
        raise HarmonizationError(
            f"the voxel matrix has {n} subject rows but the design has {design.n_subjects}"
        )
    k = len(design.sites)
    ref = design.ref_index
    counts = design.counts
    site_rows = [np.flatnonzero(design.codes == i) for i in range(k)]
    site_block = site_onehot(design.codes, k, ref)
    D = np.hstack([site_block, design.C])

    finite = np.isfinite(X)
    adjustable = _adjustable_features(X, finite, site_rows, counts, design.mean_only)
    B, estimable = _regress(D, X, finite, adjustable, lambda d, y, cols: _ols(d, y))
    adjustable &= estimable
    resid = D @ np.nan_to_num(B)
    np.subtract(X, resid, out=resid)
    has_nan = ~finite.all(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        var_pooled = _mean_square(resid, None if ref is None else site_rows[ref], finite,
                                  has_nan)
        adjustable &= np.isfinite(var_pooled) & (var_pooled > 0)

    q = design.C.shape[1]
    out = {
        "adjustable": adjustable,
        "grand": np.full(w, np.nan),
        "beta": np.full((q, w), np.nan),
        "var_pooled": np.full(w, np.nan),
        "n_obs": np.full((k, w), np.nan),
        "means": np.full((k, w), np.nan),
        "ss": np.full((k, w), np.nan),
    }
    cols = np.flatnonzero(adjustable)
    if cols.size == 0:
        return out
    Bs = B[:k][:, cols]
    grand = Bs[ref] if ref is not None else (counts / n) @ Bs
    vp = var_pooled[cols]
    z = resid[:, cols]
    del resid
    for i in range(k):
        z[_rows(site_rows[i])] += site_block[site_rows[i][0]] @ Bs - grand
    z /= np.sqrt(vp)
    nan_sub = has_nan[cols]
    f = cols.shape[0]
    for i in range(k):
        zi = z[_rows(site_rows[i])]
        if not nan_sub.any():
            c = np.full(f, float(site_rows[i].shape[0]))
            m = zi.mean(axis=0)
            zi -= m
        else:
            miss = ~finite[site_rows[i]][:, cols]
            c = (~miss).sum(axis=0).astype(float)
            zi[miss] = 0.0
            m = zi.sum(axis=0) / c
            zi -= m
            zi[miss] = 0.0
        out["n_obs"][i, cols] = c
        out["means"][i, cols] = m
        out["ss"][i, cols] = np.einsum("ij,ij->j", zi, zi)
    out["grand"][cols] = grand
    out["beta"][:, cols] = B[k:][:, cols]
    out["var_pooled"][cols] = vp
    return out


def pool_stats_arrays(
    design: Design, stats: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Pooling step: empirical Bayes over all voxels, as the in-memory ComBat does.

    ``stats`` are the concatenated outputs of :func:`chunk_stats_array` over all chunks
    (voxel order). ``gamma_hat`` / ``delta_hat`` (Johnson et al. 2007 eqs. 2.2-2.3), the priors
    (:func:`~._combat_eb.gamma_prior`, :func:`~._combat_eb.delta_prior`, section 3.1) from all
    adjustable voxels, then per site the parametric fixed point (eqs. 3.1-3.2, one joint
    convergence test over all voxels as sva), the mean-only posterior, or the non-parametric
    posterior (section 3.2), which needs every voxel's estimates: O(voxels^2) time per site and
    O(voxels) memory (:func:`~._combat_eb.nonparametric_eb`).

    Returns
    -------
    arrays, meta
        The state of a fitted :class:`~dmriharmony.harmonizers.combat.ComBat` over all voxels
        (:meth:`ComBat.from_state` rebuilds it).
    """
    adjustable = stats["adjustable"].astype(bool)
    p = adjustable.shape[0]
    k = len(design.sites)
    ref = design.ref_index
    mean_only = design.mean_only
    params = design.params
    if not adjustable.any():
        raise HarmonizationError(
            "no voxel can be harmonized: every voxel is constant within a site, missing at a"
            " site, or not estimable"
        )
    n_skip = int((~adjustable).sum())
    if n_skip:
        bad = np.flatnonzero(~adjustable)
        warnings.warn(
            f"{n_skip} voxel(s) left unadjusted (constant within a site, no observed value at a"
            f" site, or not estimable), e.g. voxel column(s) {', '.join(map(str, bad[:5]))}",
            stacklevel=3,
        )
    cols = np.flatnonzero(adjustable)
    n_obs = stats["n_obs"][:, cols]
    means = stats["means"][:, cols]
    ss = stats["ss"][:, cols]
    f = cols.shape[0]
    gamma_hat = means - means[ref] if ref is not None else means.copy()
    if ref is not None:
        gamma_hat[ref] = means[ref]
    with np.errstate(divide="ignore", invalid="ignore"):
        delta_hat = np.ones((k, f)) if mean_only else ss / (n_obs - 1.0)

    gamma_star = gamma_hat.copy()
    delta_star = delta_hat.copy()
    gbar = np.full(k, np.nan)
    t2 = np.full(k, np.nan)
    a_pr = np.full(k, np.nan)
    b_pr = np.full(k, np.nan)
    if params["eb"]:
        for i in range(k):
            gbar[i], t2[i] = ebm.gamma_prior(gamma_hat[i])
            if not mean_only:
                a_pr[i], b_pr[i] = ebm.delta_prior(delta_hat[i])
            if i == ref:
                continue
            log.info("voxel ComBat: empirical Bayes for site %s (%d voxels)", design.sites[i], f)
            if params["parametric"] and mean_only:
                gamma_star[i] = ebm.mean_only_eb(gamma_hat[i], gbar[i], t2[i])
            elif params["parametric"]:
                gamma_star[i], delta_star[i] = ebm.parametric_eb(
                    n_obs[i], means[i], ss[i], gamma_hat[i], delta_hat[i],
                    gbar[i], t2[i], a_pr[i], b_pr[i], conv=params["conv"],
                )
            else:
                gamma_star[i], delta_star[i] = ebm.nonparametric_eb(
                    n_obs[i], means[i], ss[i], gamma_hat[i], delta_hat[i],
                    engine=params["engine"],
                )
            if mean_only:
                delta_star[i] = 1.0
    if ref is not None:
        gamma_star[ref] = 0.0
        delta_star[ref] = 1.0

    def full(a: np.ndarray) -> np.ndarray:
        out = np.full(a.shape[:-1] + (p,), np.nan)
        out[..., cols] = a
        return out

    arrays = {
        "n_per_site_": np.asarray(design.counts),
        "grand_mean_": stats["grand"],
        "beta_": stats["beta"],
        "var_pooled_": stats["var_pooled"],
        "gamma_hat_": full(gamma_hat),
        "delta_hat_": full(delta_hat),
        "gamma_star_": full(gamma_star),
        "delta_star_": full(delta_star),
        "gamma_bar_": gbar, "t2_": t2, "a_prior_": a_pr, "b_prior_": b_pr,
        "adjusted_": adjustable,
    }
    meta = {
        "class": "ComBat", "params": dict(params), "sites": list(design.sites),
        "ref_index": ref, "mean_only_effective": bool(mean_only), "feature_names": None,
        "n_features": int(p), "covariate_names": list(design.covariate_names),
        "encoder": design.encoder, "float32_covariates": False, "extra": {},
    }
    return arrays, meta


def concat_stats(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate per-chunk statistics along the voxel axis (chunks in voxel order)."""
    return {name: np.concatenate([s[name] for s in parts], axis=-1) for name in _STAT_ARRAYS}


_PER_VOXEL = ("grand_mean_", "beta_", "var_pooled_", "gamma_hat_", "delta_hat_",
              "gamma_star_", "delta_star_", "adjusted_")


def slice_model(model: ComBat, start: int, stop: int) -> ComBat:
    """The fitted ComBat restricted to voxel columns ``[start, stop)``."""
    arrays, meta = model.get_state()
    for name in _PER_VOXEL:
        arrays[name] = arrays[name][..., start:stop]
    meta = dict(meta, n_features=int(stop - start), feature_names=None)
    return ComBat.from_state(arrays, meta)


def adjust_array(X: np.ndarray, model: ComBat, design: Design) -> np.ndarray:
    """Pass 2 on one chunk: the ComBat adjustment of ``X`` (n, w) with ``model`` sliced to the
    chunk (:func:`slice_model`); ``ComBat``'s own ``_apply`` (Johnson et al. 2007 eq. 2.4).
    Reference-site rows, unadjusted voxels and NaN are returned unchanged."""
    if X.shape[1] != model.n_features_in_:
        raise HarmonizationError(
            f"chunk has {X.shape[1]} voxels but the model slice has {model.n_features_in_}"
        )
    if X.shape[0] != design.n_subjects:
        raise HarmonizationError(
            f"the voxel matrix has {X.shape[0]} subject rows but the design has"
            f" {design.n_subjects}"
        )
    return model._apply(X, design.codes, design.C)


# ---------------------------------------------------------------------------------------- files
def _atomic_save_npy(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
        set_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def chunk_stats(
    matrix_file: str | os.PathLike,
    design_file: str | os.PathLike,
    chunk_index: int,
    out_file: str | os.PathLike | None = None,
) -> Path:
    """File step 1 (one MapNode iteration): statistics of chunk ``chunk_index``.

    Reads only the chunk's columns of ``matrix_file``; writes ``out_file`` (default
    ``chunk-<index>_stats.npz`` in the current folder) and returns its path.
    """
    design = load_design(design_file)
    X = read_matrix(matrix_file)
    start, stop = chunk_bounds(X.shape[1], design.chunk_size, chunk_index)
    st = chunk_stats_array(read_columns(X, start, stop), design)
    out = Path(out_file if out_file is not None else f"chunk-{int(chunk_index):05d}_stats.npz")
    meta = {"class": STATS_CLASS, "chunk_index": int(chunk_index), "start": start, "stop": stop,
            "n_voxels": int(X.shape[1]), "n_subjects": int(X.shape[0])}
    return write_model(out, st, meta)


def pool_chunks(
    design_file: str | os.PathLike,
    stats_files: list[str | os.PathLike],
    out_file: str | os.PathLike,
    mask_file: str | os.PathLike | None = None,
) -> Path:
    """File step 2: pool every chunk's statistics into the fitted model file (``VoxelComBat``
    format, reloadable with :meth:`VoxelComBat.load`). The chunks may come in any order; they
    must cover the voxels exactly once."""
    from dmriharmony.harmonizers._voxel_io import mask_info

    design = load_design(design_file)
    parts = []
    for f in stats_files:
        arrays, meta = read_model(f, STATS_CLASS)
        parts.append((int(meta["start"]), int(meta["stop"]), int(meta["n_voxels"]), arrays, f))
    if not parts:
        raise HarmonizationError("no chunk statistics files to pool")
    parts.sort(key=lambda t: t[0])
    n_vox = parts[0][2]
    pos = 0
    for start, stop, nv, _, f in parts:
        if nv != n_vox or start != pos:
            raise HarmonizationError(
                f"chunk statistics {f} cover voxels [{start}, {stop}) of {nv}; expected a chunk"
                f" starting at voxel {pos} of {n_vox} (missing, duplicated or foreign chunk)"
            )
        pos = stop
    if pos != n_vox:
        raise HarmonizationError(f"chunk statistics cover voxels [0, {pos}) of {n_vox}")
    arrays, meta = pool_stats_arrays(design, concat_stats([p[3] for p in parts]))
    mask = mask_info(mask_file, n_vox) if mask_file is not None else None
    return save_model(out_file, arrays, meta, design.chunk_size, mask)


def save_model(
    path: str | os.PathLike,
    arrays: dict[str, np.ndarray],
    combat_meta: dict[str, Any],
    chunk_size: int,
    mask: dict[str, Any] | None,
) -> Path:
    """Write a VoxelComBat model: the ComBat state over voxels plus the mask grid (if any)."""
    arrays = dict(arrays)
    meta = {"class": MODEL_CLASS, "combat": combat_meta, "chunk_size": int(chunk_size),
            "mask": None}
    if mask is not None:
        arrays["mask_index"] = mask["index"]
        meta["mask"] = {"shape": list(mask["shape"]), "affine": mask["affine"]}
    return write_model(path, arrays, meta)


def load_model(path: str | os.PathLike) -> tuple[ComBat, int, dict[str, Any] | None]:
    """Read a VoxelComBat model file: (ComBat over voxels, chunk_size, mask info or None)."""
    arrays, meta = read_model(path, MODEL_CLASS)
    mask = None
    if meta.get("mask") is not None:
        mask = {"index": arrays.pop("mask_index").astype(np.int64),
                "shape": tuple(meta["mask"]["shape"]), "affine": meta["mask"]["affine"]}
    return ComBat.from_state(arrays, meta["combat"]), int(meta["chunk_size"]), mask


def adjust_chunk(
    matrix_file: str | os.PathLike,
    model_file: str | os.PathLike,
    design_file: str | os.PathLike,
    chunk_index: int,
    out_file: str | os.PathLike | None = None,
) -> Path:
    """File step 3 (one MapNode iteration): harmonize chunk ``chunk_index`` of ``matrix_file``
    with the model; writes the (n_subjects, chunk width) block as ``.npy`` in the matrix's
    dtype (default ``chunk-<index>_combat.npy`` in the current folder)."""
    model, _, _ = load_model(model_file)
    design = load_design(design_file)
    X = read_matrix(matrix_file)
    if X.shape[1] != model.n_features_in_:
        raise HarmonizationError(
            f"voxel matrix {matrix_file} has {X.shape[1]} voxels but the model {model_file} was"
            f" fitted on {model.n_features_in_}"
        )
    start, stop = chunk_bounds(X.shape[1], design.chunk_size, chunk_index)
    Y = adjust_array(read_columns(X, start, stop), slice_model(model, start, stop), design)
    out = Path(out_file if out_file is not None else f"chunk-{int(chunk_index):05d}_combat.npy")
    return _atomic_save_npy(out, Y.astype(X.dtype, copy=False))
