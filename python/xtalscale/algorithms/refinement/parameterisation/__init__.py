"""DIALS-shaped import path ``dials.algorithms.refinement.parameterisation``."""
