"""Simulated subjects: demographics, true biological effects and individual microstructure.

Biology acts on tissue parameters, never on FA directly. Per voxel of fibre population ``p``
(internal bundle ``B``, ENIGMA label ``L``) of subject ``j``::

    f_intra = f_B + age_f * m_B * (age_j - age0) + sex_f * male_j + dx_f * dx_j * [L in dx_rois]
              + u_j + v_jB
    d_extra_perp = d_B + age_d * m_B * (age_j - age0) + dx_d * dx_j * [L in dx_rois]

with ``u_j ~ N(0, sd_global^2)`` and ``v_jB ~ N(0, sd_bundle^2)`` (individual variation shared by
all voxels of the subject / the bundle) and an age multiplier ``m_B`` (the genu of the corpus
callosum ages faster: anterior-posterior gradient of white-matter ageing, Sullivan & Pfefferbaum,
Neurosci Biobehav Rev 2006). The FA/MD effects these produce are computed counterfactually and
written to ``derivatives/groundtruth`` (see :mod:`dmriharmony.simulate.groundtruth`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from dmriharmony.errors import SimulationError
from dmriharmony.simulate.anatomy import ABBREVIATION_TO_LABEL, BUNDLE_NAMES, Phantom
from dmriharmony.simulate.signal import Microstructure, base_microstructure


@dataclass(frozen=True)
class EffectModel:
    """True biological effects (tissue parameters; f in fraction units, d in mm^2/s).

    Attributes
    ----------
    age0
        Reference age (years) at which the template subject is defined.
    age_f, age_d
        Change per year of the intra-axonal fraction / extra-axonal radial diffusivity.
    age_multiplier
        Per internal bundle multiplier of the age effect (default 1).
    sex_f
        Intra-axonal fraction difference of males vs females.
    dx_rois
        ENIGMA abbreviations of the labels where the diagnosis acts.
    dx_f, dx_d
        Diagnosis (patients vs controls) shift of f_intra / d_extra_perp in ``dx_rois``.
    sd_global, sd_bundle
        Between-subject SD of the whole-brain and per-bundle f_intra offsets.
    """

    age0: float = 40.0
    age_f: float = -0.0012
    age_d: float = 2.0e-6
    age_multiplier: dict = field(default_factory=lambda: {"CC": 1.4})
    sex_f: float = 0.006
    dx_rois: tuple = ("CGC-L", "CGC-R", "UNC-L", "UNC-R", "SLF-L")
    dx_f: float = -0.04
    dx_d: float = 0.04e-3
    sd_global: float = 0.012
    sd_bundle: float = 0.012

    def __post_init__(self) -> None:
        unknown = [r for r in self.dx_rois if r not in ABBREVIATION_TO_LABEL]
        if unknown:
            raise SimulationError(f"dx_rois: unknown phantom label(s) {unknown}; "
                                  f"known: {sorted(ABBREVIATION_TO_LABEL)}")
        bad = [b for b in self.age_multiplier if b.split("-")[0] not in
               {n.split("-")[0] for n in BUNDLE_NAMES}]
        if bad:
            raise SimulationError(f"age_multiplier: unknown bundle(s) {bad}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dx_rois"] = list(self.dx_rois)
        return d


@dataclass(frozen=True)
class Subject:
    """One simulated participant (tissue and demographics; geometry lives in transforms)."""

    label: str
    site: str | None  # None for traveling subjects
    age: float
    sex: str  # "M" / "F"
    dx: int  # 0 control, 1 patient
    offset_global: float
    offset_bundle: tuple  # per internal bundle (BUNDLE_NAMES order)
    seed: int

    @property
    def traveling(self) -> bool:
        return self.site is None


def draw_subject(label: str, site: str | None, rng: np.random.Generator, *, age: float,
                 sex: str, dx: int, effects: EffectModel) -> Subject:
    """Draw the individual offsets of one subject."""
    return Subject(
        label=label, site=site, age=float(age), sex=sex, dx=int(dx),
        offset_global=float(rng.normal(0.0, effects.sd_global)),
        offset_bundle=tuple(float(v) for v in rng.normal(0.0, effects.sd_bundle,
                                                        len(BUNDLE_NAMES))),
        seed=int(rng.integers(0, 2**31 - 1)),
    )


def subject_microstructure(phantom: Phantom, subject: Subject | None, effects: EffectModel, *,
                           age: float | None = None, sex: str | None = None,
                           dx: int | None = None, individual: bool = True) -> Microstructure:
    """Microstructure of ``subject`` (``None``: the template subject at ``age0``).

    ``age``, ``sex`` and ``dx`` override the subject's values (for counterfactual effects);
    ``individual=False`` drops the individual offsets.
    """
    ms = base_microstructure(phantom)
    if subject is not None:
        age = subject.age if age is None else age
        sex = subject.sex if sex is None else sex
        dx = subject.dx if dx is None else dx
    else:
        age = effects.age0 if age is None else age
        sex = "F" if sex is None else sex
        dx = 0 if dx is None else dx
    mult = np.array([effects.age_multiplier.get(n, effects.age_multiplier.get(n.split("-")[0],
                                                                                1.0))
                     for n in BUNDLE_NAMES])
    offs = np.zeros(len(BUNDLE_NAMES))
    glob = 0.0
    if subject is not None and individual:
        offs = np.asarray(subject.offset_bundle)
        glob = subject.offset_global
    dx_labels = [ABBREVIATION_TO_LABEL[r] for r in effects.dx_rois]
    in_dx = np.isin(phantom.label, dx_labels)
    male = 1.0 if sex == "M" else 0.0
    for k, (bundle, fi, dep) in enumerate(((phantom.bundle1, ms.f_intra1, ms.d_extra_perp1),
                                           (phantom.bundle2, ms.f_intra2, ms.d_extra_perp2))):
        b = np.maximum(bundle, 0)
        da = age - effects.age0
        df = effects.age_f * mult[b] * da + effects.sex_f * male + glob + offs[b]
        dd = effects.age_d * mult[b] * da
        if k == 0:  # the labelled population carries the diagnosis effect
            df = df + effects.dx_f * dx * in_dx
            dd = dd + effects.dx_d * dx * in_dx
        fi[:] = np.clip(fi + df, 0.05, 0.95)
        dep[:] = np.maximum(dep + dd, 0.05e-3)
    return ms
