"""Voxel-wise mixture signal and b -> 0 apparent tensor of the phantom's compartments.

For one subject the fine-grid voxels carry tissue fractions and up to two fibre populations
(:class:`Microstructure`); for one acquisition the relaxation weights ``w_c`` of
:func:`dmriharmony.simulate.tissue.compartment_weights` weight the compartments. The signal of
voxel ``v`` for a unit gradient ``g`` (template frame) and b-value ``b`` is (Panagiotaki et al.,
NeuroImage 2012)::

    S = f_wm sum_p phi_p [ (1 - f_dot) ( fi_p w_intra E_intra,p + (1 - fi_p) w_extra E_extra,p )
                           + f_dot w_intra exp(-b d_dot) ]
        + f_gm w_gm sum_k p_k exp(-b d_k) + f_csf w_csf exp(-b D_csf)

with zeppelin attenuations averaged over the three cone directions ``n_k`` of the population,
``E = mean_k exp(-b (d_perp + (d_par - d_perp) (g.n_k)^2))``. The b -> 0 apparent
tensor is the signal-weighted mean of the compartment tensors (first cumulant; Kiselev, in
"Diffusion MRI", Oxford 2010), and for a voxel that averages several fine voxels (partial
volume), the weighted mean over all of them: :func:`d0_moments` returns its numerator and
denominator so that they can be averaged over any footprint.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dmriharmony.simulate.anatomy import BUNDLE_NAMES, Phantom, bundle_params
from dmriharmony.simulate.tissue import D_CSF, GM_POOLS

_PAR = np.array([[bundle_params(n).d_intra_par, bundle_params(n).d_intra_perp,
                  bundle_params(n).d_extra_par, bundle_params(n).dispersion,
                  bundle_params(n).f_dot, bundle_params(n).d_dot] for n in BUNDLE_NAMES])


def cone_directions(dirs: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Three unit directions at polar angle ``theta`` around each of ``dirs``: (n, 3, 3).

    The azimuths are 0, 120 and 240 degrees, so the second moment of the three is
    ``cos^2(theta) n n^T + sin^2(theta)/2 (I - n n^T)`` (axially symmetric about ``n``).
    """
    n = dirs / np.maximum(np.linalg.norm(dirs, axis=1, keepdims=True), 1e-12)
    ref = np.where(np.abs(n[:, 2:3]) < 0.9, np.array([[0.0, 0.0, 1.0]]), np.array([[1.0, 0, 0]]))
    u = np.cross(n, ref)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    v = np.cross(n, u)
    ct, st = np.cos(theta)[:, None], np.sin(theta)[:, None]
    out = np.empty((n.shape[0], 3, 3))
    for k in range(3):
        phi = 2.0 * np.pi * k / 3.0
        out[:, k] = ct * n + st * (np.cos(phi) * u + np.sin(phi) * v)
    return out


@dataclass
class Microstructure:
    """Per-voxel compartment parameters of one subject (arrays over the phantom's voxels).

    ``f_intra1/2`` are intra-axonal fractions and ``d_extra_perp1/2`` extra-axonal radial
    diffusivities (mm^2/s) of populations 1/2; the other diffusivities come from the bundle.
    """

    phantom: Phantom
    f_intra1: np.ndarray
    f_intra2: np.ndarray
    d_extra_perp1: np.ndarray
    d_extra_perp2: np.ndarray


def base_microstructure(phantom: Phantom) -> Microstructure:
    """The template subject's microstructure (bundle parameters, no individual variation)."""
    fi = np.array([bundle_params(n).f_intra for n in BUNDLE_NAMES])
    dep = np.array([bundle_params(n).d_extra_perp for n in BUNDLE_NAMES])
    b1 = np.maximum(phantom.bundle1, 0)
    b2 = np.maximum(phantom.bundle2, 0)
    return Microstructure(phantom, fi[b1].astype(float), fi[b2].astype(float),
                          dep[b1].astype(float), dep[b2].astype(float))


def _cones(ms: Microstructure, k: int) -> np.ndarray:
    """Cached cone directions (n, 3, 3) float32 of population ``k`` of the phantom."""
    ph = ms.phantom
    key = f"cone{k}"
    if key not in ph.extra:
        bundle, dirs = (ph.bundle1, ph.dir1) if k == 0 else (ph.bundle2, ph.dir2)
        theta = _PAR[np.maximum(bundle, 0), 3]
        safe = np.where(np.linalg.norm(dirs, axis=1, keepdims=True) > 0, dirs, [[1.0, 0, 0]])
        ph.extra[key] = cone_directions(safe, theta).astype(np.float32)
    return ph.extra[key]


