"""DIALS-shaped ``dials.util`` import path (``xtalscale.util.flumpy``)."""
