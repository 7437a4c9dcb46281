"""``xtalscale.util.flumpy``: the ``dials.util.flumpy`` numpy <-> flex bridge, zero-copy.

Implemented in :mod:`xtalscale.flex_numpy`.
"""

from __future__ import annotations

from ..flex_numpy import (
    from_numpy,
    mat3_from_numpy,
    miller_index_from_numpy,
    to_numpy,
    vec_from_numpy,
)

__all__ = ["from_numpy", "to_numpy", "vec_from_numpy", "mat3_from_numpy", "miller_index_from_numpy"]
