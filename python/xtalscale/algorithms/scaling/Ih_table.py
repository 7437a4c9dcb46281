"""DIALS path ``dials.algorithms.scaling.Ih_table``: re-exports of :mod:`xtalscale.fit.ih_table`."""
from xtalscale.fit.ih_table import IhTable, IhTableBlock

__all__ = ["IhTable", "IhTableBlock"]
