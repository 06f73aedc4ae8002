"""Out-of-core voxel ComBat equals the in-memory ComBat; NIfTI I/O; bad inputs; workflow."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from dmriharmony.errors import HarmonizationError
from dmriharmony.harmonizers.combat import ComBat
from dmriharmony.harmonizers.voxel_combat import (
    VoxelComBat,
    build_voxel_matrix,
    harmonize_maps,
)

N, P = 40, 57
SITES = np.array(["a"] * 12 + ["b"] * 15 + ["c"] * 13)


def _data(seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    cov = pd.DataFrame({"age": rng.uniform(20, 80, N), "sex": rng.choice(["F", "M"], N)})
    scale = np.where(SITES == "c", 1.5, 1.0)[:, None]
    X = 0.5 + 0.1 * rng.normal(size=(N, P)) * scale + 0.05 * (SITES == "b")[:, None]
    X += 0.002 * cov["age"].to_numpy()[:, None]
    return X, cov


@pytest.mark.parametrize("opts", [{}, {"parametric": False}, {"mean_only": True},
                                  {"ref_site": "b"}, {"eb": False}])
@pytest.mark.parametrize("chunk", [1, 10, 1000])
def test_equals_in_memory(opts, chunk):
    X, cov = _data()
    X[3, 5] = np.nan  # a missing value: fitted on observed subjects, stays NaN
    ref = ComBat(**opts).fit(X, SITES, cov)
    v = VoxelComBat(chunk_size=chunk, **opts).fit(X, SITES, cov)
    Y, Yr = v.transform(X, SITES, cov), ref.transform(X, SITES, cov)
    assert np.array_equal(np.isnan(Y), np.isnan(Yr)) and np.isnan(Y[3, 5])
    assert np.nanmax(np.abs(Y - Yr)) < 1e-6
    for name in ("gamma_star_", "delta_star_", "var_pooled_", "beta_"):
        assert np.nanmax(np.abs(getattr(v.model_, name) - getattr(ref, name))) < 1e-9, name
    assert np.allclose(v.model_.t2_, ref.t2_, equal_nan=True)


def test_memmap_save_load_new_subjects(tmp_path):
    X, cov = _data()
    path = tmp_path / "m.npy"
    train = np.arange(30)
    np.save(path, X[train])
    v = VoxelComBat(chunk_size=8).fit(path, SITES[train], cov.iloc[train])
    v.save(tmp_path / "model.npz")
    w = VoxelComBat.load(tmp_path / "model.npz")
    ref = ComBat().fit(X[train], SITES[train], cov.iloc[train])
    new = np.arange(30, N)
    np.save(tmp_path / "new.npy", X[new])
    out = w.transform(tmp_path / "new.npy", SITES[new], cov.iloc[new], tmp_path / "h.npy")
    got = np.load(out)
    assert np.max(np.abs(got - ref.transform(X[new], SITES[new], cov.iloc[new]))) < 1e-6
    with pytest.raises(HarmonizationError, match="'zz'"):
        w.transform(X[new], ["zz"] * len(new), cov.iloc[new])


def _maps(tmp_path, X):
    shape, aff = (6, 5, 4), np.diag([2.0, 2.0, 2.0, 1.0])
    rng = np.random.default_rng(1)
    mask = np.zeros(np.prod(shape), bool)
    mask[rng.choice(mask.size, X.shape[1], replace=False)] = True
    mask = mask.reshape(shape)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), aff), tmp_path / "mask.nii.gz")
    files = []
    for j in range(X.shape[0]):
        vol = np.full(shape, 7.0, np.float32)
        vol[mask] = X[j]
        f = tmp_path / f"sub-{j:02d}_param-fa_dwimap.nii.gz"
        nib.save(nib.Nifti1Image(vol, aff), f)
        files.append(f)
    return mask, files


def test_nifti_round_trip(tmp_path):
    X, cov = _data()
    X = X.astype(np.float32).astype(float)
    mask, files = _maps(tmp_path, X)
    m = build_voxel_matrix(files, tmp_path / "mask.nii.gz", tmp_path / "x.npy")
    assert np.array_equal(np.load(m), X.astype(np.float32))
    outs = harmonize_maps(files, tmp_path / "mask.nii.gz", SITES, cov, tmp_path / "out",
                          chunk_size=7, model_file=tmp_path / "model.npz")
    ref = ComBat().fit_transform(X, SITES, cov)
    for j, o in enumerate(outs):
        vol = np.asanyarray(nib.load(o).dataobj)
        assert "desc-voxelcombat" in o.name
        assert np.max(np.abs(vol[mask] - ref[j])) < 1e-6 and np.all(vol[~mask] == 0)
    later = VoxelComBat.load(tmp_path / "model.npz").transform_maps(
        files[:3], SITES[:3], cov.iloc[:3], tmp_path / "later")
    assert np.allclose(np.asanyarray(nib.load(later[0]).dataobj)[mask], ref[0], atol=1e-6)


def test_bad_inputs(tmp_path):
    X, cov = _data()
    _, files = _maps(tmp_path, X[:4])
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 3), np.float32), np.eye(4)), tmp_path / "bad.nii")
    with pytest.raises(HarmonizationError, match="bad.nii"):
        build_voxel_matrix(files + [tmp_path / "bad.nii"], tmp_path / "mask.nii.gz",
                           tmp_path / "x.npy")
    assert not (tmp_path / "x.npy").exists()
    with pytest.raises(HarmonizationError, match="reference site 'q'"):
        VoxelComBat(ref_site="q").fit(X, SITES, cov)


def test_workflow_equals_direct(tmp_path):
    from dmriharmony.workflows.voxel_combat import init_voxel_combat_wf

    X, cov = _data()
    X = X[:, :20].astype(np.float32).astype(float)
    _, files = _maps(tmp_path, X)
    cov.to_csv(tmp_path / "cov.tsv", sep="\t", index=False)
    direct = harmonize_maps(files, tmp_path / "mask.nii.gz", SITES, cov, tmp_path / "d",
                            chunk_size=6)
    for plugin, args in (("Linear", {}), ("MultiProc", {"n_procs": 2})):
        wf = init_voxel_combat_wf(name=f"vc_{plugin}", chunk_size=6)
        wf.base_dir = str(tmp_path / plugin)
        wf.inputs.inputnode.in_files = [str(f) for f in files]
        wf.inputs.inputnode.mask_file = str(tmp_path / "mask.nii.gz")
        wf.inputs.inputnode.sites = list(SITES)
        wf.inputs.inputnode.covariates_tsv = str(tmp_path / "cov.tsv")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = wf.run(plugin=plugin, plugin_args=args)
        node = next(n for n in res.nodes() if n.name == "write_maps")
        outs = node.result.outputs.out_files
        for a, b in zip(outs, direct):
            assert np.array_equal(nib.load(a).get_fdata(), nib.load(b).get_fdata())


@pytest.mark.parametrize("dtype", ["<f8", ">f4"])
@pytest.mark.parametrize("order", ["C", "F"])
def test_npy_matrix_positioned_io(tmp_path, dtype, order):
    """On-disk matrices are read and written by blocks without memory maps (any order, byte
    order); a caller's whole-file memmap is read the same way; results equal in-memory ComBat."""
    from dmriharmony.harmonizers._voxel_steps import NpyMatrix, as_block_source, read_matrix

    X, cov = _data()
    A = np.asarray(X, dtype=dtype, order=order)
    np.save(tmp_path / "a.npy", A)
    m = read_matrix(tmp_path / "a.npy")
    assert m.fortran == (order == "F") and m.shape == A.shape
    assert np.array_equal(m.read(3, 20), A[:, 3:20])
    assert np.array_equal(m.read(5, 9, rows=True), A[5:9])
    w = NpyMatrix.create(tmp_path / "w.npy", A.shape, dtype)
    w.write(0, A[:, :30])
    w.write(30, A[:, 30:])
    w.write(7, 2 * A[7:9], rows=True)
    B = A.copy()
    B[7:9] *= 2
    assert np.array_equal(np.load(tmp_path / "w.npy"), B)
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert isinstance(as_block_source(mm), NpyMatrix)
    assert not isinstance(as_block_source(mm[:, 1:]), NpyMatrix)  # a view stays an array
    ref = ComBat().fit_transform(A.astype(float), SITES, cov)
    v = VoxelComBat(chunk_size=10).fit(mm, SITES, cov)
    got = np.load(v.transform(tmp_path / "a.npy", SITES, cov, tmp_path / "h.npy"))
    assert got.dtype == np.dtype(dtype) and np.max(np.abs(got - ref)) < 1e-6
    (tmp_path / "t.npy").write_bytes((tmp_path / "a.npy").read_bytes()[:300])
    with pytest.raises(HarmonizationError, match="truncated"):
        read_matrix(tmp_path / "t.npy")
