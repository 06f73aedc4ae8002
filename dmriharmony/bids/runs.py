"""Finding DWI runs and their gradient files and sidecars (with BIDS inheritance).

Two units are used downstream:

- :class:`DWIRun` -- one ``*_dwi.nii[.gz]`` file with its (possibly inherited) ``.bval``,
  ``.bvec`` and merged JSON metadata; the site table has one row per run.
- :class:`DTIInput` -- what one tensor fit consumes. Usually one run; but datasets that split
  the shells of one acquisition across ``acq-`` runs (``acq-b0`` + ``acq-b1000``, or
  ``acq-b1000`` + ``acq-b3000``) on the same voxel grid are fitted together, the volumes
  concatenated (:func:`group_dti_inputs`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import bids
import nibabel as nib
import numpy as np

from dmriharmony.bids.exceptions import NoMatchingDataError

LOGGER = logging.getLogger("dmriharmony.bids")

DWI_EXTENSIONS = [".nii.gz", ".nii"]
#: entities that name a run in node names and derivative file names, in BIDS order.
RUN_ENTITIES = (("subject", "sub"), ("session", "ses"), ("acquisition", "acq"),
                ("reconstruction", "rec"), ("direction", "dir"), ("run", "run"))


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
        return entities_name(self.entities)


def entities_name(entities: dict) -> str:
    """``sub_01_ses_A_acq_b1000`` from an entity dict (valid Python identifier)."""
    parts = []
    for key, short in RUN_ENTITIES:
        if entities.get(key) is not None:
            parts.append(f"{short}_{entities[key]}")
    return "_".join(parts)


def entities_prefix(entities: dict) -> str:
    """``sub-01_ses-A_run-1``: the BIDS file-name prefix of an entity dict."""
    parts = []
    for key, short in RUN_ENTITIES:
        if entities.get(key) is not None:
            # pybids' PaddedInt keeps the zero padding of run-01 in str()
            parts.append(f"{short}-{entities[key]}")
    return "_".join(parts)


@dataclass
class DTIInput:
    """The DWI run(s) one tensor fit consumes (several when shells are split across ``acq-``).

    Attributes
    ----------
    runs
        The source runs; their volumes are concatenated in this order.
    entities
        Entities of the derivatives: the runs' common entities (``acquisition`` dropped when
        the runs differ in it).
    """

    runs: list[DWIRun]
    entities: dict

    @property
    def name(self) -> str:
        return entities_name(self.entities)

    @property
    def prefix(self) -> str:
        """File-name prefix of the derivatives (``sub-01_ses-A``)."""
        return entities_prefix(self.entities)

    @property
    def merged(self) -> bool:
        return len(self.runs) > 1


def _strip(labels: Iterable[str] | None, prefix: str) -> list[str] | None:
    if not labels:
        return None
    out = []
    for lab in labels:
        lab = str(lab).strip()
        out.append(lab[len(prefix):] if lab.startswith(prefix) else lab)
    return out


def _nearest(layout: bids.BIDSLayout, path: str, extension: str) -> Path | None:
    """The nearest ``.bval``/``.bvec`` of ``path`` by the BIDS inheritance principle."""
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
                if k in dict(RUN_ENTITIES)}
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


def _grid(path: Path) -> tuple | None:
    """(shape[:3], rounded affine) of a NIfTI header, None if unreadable."""
    try:
        img = nib.load(str(path))
    except Exception:  # noqa: BLE001 - validation reports unreadable files
        return None
    return tuple(img.shape[:3]), tuple(np.round(img.affine, 3).ravel())


def group_dti_inputs(runs: list[DWIRun]) -> list[DTIInput]:
    """Group runs into tensor-fit inputs: ``acq-`` siblings on one voxel grid are merged.

    Runs that share every entity but ``acquisition`` (same subject, session, direction, run)
    and lie on the same voxel grid (shape and affine) are one acquisition whose shells were
    exported as separate series; their volumes are concatenated for the fit and the
    derivatives are named without ``acq-``. Siblings on different grids stay separate.
    """
    groups: dict[tuple, list[DWIRun]] = {}
    for run in runs:
        key = tuple((k, str(run.entities.get(k))) for k, _ in RUN_ENTITIES
                    if k != "acquisition")
        groups.setdefault(key, []).append(run)
    inputs: list[DTIInput] = []
    for members in groups.values():
        if len(members) == 1:
            inputs.append(DTIInput([members[0]], dict(members[0].entities)))
            continue
        by_grid: dict[tuple | None, list[DWIRun]] = {}
        for run in members:
            by_grid.setdefault(_grid(run.dwi), []).append(run)
        for grid, same in by_grid.items():
            if grid is None or len(same) == 1:
                inputs.extend(DTIInput([r], dict(r.entities)) for r in same)
                continue
            ents = {k: v for k, v in same[0].entities.items() if k != "acquisition"}
            LOGGER.info("fitting %s together (shells split across acq- runs)",
                        ", ".join(r.dwi.name for r in same))
            inputs.append(DTIInput(same, ents))
    return sorted(inputs, key=lambda i: str(i.runs[0].dwi))
