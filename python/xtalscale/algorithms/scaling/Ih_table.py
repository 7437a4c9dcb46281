"""DIALS path ``dials.algorithms.scaling.Ih_table``: re-exports of :mod:`xtalscale.fit.ih_table`
(and of DIALS's ASU helpers, which live in :mod:`xtalscale.symmetry`)."""
from xtalscale.fit.ih_table import IhTable, IhTableBlock, TargetAsuDictCache
from xtalscale.symmetry import get_sorted_asu_indices, map_indices_to_asu

__all__ = ["IhTable", "IhTableBlock", "TargetAsuDictCache", "get_sorted_asu_indices", "map_indices_to_asu"]
