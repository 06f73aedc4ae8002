"""Scanner sites: vendor, field, protocol, noise, and the quirks of real DWI exports.

Each :class:`Site` describes one scanner and its diffusion protocol. The presets
(:data:`PRESETS`) mimic common clinical/research protocols of the three vendors and the way
dcm2niix exports them (Li et al., J Neurosci Methods 2016):

* GE: b-values written as nominal (0, 1000), one b0 first, zeroed background outside the head;
* Siemens: CMRR-style multi-shell with b0 volumes interleaved and written as ``b=5``;
* Philips: b-values written as the slightly different effective values of each direction,
  rounded to 5 s/mm^2 (795/800/805), one b0, ``scl_slope`` intensity scaling, and no
  ``TotalReadoutTime`` / ``PhaseEncodingDirection`` (only ``PhaseEncodingAxis``) in the sidecar;
  stored in a neurological (det > 0) orientation so the FSL b-vector x flip applies.

The diffusion signal itself uses the applied b-values and gradient directions; the files carry
what the vendor writes.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from dipy.core.sphere import HemiSphere, disperse_charges

from dmriharmony.errors import SimulationError

VENDORS = ("GE", "Siemens", "Philips")
_ORIENT_CODES = set("LRAPSI")


@dataclass(frozen=True)
class Site:
    """One scanner site and its DWI protocol.

    Attributes
    ----------
    name
        Site label (alphanumeric; also the BIDS session label of traveling subjects).
    vendor
        "GE", "Siemens" or "Philips".
    model, field_strength, serial, software, institution
        Scanner identity written to the sidecar.
    shells
        Nominal b-values (s/mm^2) of the diffusion-weighted shells.
    directions
        Number of directions per shell (same length as ``shells``).
    n_b0
        Number of b=0 volumes.
    b0_position
        "first" or "interleaved" (spread evenly through the series).
    b0_written
        The b-value written for b=0 volumes (Siemens CMRR sequences write 5).
    bval_jitter, bval_round
        Relative SD of the per-direction effective b-value (applied and, when ``bval_round``
        > 0, written rounded to that step); 0 writes the nominal value.
    te_ms, tr_ms
        Echo and repetition time.
    voxel_size
        (x, y, z) mm of the acquisition grid.
    snr
        b=0 SNR in white matter (mean noise-free WM b0 signal / Rician sigma).
    signal_scale
        Stored intensity of the mean white-matter b0 (vendor/receiver scaling).
    scl_slope
        NIfTI scaling slope (Philips-style stored integers); 1 for none.
    orientation
        Voxel axis codes of the stored image (e.g. "LAS", "RAS").
    angulation_deg
        Slice angulation about the left-right axis (oblique acquisition).
    zero_background
        Vendor masks the background outside the head to 0.
    phase_encoding, total_readout_time, echo_spacing
        Sidecar fields; ``None`` leaves them out (as Philips exports do).
    bvec_error
        Deliberate export error for testing gradient checks: None, "flip_x", "flip_y",
        "flip_z" or "swap_xy" (applied to the written .bvec only).
    age_range
        Ages (years) of the site's participants.
    """

    name: str
    vendor: str
    model: str
    field_strength: float
    shells: tuple
    directions: tuple
    n_b0: int = 1
    b0_position: str = "first"
    b0_written: float = 0.0
    bval_jitter: float = 0.0
    bval_round: float = 0.0
    te_ms: float = 80.0
    tr_ms: float = 8000.0
    voxel_size: tuple = (2.5, 2.5, 2.5)
    snr: float | None = 25.0
    signal_scale: float = 1000.0
    scl_slope: float = 1.0
    orientation: str = "LAS"
    angulation_deg: float = 0.0
    zero_background: bool = False
    phase_encoding: str | None = "j-"
    total_readout_time: float | None = 0.05
    echo_spacing: float | None = 0.00069
    bvec_error: str | None = None
    serial: str = "00000"
    software: str = ""
    institution: str = ""
    age_range: tuple = (20.0, 70.0)
    extra_sidecar: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"site {self.name!r}"
        if not self.name.isalnum():
            raise SimulationError(f"{where}: the site name must be alphanumeric (BIDS label)")
        if self.vendor not in VENDORS:
            raise SimulationError(f"{where}: vendor must be one of {VENDORS}, got {self.vendor!r}")
        if len(self.shells) != len(self.directions) or not self.shells:
            raise SimulationError(f"{where}: shells and directions need the same (>0) length")
        if any(b <= 50 for b in self.shells) or any(n < 1 for n in self.directions):
            raise SimulationError(f"{where}: shells must be > 50 s/mm^2 with >= 1 direction each")
        if sum(self.directions) < 6:
            raise SimulationError(f"{where}: a tensor needs >= 6 diffusion directions")
        if self.n_b0 < 1:
            raise SimulationError(f"{where}: at least one b=0 volume is needed")
        if self.b0_position not in ("first", "interleaved"):
            raise SimulationError(f"{where}: b0_position must be 'first' or 'interleaved'")
        if (len(self.orientation) != 3 or not set(self.orientation) <= _ORIENT_CODES
                or len({_axis_of(c) for c in self.orientation}) != 3):
            raise SimulationError(f"{where}: orientation must be 3 axis codes like 'LAS'")
        if len(self.voxel_size) != 3 or min(self.voxel_size) <= 0:
            raise SimulationError(f"{where}: voxel_size must be 3 positive numbers (mm)")
        if self.snr is not None and not self.snr > 0:
            raise SimulationError(f"{where}: snr must be > 0 (or None for noise-free)")
        if self.te_ms <= 0 or self.tr_ms <= self.te_ms:
            raise SimulationError(f"{where}: need 0 < TE < TR (ms)")
        if self.bvec_error not in (None, "flip_x", "flip_y", "flip_z", "swap_xy"):
            raise SimulationError(f"{where}: unknown bvec_error {self.bvec_error!r}")

    @property
    def n_volumes(self) -> int:
        return self.n_b0 + int(sum(self.directions))

    def with_(self, **changes) -> Site:
        """Copy with fields changed (validated)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("shells", "directions", "voxel_size", "age_range"):
            d[k] = list(d[k])
        return d


