"""Finding DWI runs and their gradient files and sidecars (with BIDS inheritance)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import bids

from dmriharmony.bids.exceptions import NoMatchingDataError

DWI_EXTENSIONS = [".nii.gz", ".nii"]


@dataclass
class DWIRun:
    """One DWI run: image, gradient files (possibly inherited) and merged sidecar metadata."""

    dwi: Path
    bval: Path | None
    bvec: Path | None
    entities: dict
    metadata: dict = field(default_factory=dict)

    @property
    def subject(self) -> str:
        return str(self.entities["subject"])

    @property
    def session(self) -> str | None:
        ses = self.entities.get("session")
        return None if ses is None else str(ses)

    @property
    def name(self) -> str:
        """A short identifier usable as a Nipype node name (``sub_01_ses_A_run_1``)."""
        parts = [f"sub_{self.subject}"]
        for key, short in (("session", "ses"), ("acquisition", "acq"),
                           ("direction", "dir"), ("run", "run")):
            if self.entities.get(key) is not None:
                parts.append(f"{short}_{self.entities[key]}")
        return "_".join(parts)


def _strip(labels: Iterable[str] | None, prefix: str) -> list[str] | None:
    if not labels:
        return None
    return [lab[len(prefix):] if lab.startswith(prefix) else lab for lab in labels]


def _nearest(layout: bids.BIDSLayout, path: str, extension: str) -> Path | None:
    try:
        found = layout.get_nearest(path, suffix="dwi", extension=extension, all_=True)
    except (ValueError, IndexError, KeyError):
        return None
    found = [f for f in (found or []) if f]
    return Path(found[0]) if found else None


def collect_dwi_runs(
    layout: bids.BIDSLayout,
    participant_label: Iterable[str] | None = None,
    session_label: Iterable[str] | None = None,
) -> list[DWIRun]:
    """All DWI runs matching the filters, with inherited ``.bval/.bvec`` and sidecar metadata.

    Labels may carry their ``sub-``/``ses-`` prefix. Gradient files and JSON sidecars are looked
    up with the BIDS inheritance principle (pybids ``get_nearest``/``get_metadata``), so files
    at the dataset root or subject level apply to all runs below them.

    Raises
    ------
    NoMatchingDataError
        A requested participant/session does not exist, or no DWI run matches.
    """
    subjects = _strip(participant_label, "sub-")
    sessions = _strip(session_label, "ses-")
    if subjects:
        missing = sorted(set(subjects) - set(layout.get_subjects()))
        if missing:
            raise NoMatchingDataError(
                f"{layout.root}: participant label(s) not found: {', '.join(missing)}"
            )
    if sessions:
        missing = sorted(set(sessions) - set(layout.get_sessions()))
        if missing:
            raise NoMatchingDataError(
                f"{layout.root}: session label(s) not found: {', '.join(missing)}"
            )
    query: dict = {"suffix": "dwi", "datatype": "dwi", "extension": DWI_EXTENSIONS,
                   "return_type": "object"}
    if subjects:
        query["subject"] = subjects
    if sessions:
        query["session"] = sessions
    files = layout.get(**query)
    runs = []
    for bf in sorted(files, key=lambda f: f.path):
        ents = {k: v for k, v in bf.get_entities().items()
                if k not in ("suffix", "extension", "datatype")}
        runs.append(DWIRun(
            dwi=Path(bf.path),
            bval=_nearest(layout, bf.path, ".bval"),
            bvec=_nearest(layout, bf.path, ".bvec"),
            entities=ents,
            metadata=dict(layout.get_metadata(bf.path)),
        ))
    if not runs:
        what = []
        if subjects:
            what.append(f"participant(s) {', '.join(subjects)}")
        if sessions:
            what.append(f"session(s) {', '.join(sessions)}")
        raise NoMatchingDataError(
            f"{layout.root}: no DWI run found" + (f" for {' and '.join(what)}" if what else "")
        )
    return runs
