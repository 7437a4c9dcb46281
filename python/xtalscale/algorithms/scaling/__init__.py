"""DIALS-shaped import path (facade over the xtalscale core)."""
