"""Ground-truth anatomy of the phantom brain: tissues, named bundles, fibre orientations.

The phantom is a small ellipsoidal brain (semi-axes :data:`BRAIN_SEMI_AXES`, millimetres, RAS
template coordinates with the origin at the brain centre) with

* a cortical grey-matter ribbon under a thin layer of subarachnoid CSF, two lateral ventricles
  (CSF) and two thalami (deep GM);
* white matter whose "background" fibres run along the ellipsoid normal (corona-radiata-like);
* named bundles modelled as tubes around centre lines (or, for the corpus callosum, a slab around
  the callosal arch with left-right fibres), labelled with the ICBM-DTI-81 / ENIGMA-DTI label
  values and abbreviations (Mori et al., NeuroImage 2008; Jahanshad et al., NeuroImage 2013);
* crossing regions where two fibre populations share a voxel: the lateral projections of the
  callosal body cross the corticospinal tract (labelled SCR, the superior corona radiata, where
  callosal, projection and association fibres meet) and the superior longitudinal fasciculus.

Everything is evaluated analytically at the centres of a fine grid (1 mm, :data:`FINE_SPACING`),
which is the resolution the scanner simulation samples from; the template grid (2 mm) is made of
exact 2x2x2 blocks of the fine grid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from dmriharmony.simulate.tissue import FibreParams

log = logging.getLogger(__name__)

#: Brain ellipsoid semi-axes (x: left-right, y: posterior-anterior, z: inferior-superior), mm.
BRAIN_SEMI_AXES = (42.0, 52.0, 38.0)
#: Template grid: shape and spacing (mm); centred on the brain.
TEMPLATE_SHAPE = (48, 58, 44)
TEMPLATE_SPACING = 2.0
#: Fine (simulation) grid spacing; each template voxel is BLOCK**3 fine voxels.
FINE_SPACING = 1.0
BLOCK = int(round(TEMPLATE_SPACING / FINE_SPACING))
#: Tissue class codes of the tissue image (FSL FAST order).
TISSUE_CODES = {"background": 0, "csf": 1, "gm": 2, "wm": 3}
#: Volume fraction of the second population in a crossing voxel.
CROSSING_FRACTION = 0.45


def template_affine() -> np.ndarray:
    """Voxel-to-mm (RAS) affine of the 2 mm template grid, centred on the brain."""
    aff = np.diag([TEMPLATE_SPACING] * 3 + [1.0])
    aff[:3, 3] = [-(n - 1) * TEMPLATE_SPACING / 2.0 for n in TEMPLATE_SHAPE]
    return aff


def fine_affine() -> np.ndarray:
    """Voxel-to-mm affine of the fine grid (voxel blocks of the template grid)."""
    aff = np.diag([FINE_SPACING] * 3 + [1.0])
    t = template_affine()
    aff[:3, 3] = t[:3, 3] - (TEMPLATE_SPACING - FINE_SPACING) / 2.0
    return aff


def fine_shape() -> tuple[int, int, int]:
    return tuple(n * BLOCK for n in TEMPLATE_SHAPE)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- bundles
@dataclass(frozen=True)
class Bundle:
    """A tubular bundle around a centre line.

    Attributes
    ----------
    name
        Internal bundle name (also the group used for subject-level variation).
    points
        (k, 3) centre-line vertices in template mm.
    radius
        Tube radius (mm).
    params
        Compartment parameters of its fibres.
    labels
        ``[(z_max, label), ...]``: the ENIGMA label given to the bundle below each ``z_max`` (mm),
        in increasing order; ``None`` means the bundle carries one label (``label``).
    label
        The ENIGMA label value of the whole bundle (when ``labels`` is None).
    """

    name: str
    points: tuple
    radius: float
    params: FibreParams
    label: int = 0
    labels: tuple | None = None


#: ICBM-DTI-81 label values and ENIGMA abbreviations of the phantom's labels.
LABELS: dict[int, tuple[str, str, str]] = {
    3: ("GCC", "Genu of corpus callosum", "midline"),
    4: ("BCC", "Body of corpus callosum", "midline"),
    5: ("SCC", "Splenium of corpus callosum", "midline"),
    7: ("CST-R", "Corticospinal tract right", "R"),
    8: ("CST-L", "Corticospinal tract left", "L"),
    17: ("ALIC-R", "Anterior limb of internal capsule right", "R"),
    18: ("ALIC-L", "Anterior limb of internal capsule left", "L"),
    19: ("PLIC-R", "Posterior limb of internal capsule right", "R"),
    20: ("PLIC-L", "Posterior limb of internal capsule left", "L"),
    25: ("SCR-R", "Superior corona radiata right", "R"),
    26: ("SCR-L", "Superior corona radiata left", "L"),
    35: ("CGC-R", "Cingulum (cingulate gyrus) right", "R"),
    36: ("CGC-L", "Cingulum (cingulate gyrus) left", "L"),
    41: ("SLF-R", "Superior longitudinal fasciculus right", "R"),
    42: ("SLF-L", "Superior longitudinal fasciculus left", "L"),
    45: ("IFO-R", "Inferior fronto-occipital fasciculus right", "R"),
    46: ("IFO-L", "Inferior fronto-occipital fasciculus left", "L"),
    47: ("UNC-R", "Uncinate fasciculus right", "R"),
    48: ("UNC-L", "Uncinate fasciculus left", "L"),
}
ABBREVIATION_TO_LABEL = {v[0]: k for k, v in LABELS.items()}

#: Fibre compartments (f_intra at TE -> 0) per structure; FA at b -> 0 and TE ~ 80 ms is
#: roughly 0.75 (CC), 0.6-0.7 (projection), 0.5-0.6 (association), 0.35 (background WM).
PARAMS = {
    "CC": FibreParams(f_intra=0.54, d_extra_perp=0.50e-3, dispersion=0.30),
    "CCproj": FibreParams(f_intra=0.48, dispersion=0.40),
    "CST": FibreParams(f_intra=0.50, d_extra_perp=0.52e-3, dispersion=0.35),
    "ALIC": FibreParams(f_intra=0.46, dispersion=0.40),
    "CGC": FibreParams(f_intra=0.46, dispersion=0.40),
    "SLF": FibreParams(f_intra=0.42, dispersion=0.45),
    "IFO": FibreParams(f_intra=0.46, dispersion=0.40),
    "UNC": FibreParams(f_intra=0.42, dispersion=0.45),
    "WM": FibreParams(f_intra=0.38, d_extra_perp=0.65e-3, dispersion=0.70),
}

#: Callosal arch (y, z) in the mid-sagittal plane, anterior to posterior.
CC_ARCH = ((20.0, -1.0), (25.0, 6.0), (21.0, 12.0), (12.0, 15.0), (0.0, 16.0), (-12.0, 15.0),
           (-21.0, 12.0), (-26.0, 7.0), (-24.0, 1.0))
CC_HALF_WIDTH = 8.0  # |x| of the labelled corpus callosum
CC_RADIUS = 3.2
#: genu: y > CC_GENU_Y; splenium: y < CC_SPLENIUM_Y (along the arch); body in between.
CC_GENU_Y, CC_SPLENIUM_Y = 13.0, -15.0
#: lateral projections of the callosal body: |x| in (CC_HALF_WIDTH, CCPROJ_X_MAX), centre height
#: z = 15.5 + CCPROJ_SLOPE (|x| - CC_HALF_WIDTH), half thickness CCPROJ_HALF, y in CCPROJ_Y.
CCPROJ_X_MAX, CCPROJ_SLOPE, CCPROJ_HALF, CCPROJ_Y = 28.0, 0.35, 3.2, (-13.0, 11.0)


def _mirror(points: list[tuple[float, float, float]]) -> tuple:
    return tuple((-x, y, z) for x, y, z in points)


def _bundles() -> list[Bundle]:
    """The tubular bundles (left hemisphere points are the mirror of the right ones)."""
    right = {
        # projection: brainstem -> internal capsule (PLIC) -> corona radiata (SCR)
        "CST": ([(7.0, -8.0, -36.0), (10.0, -7.0, -22.0), (14.0, -6.0, -8.0), (15.0, -6.0, 4.0),
                 (16.0, -6.0, 16.0), (17.0, -5.0, 27.0)], 3.0,
                ((-10.0, (7, 8)), (3.0, (19, 20)), (24.0, (25, 26)), (1e9, (0, 0)))),
        "ALIC": ([(11.0, 4.0, -4.0), (14.0, 13.0, 0.0), (17.0, 22.0, 6.0), (19.0, 29.0, 11.0)],
                 2.6, (17, 18)),
        "CGC": ([(5.5, 22.0, 12.0), (5.5, 14.0, 21.0), (5.5, 0.0, 23.0), (5.5, -14.0, 21.0),
                 (5.5, -22.0, 14.0)], 2.4, (35, 36)),
        "SLF": ([(25.0, 18.0, 20.0), (26.0, 6.0, 22.0), (26.0, -8.0, 22.0), (25.0, -20.0, 19.0)],
                3.0, (41, 42)),
        "IFO": ([(16.0, 32.0, 2.0), (22.0, 18.0, -2.0), (25.0, 2.0, -5.0), (25.0, -16.0, -2.0),
                 (20.0, -32.0, 2.0)], 2.6, (45, 46)),
        "UNC": ([(15.0, 27.0, -9.0), (23.0, 16.0, -12.0), (28.0, 8.0, -17.0),
                 (29.0, 1.0, -24.0)], 2.4, (47, 48)),
    }
    out = []
    for name, spec in right.items():
        pts, radius, lab = spec
        for side, sign in (("R", 1.0), ("L", -1.0)):
            p = tuple((sign * x, y, z) for x, y, z in pts)
            if isinstance(lab[0], tuple):
                labels = tuple((zmax, pair[0] if side == "R" else pair[1]) for zmax, pair in lab)
                out.append(Bundle(f"{name}-{side}", p, radius, PARAMS[name], labels=labels))
            else:
                out.append(Bundle(f"{name}-{side}", p, radius, PARAMS[name],
                                  label=lab[0] if side == "R" else lab[1]))
    return out


#: Bundles (internal names) from highest to lowest priority where tubes overlap without
#: forming a designed crossing.
BUNDLE_NAMES = ("CC", "CST-R", "CST-L", "ALIC-R", "ALIC-L", "CGC-R", "CGC-L", "SLF-R", "SLF-L",
                "IFO-R", "IFO-L", "UNC-R", "UNC-L", "CCproj-R", "CCproj-L", "WM")
BUNDLE_INDEX = {n: i for i, n in enumerate(BUNDLE_NAMES)}


def bundle_params(name: str) -> FibreParams:
    """Compartment parameters of the internal bundle ``name`` (e.g. ``"SLF-L"``)."""
    return PARAMS[name.split("-")[0]]


# ----------------------------------------------------------------------------- phantom
@dataclass
class Phantom:
    """Anatomy of the template subject on the fine grid (flattened to in-brain voxels).

    Attributes
    ----------
    shape, affine
        Fine grid.
    index
        (n,) flat indices (C order) of the fine voxels with brain tissue.
    f_csf, f_gm, f_wm
        (n,) tissue volume fractions (sum to the brain fraction, <= 1).
    bundle1, bundle2
        (n,) internal bundle index (:data:`BUNDLE_NAMES`) of fibre population 1 / 2 (-1: none).
    dir1, dir2
        (n, 3) unit fibre directions (template frame).
    phi2
        (n,) fraction of the WM volume in population 2 (0 outside crossings).
    label
        (n,) ENIGMA label value (0: unlabelled).
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    index: np.ndarray
    f_csf: np.ndarray
    f_gm: np.ndarray
    f_wm: np.ndarray
    bundle1: np.ndarray
    bundle2: np.ndarray
    dir1: np.ndarray
    dir2: np.ndarray
    phi2: np.ndarray
    label: np.ndarray
    extra: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.index.size)

    def to_volume(self, values: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Scatter per-voxel ``values`` (n, ...) back onto the fine grid."""
        values = np.asarray(values)
        out = np.full((int(np.prod(self.shape)),) + values.shape[1:], fill, dtype=values.dtype)
        out[self.index] = values
        return out.reshape(self.shape + values.shape[1:])


def _smoothstep(t: np.ndarray) -> np.ndarray:
    """0 below -0.5, 1 above 0.5, linear in between (a 1-voxel partial-volume ramp)."""
    return np.clip(t + 0.5, 0.0, 1.0)


def _ellipsoid_depth(xyz: np.ndarray, centre, semi) -> np.ndarray:
    """Approximate signed depth (mm, positive inside) below an ellipsoid surface."""
    q = (xyz - np.asarray(centre)) / np.asarray(semi)
    rho = np.sqrt((q**2).sum(axis=-1))
    return (1.0 - rho) * float(np.min(semi))


def _polyline_samples(points: np.ndarray, step: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Densely resample a polyline; return points and unit tangents."""
    pts, tans = [], []
    for a, b in zip(points[:-1], points[1:]):
        seg = b - a
        length = float(np.linalg.norm(seg))
        k = max(int(np.ceil(length / step)), 1)
        t = np.arange(k) / k
        pts.append(a + t[:, None] * seg)
        tans.append(np.repeat((seg / length)[None], k, axis=0))
    pts.append(points[-1][None])
    tans.append(tans[-1][-1:])
    return np.concatenate(pts), np.concatenate(tans)


def _tube(xyz: np.ndarray, bundle: Bundle) -> tuple[np.ndarray, np.ndarray]:
    """Voxels within ``bundle.radius`` of the centre line: (member indices, tangents)."""
    pts, tans = _polyline_samples(np.asarray(bundle.points, dtype=float))
    lo, hi = pts.min(axis=0) - bundle.radius - 1, pts.max(axis=0) + bundle.radius + 1
    cand = np.flatnonzero(np.all((xyz >= lo) & (xyz <= hi), axis=1))
    dist, nearest = cKDTree(pts).query(xyz[cand])
    keep = dist <= bundle.radius
    return cand[keep], tans[nearest[keep]]


def _tissue_fractions(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSF, GM and WM volume fractions at ``xyz`` (fine voxel centres)."""
    depth = _ellipsoid_depth(xyz, (0.0, 0.0, 0.0), BRAIN_SEMI_AXES)
    brain = _smoothstep(depth / FINE_SPACING)
    below_csf = _smoothstep((depth - 1.5) / FINE_SPACING)  # subarachnoid CSF: 0-1.5 mm
    below_gm = _smoothstep((depth - 5.5) / FINE_SPACING)  # cortex: 1.5-5.5 mm
    f_csf = brain - below_csf
    f_gm = below_csf - below_gm
    f_wm = below_gm.copy()
    # ventricles (CSF) and thalami (GM) replace white matter
    for sx in (-1.0, 1.0):
        vent = _smoothstep(_ellipsoid_depth(xyz, (sx * 5.0, 0.0, 6.0), (3.5, 15.0, 4.5)))
        take = np.minimum(vent, f_wm)
        f_wm -= take
        f_csf += take
        thal = _smoothstep(_ellipsoid_depth(xyz, (sx * 7.0, -9.0, 0.0), (4.5, 7.5, 5.0)))
        take = np.minimum(thal, f_wm)
        f_wm -= take
        f_gm += take
    return f_csf, f_gm, f_wm


@lru_cache(maxsize=1)
def build_phantom() -> Phantom:
    """Rasterise the analytic anatomy on the fine grid (deterministic; cached)."""
    shape = fine_shape()
    aff = fine_affine()
    ijk = np.indices(shape).reshape(3, -1).T.astype(float)
    xyz_all = ijk * FINE_SPACING + aff[:3, 3]
    f_csf, f_gm, f_wm = _tissue_fractions(xyz_all)
    inside = (f_csf + f_gm + f_wm) > 1e-6
    index = np.flatnonzero(inside)
    xyz = xyz_all[index]
    f_csf, f_gm, f_wm = f_csf[index], f_gm[index], f_wm[index]
    n = index.size
    wm = f_wm > 0

    # background WM: along the ellipsoid normal (corona radiata-like)
    normal = xyz / np.asarray(BRAIN_SEMI_AXES) ** 2
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
    dir1 = normal.copy()
    bundle1 = np.where(wm, BUNDLE_INDEX["WM"], -1).astype(np.int16)
    dir2 = np.zeros((n, 3))
    bundle2 = np.full(n, -1, dtype=np.int16)
    phi2 = np.zeros(n)
    label = np.zeros(n, dtype=np.int16)
    prio = np.full(n, len(BUNDLE_NAMES), dtype=np.int16)  # lower = higher priority

    def claim(members: np.ndarray, name: str, dirs: np.ndarray, labels: np.ndarray) -> None:
        ok = wm[members]
        members, dirs, labels = members[ok], dirs[ok], labels[ok]
        better = BUNDLE_INDEX[name] < prio[members]
        m, dirs, labels = members[better], dirs[better], labels[better]
        bundle1[m] = BUNDLE_INDEX[name]
        dir1[m] = dirs
        label[m] = labels
        prio[m] = BUNDLE_INDEX[name]

    # corpus callosum: slab around the arch, left-right fibres; GCC/BCC/SCC by y along the arch
    arch_pts, _ = _polyline_samples(np.asarray(CC_ARCH))
    cand = np.flatnonzero(np.abs(xyz[:, 0]) <= CC_HALF_WIDTH)
    dist, nearest = cKDTree(arch_pts).query(xyz[cand][:, 1:])
    keep = dist <= CC_RADIUS
    m = cand[keep]
    y_arch = arch_pts[nearest[keep], 0]
    lab = np.where(y_arch > CC_GENU_Y, 3, np.where(y_arch < CC_SPLENIUM_Y, 5, 4)).astype(np.int16)
    cc_dir = np.zeros((m.size, 3))
    cc_dir[:, 0] = 1.0
    # the genu and splenium fan out (forceps minor / major)
    fan = np.where(lab == 3, 0.25, np.where(lab == 5, -0.25, 0.0)) * xyz[m, 0] / CC_HALF_WIDTH
    cc_dir[:, 1] = fan
    cc_dir /= np.linalg.norm(cc_dir, axis=1, keepdims=True)
    claim(m, "CC", cc_dir, lab)

    # tubes
    for b in _bundles():
        members, tangents = _tube(xyz, b)
        if b.labels is not None:
            z = xyz[members, 2]
            lab = np.zeros(members.size, dtype=np.int16)
            lo = -np.inf
            for zmax, value in b.labels:
                lab[(z > lo) & (z <= zmax)] = value
                lo = zmax
        else:
            lab = np.full(members.size, b.label, dtype=np.int16)
        claim(members, b.name, tangents, lab)

    # lateral callosal projections: left-right fibres rising into the centrum semiovale; they
    # cross the CST (-> SCR) and the SLF; elsewhere they replace background WM
    ax = np.abs(xyz[:, 0])
    zc = 15.5 + CCPROJ_SLOPE * (ax - CC_HALF_WIDTH)
    proj = ((ax > CC_HALF_WIDTH) & (ax < CCPROJ_X_MAX) & (np.abs(xyz[:, 2] - zc) <= CCPROJ_HALF)
            & (xyz[:, 1] >= CCPROJ_Y[0]) & (xyz[:, 1] <= CCPROJ_Y[1]) & wm)
    pdir = np.stack([np.sign(xyz[:, 0]), np.zeros(n), np.full(n, CCPROJ_SLOPE)], axis=1)
    pdir /= np.linalg.norm(pdir, axis=1, keepdims=True)
    side_name = np.where(xyz[:, 0] >= 0, "CCproj-R", "CCproj-L")
    crossing_with = {BUNDLE_INDEX[k] for k in ("CST-R", "CST-L", "SLF-R", "SLF-L")}
    cross = proj & np.isin(bundle1, list(crossing_with))
    plain = proj & (bundle1 == BUNDLE_INDEX["WM"])
    for nm in ("CCproj-R", "CCproj-L"):
        sel = cross & (side_name == nm)
        bundle2[sel] = BUNDLE_INDEX[nm]
        dir2[sel] = pdir[sel]
        phi2[sel] = CROSSING_FRACTION
        sel = plain & (side_name == nm)
        bundle1[sel] = BUNDLE_INDEX[nm]
        dir1[sel] = pdir[sel]
    log.debug("phantom: %d brain voxels, %d crossing", n, int(cross.sum()))
    return Phantom(shape=shape, affine=aff, index=index, f_csf=f_csf, f_gm=f_gm, f_wm=f_wm,
                   bundle1=bundle1, bundle2=bundle2, dir1=dir1, dir2=dir2, phi2=phi2,
                   label=label, extra={"xyz": xyz})


def label_table() -> pd.DataFrame:
    """The phantom's label table: columns ``index, abbreviation, name, side``.

    ``index`` is the ICBM-DTI-81 (JHU) label value that ENIGMA's look-up table uses.
    """
    rows = [{"index": k, "abbreviation": v[0], "name": v[1], "side": v[2]}
            for k, v in sorted(LABELS.items())]
    return pd.DataFrame(rows, columns=["index", "abbreviation", "name", "side"])
