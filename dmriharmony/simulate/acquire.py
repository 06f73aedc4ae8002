"""Scanner simulation: one subject, one site -> a DWI series with its gradient files.

For every voxel of the site's acquisition grid, ``k^3`` sub-voxel points (``k = ceil(voxel /
fine spacing)``) are mapped through the scan's subject-to-template transform onto the phantom's
fine grid; the voxel signal is their mean (partial volume). The gradient directions are written in
the voxel frame of the stored image (FSL/BIDS convention: for a neurological, det > 0, image the
x component is negated); for the signal they are turned into the template frame with the
rotation of the subject's affine (the "finite strain" reorientation, Alexander et al., IEEE TMI
2001; the deformation's local rotation, a few degrees, is ignored). Noise is Rician, the
magnitude of complex Gaussian noise with sigma = (mean WM b0 signal) / SNR (Gudbjartsson &
Patz, MRM 1995).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from scipy import sparse
from scipy.spatial.transform import Rotation

from dmriharmony.simulate.anatomy import BRAIN_SEMI_AXES, FINE_SPACING, Phantom
from dmriharmony.simulate.scanners import Protocol, Site, protocol
from dmriharmony.simulate.signal import Microstructure, _cones, d0_moments, mixture_signal
from dmriharmony.simulate.tissue import compartment_weights, relaxation_at, tensor_metrics
from dmriharmony.simulate.transforms import Warp, rotation_part, scanner_to_template

log = logging.getLogger(__name__)

#: Margin (mm) of the field of view around the brain.
FOV_MARGIN = 4.0
#: Voxels whose centre lies deeper than this (mm) outside the brain are "background".
HEAD_MARGIN = 4.0
#: Sub-voxel sampling step (mm) of the partial-volume footprint of an acquisition voxel.
SUBSAMPLE_SPACING = 1.5
_CHUNK_POINTS = 400_000
_CHUNK_VOXELS = 40_000


@dataclass
class Scan:
    """A simulated DWI series (signal in relaxation-weighted proton-density units)."""

    data: np.ndarray  # (X, Y, Z, N) float64, noisy unless snr is None
    affine: np.ndarray
    protocol: Protocol
    bvecs_written: np.ndarray  # (N, 3) FSL convention as written to .bvec
    head_mask: np.ndarray
    weights: dict
    ref_signal: float
    sigma: float | None
    native_truth: dict | None = None


def _n_threads() -> int:
    env = os.environ.get("DMRIHARMONY_THREADS")
    if env:
        return max(1, int(env))
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else (os.cpu_count() or 1)))


def reference_wm_signal(weights: dict) -> float:
    """b=0 signal of a reference white-matter voxel (half intra, half extra), PD units."""
    return 0.5 * weights["intra"] + 0.5 * weights["extra"]


def acquisition_grid(site: Site, affine: np.ndarray, warp: Warp | None = None
                     ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Image affine and shape of ``site``'s field of view around the subject's brain.

    ``affine`` maps scanner mm to template mm (the brain centre is the template origin); the
    margin grows by the largest displacement of ``warp``.
    """
    extra = 0.0 if warp is None else float(np.linalg.norm(warp.field, axis=-1).max())
    semi = np.asarray(BRAIN_SEMI_AXES) + FOV_MARGIN + extra
    inv = np.linalg.inv(affine)
    rot = Rotation.from_euler("x", site.angulation_deg, degrees=True).as_matrix()
    # the brain ellipsoid y^T diag(semi^-2) y <= 1 seen in scanner space is x = inv(A) y: its
    # half-extent along the unit image axis e is sqrt(e^T L diag(semi^2) L^T e), L = inv(A)_3x3
    lin = inv[:3, :3] @ np.diag(semi)
    half = np.sqrt(((rot.T @ lin) ** 2).sum(axis=1))
    centre = rot.T @ inv[:3, 3]
    vox = np.asarray(site.voxel_size, dtype=float)
    lo, hi = centre - half, centre + half
    shape = tuple(int(np.ceil((h - l) / v)) + 1 for l, h, v in zip(lo, hi, vox))
    u0 = centre - (np.asarray(shape) - 1) / 2.0 * vox
    aff_ras = np.eye(4)
    aff_ras[:3, :3] = rot @ np.diag(vox)
    aff_ras[:3, 3] = rot @ u0
    ornt = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(tuple(site.orientation)))
    new_aff = aff_ras @ inv_ornt_aff(ornt, shape)
    new_shape = apply_orientation(np.empty(shape, dtype=np.uint8), ornt).shape
    return new_aff, new_shape  # type: ignore[return-value]


