"""DIALS-shaped import path: ``xtalscale.algorithms.scaling.model`` (ScalingModelBase and the built-in models)."""
