"""Tissue compartments of the phantom: diffusivities, relaxation, signal and true tensor.

Every voxel of the phantom is a mixture of compartments (Panagiotaki et al., NeuroImage 2012,
"Compartment models of the diffusion MR signal in brain white matter"):

* white matter, per fibre population: an intra-axonal *thin zeppelin* (axially symmetric tensor
  with a very small perpendicular diffusivity; a stick when it is 0) and an extra-axonal
  zeppelin (hindered diffusion, larger perpendicular diffusivity), both dispersed over a cone of
  three directions at polar angle ``dispersion`` around the bundle direction (orientation
  dispersion, Zhang et al. NeuroImage 2012), plus a small slowly diffusing isotropic pool
  (``f_dot``, restricted water in cell bodies; Alexander et al. NeuroImage 2010, Panagiotaki 2012);
* grey matter: two isotropic Gaussian pools (fast/slow), which give GM its kurtosis;
* CSF: free water, isotropic, D = 3.0e-3 mm^2/s (37 degrees C).

The signal of compartment ``c`` for unit gradient ``g`` and b-value ``b`` is (proton-density and
relaxation weighted)::

    S_c = PD_c * (1 - exp(-TR/T1_c)) * exp(-TE/T2_c) * exp(-b g^T D_c g)

so the summed signal is not mono-exponential in ``b`` (DTI estimates depend on the b-value, as in
tissue, Jensen et al. MRM 2005) and the echo time changes the compartment weights (intra-axonal
water has the longer T2, Veraart et al. NeuroImage 2018).

Ground truth: the *true apparent diffusion tensor at b -> 0* of a mixture is the signal-weighted
mean of the compartment tensors (first cumulant, Kiselev 2010)::

    D0 = sum_c w_c D_c / sum_c w_c,   w_c = PD_c (1 - exp(-TR/T1_c)) exp(-TE/T2_c)

FA/MD/AD/RD of ``D0`` (Basser & Pierpaoli, JMR B 1996) are the ground-truth maps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

#: CSF diffusivity (free water at 37 C), mm^2/s.
D_CSF = 3.0e-3
#: Grey-matter pools: (fraction, diffusivity mm^2/s). MD0 = 0.80e-3.
GM_POOLS = ((0.30, 0.30e-3), (0.70, 1.014e-3))


@dataclass(frozen=True)
class FibreParams:
    """Compartment parameters of one fibre population (diffusivities in mm^2/s).

    Attributes
    ----------
    f_intra : float
        Intra-axonal signal fraction at TE -> 0 (proton-density weighted).
    d_intra_par, d_intra_perp : float
        Intra-axonal axial / radial diffusivity.
    d_extra_par : float
        Extra-axonal axial diffusivity.
    d_extra_perp : float
        Extra-axonal radial diffusivity.
    dispersion : float
        Polar angle (radians) of the three-direction cone the fibres are spread over.
    f_dot : float
        Fraction of the WM volume in the slow isotropic pool (diffusivity ``d_dot``).
    d_dot : float
        Diffusivity of that pool.
    """

    f_intra: float
    d_intra_par: float = 2.0e-3
    d_intra_perp: float = 0.0
    d_extra_par: float = 1.7e-3
    d_extra_perp: float = 0.55e-3
    dispersion: float = 0.35
    f_dot: float = 0.04
    d_dot: float = 0.08e-3

    def to_dict(self) -> dict:
        """Parameters as a plain dict (for the ground-truth JSON)."""
        return asdict(self)

    def adjusted(self, d_f_intra: float = 0.0, d_extra_perp: float = 0.0) -> FibreParams:
        """Return a copy with the intra fraction / extra radial diffusivity shifted."""
        return replace(
            self,
            f_intra=float(np.clip(self.f_intra + d_f_intra, 0.05, 0.95)),
            d_extra_perp=float(max(self.d_extra_perp + d_extra_perp, 0.05e-3)),
        )


@dataclass(frozen=True)
class Relaxation:
    """Relaxation times (ms) and proton density of the compartments at a field strength."""

    t2_intra: float
    t2_extra: float
    t2_gm: float
    t2_csf: float
    t1_wm: float
    t1_gm: float
    t1_csf: float
    pd_wm: float = 0.69
    pd_gm: float = 0.80
    pd_csf: float = 1.00


def relaxation_at(field_strength: float) -> Relaxation:
    """Compartment relaxation times at ``field_strength`` tesla.

    Values at 3 T follow Veraart et al. (NeuroImage 2018; intra-axonal T2 longer than
    extra-axonal) and Wansapura et al. (JMRI 1999); T2 is ~10% longer and T1 ~20% shorter at 1.5 T
    (Stanisz et al., MRM 2005).
    """
    if field_strength >= 2.0:
        return Relaxation(t2_intra=78.0, t2_extra=62.0, t2_gm=88.0, t2_csf=1800.0,
                          t1_wm=850.0, t1_gm=1350.0, t1_csf=4100.0)
    return Relaxation(t2_intra=86.0, t2_extra=68.0, t2_gm=97.0, t2_csf=2000.0,
                      t1_wm=650.0, t1_gm=1100.0, t1_csf=3700.0)


def compartment_weights(relax: Relaxation, te_ms: float, tr_ms: float) -> dict[str, float]:
    """Per-unit-volume b=0 signal of each compartment type at (TE, TR)."""
    def sat(t1: float) -> float:
        return 1.0 - np.exp(-tr_ms / t1)

    return {
        "intra": relax.pd_wm * sat(relax.t1_wm) * np.exp(-te_ms / relax.t2_intra),
        "extra": relax.pd_wm * sat(relax.t1_wm) * np.exp(-te_ms / relax.t2_extra),
        "gm": relax.pd_gm * sat(relax.t1_gm) * np.exp(-te_ms / relax.t2_gm),
        "csf": relax.pd_csf * sat(relax.t1_csf) * np.exp(-te_ms / relax.t2_csf),
    }


def zeppelin_tensors(dirs: np.ndarray, d_par: np.ndarray, d_perp: np.ndarray) -> np.ndarray:
    """Axially symmetric tensors ``d_perp I + (d_par - d_perp) n n^T`` as (..., 6).

    Components are ordered (xx, yy, zz, xy, xz, yz).
    """
    n = dirs
    dd = (d_par - d_perp)[..., None]
    out = np.empty(n.shape[:-1] + (6,), dtype=np.float64)
    out[..., 0] = d_perp + dd[..., 0] * n[..., 0] ** 2
    out[..., 1] = d_perp + dd[..., 0] * n[..., 1] ** 2
    out[..., 2] = d_perp + dd[..., 0] * n[..., 2] ** 2
    out[..., 3] = dd[..., 0] * n[..., 0] * n[..., 1]
    out[..., 4] = dd[..., 0] * n[..., 0] * n[..., 2]
    out[..., 5] = dd[..., 0] * n[..., 1] * n[..., 2]
    return out


def tensor6_to_matrix(d6: np.ndarray) -> np.ndarray:
    """(..., 6) tensor components (xx, yy, zz, xy, xz, yz) -> (..., 3, 3) matrices."""
    m = np.empty(d6.shape[:-1] + (3, 3), dtype=np.float64)
    m[..., 0, 0], m[..., 1, 1], m[..., 2, 2] = d6[..., 0], d6[..., 1], d6[..., 2]
    m[..., 0, 1] = m[..., 1, 0] = d6[..., 3]
    m[..., 0, 2] = m[..., 2, 0] = d6[..., 4]
    m[..., 1, 2] = m[..., 2, 1] = d6[..., 5]
    return m


def tensor_metrics(d6: np.ndarray) -> dict[str, np.ndarray]:
    """FA, MD, AD, RD of (..., 6) tensors (Basser & Pierpaoli, JMR B 1996, eq. 9-10).

    Zero tensors (outside the head) give 0 for every metric.
    """
    ev = np.linalg.eigvalsh(tensor6_to_matrix(d6))[..., ::-1]
    ev = np.clip(ev, 0.0, None)
    md = ev.mean(axis=-1)
    num = np.sqrt(((ev - md[..., None]) ** 2).sum(axis=-1))
    den = np.sqrt((ev**2).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        fa = np.where(den > 0, np.sqrt(1.5) * num / np.where(den > 0, den, 1.0), 0.0)
    return {"fa": fa, "md": md, "ad": ev[..., 0], "rd": 0.5 * (ev[..., 1] + ev[..., 2])}
