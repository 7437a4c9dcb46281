"""Zero-copy bridge between numpy arrays and flex arrays (``dials.util.flumpy``'s functions).

Flex arrays here are numpy-backed, so both directions share memory with their input (as
DIALS's flumpy does for contiguous arrays of a matching dtype).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import flex_arrays as fa

__all__ = ["from_numpy", "to_numpy", "vec_from_numpy", "mat3_from_numpy", "miller_index_from_numpy"]


def to_numpy(array: fa.FlexArray) -> np.ndarray:
    """The data of a flex array as a numpy array sharing its memory.

    Raises
    ------
    TypeError
        If ``array`` is not a flex array.
    """
    if not isinstance(array, fa.FlexArray):
        raise TypeError(f"to_numpy: expected a flex array (got {type(array).__name__})")
    return array.as_numpy_array()


def from_numpy(array: Any) -> fa.FlexArray:
    """A scalar-element flex array (double/int/size_t/bool, 1-D or grid) over ``array``.

    Use :func:`vec_from_numpy` / :func:`miller_index_from_numpy` for tuple elements.

    Raises
    ------
    TypeError
        For dtypes without a flex counterpart.
    """
    a = np.ascontiguousarray(array)
    if a.dtype == object or a.dtype.kind == "U":
        return fa.std_string(a.ravel().tolist())
    table = {"f": fa.double, "b": fa.bool}
    if a.dtype.kind in table:
        t = table[a.dtype.kind]
    elif a.dtype.kind == "i":
        t = fa.int
    elif a.dtype.kind == "u":
        t = fa.size_t
    else:
        raise TypeError(f"from_numpy: no flex type for dtype {a.dtype}")
    return t._wrap(t._cast(a, "array") if a.ndim else t._cast(a.reshape(1), "array"))


def vec_from_numpy(array: Any) -> fa.FlexArray:
    """``flex.vec2_double``/``vec3_double`` from an ``(n, 2)``/``(n, 3)`` array."""
    a = np.ascontiguousarray(array, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] not in (2, 3):
        raise ValueError(f"vec_from_numpy: need shape (n, 2) or (n, 3) (got {a.shape})")
    return (fa.vec2_double if a.shape[1] == 2 else fa.vec3_double)._wrap(a)


def mat3_from_numpy(array: Any) -> fa.mat3_double:
    """``flex.mat3_double`` from an ``(n, 9)`` or ``(n, 3, 3)`` array (row-major)."""
    a = np.ascontiguousarray(array, dtype=np.float64)
    if a.ndim == 3 and a.shape[1:] == (3, 3):
        a = a.reshape(a.shape[0], 9)
    if a.ndim != 2 or a.shape[1] != 9:
        raise ValueError(f"mat3_from_numpy: need shape (n, 9) or (n, 3, 3) (got {a.shape})")
    return fa.mat3_double._wrap(a)


def miller_index_from_numpy(array: Any) -> fa.miller_index:
    """``flex.miller_index`` from an ``(n, 3)`` integer array (values must fit int32)."""
    a = np.asarray(array)
    if a.ndim != 2 or a.shape[1] != 3 or a.dtype.kind not in "iu":
        raise ValueError(
            f"miller_index_from_numpy: need an (n, 3) integer array (got {a.dtype}, {a.shape})"
        )
    return fa.miller_index._wrap(np.ascontiguousarray(fa.miller_index._cast(a, "array")))