def _lookup_table(phantom: Phantom) -> np.ndarray:
    table = np.full(int(np.prod(phantom.shape)), -1, dtype=np.int64)
    table[phantom.index] = np.arange(phantom.n)
    return table


def _footprint(phantom: Phantom, img_affine: np.ndarray, shape: tuple[int, int, int],
               affine: np.ndarray, warp: Warp | None) -> tuple[sparse.csr_matrix, np.ndarray,
                                                               np.ndarray]:
    """Sparse (n_voxels x n_used) averaging matrix, used phantom positions, head mask."""
    zooms = np.linalg.norm(img_affine[:3, :3], axis=0)
    k = [max(1, int(np.ceil(z / SUBSAMPLE_SPACING - 1e-6))) for z in zooms]
    sub = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) / n - 0.5 for n in k], indexing="ij"),
                   axis=-1).reshape(-1, 3)
    ns = sub.shape[0]
    table = _lookup_table(phantom)
    fine_inv = np.linalg.inv(phantom.affine)
    fshape = np.asarray(phantom.shape)
    n_vox = int(np.prod(shape))
    ijk_all = np.indices(shape).reshape(3, -1).T.astype(float)
    semi = np.asarray(BRAIN_SEMI_AXES)
    centres = ijk_all @ img_affine[:3, :3].T + img_affine[:3, 3]
    tc = scanner_to_template(centres, affine, warp)
    depth = (1.0 - np.sqrt(((tc / semi) ** 2).sum(axis=1))) * semi.min()
    head = depth > -HEAD_MARGIN
    # sub-voxel offsets in template mm (the warp is smooth: its change across a voxel is
    # neglected, so a voxel's footprint is the affine image of the voxel box at T(centre))
    offsets = sub @ (affine[:3, :3] @ img_affine[:3, :3]).T
    reach = float(np.linalg.norm(offsets, axis=1).max()) + FINE_SPACING
    cand = np.flatnonzero(depth > -reach)
    rows, cols = [], []
    step = max(1, _CHUNK_POINTS // ns)
    for start in range(0, cand.size, step):
        vox = cand[start:start + step]
        t = (tc[vox][:, None, :] + offsets[None]).reshape(-1, 3)
        f = np.rint(t @ fine_inv[:3, :3].T + fine_inv[:3, 3]).astype(np.int64)
        ok = np.all((f >= 0) & (f < fshape), axis=1)
        pos = np.full(f.shape[0], -1, dtype=np.int64)
        pos[ok] = table[np.ravel_multi_index(f[ok].T, phantom.shape)]
        keep = pos >= 0
        rows.append(np.repeat(vox, ns)[keep])
        cols.append(pos[keep])
    rows_a = np.concatenate(rows)
    cols_a = np.concatenate(cols)
    used, inverse = np.unique(cols_a, return_inverse=True)
    w = sparse.csr_matrix((np.full(rows_a.size, 1.0 / ns), (rows_a, inverse)),
                          shape=(n_vox, used.size))
    w.sum_duplicates()
    return w, used, head.reshape(shape)


def render_scan(phantom: Phantom, ms: Microstructure, site: Site, affine: np.ndarray,
                warp: Warp | None, rng: np.random.Generator, *, snr: float | None = None,
                noise: bool = True, native_truth: bool = False) -> Scan:
    """Simulate one DWI series of subject microstructure ``ms`` at ``site``.

    Parameters
    ----------
    affine, warp
        The scan's scanner -> template transform (see :mod:`.transforms`).
    rng
        Noise generator.
    snr
        b0 WM SNR; defaults to ``site.snr``. ``noise=False`` (or ``site.snr`` None) gives the
        noise-free signal.
    native_truth
        Also return the b -> 0 FA/MD/AD/RD of every acquisition voxel (signal-weighted over its
        footprint), the exact target of a noise-free DTI fit in the b -> 0 limit.
    """
    img_affine, shape = acquisition_grid(site, affine, warp)
    prot = protocol(site)
    zooms = np.linalg.norm(img_affine[:3, :3], axis=0)
    frame = img_affine[:3, :3] / zooms  # unit image axes in scanner space (columns)
    g_world = prot.bvecs_voxel @ frame.T
    g_tpl = g_world @ rotation_part(affine).T
    weights = compartment_weights(relaxation_at(site.field_strength), site.te_ms, site.tr_ms)
    w, used, head = _footprint(phantom, img_affine, shape, affine, warp)
    n_vox = w.shape[0]
    data = np.zeros((n_vox, prot.bvals_applied.size))
    starts = list(range(0, used.size, _CHUNK_VOXELS))
    _cones(ms, 0), _cones(ms, 1)  # fill the phantom's cache before the threads read it

    def chunk(start: int) -> np.ndarray:
        return mixture_signal(ms, used[start:start + _CHUNK_VOXELS], prot.bvals_applied, g_tpl,
                              weights)

    # numpy's ufuncs release the GIL: chunks run in parallel threads; the sum is done in a
    # fixed order, so the result does not depend on the number of threads
    with ThreadPoolExecutor(max_workers=_n_threads()) as pool:
        for start, s in zip(starts, pool.map(chunk, starts)):
            data += w[:, start:start + s.shape[0]] @ s
    truth = None
    if native_truth:
        num, den = d0_moments(ms, used, weights)
        wn, wd = w @ num, w @ den
        with np.errstate(invalid="ignore", divide="ignore"):
            d0 = np.where(wd[:, None] > 0, wn / np.where(wd > 0, wd, 1.0)[:, None], 0.0)
        truth = {k: v.reshape(shape) for k, v in tensor_metrics(d0).items()}
        truth["signal_fraction"] = (w @ np.ones(used.size)).reshape(shape)
    ref = reference_wm_signal(weights)
    snr = site.snr if snr is None else snr
    sigma = None
    if noise and snr is not None and np.isfinite(snr):
        sigma = ref / float(snr)
        real = data + rng.normal(0.0, sigma, data.shape)
        imag = rng.normal(0.0, sigma, data.shape)
        data = np.sqrt(real**2 + imag**2)
    data = data.reshape(shape + (prot.bvals_applied.size,))
    if site.zero_background:
        data[~head] = 0.0
    bvecs = prot.bvecs_voxel.copy()
    if np.linalg.det(img_affine[:3, :3]) > 0:
        bvecs[:, 0] *= -1.0  # FSL convention for neurological storage
    bvecs = _export_error(bvecs, site.bvec_error)
    bvecs[prot.bvals_written <= 0] = 0.0
    return Scan(data=data, affine=img_affine, protocol=prot, bvecs_written=bvecs,
                head_mask=head, weights=weights, ref_signal=ref, sigma=sigma,
                native_truth=truth)


def _export_error(bvecs: np.ndarray, error: str | None) -> np.ndarray:
    out = bvecs.copy()
    if error in ("flip_x", "flip_y", "flip_z"):
        out[:, "xyz".index(error[-1])] *= -1.0
    elif error == "swap_xy":
        out[:, [0, 1]] = out[:, [1, 0]]
    return out
