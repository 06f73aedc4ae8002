"""File-system helpers shared by every atomic writer."""

from __future__ import annotations

import os

__all__ = ["set_default_mode"]


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (threads are safe)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)  # elsewhere: briefly restrictive, never permissive
    os.umask(mask)
    return mask


def set_default_mode(path: str | os.PathLike) -> None:
    """Give a temporary file the permissions a plain ``open()`` would have (``0o666 & ~umask``).

    :func:`tempfile.mkstemp` creates files readable by their owner only (0600); renamed into
    place they would hide a study's outputs from the rest of the group on a shared cluster.
    """
    os.chmod(path, 0o666 & ~_umask())
