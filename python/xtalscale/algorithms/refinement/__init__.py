"""DIALS-shaped import path ``dials.algorithms.refinement`` (only what scaling scripts use)."""
