"""Safe persistence of fitted harmonizers: one ``.npz`` of arrays plus a JSON header, no pickle.

A model file holds numeric arrays only (loaded with ``allow_pickle=False``) and one entry
``__meta__``: a JSON document (class name, format version, parameters, site labels, feature
names, covariate encoding). Files are written atomically: to a temporary file in the same
folder, then moved into place with :func:`os.replace`, so a crash never leaves a half-written
model behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dmriharmony._fs import set_default_mode
from dmriharmony.errors import HarmonizationError

__all__ = ["FORMAT_VERSION", "write_model", "read_model"]

FORMAT_VERSION = 1
_META = "__meta__"


def write_model(
    path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict[str, Any]
) -> Path:
    """Write ``arrays`` and ``meta`` to ``path`` atomically; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = json.dumps({**meta, "format_version": FORMAT_VERSION}, sort_keys=True)
    payload = {k: np.asarray(v) for k, v in arrays.items()}
    for key, value in payload.items():
        if value.dtype.kind not in "biuf":
            raise HarmonizationError(f"model array {key!r} is not numeric ({value.dtype})")
    payload[_META] = np.frombuffer(header.encode("utf-8"), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **payload)
            fh.flush()
            os.fsync(fh.fileno())
        set_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_model(path: str | os.PathLike, expected_class: str) -> tuple[dict[str, np.ndarray], dict]:
    """Read a model written by :func:`write_model`, checking it holds ``expected_class``."""
    path = Path(path)
    if not path.is_file():
        raise HarmonizationError(f"model file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise HarmonizationError(f"model file {path} is not a dmriharmony model ({exc})") from exc
    if _META not in arrays:
        raise HarmonizationError(f"model file {path} has no {_META} header")
    meta = json.loads(arrays.pop(_META).tobytes().decode("utf-8"))
    if meta.get("class") != expected_class:
        raise HarmonizationError(
            f"model file {path} holds a {meta.get('class')!r} model, not {expected_class!r}"
        )
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise HarmonizationError(
            f"model file {path} has format version {meta['format_version']}, newer than this"
            f" dmriharmony reads ({FORMAT_VERSION})"
        )
    return arrays, meta
