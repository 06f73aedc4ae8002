"""Shared pytest fixtures: locations of the read-only reference material in ../shared."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# no Nipype version check over the network, whichever test imports nipype first
os.environ.setdefault("NIPYPE_NO_ET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("DMRIHARMONY_SHARED", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def enigma_dir() -> Path:
    """The real ENIGMA-DTI template and Subject1 outputs (../shared/enigma/)."""
    path = SHARED_DIR / "enigma"
    if not (path / "ENIGMA_look_up_table.txt").exists():
        pytest.skip(f"ENIGMA reference files not found in {path} (set DMRIHARMONY_SHARED)")
    return path


@pytest.fixture(scope="session")
def refs_dir() -> Path:
    """Reference figures computed with R (metafor, lme4) in ../shared/refs/."""
    path = SHARED_DIR / "refs"
    if not path.is_dir():
        pytest.skip(f"R reference figures not found in {path} (set DMRIHARMONY_SHARED)")
    return path


@pytest.fixture(scope="session")
def metafor_bcg(refs_dir: Path) -> dict:
    return json.loads((refs_dir / "metafor_bcg.json").read_text())


@pytest.fixture(scope="session")
def lme4_sleepstudy(refs_dir: Path) -> dict:
    return json.loads((refs_dir / "lme4_sleepstudy.json").read_text())
