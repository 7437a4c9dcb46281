"""dxtbx ``model.experiment_list`` facade over :mod:`xtalscale.experiments`."""
from ...experiments import Experiment, ExperimentList, ExperimentListFactory  # noqa: F401

__all__ = ["Experiment", "ExperimentList", "ExperimentListFactory"]
