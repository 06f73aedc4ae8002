"""The site table: one row per DWI run with its scanner and acquisition.

BIDS has no site field. The site of a run is taken, in order, from: a ``site`` column of the
subject's ``sub-<label>_sessions.tsv`` (traveling subjects scanned at several sites), a
``site`` column of ``participants.tsv``, the session label, the ``acq-`` label, and finally a
scanner key built from the sidecar (``Manufacturer_Model_FieldT_Serial``).
"""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from dmriharmony.bids.runs import DWIRun
from dmriharmony.dti.gradients import B0_THRESHOLD, read_bvals, read_bvecs, shells

SITE_COLUMNS = [
    "subject", "session", "run", "acq", "site", "site_source", "vendor", "model", "field",
    "serial", "shells", "n_directions", "n_volumes", "voxel_size", "te", "dwi",
]
_MISSING = {"", "n/a", "na", "nan", "none"}


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


def scanner_key(metadata: dict) -> str | None:
    """``Manufacturer_Model_<field>T_Serial`` from sidecar metadata (None if nothing known)."""
    parts = [
        _clean(metadata.get("Manufacturer")),
        _clean(metadata.get("ManufacturersModelName")),
        None if metadata.get("MagneticFieldStrength") is None
        else f"{float(metadata['MagneticFieldStrength']):g}T",
        _clean(metadata.get("DeviceSerialNumber")),
    ]
    parts = [_slug(p) for p in parts if p]
    return "_".join(p for p in parts if p) or None


def _n_directions(bvals: np.ndarray, bvecs: np.ndarray) -> int:
    """Distinct gradient directions among diffusion-weighted volumes (g and -g identical)."""
    dw = bvals > B0_THRESHOLD
    g = bvecs[dw]
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    flip = (g[:, 0] < 0) | ((g[:, 0] == 0) & (g[:, 1] < 0))
    g[flip] *= -1
    return int(len(np.unique(np.round(g, 3), axis=0)))


def _site(run: DWIRun, bids_root: Path, participants: pd.DataFrame | None,
          sessions_cache: dict) -> tuple[str, str]:
    sub = run.subject
    ses = run.session
    if ses is not None:
        if sub not in sessions_cache:
            sessions_cache[sub] = _read_tsv(bids_root / f"sub-{sub}" / f"sub-{sub}_sessions.tsv")
        st = sessions_cache[sub]
        if st is not None and "site" in st.columns and "session_id" in st.columns:
            row = st.loc[st["session_id"].isin([f"ses-{ses}", ses]), "site"]
            if len(row) and _clean(row.iloc[0]):
                return _clean(row.iloc[0]), "sessions.tsv"
    if participants is not None and "site" in participants.columns:
        row = participants.loc[participants["participant_id"].isin([f"sub-{sub}", sub]), "site"]
        if len(row) and _clean(row.iloc[0]):
            return _clean(row.iloc[0]), "participants.tsv"
    if ses is not None:
        return ses, "session"
    acq = run.entities.get("acquisition")
    if acq is not None:
        return str(acq), "acq"
    key = scanner_key(run.metadata)
    if key:
        return key, "scanner"
    return "unknown", "none"


def site_table(runs: list[DWIRun], bids_root: str | Path, *, b_round: float = 50.0,
               read_images: bool = True) -> pd.DataFrame:
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

    Returns
    -------
    pandas.DataFrame
        Columns :data:`SITE_COLUMNS`; ``model`` has surrounding spaces stripped; ``shells`` is
        a space-separated string of rounded b-values; missing values are NaN.
    """
    bids_root = Path(bids_root)
    participants = _read_tsv(bids_root / "participants.tsv")
    sessions_cache: dict = {}
    rows = []
    for run in runs:
        md = run.metadata
        site, source = _site(run, bids_root, participants, sessions_cache)
        row = {
            "subject": run.subject,
            "session": run.session,
            "run": run.entities.get("run"),
            "acq": run.entities.get("acquisition"),
            "site": site,
            "site_source": source,
            "vendor": _clean(md.get("Manufacturer")),
            "model": _clean(md.get("ManufacturersModelName")),
            "field": md.get("MagneticFieldStrength"),
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
                row["n_volumes"] = int(hdr.get_data_shape()[3]) if len(hdr.get_data_shape()) > 3 \
                    else 1
                row["voxel_size"] = "x".join(f"{z:.3g}" for z in hdr.get_zooms()[:3])
        except Exception:  # noqa: BLE001 - validation reports bad files with a clear message
            pass
        if row["run"] is not None:
            row["run"] = int(row["run"])
        rows.append(row)
    return pd.DataFrame(rows, columns=SITE_COLUMNS)
