"""``xtalscale.array_family.flex``: the import path of ``dials.array_family.flex``.

Holds the numpy-backed flex array types (``flex.double``, ``flex.int``, ``flex.bool``,
``flex.size_t``, ``flex.vec3_double``, ``flex.miller_index``, ``flex.std_string``, ...),
``flex.grid``, the module functions (``flex.mean``, ``flex.sum``, ``flex.sort_permutation``,
``flex.random_selection``, ...) and ``flex.reflection_table``. See
:mod:`xtalscale.flex_arrays` and :mod:`xtalscale.reflection_table` for the details.
"""

from __future__ import annotations

from ..flex_arrays import *  # noqa: F401,F403  (the DIALS flex namespace)
from ..flex_arrays import __all__ as _flex_all
from ..reflection_table import experiment_id_map, reflection_table

__all__ = list(_flex_all) + ["reflection_table", "experiment_id_map"]
