"""dxtbx ``serialize.load`` facade over :mod:`xtalscale.experiments`."""
from __future__ import annotations

from ...experiments import experiment_list

__all__ = ["experiment_list"]
