"""Nipype interfaces over :mod:`dmriharmony.harmonizers.voxel_combat` (thin wrappers).

One interface per step of the out-of-core voxel ComBat, each taking and returning files, so
that the chunk steps run as ``MapNode`` iterations (one process or cluster job per chunk):

- :class:`VoxelMatrix`: maps + mask -> subjects x voxels ``.npy``, design file, chunk indices;
- :class:`VoxelChunkStats`: statistics of one chunk (iterate over ``chunk_index``);
- :class:`VoxelPool`: empirical-Bayes pooling over all chunks -> model file;
- :class:`VoxelAdjustChunk`: harmonized columns of one chunk (iterate over ``chunk_index``);
- :class:`VoxelWriteMaps`: harmonized NIfTI per subject;
- :class:`ApplyVoxelComBat`: harmonize later subjects with a saved model (one node).

Covariates come from a TSV with one row per input map, in the order of ``in_files``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("NIPYPE_NO_ET", "1")  # no version check over the network

import pandas as pd  # noqa: E402
from nipype.interfaces.base import (  # noqa: E402
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from dmriharmony.errors import HarmonizationError  # noqa: E402

__all__ = [
    "ApplyVoxelComBat",
    "VoxelAdjustChunk",
    "VoxelChunkStats",
    "VoxelMatrix",
    "VoxelPool",
    "VoxelWriteMaps",
]

#: Columns of the covariates TSV never used as covariates unless named.
ID_COLUMNS = ("subject", "participant_id", "session", "session_id", "run", "scan", "site",
              "in_file", "path")


def _opt(value: Any, default: Any = None) -> Any:
    return value if isdefined(value) else default


def read_covariates(path: str | None, columns: list[str] | None, n: int) -> pd.DataFrame | None:
    """Covariates TSV (one row per map, in ``in_files`` order) -> the chosen columns."""
    if path is None:
        if columns:
            raise HarmonizationError(f"covariates {columns} named but no covariates_file given")
        return None
    try:
        table = pd.read_csv(path, sep="\t")
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise HarmonizationError(f"cannot read covariates file {path}: {err}") from err
    if table.shape[0] != n:
        raise HarmonizationError(
            f"covariates file {path} has {table.shape[0]} rows but there are {n} input maps"
            " (one row per map, in the same order)"
        )
    cols = list(columns) if columns else [c for c in table.columns if c not in ID_COLUMNS]
    missing = [c for c in cols if c not in table.columns]
    if missing:
        raise HarmonizationError(f"column {missing[0]!r} not found in covariates file {path}")
    return table[cols] if cols else None


class _OptionsSpec(BaseInterfaceInputSpec):
    chunk_size = traits.Int(8192, usedefault=True, desc="voxels per chunk")
    parametric = traits.Bool(True, usedefault=True, desc="parametric empirical Bayes priors")
    mean_only = traits.Bool(False, usedefault=True, desc="adjust site locations only")
    eb = traits.Bool(True, usedefault=True, desc="empirical Bayes shrinkage")
    ref_site = traits.Str(desc="reference site left unchanged")
    categorical = traits.List(traits.Str, desc="categorical covariate columns")
    continuous = traits.List(traits.Str, desc="continuous covariate columns")
    conv = traits.Float(1e-4, usedefault=True, desc="parametric EB convergence threshold")


class _MatrixInputSpec(_OptionsSpec):
    in_files = InputMultiObject(File(exists=True), mandatory=True,
                                desc="one template-space map per subject")
    mask_file = File(exists=True, mandatory=True, desc="mask or skeleton (nonzero = voxel)")
    sites = traits.List(traits.Str, mandatory=True, desc="site label of each map")
    covariates_file = File(exists=True, desc="covariates TSV, one row per map in order")
    covariates = traits.List(traits.Str, desc="covariate columns (default: all non-ID columns)")
    dtype = traits.Enum("float32", "float64", usedefault=True, desc="on-disk matrix type")


class _MatrixOutputSpec(TraitedSpec):
    matrix_file = File(exists=True, desc="subjects x voxels .npy")
    design_file = File(exists=True, desc="encoded sites/covariates and options (.npz)")
    chunk_indices = traits.List(traits.Int, desc="0 .. n_chunks - 1 (the MapNode iterfield)")
    n_voxels = traits.Int(desc="voxels in the mask")


class VoxelMatrix(SimpleInterface):
    """Build the on-disk matrix (:func:`~dmriharmony.harmonizers.voxel_combat.build_voxel_matrix`)
    and the design file (:func:`~dmriharmony.harmonizers.voxel_combat.write_design`)."""

    input_spec = _MatrixInputSpec
    output_spec = _MatrixOutputSpec

    def _run_interface(self, runtime):
        from dmriharmony.harmonizers import voxel_combat as vc

        inp = self.inputs
        files = list(inp.in_files)
        if len(inp.sites) != len(files):
            raise HarmonizationError(f"{len(inp.sites)} site labels for {len(files)} input maps")
        cov = read_covariates(_opt(inp.covariates_file), _opt(inp.covariates), len(files))
        cwd = Path(runtime.cwd)
        matrix = vc.build_voxel_matrix(files, inp.mask_file, cwd / "matrix.npy", dtype=inp.dtype)
        design = vc.write_design(
            list(inp.sites), cov, cwd / "design.npz", chunk_size=inp.chunk_size,
            parametric=inp.parametric, mean_only=inp.mean_only, ref_site=_opt(inp.ref_site),
            eb=inp.eb, categorical=_opt(inp.categorical), continuous=_opt(inp.continuous),
            conv=inp.conv)
        n_vox = int(vc.read_matrix(matrix).shape[1])
        self._results["matrix_file"] = str(matrix)
        self._results["design_file"] = str(design)
        self._results["chunk_indices"] = list(range(vc.n_chunks(n_vox, inp.chunk_size)))
        self._results["n_voxels"] = n_vox
        return runtime


class _ChunkInputSpec(BaseInterfaceInputSpec):
    matrix_file = File(exists=True, mandatory=True, desc="subjects x voxels .npy")
    design_file = File(exists=True, mandatory=True, desc="design file of VoxelMatrix")
    chunk_index = traits.Int(mandatory=True, desc="which voxel chunk")


class _StatsOutputSpec(TraitedSpec):
    stats_file = File(exists=True, desc="per-voxel statistics of the chunk (.npz)")


class VoxelChunkStats(SimpleInterface):
    """Pass 1 on one chunk (:func:`~dmriharmony.harmonizers.voxel_combat.chunk_stats`)."""

    input_spec = _ChunkInputSpec
    output_spec = _StatsOutputSpec

    def _run_interface(self, runtime):
        from dmriharmony.harmonizers.voxel_combat import chunk_stats

        inp = self.inputs
        out = Path(runtime.cwd) / f"chunk-{inp.chunk_index:05d}_stats.npz"
        self._results["stats_file"] = str(
            chunk_stats(inp.matrix_file, inp.design_file, inp.chunk_index, out))
        return runtime


class _PoolInputSpec(BaseInterfaceInputSpec):
    design_file = File(exists=True, mandatory=True, desc="design file of VoxelMatrix")
    stats_files = InputMultiObject(File(exists=True), mandatory=True,
                                   desc="statistics of every chunk")
    mask_file = File(exists=True, desc="mask, stored in the model (for later NIfTI input)")


class _PoolOutputSpec(TraitedSpec):
    model_file = File(exists=True, desc="fitted VoxelComBat model (.npz)")


class VoxelPool(SimpleInterface):
    """Empirical-Bayes pooling over all chunks
    (:func:`~dmriharmony.harmonizers.voxel_combat.pool_chunks`)."""

    input_spec = _PoolInputSpec
    output_spec = _PoolOutputSpec

    def _run_interface(self, runtime):
        from dmriharmony.harmonizers.voxel_combat import pool_chunks

        inp = self.inputs
        out = Path(runtime.cwd) / "model_desc-voxelcombat.npz"
        self._results["model_file"] = str(pool_chunks(
            inp.design_file, list(inp.stats_files), out, _opt(inp.mask_file)))
        return runtime


class _AdjustInputSpec(_ChunkInputSpec):
    model_file = File(exists=True, mandatory=True, desc="fitted model of VoxelPool")


class _AdjustOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="harmonized columns of the chunk (.npy)")


class VoxelAdjustChunk(SimpleInterface):
    """Pass 2 on one chunk (:func:`~dmriharmony.harmonizers.voxel_combat.adjust_chunk`)."""

    input_spec = _AdjustInputSpec
    output_spec = _AdjustOutputSpec

    def _run_interface(self, runtime):
        from dmriharmony.harmonizers.voxel_combat import adjust_chunk

        inp = self.inputs
        out = Path(runtime.cwd) / f"chunk-{inp.chunk_index:05d}_combat.npy"
        self._results["out_file"] = str(adjust_chunk(
            inp.matrix_file, inp.model_file, inp.design_file, inp.chunk_index, out))
        return runtime


class _WriteInputSpec(BaseInterfaceInputSpec):
    chunk_files = InputMultiObject(File(exists=True), mandatory=True,
                                   desc="harmonized chunks, in chunk order")
    mask_file = File(exists=True, mandatory=True, desc="mask of the matrix")
    in_files = InputMultiObject(File(exists=True), mandatory=True,
                                desc="input maps (names and headers of the outputs)")
    out_names = traits.List(traits.Str, desc="output file names (default: desc-voxelcombat)")


class _WriteOutputSpec(TraitedSpec):
    out_files = OutputMultiObject(File(exists=True), desc="harmonized maps, input order")


class VoxelWriteMaps(SimpleInterface):
    """Harmonized NIfTI per subject (:func:`~dmriharmony.harmonizers.voxel_combat.write_maps`)."""

    input_spec = _WriteInputSpec
    output_spec = _WriteOutputSpec

    def _run_interface(self, runtime):
        from dmriharmony.harmonizers.voxel_combat import output_name, write_maps

        inp = self.inputs
        files = list(inp.in_files)
        names = _opt(inp.out_names) or [output_name(f) for f in files]
        cwd = Path(runtime.cwd)
        outs = write_maps(list(inp.chunk_files), inp.mask_file, [cwd / n for n in names], files)
        self._results["out_files"] = [str(o) for o in outs]
        return runtime


class _ApplyInputSpec(BaseInterfaceInputSpec):
    model_file = File(exists=True, mandatory=True, desc="model of VoxelPool / VoxelComBat.save")
    in_files = InputMultiObject(File(exists=True), mandatory=True, desc="maps of new subjects")
    sites = traits.List(traits.Str, mandatory=True, desc="their sites (seen when fitting)")
    covariates_file = File(exists=True, desc="covariates TSV, one row per map in order")
    covariates = traits.List(traits.Str, desc="covariate columns (default: all non-ID columns)")
    chunk_size = traits.Int(desc="voxels per chunk (default: the model's)")


class ApplyVoxelComBat(SimpleInterface):
    """Harmonize maps of later subjects of seen sites with a saved model
    (:meth:`~dmriharmony.harmonizers.voxel_combat.VoxelComBat.transform_maps`)."""

    input_spec = _ApplyInputSpec
    output_spec = _WriteOutputSpec

    def _run_interface(self, runtime):
        from dmriharmony.harmonizers.voxel_combat import VoxelComBat

        inp = self.inputs
        files = list(inp.in_files)
        if len(inp.sites) != len(files):
            raise HarmonizationError(f"{len(inp.sites)} site labels for {len(files)} input maps")
        model = VoxelComBat.load(inp.model_file)
        if isdefined(inp.chunk_size):
            model.chunk_size = inp.chunk_size
        cov = read_covariates(_opt(inp.covariates_file), _opt(inp.covariates), len(files))
        outs = model.transform_maps(files, list(inp.sites), cov, runtime.cwd)
        self._results["out_files"] = [str(o) for o in outs]
        return runtime
