"""dxtbx ``model`` facade over :mod:`xtalscale.experiments`."""
from ...experiments import (  # noqa: F401
    Beam,
    BeamFactory,
    Crystal,
    CrystalFactory,
    Detector,
    DetectorFactory,
    Experiment,
    ExperimentList,
    Goniometer,
    GoniometerFactory,
    Panel,
    Scan,
    ScanFactory,
)
from .experiment_list import ExperimentListFactory  # noqa: F401

__all__ = ["Beam", "BeamFactory", "Crystal", "CrystalFactory", "Detector", "DetectorFactory",
           "Experiment", "ExperimentList", "ExperimentListFactory", "Goniometer",
           "GoniometerFactory", "Panel", "Scan", "ScanFactory"]
