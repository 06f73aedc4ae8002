"""The site table: one row per DWI run with its scanner and acquisition.

BIDS has no site field. The site of a run is taken, in order, from: a site column of the
subject's ``sub-<label>_sessions.tsv`` (traveling subjects scanned at several sites), a site
column of ``participants.tsv`` (``site`` by default, matched case-insensitively), the session
label, the ``acq-`` label (unless the subject has several ``acq-`` runs in one session: then
``acq-`` splits shells, not sites), and finally a scanner key built from the sidecar
(``Manufacturer_Model_FieldT_Serial``). Model names are stripped of surrounding spaces (real
sidecars carry ``"Prisma "``) and vendor names normalised (``SIEMENS`` -> ``Siemens``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from dmriharmony.bids.runs import RUN_ENTITIES, DWIRun
from dmriharmony.dti.gradients import B0_THRESHOLD, read_bvals, read_bvecs, shells

LOGGER = logging.getLogger("dmriharmony.bids")

SITE_COLUMNS = [
    "subject", "session", "run", "acq", "site", "site_source", "vendor", "model", "field",
    "serial", "shells", "n_directions", "n_volumes", "voxel_size", "te", "dwi",
]
_MISSING = {"", "n/a", "na", "nan", "none"}
_VENDORS = {"siemens": "Siemens", "ge": "GE", "philips": "Philips", "canon": "Canon",
            "toshiba": "Canon", "hitachi": "Hitachi", "uih": "UIH", "united": "UIH"}


def _read_tsv(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def _clean(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return None if text.lower() in _MISSING else text


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "", text)


def normalize_vendor(manufacturer: object) -> str | None:
    """``Siemens``/``GE``/``Philips``/... from a DICOM Manufacturer string (None if absent).

    ``"SIEMENS"``, ``"Siemens Healthineers"``, ``"GE MEDICAL SYSTEMS"``, ``"Philips Medical
    Systems"`` map to the short vendor names; unknown manufacturers are returned stripped.
    """
    text = _clean(manufacturer)
    if text is None:
        return None
    first = re.split(r"[^A-Za-z]+", text.lower())
    for word in first:
        if word in _VENDORS:
            return _VENDORS[word]
    return text


def scanner_key(metadata: dict) -> str | None:
    """``Manufacturer_Model_<field>T_Serial`` from sidecar metadata (1.5 T -> ``1p5T``; None if
    nothing is known)."""
    field = metadata.get("MagneticFieldStrength")
    try:
        field_txt = None if field is None else f"{float(field):g}T".replace(".", "p")
    except (TypeError, ValueError):
        field_txt = _clean(field)
    parts = [
        normalize_vendor(metadata.get("Manufacturer")),
        _clean(metadata.get("ManufacturersModelName")),
        field_txt,
        _clean(metadata.get("DeviceSerialNumber")),
    ]
    parts = [_slug(p) for p in parts if p]
    return "_".join(p for p in parts if p) or None


def _n_directions(bvals: np.ndarray, bvecs: np.ndarray) -> int:
    """Distinct gradient directions among diffusion-weighted volumes (g and -g identical)."""
    dw = bvals > B0_THRESHOLD
    g = bvecs[dw]
    norms = np.linalg.norm(g, axis=1, keepdims=True)
    g = g[np.isfinite(norms[:, 0]) & (norms[:, 0] > 0)]
    if not len(g):
        return 0
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    flip = (g[:, 0] < 0) | ((g[:, 0] == 0) & (g[:, 1] < 0))
    g[flip] *= -1
    return int(len(np.unique(np.round(g, 3), axis=0)))


def _column(table: pd.DataFrame | None, name: str) -> str | None:
    """The column of ``table`` named ``name`` (case-insensitive), None if absent."""
    if table is None:
        return None
    for col in table.columns:
        if col.strip().lower() == name.lower():
            return col
    return None


def _acq_siblings(runs: list[DWIRun]) -> set[int]:
    """Indices of runs sharing all entities but ``acq-`` with another run of a different acq."""
    keys: dict[tuple, set] = {}
    for run in runs:
        key = tuple(str(run.entities.get(k)) for k, _ in RUN_ENTITIES if k != "acquisition")
        keys.setdefault(key, set()).add(run.entities.get("acquisition"))
    out = set()
    for i, run in enumerate(runs):
        key = tuple(str(run.entities.get(k)) for k, _ in RUN_ENTITIES if k != "acquisition")
        if len(keys[key]) > 1:
            out.add(i)
    return out


def _site(run: DWIRun, bids_root: Path, participants: pd.DataFrame | None,
          sessions_cache: dict, site_column: str, acq_is_shell: bool) -> tuple[str, str]:
    sub = run.subject
    ses = run.session
    if ses is not None:
        if sub not in sessions_cache:
            sessions_cache[sub] = _read_tsv(bids_root / f"sub-{sub}" / f"sub-{sub}_sessions.tsv")
        st = sessions_cache[sub]
        col = _column(st, site_column)
        if col is not None and "session_id" in st.columns:
            row = st.loc[st["session_id"].str.strip().isin([f"ses-{ses}", ses]), col]
            if len(row) and _clean(row.iloc[0]):
                return _clean(row.iloc[0]), "sessions.tsv"
    col = _column(participants, site_column)
    if col is not None and "participant_id" in participants.columns:
        ids = participants["participant_id"].str.strip()
        row = participants.loc[ids.isin([f"sub-{sub}", sub]), col]
        if len(row) and _clean(row.iloc[0]):
            return _clean(row.iloc[0]), "participants.tsv"
    if ses is not None:
        return ses, "session"
    acq = run.entities.get("acquisition")
    if acq is not None and not acq_is_shell:
        return str(acq), "acq"
    key = scanner_key(run.metadata)
    if key:
        return key, "scanner"
    return "unknown", "none"


def site_table(runs: list[DWIRun], bids_root: str | Path, *, b_round: float = 50.0,
               read_images: bool = True, site_column: str = "site") -> pd.DataFrame:
    """One row per DWI run: subject, session, run, acq, site, scanner and acquisition.

    Parameters
    ----------
    runs
        From :func:`dmriharmony.bids.runs.collect_dwi_runs`.
    bids_root
        The dataset root (for ``participants.tsv`` and ``sessions.tsv``).
    b_round
        Shells are b-values rounded to this step (scanners report 995 for 1000).
    read_images
        Read the NIfTI headers for voxel size and volume count (cheap, header only).
    site_column
        Name of the site column in ``participants.tsv`` / ``sessions.tsv``.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`SITE_COLUMNS`; ``model`` has surrounding spaces stripped; ``vendor`` is
        normalised (:func:`normalize_vendor`); ``shells`` is a space-separated string of
        rounded b-values; unknown values are None/NaN.
    """
    bids_root = Path(bids_root)
    participants = _read_tsv(bids_root / "participants.tsv")
    sessions_cache: dict = {}
    shell_split = _acq_siblings(runs)
    rows = []
    for i, run in enumerate(runs):
        md = run.metadata
        site, source = _site(run, bids_root, participants, sessions_cache, site_column,
                             i in shell_split)
        field = md.get("MagneticFieldStrength")
        try:
            field = None if field is None else float(field)
        except (TypeError, ValueError):
            field = None
        row = {
            "subject": run.subject,
            "session": run.session,
            "run": run.entities.get("run"),
            "acq": run.entities.get("acquisition"),
            "site": site,
            "site_source": source,
            "vendor": normalize_vendor(md.get("Manufacturer")),
            "model": _clean(md.get("ManufacturersModelName")),
            "field": field,
            "serial": _clean(md.get("DeviceSerialNumber")),
            "shells": None,
            "n_directions": None,
            "n_volumes": None,
            "voxel_size": None,
            "te": md.get("EchoTime"),
            "dwi": str(run.dwi),
        }
        try:
            if run.bval is not None:
                bvals = read_bvals(run.bval)
                row["shells"] = " ".join(str(s) for s in shells(bvals, b_round))
                if run.bvec is not None:
                    row["n_directions"] = _n_directions(bvals, read_bvecs(run.bvec, len(bvals)))
            if read_images:
                hdr = nib.load(str(run.dwi)).header
                dims = hdr.get_data_shape()
                row["n_volumes"] = int(dims[3]) if len(dims) > 3 else 1
                row["voxel_size"] = "x".join(f"{z:.3g}" for z in hdr.get_zooms()[:3])
        except Exception as exc:  # noqa: BLE001 - validation reports bad files clearly
            LOGGER.debug("site table: %s: %s", run.dwi, exc)
        if row["run"] is not None:
            row["run"] = int(row["run"])
        rows.append(row)
    return pd.DataFrame(rows, columns=SITE_COLUMNS)
