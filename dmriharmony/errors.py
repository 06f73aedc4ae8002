"""Exceptions raised by dmriharmony.

Every error names what is at fault (file, subject, site, feature or column) in one line so a
researcher can fix the input without reading a traceback.
"""

from __future__ import annotations


class DmriHarmonyError(Exception):
    """Base class of all dmriharmony errors."""


class HarmonizationError(DmriHarmonyError, ValueError):
    """Invalid input to a harmonizer (names the site, feature or column at fault)."""


class BIDSInputError(DmriHarmonyError, ValueError):
    """Invalid BIDS input (names the file at fault)."""


class SimulationError(DmriHarmonyError, ValueError):
    """Invalid simulator configuration."""


class TemplateError(DmriHarmonyError, ValueError):
    """A template cannot be found or loaded (says how to obtain it)."""
