"""Indexing a BIDS dataset with pybids (cached in a SQLite database in the work folder)."""

from __future__ import annotations

import hashlib
import logging
import shutil
from importlib import resources
from pathlib import Path

import bids

from dmriharmony.bids.exceptions import InvalidDatasetError

LOGGER = logging.getLogger("dmriharmony.bids")


def config_path() -> Path:
    """The pybids configuration that knows dmriharmony's ``space/model/param/desc`` entities."""
    return Path(str(resources.files("dmriharmony") / "data" / "bids_config.json"))


def database_dir(work_dir: str | Path, bids_dir: str | Path) -> Path:
    """Folder of the pybids database for ``bids_dir`` inside ``work_dir`` (one per dataset)."""
    key = hashlib.sha1(str(Path(bids_dir).resolve()).encode()).hexdigest()[:12]
    return Path(work_dir) / "bids_db" / key


def load_layout(
    bids_dir: str | Path,
    *,
    work_dir: str | Path | None = None,
    reset_database: bool = False,
) -> bids.BIDSLayout:
    """Index ``bids_dir`` with pybids.

    With ``work_dir`` the index is stored in ``<work_dir>/bids_db/<hash>/`` (pybids
    ``database_path``) and re-loaded on the next call: indexing a large dataset once instead of
    on every run. ``reset_database`` re-indexes (after files were added).

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
        if reset_database and db.exists():
            shutil.rmtree(db)
        db.parent.mkdir(parents=True, exist_ok=True)
        kwargs["database_path"] = str(db)
    try:
        return bids.BIDSLayout(str(root), **kwargs)
    except Exception as exc:  # pybids raises ValueError/BIDSValidationError/sqlite errors
        raise InvalidDatasetError(f"{root}: pybids cannot index it ({exc})") from None
