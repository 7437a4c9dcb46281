"""dxtbx ``serialize.load`` facade over :mod:`xtalscale.experiments`."""
from __future__ import annotations

from ...experiments import ExperimentList, ExperimentListFactory

__all__ = ["experiment_list"]


def experiment_list(filename, check_format: bool = True) -> ExperimentList:
    """Load an ``.expt`` / ``*_experiments.json`` file (``check_format`` is accepted for
    compatibility; image files are never opened)."""
    return ExperimentListFactory.from_json_file(filename, check_format=check_format)
