"""dxtbx ``model.detector`` facade over :mod:`xtalscale.experiments`."""
from ...experiments import Detector, DetectorFactory, Panel  # noqa: F401

__all__ = ["Detector", "DetectorFactory", "Panel"]