def _axis_of(code: str) -> int:
    return {"L": 0, "R": 0, "A": 1, "P": 1, "S": 2, "I": 2}[code]


def _site_rng(site: Site, what: str) -> np.random.Generator:
    """A generator that depends only on the site's name and protocol (not the dataset seed)."""
    key = f"{site.name}|{site.vendor}|{site.shells}|{site.directions}|{what}"
    return np.random.default_rng(zlib.crc32(key.encode()))


def shell_directions(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` unit directions spread by electrostatic repulsion (Jones et al., MRM 1999)."""
    if n == 1:
        return np.array([[1.0, 0.0, 0.0]])
    v = rng.normal(size=(n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    hemi, _ = disperse_charges(HemiSphere(xyz=v), 1000, const=0.05)
    d = hemi.vertices.copy()
    return d / np.linalg.norm(d, axis=1, keepdims=True)


@dataclass(frozen=True)
class Protocol:
    """The gradient table of a site: applied and written values (voxel frame)."""

    bvals_applied: np.ndarray
    bvals_written: np.ndarray
    bvecs_voxel: np.ndarray  # unit vectors in the image voxel frame (0 for b=0)


_PROTOCOL_CACHE: dict[str, Protocol] = {}


def protocol(site: Site) -> Protocol:
    """The site's volume order, b-values and gradient directions (deterministic per site)."""
    key = repr(site)
    if key not in _PROTOCOL_CACHE:
        _PROTOCOL_CACHE[key] = _make_protocol(site)
    p = _PROTOCOL_CACHE[key]
    return Protocol(p.bvals_applied.copy(), p.bvals_written.copy(), p.bvecs_voxel.copy())


def _make_protocol(site: Site) -> Protocol:
    rng = _site_rng(site, "gradients")
    dw_b, dw_g = [], []
    for shell, n in zip(site.shells, site.directions):
        g = shell_directions(int(n), rng)
        dw_b.extend([float(shell)] * int(n))
        dw_g.extend(g)
    # interleave shells the way product sequences do (alternating through the list)
    order = np.argsort(np.concatenate([np.linspace(0, 1, int(n), endpoint=False) + 1e-3 * k
                                       for k, n in enumerate(site.directions)]), kind="stable")
    dw_b = np.asarray(dw_b)[order]
    dw_g = np.asarray(dw_g)[order]
    n_dw = dw_b.size
    if site.b0_position == "first" or site.n_b0 == 1:
        b0_at = np.arange(site.n_b0)
    else:
        # one b0 every n / n_b0 volumes, the first at the start (CMRR-style interleaving)
        b0_at = np.round(np.arange(site.n_b0) * (n_dw + site.n_b0) / site.n_b0).astype(int)
    n = n_dw + site.n_b0
    is_b0 = np.zeros(n, bool)
    is_b0[np.unique(b0_at)] = True
    if is_b0.sum() != site.n_b0:  # collisions of rounded positions: fill from the start
        free = np.flatnonzero(~is_b0)
        is_b0[free[: site.n_b0 - is_b0.sum()]] = True
    bvals = np.zeros(n)
    bvecs = np.zeros((n, 3))
    bvals[~is_b0] = dw_b
    bvecs[~is_b0] = dw_g
    applied = bvals.copy()
    written = bvals.copy()
    if site.bval_jitter > 0:
        jit = 1.0 + _site_rng(site, "bjitter").normal(0.0, site.bval_jitter, n)
        applied[~is_b0] = bvals[~is_b0] * jit[~is_b0]
        if site.bval_round > 0:
            written[~is_b0] = np.round(applied[~is_b0] / site.bval_round) * site.bval_round
    applied[is_b0] = site.b0_written
    written[is_b0] = site.b0_written
    return Protocol(applied, written, bvecs)


def sidecar(site: Site, *, slice_thickness: float, n_slices: int) -> dict:
    """dcm2niix-style JSON sidecar of a DWI run at ``site``."""
    d: dict = {
        "Modality": "MR",
        "MagneticFieldStrength": float(site.field_strength),
        "ImagingFrequency": round(42.577478 * site.field_strength, 4),
        "Manufacturer": site.vendor,
        "ManufacturersModelName": site.model,
        "InstitutionName": site.institution or f"{site.name} imaging centre",
        "DeviceSerialNumber": site.serial,
        "SoftwareVersions": site.software,
        "MRAcquisitionType": "2D",
        "ScanningSequence": "EP",
        "SequenceVariant": "SK_SP",
        "SeriesDescription": f"DTI_{'_'.join(str(int(b)) for b in site.shells)}",
        "SliceThickness": float(slice_thickness),
        "EchoTime": round(site.te_ms / 1000.0, 5),
        "RepetitionTime": round(site.tr_ms / 1000.0, 4),
        "FlipAngle": 90,
        "ImageType": ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"],
        "ConversionSoftware": "dmriharmony-simulate",
        "ConversionSoftwareVersion": "0.1.0",
    }
    if site.vendor == "Philips":
        d["PhaseEncodingAxis"] = "j"
        d["PhilipsRescaleSlope"] = float(site.scl_slope)
        d["PhilipsRescaleIntercept"] = 0.0
        d["UsePhilipsFloatNotDisplayScaling"] = 1
    else:
        if site.phase_encoding is not None:
            d["PhaseEncodingDirection"] = site.phase_encoding
        if site.total_readout_time is not None:
            d["TotalReadoutTime"] = float(site.total_readout_time)
        if site.echo_spacing is not None:
            d["EffectiveEchoSpacing"] = float(site.echo_spacing)
        # slice timing of an interleaved ascending 2D acquisition
        order = list(range(0, n_slices, 2)) + list(range(1, n_slices, 2))
        times = np.empty(n_slices)
        times[order] = np.arange(n_slices) * (site.tr_ms / 1000.0) / n_slices
        d["SliceTiming"] = [round(float(t), 4) for t in times]
    d.update(_VENDOR_SIDECAR[site.vendor])
    d.update(site.extra_sidecar)
    return d


#: Vendor-typical sequence and coil names (as dcm2niix copies them from the DICOM headers).
_VENDOR_SIDECAR = {
    "GE": {"PulseSequenceType": "Spin-echo EPI", "SequenceName": "epi2",
           "ReceiveCoilName": "8HRBRAIN"},
    "Siemens": {"PulseSequenceType": "Spin-echo EPI", "SequenceName": "ep_b0",
                "ReceiveCoilName": "HeadNeck_64"},
    "Philips": {"PulseSequenceType": "Spin-echo EPI", "SequenceName": "DwiSE",
                "ReceiveCoilName": "SENSE-Head-8"},
}


PRESETS: dict[str, Site] = {
    "ge": Site(
        name="ge", vendor="GE", model="DISCOVERY MR750", field_strength=3.0,
        shells=(1000.0,), directions=(20,), n_b0=1, te_ms=82.0, tr_ms=8000.0,
        voxel_size=(2.5, 2.5, 2.5), snr=22.0, signal_scale=1200.0, orientation="LAS",
        zero_background=True, phase_encoding="j", total_readout_time=0.0512,
        echo_spacing=0.0008, serial="000000608555MR3", institution="GE site",
        software="27\\LX\\MR Software release:DV26.0_R03_1831.b", age_range=(20.0, 65.0)),
    "siemens": Site(
        name="siemens", vendor="Siemens", model="Prisma_fit", field_strength=3.0,
        shells=(1000.0, 2000.0), directions=(12, 12), n_b0=2, b0_position="interleaved",
        b0_written=5.0, te_ms=89.0, tr_ms=7600.0, voxel_size=(2.5, 2.5, 2.5), snr=18.0,
        signal_scale=300.0, orientation="LAS", angulation_deg=-8.0, phase_encoding="j-",
        total_readout_time=0.0466, echo_spacing=0.00069, serial="167024",
        institution="Siemens site", software="syngo MR E11", age_range=(25.0, 70.0)),
    "philips": Site(
        name="philips", vendor="Philips", model="Achieva", field_strength=1.5,
        shells=(800.0,), directions=(15,), n_b0=1, bval_jitter=0.004, bval_round=5.0,
        te_ms=70.0, tr_ms=7000.0, voxel_size=(2.5, 2.5, 3.0), snr=16.0, signal_scale=950.0,
        scl_slope=1.3748, orientation="RAS", angulation_deg=10.0, zero_background=True,
        phase_encoding=None, total_readout_time=None, echo_spacing=None, serial="42018",
        institution="Philips site", software="5.1.7\\5.1.7.2", age_range=(30.0, 75.0)),
    "ge15": Site(
        name="ge15", vendor="GE", model="SIGNA HDxt", field_strength=1.5,
        shells=(1000.0,), directions=(15,), n_b0=1, te_ms=95.0, tr_ms=10000.0,
        voxel_size=(2.5, 2.5, 3.0), snr=14.0, signal_scale=2400.0, orientation="LAS",
        zero_background=True, phase_encoding="j", total_readout_time=0.0604,
        echo_spacing=0.00072, serial="000000517MR15", institution="GE 1.5T site",
        software="15\\LX\\MR Software release:15.0_M4_0910.a"),
    "philips3": Site(
        name="philips3", vendor="Philips", model="Ingenia", field_strength=3.0,
        shells=(1000.0,), directions=(32,), n_b0=1, bval_jitter=0.004, bval_round=5.0,
        te_ms=76.0, tr_ms=8200.0, voxel_size=(2.0, 2.0, 2.0), snr=20.0, signal_scale=1200.0,
        scl_slope=2.0183, orientation="RAS", angulation_deg=12.0, zero_background=True,
        phase_encoding=None, total_readout_time=None, echo_spacing=None, serial="45233",
        institution="Philips 3T site", software="5.4.1\\5.4.1.1"),
    "siemens15": Site(
        name="siemens15", vendor="Siemens", model="Avanto", field_strength=1.5,
        shells=(1000.0,), directions=(30,), n_b0=1, te_ms=96.0, tr_ms=9300.0,
        voxel_size=(2.5, 2.5, 2.5), snr=15.0, signal_scale=380.0, orientation="LAS",
        phase_encoding="j-", total_readout_time=0.0712, echo_spacing=0.00078, serial="26431",
        institution="Siemens 1.5T site", software="syngo MR B17"),
}
#: The three sites of the default dataset.
DEFAULT_SITES = ("ge", "siemens", "philips")


def get_site(site: str | Site | dict) -> Site:
    """A :class:`Site` from a preset name, a Site, or a dict of fields (``preset`` key allowed)."""
    if isinstance(site, Site):
        return site
    if isinstance(site, str):
        if site not in PRESETS:
            raise SimulationError(f"unknown site preset {site!r}; presets: {sorted(PRESETS)}")
        return PRESETS[site]
    if isinstance(site, dict):
        spec = dict(site)
        base = spec.pop("preset", None)
        for k in ("shells", "directions", "voxel_size", "age_range"):
            if k in spec:
                spec[k] = tuple(spec[k])
        try:
            if base is not None:
                return replace(get_site(base), **spec)
            return Site(**spec)
        except TypeError as exc:
            raise SimulationError(f"site {spec.get('name', base)!r}: {exc}") from None
    raise SimulationError(f"cannot build a site from {type(site).__name__}")
