"""Outputs written atomically get the permissions of a plain open() (0o666 & ~umask), not 0600."""

from __future__ import annotations

import os
import stat

from dmriharmony.dti.io import atomic_write_bytes


def test_atomic_writes_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_bytes(b"x", tmp_path / "a.tsv")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.umask(0o007)
        path = atomic_write_bytes(b"y", tmp_path / "b.tsv")
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
    finally:
        os.umask(old)
