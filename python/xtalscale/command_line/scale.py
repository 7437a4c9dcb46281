"""DIALS import path ``dials.command_line.scale``: the whole ``dials.scale`` PHIL master scope.

Implemented in :mod:`xtalscale.job.phil` (the command itself is ``xtalscale scale``,
:mod:`xtalscale.cli.scale`).
"""
from __future__ import annotations

from xtalscale.job.phil import scale_phil_scope as phil_scope

__all__ = ["phil_scope"]
