"""dxtbx ``model.detector`` facade over :mod:`xtalscale.experiments`."""
from ...experiments import Detector, DetectorFactory, Panel

__all__ = ["Detector", "DetectorFactory", "Panel"]
