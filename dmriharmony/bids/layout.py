"""Indexing a BIDS dataset with pybids (cached in a SQLite database in the work folder)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from importlib import resources
from pathlib import Path

import bids

from dmriharmony.bids.exceptions import InvalidDatasetError
from dmriharmony.dti.io import atomic_write_bytes

LOGGER = logging.getLogger("dmriharmony.bids")


def config_path() -> Path:
    """The pybids configuration that knows dmriharmony's ``space/model/param/desc`` entities."""
    return Path(str(resources.files("dmriharmony") / "data" / "bids_config.json"))


def database_dir(work_dir: str | Path, bids_dir: str | Path) -> Path:
    """Folder of the pybids database for ``bids_dir`` inside ``work_dir`` (one per dataset)."""
    key = hashlib.sha1(str(Path(bids_dir).resolve()).encode()).hexdigest()[:12]
    return Path(work_dir) / "bids_db" / key


def dataset_fingerprint(root: str | Path) -> str:
    """SHA-1 of every file's relative path, size and mtime under ``root`` (hidden and
    ``derivatives``/``sourcedata``/``code`` folders skipped): changes when files are added,
    removed or rewritten. Stat calls only; far cheaper than re-indexing."""
    root = Path(root)
    skip = {"derivatives", "sourcedata", "code"}
    h = hashlib.sha1()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and not (rel == Path(".") and d in skip))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            st = os.stat(os.path.join(dirpath, name))
            h.update(f"{rel / name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def load_layout(
    bids_dir: str | Path,
    *,
    work_dir: str | Path | None = None,
    reset_database: bool = False,
) -> bids.BIDSLayout:
    """Index ``bids_dir`` with pybids.

    With ``work_dir`` the index is stored in ``<work_dir>/bids_db/<hash>/`` (pybids
    ``database_path``) and re-loaded on the next call: indexing a large dataset once instead of
    on every run. The index is rebuilt when the dataset changed since it was made (files
    added, removed or rewritten: :func:`dataset_fingerprint`) or with ``reset_database``.

    Raises
    ------
    InvalidDatasetError
        If the folder does not exist or lacks ``dataset_description.json``.
    """
    root = Path(bids_dir).resolve()
    if not root.is_dir():
        raise InvalidDatasetError(f"{root}: BIDS folder does not exist")
    if not (root / "dataset_description.json").is_file():
        raise InvalidDatasetError(
            f"{root / 'dataset_description.json'}: missing; not a BIDS dataset"
        )
    kwargs: dict = {"validate": False, "config": ["bids", str(config_path())]}
    if work_dir is not None:
        db = database_dir(work_dir, root)
        stamp = db.parent / f"{db.name}.fingerprint"
        fingerprint = dataset_fingerprint(root)
        stale = not stamp.is_file() or stamp.read_text().strip() != fingerprint
        if (reset_database or stale) and db.exists():
            LOGGER.info("re-indexing %s (%s)", root, "reset" if reset_database else "changed")
            shutil.rmtree(db)
        db.parent.mkdir(parents=True, exist_ok=True)
        kwargs["database_path"] = str(db)
    try:
        layout = bids.BIDSLayout(str(root), **kwargs)
    except Exception as exc:  # pybids raises ValueError/BIDSValidationError/sqlite errors
        raise InvalidDatasetError(f"{root}: pybids cannot index it ({exc})") from None
    if work_dir is not None:
        atomic_write_bytes((fingerprint + "\n").encode(), stamp)
    return layout
