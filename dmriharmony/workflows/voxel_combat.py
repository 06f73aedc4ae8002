"""Nipype workflow of the out-of-core voxel ComBat (nipreps-style ``init_*_wf`` factory).

::

    inputnode(in_files, mask_file, sites, covariates_tsv, covariates)
      -> build_matrix (VoxelMatrix: .npy + design + chunk indices)
      -> chunk_stats (MapNode over chunk_index: VoxelChunkStats)
      -> pool (VoxelPool: empirical Bayes over all voxels -> model file)
      -> adjust (MapNode over chunk_index: VoxelAdjustChunk)
      -> write_maps (VoxelWriteMaps)
      -> outputnode(out_files, model_file, matrix_file)

The two MapNodes are where a plugin (MultiProc, SLURM, SGE...) spreads the work: one iteration
per voxel chunk, each reading only its columns of the on-disk matrix.
"""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from dmriharmony.interfaces.voxel_combat import (
    VoxelAdjustChunk,
    VoxelChunkStats,
    VoxelMatrix,
    VoxelPool,
    VoxelWriteMaps,
)

__all__ = ["init_voxel_combat_wf"]


def init_voxel_combat_wf(
    name: str = "voxel_combat_wf",
    chunk_size: int = 8192,
    parametric: bool = True,
    mean_only: bool = False,
    ref_site: str | None = None,
    eb: bool = True,
    categorical: list[str] | None = None,
    continuous: list[str] | None = None,
    dtype: str = "float32",
) -> pe.Workflow:
    """Voxelwise / skeleton ComBat of template-space maps, chunked over voxels.

    Parameters
    ----------
    name : str
    chunk_size : int
        Voxels per MapNode iteration.
    parametric, mean_only, ref_site, eb, categorical, continuous
        ComBat options (:class:`~dmriharmony.harmonizers.combat.ComBat`).
    dtype : {"float32", "float64"}
        On-disk matrix type.

    Inputs (``inputnode``)
    ----------------------
    in_files : list of maps (one per subject, on the mask's grid); mask_file; sites : list of
    labels; covariates_tsv : TSV with one row per map, same order (optional); covariates :
    columns to use (optional, default every non-ID column).

    Outputs (``outputnode``)
    ------------------------
    out_files : harmonized maps (input order); model_file : fitted model
    (:meth:`~dmriharmony.harmonizers.voxel_combat.VoxelComBat.load`); matrix_file.
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(
        fields=["in_files", "mask_file", "sites", "covariates_tsv", "covariates"]),
        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(
        fields=["out_files", "model_file", "matrix_file"]), name="outputnode")

    build = pe.Node(VoxelMatrix(chunk_size=chunk_size, parametric=parametric,
                                mean_only=mean_only, eb=eb, dtype=dtype), name="build_matrix")
    if ref_site is not None:
        build.inputs.ref_site = str(ref_site)
    if categorical is not None:
        build.inputs.categorical = list(categorical)
    if continuous is not None:
        build.inputs.continuous = list(continuous)
    stats = pe.MapNode(VoxelChunkStats(), iterfield=["chunk_index"], name="chunk_stats")
    pool = pe.Node(VoxelPool(), name="pool")
    adjust = pe.MapNode(VoxelAdjustChunk(), iterfield=["chunk_index"], name="adjust_chunk")
    write = pe.Node(VoxelWriteMaps(), name="write_maps")

    wf.connect([
        (inputnode, build, [("in_files", "in_files"), ("mask_file", "mask_file"),
                            ("sites", "sites"), ("covariates_tsv", "covariates_file"),
                            ("covariates", "covariates")]),
        (build, stats, [("matrix_file", "matrix_file"), ("design_file", "design_file"),
                        ("chunk_indices", "chunk_index")]),
        (build, pool, [("design_file", "design_file")]),
        (inputnode, pool, [("mask_file", "mask_file")]),
        (stats, pool, [("stats_file", "stats_files")]),
        (build, adjust, [("matrix_file", "matrix_file"), ("design_file", "design_file"),
                         ("chunk_indices", "chunk_index")]),
        (pool, adjust, [("model_file", "model_file")]),
        (adjust, write, [("out_file", "chunk_files")]),
        (inputnode, write, [("mask_file", "mask_file"), ("in_files", "in_files")]),
        (write, outputnode, [("out_files", "out_files")]),
        (pool, outputnode, [("model_file", "model_file")]),
        (build, outputnode, [("matrix_file", "matrix_file")]),
    ])
    return wf
