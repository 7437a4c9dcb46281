"""A small subset of ``scitbx.matrix``: dense row-major matrices and vectors.

Provided (the calls DIALS/dxtbx scripts make on geometry and small linear algebra):

* constructors ``rec(elems, n)``, ``col(elems)``, ``row(elems)``, ``sqr(elems)``,
  ``diag(diagonal)``, ``identity(n)``, ``zeros(n)`` (``n`` is ``(n_rows, n_columns)``;
  ``sqr`` takes n² values; ``elems`` is kept as a tuple of floats);
* arithmetic ``+ - * /`` (``*`` is the matrix product for two matrices and elementwise
  scaling with a number; ``/`` divides by a number), unary ``-``, ``==``;
* ``n``, ``elems``, ``n_rows()``, ``n_columns()``, ``len()``, iteration, ``m[i]`` (flat
  index) and ``m[i, j]``, ``transpose()``, ``trace()``, ``determinant()``, ``inverse()``,
  ``as_list_of_lists()``, ``as_numpy_array()``, ``round(digits)``, ``each_abs()``,
  ``min()``, ``max()``;
* vectors: ``dot()``, ``cross()`` (3-vectors), ``length()``, ``length_sq()``, ``norm_sq()``,
  ``normalize()``, ``angle(other, deg=False)``, ``outer_product()``,
  ``rotate_around_origin(axis, angle, deg=False)`` (right-handed) and
  ``axis_and_angle_as_r3_rotation_matrix(angle, deg=False)`` (self is the axis).

Not provided: the rest of scitbx.matrix (quaternions, rt, symmetric-matrix helpers ...).
Non-finite elements are accepted as scitbx does; shape mismatches raise ``ValueError``.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["col", "diag", "identity", "rec", "row", "sqr", "zeros"]


class rec:
    """A dense ``n_rows × n_columns`` matrix with row-major ``elems``."""

    __slots__ = ("elems", "n")

    def __init__(self, elems: Any, n: Any) -> None:
        values = tuple(float(x) for x in (elems.ravel() if isinstance(elems, np.ndarray)
                                          else elems))
        shape = tuple(int(k) for k in n)
        if len(shape) != 2 or shape[0] < 0 or shape[1] < 0:
            raise ValueError(f"matrix shape must be (n_rows, n_columns), got {n!r}")
        if len(values) != shape[0] * shape[1]:
            raise ValueError(f"{len(values)} elements do not fill a {shape[0]} x {shape[1]} "
                             "matrix")
        self.elems = values
        self.n = shape

    # ------------------------------------------------------------------ structure
    def n_rows(self) -> int:
        return self.n[0]

    def n_columns(self) -> int:
        return self.n[1]

    def __len__(self) -> int:
        return len(self.elems)

    def __iter__(self) -> Iterator[float]:
        return iter(self.elems)

    def __getitem__(self, key: Any) -> float:
        if isinstance(key, tuple):
            i, j = key
            if not (0 <= i < self.n[0] and 0 <= j < self.n[1]):
                raise IndexError(f"index {key} out of range for a {self.n[0]} x {self.n[1]} "
                                 "matrix")
            return self.elems[i * self.n[1] + j]
        return self.elems[key]

    def as_numpy_array(self) -> np.ndarray:
        """The matrix as an ``(n_rows, n_columns)`` float64 array (a copy)."""
        return np.array(self.elems, dtype=np.float64).reshape(self.n)

    def as_list_of_lists(self) -> list:
        return self.as_numpy_array().tolist()

    def _new(self, a: np.ndarray) -> rec:
        a = np.asarray(a, dtype=np.float64)
        if a.ndim == 2 and a.shape[1] == 1:
            return col(a.ravel())
        if a.ndim == 2 and a.shape[0] == 1:
            return row(a.ravel())
        if a.ndim == 2 and a.shape[0] == a.shape[1]:
            return sqr(a.ravel())
        return rec(a.ravel(), a.shape)

    def _same_shape(self, other: Any, op: str) -> np.ndarray:
        o = other.as_numpy_array() if isinstance(other, rec) else np.asarray(other, float)
        if o.size != len(self.elems):
            raise ValueError(f"matrix {op}: shapes {self.n} and {np.shape(o)} do not match")
        return o.reshape(self.n)

    # ------------------------------------------------------------------ arithmetic
    def __add__(self, other: Any) -> rec:
        return self._new(self.as_numpy_array() + self._same_shape(other, "+"))

    def __sub__(self, other: Any) -> rec:
        return self._new(self.as_numpy_array() - self._same_shape(other, "-"))

    def __radd__(self, other: Any) -> rec:
        return self.__add__(other)

    def __rsub__(self, other: Any) -> rec:
        return self._new(self._same_shape(other, "-") - self.as_numpy_array())

    def __neg__(self) -> rec:
        return self._new(-self.as_numpy_array())

    def __pos__(self) -> rec:
        return self

    def __mul__(self, other: Any) -> Any:
        if isinstance(other, numbers.Real):
            return self._new(self.as_numpy_array() * float(other))
        if isinstance(other, rec):
            b = other.as_numpy_array()
        else:  # a plain sequence multiplies as a column vector
            b = np.asarray(other, dtype=np.float64).reshape(-1, 1)
        a = self.as_numpy_array()
        if a.shape[1] != b.shape[0]:
            raise ValueError(f"matrix product: shapes {a.shape} and {b.shape} do not match")
        return self._new(a @ b)

    def __rmul__(self, other: Any) -> Any:
        if isinstance(other, numbers.Real):
            return self._new(self.as_numpy_array() * float(other))
        a = np.asarray(other, dtype=np.float64).reshape(1, -1)  # a plain sequence: a row
        return self._new(a @ self.as_numpy_array())

    def __truediv__(self, other: Any) -> rec:
        if not isinstance(other, numbers.Real):
            raise TypeError("a matrix can only be divided by a number")
        return self._new(self.as_numpy_array() / float(other))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, rec):
            return NotImplemented
        return self.n == other.n and self.elems == other.elems

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"matrix.rec(elems={self.elems}, n={self.n})"

    # ------------------------------------------------------------------ matrix functions
    def transpose(self) -> rec:
        return self._new(self.as_numpy_array().T)

    def _square(self, what: str) -> np.ndarray:
        if self.n[0] != self.n[1]:
            raise ValueError(f"{what} needs a square matrix (shape {self.n})")
        return self.as_numpy_array()

    def trace(self) -> float:
        return float(np.trace(self._square("trace")))

    def determinant(self) -> float:
        return float(np.linalg.det(self._square("determinant")))

    def inverse(self) -> sqr:
        a = self._square("inverse")
        if a.size and np.linalg.det(a) == 0:
            raise ValueError("matrix inverse: the matrix is singular")
        return sqr(np.linalg.inv(a).ravel())

    def each_abs(self) -> rec:
        return self._new(np.abs(self.as_numpy_array()))

    def min(self) -> float:
        return min(self.elems)

    def max(self) -> float:
        return max(self.elems)

    def round(self, digits: int) -> rec:
        return self._new(np.round(self.as_numpy_array(), digits))

    # ------------------------------------------------------------------ vectors
    def _vector(self, what: str) -> np.ndarray:
        if 1 not in self.n:
            raise ValueError(f"{what} needs a vector (shape {self.n})")
        return np.array(self.elems, dtype=np.float64)

    def dot(self, other: Any = None) -> float:
        a = self._vector("dot")
        b = a if other is None else np.asarray(list(other), dtype=np.float64)
        if a.size != b.size:
            raise ValueError(f"dot: {a.size} and {b.size} elements")
        return float(np.dot(a, b))

    def cross(self, other: Any) -> rec:
        a, b = self._vector("cross"), np.asarray(list(other), dtype=np.float64)
        if a.size != 3 or b.size != 3:
            raise ValueError("cross needs two 3-vectors")
        return self._new(np.cross(a, b).reshape(self.n))

    def length_sq(self) -> float:
        return self.dot()

    norm_sq = length_sq

    def length(self) -> float:
        return math.sqrt(self.length_sq())

    def normalize(self) -> rec:
        length = self.length()
        if length == 0:
            raise ValueError("normalize: zero-length vector")
        return self / length

    def angle(self, other: Any, deg: bool = False) -> float:
        """The angle between two vectors (radians unless ``deg``)."""
        b = other if isinstance(other, rec) else col(other)
        denominator = self.length() * b.length()
        if denominator == 0:
            raise ValueError("angle: zero-length vector")
        cos = max(-1.0, min(1.0, self.dot(b) / denominator))
        value = math.acos(cos)
        return math.degrees(value) if deg else value

    def outer_product(self, other: Any = None) -> rec:
        a = self._vector("outer_product")
        b = a if other is None else np.asarray(list(other), dtype=np.float64)
        return self._new(np.outer(a, b))

    def axis_and_angle_as_r3_rotation_matrix(self, angle: float, deg: bool = False) -> sqr:
        """Right-handed rotation by ``angle`` about this (3-vector) axis."""
        k = self.normalize()._vector("axis_and_angle_as_r3_rotation_matrix")
        if k.size != 3:
            raise ValueError("the rotation axis must be a 3-vector")
        t = math.radians(angle) if deg else float(angle)
        kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
        r = np.eye(3) + math.sin(t) * kx + (1 - math.cos(t)) * (kx @ kx)
        return sqr(r.ravel())

    def rotate_around_origin(self, axis: Any, angle: float, deg: bool = False) -> rec:
        """This 3-vector rotated right-handedly by ``angle`` about ``axis``."""
        a = axis if isinstance(axis, rec) else col(axis)
        r = a.axis_and_angle_as_r3_rotation_matrix(angle, deg=deg).as_numpy_array()
        return self._new((r @ self._vector("rotate_around_origin")).reshape(self.n))


class col(rec):
    """A column vector."""

    __slots__ = ()

    def __init__(self, elems: Any) -> None:
        values = tuple(elems.ravel()) if isinstance(elems, np.ndarray) else tuple(elems)
        super().__init__(values, (len(values), 1))


class row(rec):
    """A row vector."""

    __slots__ = ()

    def __init__(self, elems: Any) -> None:
        values = tuple(elems.ravel()) if isinstance(elems, np.ndarray) else tuple(elems)
        super().__init__(values, (1, len(values)))


class sqr(rec):
    """A square matrix from n² row-major values."""

    __slots__ = ()

    def __init__(self, elems: Any) -> None:
        values = tuple(elems.ravel()) if isinstance(elems, np.ndarray) else tuple(elems)
        n = math.isqrt(len(values))
        if n * n != len(values):
            raise ValueError(f"sqr needs a square number of elements (got {len(values)})")
        super().__init__(values, (n, n))


def diag(diagonal: Any) -> sqr:
    """The square matrix with ``diagonal`` on its diagonal."""
    return sqr(np.diag(np.asarray(list(diagonal), dtype=np.float64)).ravel())


def identity(n: int) -> sqr:
    """The ``n × n`` identity."""
    return sqr(np.eye(int(n)).ravel())


def zeros(n: Any) -> rec:
    """A zero matrix of shape ``n`` (an int gives a column of that length)."""
    if isinstance(n, numbers.Integral):
        return col([0.0] * int(n))
    shape = tuple(int(k) for k in n)
    return rec([0.0] * (shape[0] * shape[1]), shape)