def _populations(ms: Microstructure, sel: np.ndarray):
    """Per fibre population: positions within ``sel`` where it is present, and its parameters."""
    ph = ms.phantom
    out = []
    for k, (bundle, dirs, fi, dep) in enumerate((
            (ph.bundle1, ph.dir1, ms.f_intra1, ms.d_extra_perp1),
            (ph.bundle2, ph.dir2, ms.f_intra2, ms.d_extra_perp2))):
        b = bundle[sel]
        at = np.flatnonzero((b >= 0) & (ph.f_wm[sel] > 0))
        v = sel[at]
        phi = ph.phi2[v] if k == 1 else 1.0 - ph.phi2[v]
        vol = ph.f_wm[v] * phi
        par = _PAR[b[at]]
        out.append((at, vol, dirs[v], fi[v], par[:, 0], par[:, 1], par[:, 2], dep[v],
                    par[:, 3], par[:, 4], par[:, 5], k, v))
    return out


def mixture_signal(ms: Microstructure, sel: np.ndarray, bvals: np.ndarray, gdirs: np.ndarray,
                   weights: dict[str, float], dtype=np.float64) -> np.ndarray:
    """Noise-free signal (len(sel), n_volumes) of phantom voxels ``sel``.

    Parameters
    ----------
    ms
        Subject microstructure.
    sel
        Positions in the phantom's voxel arrays.
    bvals, gdirs
        Applied b-values (s/mm^2) and unit gradient directions in the template frame (n, 3).
    weights
        Relaxation weights of the acquisition (``intra, extra, gm, csf``).
    """
    ph = ms.phantom
    bvals = np.asarray(bvals, dtype=float)
    e_gm = sum(p * np.exp(-bvals * d) for p, d in GM_POOLS)
    e_csf = np.exp(-bvals * D_CSF)
    sig = (ph.f_gm[sel, None] * weights["gm"]) * e_gm[None] + \
          (ph.f_csf[sel, None] * weights["csf"]) * e_csf[None]
    sig = sig.astype(dtype)
    b = bvals[None].astype(np.float32)
    for (act, v, _dirs, fi, dip, dipp, dep_par, dep, _theta, fdot, ddot, k_pop,
         vox) in _populations(ms, sel):
        if act.size == 0:
            continue
        cone = _cones(ms, k_pop)[vox]
        g = gdirs.T.astype(np.float32)
        dpi, dai = dipp[:, None].astype(np.float32), (dip - dipp)[:, None].astype(np.float32)
        dpe, dae = dep[:, None].astype(np.float32), (dep_par - dep)[:, None].astype(np.float32)
        e_i = np.zeros((act.size, bvals.size), dtype=np.float32)
        e_e = np.zeros((act.size, bvals.size), dtype=np.float32)
        for k in range(3):
            c2 = (cone[:, k] @ g) ** 2
            e_i += np.exp(-b * (dpi + dai * c2))
            e_e += np.exp(-b * (dpe + dae * c2))
        a_i = (v * (1.0 - fdot) * fi * weights["intra"] / 3.0)[:, None]
        a_e = (v * (1.0 - fdot) * (1.0 - fi) * weights["extra"] / 3.0)[:, None]
        a_d = (v * fdot * weights["intra"])[:, None]
        sig[act] += (a_i * e_i + a_e * e_e + a_d * np.exp(-bvals[None] * ddot[:, None])
                     ).astype(dtype)
    return sig


def d0_moments(ms: Microstructure, sel: np.ndarray,
               weights: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Numerator (len(sel), 6) and denominator (len(sel),) of the b -> 0 apparent tensor.

    ``D0 = num / den`` per voxel; over a footprint of voxels, ``sum(num) / sum(den)`` is the
    apparent tensor at b -> 0 of their summed signal. Tensor components (xx, yy, zz, xy, xz, yz).
    """
    ph = ms.phantom
    md_gm = sum(p * d for p, d in GM_POOLS)
    a_gm = ph.f_gm[sel] * weights["gm"]
    a_csf = ph.f_csf[sel] * weights["csf"]
    num = np.zeros((sel.size, 6))
    num[:, :3] = (a_gm * md_gm + a_csf * D_CSF)[:, None]
    den = (a_gm + a_csf).astype(float)
    for at, vol, dirs, fi, dip, dipp, dep_par, dep, theta, fdot, ddot, _k, _v in \
            _populations(ms, sel):
        a_i = vol * (1.0 - fdot) * fi * weights["intra"]
        a_e = vol * (1.0 - fdot) * (1.0 - fi) * weights["extra"]
        a_d = vol * fdot * weights["intra"]
        # dispersed zeppelin: d_perp I + (d_par - d_perp) M2, with the cone's second moment
        # M2 = cos^2 t n n^T + sin^2 t / 2 (I - n n^T) = c_iso I + c_ani n n^T
        c_ani = np.cos(theta) ** 2 - 0.5 * np.sin(theta) ** 2
        c_iso = 0.5 * np.sin(theta) ** 2
        ani = a_i * (dip - dipp) + a_e * (dep_par - dep)
        iso = a_i * dipp + a_e * dep + ani * c_iso + a_d * ddot
        n = dirs
        num[at, :3] += iso[:, None] + (ani * c_ani)[:, None] * n**2
        num[at, 3:] += (ani * c_ani)[:, None] * (n[:, [0, 0, 1]] * n[:, [1, 2, 2]])
        den[at] += a_i + a_e + a_d
    return num, den
