"""DIALS import path ``dials.algorithms.scaling.error_model``."""
