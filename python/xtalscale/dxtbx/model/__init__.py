"""dxtbx ``model`` facade over :mod:`xtalscale.experiments`."""
from ...experiments import (  # noqa: F401
    Beam,
    Crystal,
    Detector,
    Experiment,
    ExperimentList,
    Goniometer,
    Panel,
    Scan,
)
from .experiment_list import ExperimentListFactory  # noqa: F401

__all__ = ["Beam", "Crystal", "Detector", "Experiment", "ExperimentList",
           "ExperimentListFactory", "Goniometer", "Panel", "Scan"]
