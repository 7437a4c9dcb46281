"""DIALS import path ``dials.util.options``: the command-line parser.

Implemented in :mod:`xtalscale.job.options`.
"""
from __future__ import annotations

from xtalscale.job.options import (
    ArgumentParser,
    FilenameDataWrapper,
    reflections_and_experiments_from_files,
)

__all__ = ["ArgumentParser", "FilenameDataWrapper", "reflections_and_experiments_from_files"]
