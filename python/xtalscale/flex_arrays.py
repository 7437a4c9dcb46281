"""numpy-backed stand-ins for the scitbx/cctbx ``flex`` arrays that DIALS scripts use.

Each flex type (``double``, ``int``, ``bool``, ``size_t``, ``vec3_double``, ``miller_index``,
``std_string``, ...) wraps one numpy array:

* ``as_numpy_array()`` and ``np.asarray(a)`` return the data **without copying**, and any
  C++ entry point that takes a numpy array accepts a flex array the same way (through
  ``__array__``), so nothing is copied at the boundary.
* Arithmetic, comparisons and numpy ufuncs work through ``__array_ufunc__`` and return flex
  arrays again (``flex.double * flex.double -> flex.double``, ``a > 0 -> flex.bool``).
* ``append``/``extend`` grow an over-allocated buffer (amortised O(1)), so a DIALS loop that
  appends one value at a time stays linear. Views handed out before a growth keep the old
  data alive and stay valid (they just stop tracking the array).
* Elements read back as Python scalars; vector types give tuples, like scitbx.

Notes
-----
scitbx semantics that differ from numpy are kept: ``a.all()`` returns the grid dimensions
(use ``all_eq``/``count`` for truth tests), slicing returns a copy, and ``flex.double(n)``
is ``n`` zeros.
"""

from __future__ import annotations

import numbers
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

__all__ = [
    "grid",
    "FlexArray",
    "double",
    "int",
    "bool",
    "size_t",
    "std_string",
    "vec2_double",
    "vec3_double",
    "mat3_double",
    "miller_index",
    "int6",
    "flex_type_for",
    "as_flex",
    "mean",
    "min",
    "max",
    "sum",
    "abs",
    "sqrt",
    "exp",
    "log",
    "pow2",
    "pow",
    "sum_sq",
    "sort_permutation",
    "random_selection",
    "random_permutation",
    "random_double",
    "set_random_seed",
    "get_random_seed",
    "size_t_range",
    "int_range",
    "double_range",
    "mean_and_variance",
    "min_max_mean_double",
    "union",
    "intersection",
    "mean_weighted",
    "first_index",
    "last_index",
    "linear_correlation",
    "packed_u_size",
    "packed_u_diagonal_positions",
    "symmetric_from_packed_u",
]

_builtin_int = int
_builtin_bool = bool
_builtin_min = min
_builtin_max = max
_builtin_sum = sum
_builtin_abs = abs
_builtin_pow = pow


class grid:
    """Shape of a multi-dimensional flex array (scitbx ``flex.grid``), e.g. ``grid(n, m)``.

    Parameters
    ----------
    *dims : int or a single sequence of int
        Extents along each dimension; all must be non-negative.
    """

    __slots__ = ("_dims",)

    def __init__(self, *dims: Any) -> None:
        if len(dims) == 1 and not isinstance(dims[0], numbers.Integral):
            dims = tuple(dims[0])
        try:
            parsed = tuple(_builtin_int(operator_index(d)) for d in dims)
        except TypeError as exc:
            raise TypeError(f"grid: dimensions must be integers (got {dims!r})") from exc
        if not parsed or any(d < 0 for d in parsed):
            raise ValueError(
                f"grid: dimensions must be non-negative and at least one (got {dims!r})"
            )
        self._dims = parsed

    def all(self) -> tuple[_builtin_int, ...]:
        """Extents along each dimension (scitbx name)."""
        return self._dims

    def focus(self) -> tuple[_builtin_int, ...]:
        """Same as ``all()`` for the origin-0 grids supported here."""
        return self._dims

    def origin(self) -> tuple[_builtin_int, ...]:
        return (0,) * len(self._dims)

    def nd(self) -> _builtin_int:
        return len(self._dims)

    def size_1d(self) -> _builtin_int:
        return _builtin_int(np.prod(self._dims, dtype=np.int64))

    def __eq__(self, other: object) -> _builtin_bool:
        return isinstance(other, grid) and other._dims == self._dims

    def __hash__(self) -> _builtin_int:
        return hash(self._dims)

    def __repr__(self) -> str:
        return f"grid{self._dims}"


def operator_index(x: Any) -> _builtin_int:
    """``operator.index`` that also accepts integral numpy scalars and integral floats."""
    import operator

    try:
        return operator.index(x)
    except TypeError:
        if isinstance(x, float) and x.is_integer():
            return _builtin_int(x)
        raise


class FlexArray(NDArrayOperatorsMixin):
    """Base class of the flex types: a resizable 1-D (or grid) array of fixed-width elements.

    Subclasses set ``_dtype`` (numpy dtype of one scalar) and ``_width`` (0 for scalar
    elements, k for elements that are k-tuples such as vec3 or miller indices).
    """

    __slots__ = ("_buf", "_n", "__weakref__")
    _dtype: np.dtype = np.dtype(np.float64)
    _width: _builtin_int = 0
    _default: Any = 0

    # ------------------------------------------------------------------ construction
    def __init__(self, *args: Any) -> None:
        if len(args) == 0:
            data = self._empty(0)
        elif len(args) == 1:
            data = self._from_one(args[0])
        elif len(args) == 2:
            data = self._from_size_value(args[0], args[1])
        else:
            raise TypeError(
                f"{type(self).__name__}() takes at most 2 arguments ({len(args)} given)"
            )
        self._buf = data
        self._n = data.shape[0]

    @classmethod
    def _element_shape(cls) -> tuple[_builtin_int, ...]:
        return (cls._width,) if cls._width else ()

    @classmethod
    def _empty(cls, n: _builtin_int) -> np.ndarray:
        return np.zeros((n,) + cls._element_shape(), dtype=cls._dtype)

    def _from_size_value(self, size: Any, value: Any) -> np.ndarray:
        if isinstance(size, grid):
            if self._width:
                raise ValueError(f"{type(self).__name__}: grid construction needs scalar elements")
            data = np.empty(size.all(), dtype=self._dtype)
        else:
            n = _check_size(size, "size")
            data = np.empty((n,) + self._element_shape(), dtype=self._dtype)
        data[...] = self._coerce_value(value, "value")
        return data

    def _from_one(self, arg: Any) -> np.ndarray:
        if isinstance(arg, grid):
            if self._width:
                raise ValueError(f"{type(self).__name__}: grid construction needs scalar elements")
            return np.full(arg.all(), self._default, dtype=self._dtype)
        if isinstance(arg, numbers.Integral) and not isinstance(arg, (_builtin_bool, np.bool_)):
            return self._empty(_check_size(arg, "size"))
        data = self._coerce_array(arg, "data")
        # flex(flex) copies, as scitbx does; a numpy array is adopted without a copy (flumpy
        # semantics) unless it is read-only, since flex arrays are always writable.
        if isinstance(arg, FlexArray) and np.shares_memory(data, arg._buf):
            return data.copy()
        if not data.flags.writeable:
            return data.copy()
        return data

    @classmethod
    def _coerce_value(cls, value: Any, what: str) -> np.ndarray:
        arr = np.asarray(value)
        if cls._width and arr.shape != (cls._width,):
            raise ValueError(
                f"{cls.__name__}: {what} must have {cls._width} components (got shape {arr.shape})"
            )
        if not cls._width and arr.ndim != 0:
            raise ValueError(f"{cls.__name__}: {what} must be a scalar (got shape {arr.shape})")
        return cls._cast(arr, what)

    @classmethod
    def _cast(cls, arr: np.ndarray, what: str) -> np.ndarray:
        """Cast to the flex dtype, refusing lossy conversions (float -> int, negative -> size_t)."""
        if arr.dtype == cls._dtype:
            return arr
        if arr.size == 0:
            return arr.astype(cls._dtype)
        if cls._dtype.kind in "iu":
            if arr.dtype.kind == "f":
                if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
                    raise ValueError(f"{cls.__name__}: {what} holds non-integral values")
            elif arr.dtype.kind not in "iub":
                raise TypeError(f"{cls.__name__}: {what} has dtype {arr.dtype}, expected integers")
            info = np.iinfo(cls._dtype)
            if arr.min() < info.min or arr.max() > info.max:
                raise ValueError(
                    f"{cls.__name__}: {what} holds values outside [{info.min}, {info.max}]"
                )
        elif cls._dtype.kind == "f" and arr.dtype.kind not in "iufb":
            raise TypeError(f"{cls.__name__}: {what} has dtype {arr.dtype}, expected numbers")
        elif cls._dtype.kind == "b" and arr.dtype.kind not in "b":
            if arr.dtype.kind in "iu" and np.all((arr == 0) | (arr == 1)):
                return arr.astype(np.bool_)
            raise TypeError(f"{cls.__name__}: {what} has dtype {arr.dtype}, expected bool")
        return arr.astype(cls._dtype)

    @classmethod
    def _coerce_array(cls, seq: Any, what: str) -> np.ndarray:
        """This flex type's array layout from a sequence/array (zero-copy when it already fits)."""
        if isinstance(seq, FlexArray):
            arr = seq._a
        elif isinstance(seq, np.ndarray):
            arr = seq
        else:
            if isinstance(seq, (str, bytes)):
                raise TypeError(f"{cls.__name__}: {what} must be a sequence of numbers")
            if not isinstance(seq, Sequence):
                seq = list(seq)
            arr = np.asarray(seq) if len(seq) else np.zeros((0,) + cls._element_shape(), cls._dtype)
        if cls._width:
            if arr.ndim != 2 or arr.shape[1] != cls._width:
                raise ValueError(
                    f"{cls.__name__}: {what} must have shape (n, {cls._width}) (got {arr.shape})"
                )
        elif arr.ndim < 1:
            raise ValueError(f"{cls.__name__}: {what} must be 1-dimensional (got a scalar)")
        arr = cls._cast(arr, what)
        return np.ascontiguousarray(arr)

    @classmethod
    def _wrap(cls, data: np.ndarray) -> "FlexArray":
        """A flex array that adopts ``data`` (already of the right dtype/layout) without copying."""
        obj = cls.__new__(cls)
        obj._buf = data
        obj._n = data.shape[0]
        return obj

    # ------------------------------------------------------------------ numpy interop
    @property
    def _a(self) -> np.ndarray:
        buf = self._buf
        return buf if buf.shape[0] == self._n else buf[: self._n]

    def as_numpy_array(self) -> np.ndarray:
        """The data as a numpy array **sharing memory** with this flex array (no copy).

        Shape is ``(n,)`` for scalar elements, ``(n, k)`` for k-tuples and the grid shape for
        grid arrays. Writes through the view change the flex array.
        """
        return self._a

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self._a
        if dtype is not None and np.dtype(dtype) != a.dtype:
            return a.astype(dtype)
        return a.copy() if copy else a

    @property
    def dtype(self) -> np.dtype:
        return self._buf.dtype

    @property
    def shape(self) -> tuple[_builtin_int, ...]:
        return self._a.shape

    @property
    def ndim(self) -> _builtin_int:
        return self._buf.ndim

    @property
    def nbytes(self) -> _builtin_int:
        return self._a.nbytes

    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = tuple(o._a if isinstance(o, FlexArray) else o for o in out)
        args = _ufunc_operands(inputs)
        result = getattr(ufunc, method)(*args, **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        if method in ("reduce", "accumulate", "reduceat", "outer", "at"):
            return _to_python(result) if method == "reduce" else result
        if isinstance(result, tuple):
            return tuple(_wrap_result(r, inputs, ufunc) for r in result)
        return _wrap_result(result, inputs, ufunc)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        # numpy functions see plain arrays; results are returned as numpy objects.
        conv = _unflex_tree(args)
        kw = _unflex_tree(kwargs)
        return func(*conv, **kw)

    # numpy-style read-only conveniences for code that treats columns as arrays; results are
    # plain numpy objects. (scitbx names such as all(), count(), select() keep flex meaning.)
    _NUMPY_PASSTHROUGH = frozenset(
        {
            "astype",
            "tolist",
            "min",
            "max",
            "mean",
            "std",
            "var",
            "argsort",
            "argmin",
            "argmax",
            "reshape",
            "ravel",
            "flatten",
            "T",
            "any",
            "nonzero",
            "cumsum",
            "prod",
            "clip",
            "itemsize",
            "strides",
            "flags",
            "tobytes",
            "view",
        }
    )

    def __getattr__(self, name: str) -> Any:
        if name in FlexArray._NUMPY_PASSTHROUGH:
            return getattr(self._a, name)
        raise AttributeError(f"flex.{type(self).__name__} has no attribute {name!r}")

    # ------------------------------------------------------------------ container protocol
    def __len__(self) -> _builtin_int:
        # scitbx: a grid array's length is its total element count (iteration is flat too)
        if not self._width and self._buf.ndim > 1:
            return _builtin_int(self._a.size)
        return self._n

    def size(self) -> _builtin_int:
        """Number of elements (rows for grid arrays use ``all()``)."""
        return _builtin_int(self._a.size // (self._width or 1))

    def __iter__(self) -> Iterator[Any]:
        a = self._a
        if self._width:
            return map(tuple, a.tolist())
        if a.ndim > 1:
            return iter(a.ravel().tolist())
        return iter(a.tolist())

    def __getitem__(self, key: Any) -> Any:
        a = self._a
        if isinstance(key, (numbers.Integral, np.integer)) and not isinstance(
            key, (_builtin_bool, np.bool_)
        ):
            k = _builtin_int(key)
            if k < -self._n or k >= self._n:
                raise IndexError(f"{type(self).__name__} index {k} out of range for size {self._n}")
            if self._width:
                return tuple(a[k].tolist())
            if a.ndim > 1:
                return type(self)._wrap(a[k].copy())
            v = a[k]
            return v.item() if isinstance(v, np.generic) else v
        if isinstance(key, tuple) and all(
            isinstance(k, (numbers.Integral, np.integer)) for k in key
        ):
            if a.ndim != len(key):
                raise IndexError(
                    f"{type(self).__name__}: {len(key)} indices for a {a.ndim}-D array"
                )
            return a[key].item()
        if isinstance(key, tuple) and not self._width:
            part = a[key]  # e.g. a grid row g[i, :]: a copy, like every flex slice
            return (
                type(self)._wrap(part.copy())
                if isinstance(part, np.ndarray) and part.ndim
                else part
            )
        if isinstance(key, slice):
            return type(self)._wrap(a[key].copy())
        if isinstance(key, (FlexArray, np.ndarray, list)):
            return self.select(key)
        return a[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(key, (FlexArray, list)):
            key = np.asarray(key)
        if isinstance(value, FlexArray):
            value = value._a
        try:
            self._a[key] = value
        except IndexError as exc:
            raise IndexError(f"{type(self).__name__}: {exc}") from None

    def __contains__(self, item: Any) -> _builtin_bool:
        a = self._a
        if self._width:
            return _builtin_bool(np.any(np.all(a == np.asarray(item), axis=1)))
        return _builtin_bool(np.any(a == item))

    def __repr__(self) -> str:
        return f"<flex.{type(self).__name__} size={self._n}>"

    def __reduce__(self) -> tuple:
        return (type(self)._wrap, (self._a.copy(),))

    def __bool__(self) -> _builtin_bool:
        raise ValueError(
            f"the truth value of a flex.{type(self).__name__} is ambiguous; "
            "use all_eq(), count() or len()"
        )

    __hash__ = None  # type: ignore[assignment]

    # ------------------------------------------------------------------ scitbx grid API
    def all(self) -> tuple[_builtin_int, ...]:
        """Grid extents (scitbx semantics: NOT a truth reduction)."""
        return (self._n,) if self._width else self._a.shape

    def focus(self) -> tuple[_builtin_int, ...]:
        return self.all()

    def accessor(self) -> grid:
        return grid(*self.all())

    def nd(self) -> _builtin_int:
        return len(self.all())

    def reshape(self, g: grid) -> None:
        """Reshape in place to the grid ``g`` (element count must match)."""
        if not isinstance(g, grid):
            g = grid(g)
        if self._width or g.size_1d() != self._a.size:
            raise ValueError(
                f"{type(self).__name__}.reshape: grid {g} does not match size {self._a.size}"
            )
        self._buf = self._a.reshape(g.all())
        self._n = self._buf.shape[0]

    def as_1d(self) -> "FlexArray":
        return type(self)._wrap(self._a.reshape(-1))

    # ------------------------------------------------------------------ growth
    def _ensure_1d(self, what: str) -> None:
        if not self._width and self._buf.ndim != 1:
            raise ValueError(f"{type(self).__name__}.{what}: not supported on a grid array")

    def _reserve(self, needed: _builtin_int) -> None:
        cap = self._buf.shape[0]
        if needed <= cap and self._buf.flags.writeable and self._buf.flags.c_contiguous:
            return
        new_cap = _builtin_max(needed, 2 * cap, 8)
        new = np.empty((new_cap,) + self._element_shape(), dtype=self._dtype)
        new[: self._n] = self._a
        self._buf = new

    def append(self, value: Any) -> None:
        """Append one element (amortised O(1))."""
        self._ensure_1d("append")
        v = self._coerce_value(value, "value")
        self._reserve(self._n + 1)
        self._buf[self._n] = v
        self._n += 1

    def extend(self, other: Any) -> None:
        """Append all elements of another array/sequence of the same element type."""
        self._ensure_1d("extend")
        data = self._coerce_array(other, "other")
        m = data.shape[0]
        self._reserve(self._n + m)
        self._buf[self._n : self._n + m] = data
        self._n += m

    def resize(self, n: Any, value: Any = None) -> None:
        """Set the size to ``n``; new elements get ``value`` (default zero)."""
        self._ensure_1d("resize")
        n = _check_size(n, "n")
        if n > self._n:
            old = self._n
            self._reserve(n)
            self._buf[old:n] = self._coerce_value(
                self._default if value is None else value, "value"
            )
        self._n = n

    def clear(self) -> None:
        self._n = 0

    def insert(self, i: Any, value: Any) -> None:
        self._ensure_1d("insert")
        data = np.insert(self._a, _builtin_int(i), self._coerce_value(value, "value"), axis=0)
        self._buf, self._n = data, data.shape[0]

    def pop_back(self) -> None:
        if self._n == 0:
            raise IndexError(f"{type(self).__name__}.pop_back on an empty array")
        self._n -= 1

    # ------------------------------------------------------------------ selection
    def select(self, selection: Any, reverse: _builtin_bool = False) -> "FlexArray":
        """Elements at the positions given by a bool mask or by indices (a copy)."""
        self._ensure_1d("select")
        sel = _as_selection(selection, self._n, "selection")
        if reverse:
            if sel.dtype == np.bool_:
                raise ValueError("select(reverse=True) needs indices, not a bool mask")
            if len(sel) != self._n:
                raise ValueError("select(reverse=True): need one index per element")
            out = np.zeros_like(self._a)
            out[sel] = self._a
            return type(self)._wrap(out)
        return type(self)._wrap(self._a[sel])

    def set_selected(self, selection: Any, values: Any) -> "FlexArray":
        """Assign ``values`` (scalar, or one per selected element) at the selected positions."""
        self._ensure_1d("set_selected")
        sel = _as_selection(selection, self._n, "selection")
        n_sel = _builtin_int(np.count_nonzero(sel)) if sel.dtype == np.bool_ else len(sel)
        if isinstance(values, FlexArray) or (
            isinstance(values, (np.ndarray, list, tuple))
            and np.ndim(values) > (1 if self._width else 0)
        ):
            vals = self._coerce_array(values, "values")
            if sel.dtype == np.bool_ and len(vals) == self._n and n_sel != self._n:
                vals = vals[sel]
            if len(vals) != n_sel:
                raise ValueError(
                    f"{type(self).__name__}.set_selected: {len(vals)} values for "
                    f"{n_sel} selected elements"
                )
            self._a[sel] = vals
        else:
            self._a[sel] = self._coerce_value(values, "values")
        return self

    def deep_copy(self) -> "FlexArray":
        """An independent copy."""
        return type(self)._wrap(self._a.copy())

    def shallow_copy(self) -> "FlexArray":
        return type(self)._wrap(self._a)

    copy = deep_copy

    def __copy__(self) -> "FlexArray":
        return self.deep_copy()

    def __deepcopy__(self, memo: dict) -> "FlexArray":
        return self.deep_copy()

    def reversed(self) -> "FlexArray":
        return type(self)._wrap(self._a[::-1].copy())

    def concatenate(self, other: Any) -> "FlexArray":
        return type(self)._wrap(np.concatenate([self._a, self._coerce_array(other, "other")]))

    def count(self, value: Any) -> _builtin_int:
        """Number of elements equal to ``value``."""
        a = self._a
        if self._width:
            return _builtin_int(np.count_nonzero(np.all(a == np.asarray(value), axis=1)))
        return _builtin_int(np.count_nonzero(a == value))

    def all_eq(self, value: Any) -> _builtin_bool:
        return _builtin_bool(np.all(np.asarray(self._a == np.asarray(getattr(value, "_a", value)))))

    def all_ne(self, value: Any) -> _builtin_bool:
        return _builtin_bool(np.all(self._a != np.asarray(getattr(value, "_a", value))))

    def all_lt(self, value: Any) -> _builtin_bool:
        return _builtin_bool(np.all(self._a < np.asarray(getattr(value, "_a", value))))

    def all_le(self, value: Any) -> _builtin_bool:
        return _builtin_bool(np.all(self._a <= np.asarray(getattr(value, "_a", value))))

    def all_gt(self, value: Any) -> _builtin_bool:
        return _builtin_bool(np.all(self._a > np.asarray(getattr(value, "_a", value))))

    def all_ge(self, value: Any) -> _builtin_bool:
        return _builtin_bool(np.all(self._a >= np.asarray(getattr(value, "_a", value))))

    def fill(self, value: Any) -> None:
        self._a[...] = self._coerce_value(value, "value")

    def as_double(self) -> "double":
        return double._wrap(self._a.astype(np.float64))

    def as_int(self) -> "int":
        return int._wrap(
            int._cast(self._a, "values")
            if self._a.dtype.kind != "f"
            else np.trunc(self._a).astype(np.int32)
        )

    def as_string(self) -> "std_string":
        return std_string._wrap(np.array([str(x) for x in self], dtype=object))


# ---------------------------------------------------------------------------- scalar kinds
class _NumericMixin:
    """Reductions shared by the numeric scalar flex types."""

    def min_max_mean(self) -> "_MinMaxMean":
        return _MinMaxMean(self._a)  # type: ignore[attr-defined]

    def sum(self) -> Any:
        return _to_python(self._a.sum())  # type: ignore[attr-defined]

    def dot(self, other: Any) -> float:
        return float(np.dot(np.asarray(self), np.asarray(other)))

    def round(self, n: _builtin_int = 0) -> "double":
        return double._wrap(np.round(np.asarray(self, dtype=np.float64), n))


class double(_NumericMixin, FlexArray):
    """flex.double: float64 values (1-D or a grid).

    ``v * M`` with a scipy sparse matrix ``M`` is the row-vector product ``(v^T M)_j =
    sum_i v_i M_ij`` (the scitbx ``flex.double * sparse.matrix`` convention).
    """

    __slots__ = ()
    _dtype = np.dtype(np.float64)
    _default = 0.0

    def __mul__(self, other: Any) -> Any:
        if _is_sparse(other):
            if self._buf.ndim != 1 or other.shape[0] != self._n:
                raise ValueError(
                    f"flex.double * sparse: vector of size {self._n} does not match "
                    f"a matrix with {other.shape[0]} rows"
                )
            return double._wrap(np.asarray(other.T @ self._a, dtype=np.float64).reshape(-1))
        return super().__mul__(other)

    def matrix_transpose(self) -> "double":
        """Transpose of a 2-D grid array (a copy)."""
        if self._buf.ndim != 2:
            raise ValueError(f"matrix_transpose needs a 2-D grid (got shape {self._a.shape})")
        return double._wrap(np.ascontiguousarray(self._a.T))

    def matrix_multiply(self, other: Any) -> "double":
        """Matrix product with a 2-D grid or a vector (scitbx ``matrix_multiply``)."""
        a, b = self._a, np.asarray(other, dtype=np.float64)
        if a.ndim != 2 or b.ndim not in (1, 2) or a.shape[1] != b.shape[0]:
            raise ValueError(f"matrix_multiply: shapes {a.shape} and {b.shape} do not match")
        return double._wrap(np.ascontiguousarray(a @ b))

    # scitbx vector norms and matrix helpers used by least-squares code
    def norm(self) -> float:
        """Euclidean norm of all elements."""
        return float(np.linalg.norm(self._a.ravel()))

    def norm_inf(self) -> float:
        """Largest absolute element (0 for an empty array)."""
        a = self._a
        return float(np.abs(a).max()) if a.size else 0.0

    def matrix_diagonal(self) -> "double":
        """Diagonal of a square 2-D grid (a copy)."""
        a = self._a
        if a.ndim != 2 or a.shape[0] != a.shape[1]:
            raise ValueError(f"matrix_diagonal needs a square 2-D grid (got shape {a.shape})")
        return double._wrap(np.diagonal(a).copy())

    def matrix_paste_column_in_place(self, column: Any, j: Any) -> None:
        """Write ``column`` into column ``j`` of this 2-D grid."""
        a, c = self._a, np.asarray(column, dtype=np.float64)
        if a.ndim != 2 or c.shape != (a.shape[0],):
            raise ValueError(f"matrix_paste_column_in_place: column of shape {c.shape} does not "
                             f"fit a grid of shape {a.shape}")
        a[:, operator_index(j)] = c

    def matrix_packed_u_diagonal(self) -> "double":
        """Diagonal of a symmetric matrix stored packed-upper (row by row, i <= j)."""
        return double._wrap(self._a[packed_u_diagonal_positions(packed_u_size(self._a))].copy())

    def matrix_packed_u_diagonal_add_in_place(self, value: Any) -> None:
        """Add ``value`` (a scalar or one value per row) to the packed-upper diagonal, in place."""
        positions = packed_u_diagonal_positions(packed_u_size(self._a))
        self._a[positions] += np.asarray(value, dtype=np.float64)

    def matrix_packed_u_as_symmetric(self) -> "double":
        """The full symmetric ``n × n`` grid of a packed-upper matrix."""
        return double._wrap(symmetric_from_packed_u(self._a))

    def matrix_symmetric_as_packed_u(self, relative_epsilon: float = 1e-12) -> "double":
        """Packed-upper form of a symmetric 2-D grid (ValueError if it is not symmetric)."""
        a = self._a
        if a.ndim != 2 or a.shape[0] != a.shape[1]:
            raise ValueError(f"matrix_symmetric_as_packed_u needs a square grid (got {a.shape})")
        scale = float(np.abs(a).max()) if a.size else 0.0
        if not np.allclose(a, a.T, rtol=0.0, atol=relative_epsilon * _builtin_max(scale, 1.0)):
            raise ValueError("matrix_symmetric_as_packed_u: the matrix is not symmetric")
        return double._wrap(a[np.triu_indices(a.shape[0])].copy())

    def __rmul__(self, other: Any) -> Any:
        if _is_sparse(other):  # M * v: column-vector product
            if self._buf.ndim != 1 or other.shape[1] != self._n:
                raise ValueError(
                    f"sparse * flex.double: matrix with {other.shape[1]} columns "
                    f"does not match a vector of size {self._n}"
                )
            return double._wrap(np.asarray(other @ self._a, dtype=np.float64).reshape(-1))
        return super().__rmul__(other)


class int(_NumericMixin, FlexArray):  # noqa: A001  (scitbx name)
    """flex.int: 32-bit signed integers."""

    __slots__ = ()
    _dtype = np.dtype(np.int32)


class size_t(_NumericMixin, FlexArray):
    """flex.size_t: 64-bit unsigned integers (indices, flags, panel numbers)."""

    __slots__ = ()
    _dtype = np.dtype(np.uint64)


class bool(FlexArray):  # noqa: A001  (scitbx name)
    """flex.bool: a boolean mask."""

    __slots__ = ()
    _dtype = np.dtype(np.bool_)
    _default = False

    def iselection(self, test_value: _builtin_bool = True) -> size_t:
        """Indices where the mask equals ``test_value``."""
        a = self._a if test_value else ~self._a
        return size_t._wrap(np.flatnonzero(a).astype(np.uint64))

    def __invert__(self) -> "bool":
        return bool._wrap(~self._a)


class std_string(FlexArray):
    """flex.std_string: Python strings (stored in an object array)."""

    __slots__ = ()
    _dtype = np.dtype(object)
    _default = ""

    @classmethod
    def _empty(cls, n: _builtin_int) -> np.ndarray:
        return np.full(n, "", dtype=object)

    @classmethod
    def _cast(cls, arr: np.ndarray, what: str) -> np.ndarray:
        if arr.dtype == object:
            if arr.size and not all(isinstance(x, str) for x in arr.ravel()):
                raise TypeError(f"std_string: {what} must hold only str")
            return arr
        if arr.dtype.kind != "U":
            raise TypeError(f"std_string: {what} must hold strings (got dtype {arr.dtype})")
        return arr.astype(object)

    @classmethod
    def _coerce_value(cls, value: Any, what: str) -> Any:
        if not isinstance(value, str):
            raise TypeError(f"std_string: {what} must be a str (got {type(value).__name__})")
        return value

    @classmethod
    def _coerce_array(cls, seq: Any, what: str) -> np.ndarray:
        if isinstance(seq, FlexArray):
            seq = seq._a
        if isinstance(seq, str):
            raise TypeError(f"std_string: {what} must be a sequence of str")
        arr = np.empty(len(seq), dtype=object)
        arr[:] = list(seq)
        return cls._cast(arr, what)


# ---------------------------------------------------------------------------- tuple kinds
class vec2_double(FlexArray):
    """flex.vec2_double: (n, 2) float64; elements are 2-tuples."""

    __slots__ = ()
    _dtype = np.dtype(np.float64)
    _width = 2

    def parts(self) -> tuple[double, ...]:
        a = self._a
        return tuple(double._wrap(np.ascontiguousarray(a[:, k])) for k in range(self._width))


class vec3_double(vec2_double):
    """flex.vec3_double: (n, 3) float64; elements are 3-tuples."""

    __slots__ = ()
    _width = 3

    def __init__(self, *args: Any) -> None:
        # flex.vec3_double(x, y, z) from three flex.double of equal length
        if len(args) == 3 and all(isinstance(x, (FlexArray, np.ndarray, list)) for x in args):
            cols = [np.asarray(x, dtype=np.float64) for x in args]
            if _builtin_len_set(cols) != 1 or cols[0].ndim != 1:
                raise ValueError("vec3_double(x, y, z): three 1-D arrays of equal length required")
            data = np.stack(cols, axis=1)
            self._buf, self._n = data, data.shape[0]
            return
        super().__init__(*args)

    def norms(self) -> double:
        """Euclidean length of every vector."""
        return double._wrap(np.sqrt(np.einsum("ij,ij->i", self._a, self._a)))

    def dot(self, other: Any) -> double:
        """Row-wise dot products with another vec3 array (or one vector)."""
        b = np.asarray(other, dtype=np.float64)
        if b.ndim == 1:
            return double._wrap(self._a @ b)
        return double._wrap(np.einsum("ij,ij->i", self._a, b))

    def cross(self, other: Any) -> "vec3_double":
        return vec3_double._wrap(np.cross(self._a, np.asarray(other, dtype=np.float64)))

    def each_normalize(self) -> "vec3_double":
        n = np.sqrt(np.einsum("ij,ij->i", self._a, self._a))
        if np.any(n == 0):
            raise ValueError("vec3_double.each_normalize: zero-length vector")
        return vec3_double._wrap(self._a / n[:, None])

    def mean(self) -> tuple[float, float, float]:
        if self._n == 0:
            raise ValueError("vec3_double.mean of an empty array")
        return tuple(self._a.mean(axis=0).tolist())

    def sum(self) -> tuple[float, float, float]:
        return tuple(self._a.sum(axis=0).tolist())

    def min(self) -> tuple[float, float, float]:
        return tuple(self._a.min(axis=0).tolist())

    def max(self) -> tuple[float, float, float]:
        return tuple(self._a.max(axis=0).tolist())

    def as_double(self) -> double:
        return double._wrap(self._a.reshape(-1).copy())


class mat3_double(vec2_double):
    """flex.mat3_double: (n, 9) float64 row-major 3x3 matrices; elements are 9-tuples."""

    __slots__ = ()
    _width = 9


class miller_index(FlexArray):
    """flex.miller_index: (n, 3) int32; elements are (h, k, l) tuples."""

    __slots__ = ()
    _dtype = np.dtype(np.int32)
    _width = 3

    def as_vec3_double(self) -> vec3_double:
        return vec3_double._wrap(self._a.astype(np.float64))

    def parts(self) -> tuple[int, int, int]:
        return tuple(int._wrap(np.ascontiguousarray(self._a[:, k])) for k in range(3))


class int6(FlexArray):
    """flex.int6 (DIALS bounding boxes): (n, 6) int32; elements are 6-tuples."""

    __slots__ = ()
    _dtype = np.dtype(np.int32)
    _width = 6

    def parts(self) -> tuple[int, ...]:
        return tuple(int._wrap(np.ascontiguousarray(self._a[:, k])) for k in range(6))


# ---------------------------------------------------------------------------- wrapping
_SCALAR_TYPES = {
    np.dtype(np.float64): double,
    np.dtype(np.int32): int,
    np.dtype(np.uint64): size_t,
    np.dtype(np.bool_): bool,
    np.dtype(object): std_string,
}
_TUPLE_TYPES = {
    (np.dtype(np.float64), 2): vec2_double,
    (np.dtype(np.float64), 3): vec3_double,
    (np.dtype(np.float64), 9): mat3_double,
    (np.dtype(np.int32), 3): miller_index,
    (np.dtype(np.int32), 6): int6,
}


def flex_type_for(arr: np.ndarray) -> type[FlexArray]:
    """The flex type that holds ``arr`` as-is (by dtype and shape).

    float64 (n,) -> double, (n, 3) float64 -> vec3_double, (n, 3) int32 -> miller_index,
    (n, 6) int32 -> int6, int32 -> int, uint64 -> size_t, bool -> bool, str/object -> std_string.
    Other integer dtypes are accepted when their values fit (int64 -> int, uint32 -> size_t).

    Raises
    ------
    TypeError
        If no flex type matches.
    """
    arr = np.asarray(arr)
    if arr.dtype.kind == "U":
        return std_string
    if arr.ndim == 1 or (arr.ndim == 0):
        t = _SCALAR_TYPES.get(arr.dtype)
        if t is None and arr.dtype.kind == "i":
            return int
        if t is None and arr.dtype.kind == "u":
            return size_t
        if t is None and arr.dtype.kind == "f":
            return double
        if t is not None:
            return t
    elif arr.ndim == 2:
        dt = arr.dtype
        if dt.kind == "f":
            dt = np.dtype(np.float64)
        elif dt.kind in "iu":
            dt = np.dtype(np.int32)
        t = _TUPLE_TYPES.get((dt, arr.shape[1]))
        if t is not None:
            return t
    raise TypeError(f"no flex type for a numpy array of dtype {arr.dtype} and shape {arr.shape}")


def as_flex(obj: Any) -> Any:
    """Wrap a numpy array as the matching flex type without copying (flex arrays pass through).

    2-D float64 arrays whose width is not a known tuple width become grid ``flex.double``.
    Scalars and unsupported dtypes are returned unchanged.
    """
    if isinstance(obj, FlexArray) or not isinstance(obj, np.ndarray) or obj.ndim == 0:
        return obj
    try:
        t = flex_type_for(obj)
    except TypeError:
        if obj.dtype == np.float64 or obj.dtype == np.int32 or obj.dtype == np.bool_:
            return _SCALAR_TYPES[obj.dtype]._wrap(obj)  # grid arrays
        return obj
    if obj.ndim == 2 and t._width == 0:
        return t._wrap(obj)
    data = t._cast(obj, "array")
    if not data.flags.c_contiguous:
        data = np.ascontiguousarray(data)
    if not data.flags.writeable:  # e.g. np.frombuffer on bytes: columns must be writable
        data = data.copy()
    return t._wrap(data)


# ---------------------------------------------------------------------------- helpers
def _is_sparse(obj: Any) -> _builtin_bool:
    mod = type(obj).__module__
    if not mod.startswith("scipy.sparse"):
        return False
    import scipy.sparse

    return scipy.sparse.issparse(obj)


def _builtin_len_set(cols: list) -> _builtin_int:
    return len({c.shape for c in cols})


def _check_size(n: Any, what: str) -> _builtin_int:
    try:
        v = operator_index(n)
    except TypeError as exc:
        raise TypeError(f"{what} must be an integer (got {type(n).__name__})") from exc
    if v < 0:
        raise ValueError(f"{what} must be non-negative (got {v})")
    return v


def _as_selection(selection: Any, n: _builtin_int, what: str) -> np.ndarray:
    """Validate a bool mask (length n) or an index array (all in [0, n)) for selection."""
    if isinstance(selection, (list, tuple)) and selection:
        # numpy would read [True, 3] as the indices [1, 3]: a mask and indices do not mix
        flags = [isinstance(x, (_builtin_bool, np.bool_)) for x in selection]
        if any(flags) and not all(flags):
            raise TypeError(f"{what} mixes bools and indices (element "
                            f"{flags.index(not flags[0])} differs from element 0)")
    sel = np.asarray(selection)
    if sel.ndim != 1:
        if sel.size == 0:
            return np.zeros(0, dtype=np.intp)
        raise ValueError(f"{what} must be 1-dimensional (got shape {sel.shape})")
    if sel.dtype == np.bool_:
        if len(sel) != n:
            raise ValueError(f"{what}: bool mask of length {len(sel)} for an array of size {n}")
        return sel
    if len(sel) == 0:
        return np.zeros(0, dtype=np.intp)
    if sel.dtype.kind not in "iu":
        raise TypeError(f"{what} must be a bool mask or integer indices (got dtype {sel.dtype})")
    lo, hi = sel.min(), sel.max()
    if lo < 0 or hi >= n:
        bad = lo if lo < 0 else hi
        raise IndexError(f"{what}: index {bad} out of range for size {n}")
    return sel.astype(np.intp, copy=False)


def _ufunc_operands(inputs: tuple) -> list:
    """Plain arrays for a ufunc; a 1-D array meets an (n, k) vec array row-wise (scitbx rule)."""
    arrays = [x._a if isinstance(x, FlexArray) else x for x in inputs]
    widths = {x._a.shape[0] for x in inputs if isinstance(x, FlexArray) and x._width}
    if widths:
        out = []
        for x, a in zip(inputs, arrays):
            if (
                isinstance(a, np.ndarray)
                and a.ndim == 1
                and not (isinstance(x, FlexArray) and x._width)
                and a.shape[0] in widths
            ):
                a = a[:, None]
            out.append(a)
        return out
    return arrays


def _wrap_result(result: Any, inputs: tuple, ufunc: np.ufunc) -> Any:
    """Flex type of a ufunc result, decided by the operands (grid stays grid, vec stays vec)."""
    if not isinstance(result, np.ndarray):
        return _to_python(result)
    width = next((x._width for x in inputs if isinstance(x, FlexArray) and x._width), 0)
    if width and result.ndim == 2 and result.shape[1] == width:
        if result.dtype == np.bool_ and ufunc in (np.equal, np.not_equal):
            # scitbx compares tuple elements as wholes: one bool per element
            red = np.all(result, axis=1) if ufunc is np.equal else np.any(result, axis=1)
            return bool._wrap(red)
        t = _TUPLE_TYPES.get((result.dtype, width))
        return t._wrap(result) if t is not None else result
    t = _SCALAR_TYPES.get(result.dtype)
    if t is not None and result.ndim >= 1 and t is not std_string:
        return t._wrap(result)
    return result


def _unflex_tree(obj: Any) -> Any:
    if isinstance(obj, FlexArray):
        return obj._a
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unflex_tree(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _unflex_tree(v) for k, v in obj.items()}
    return obj


def _to_python(x: Any) -> Any:
    return x.item() if isinstance(x, np.generic) else x


def _plain(a: Any, what: str) -> np.ndarray:
    if isinstance(a, FlexArray):
        return a._a
    return np.asarray(a)


def _nonempty(a: Any, name: str) -> np.ndarray:
    arr = _plain(a, name)
    if arr.size == 0:
        raise ValueError(f"flex.{name} of an empty array")
    return arr


# ---------------------------------------------------------------------------- packed-upper matrices
def packed_u_size(packed: Any) -> _builtin_int:
    """Order n of a symmetric matrix stored packed-upper in n (n + 1) / 2 values."""
    m = np.asarray(packed).size
    n = _builtin_int((np.sqrt(8 * m + 1) - 1) // 2)
    if n * (n + 1) // 2 != m or np.asarray(packed).ndim != 1:
        raise ValueError(f"{m} values are not a packed-upper symmetric matrix (n (n + 1) / 2)")
    return n


def packed_u_diagonal_positions(n: _builtin_int) -> np.ndarray:
    """Positions of the diagonal in packed-upper storage of order n (row i starts at
    i n - i (i - 1) / 2)."""
    i = np.arange(n)
    return i * n - (i * (i - 1)) // 2


def symmetric_from_packed_u(packed: Any) -> np.ndarray:
    """The full symmetric ``n × n`` float64 matrix of a packed-upper vector."""
    p = np.asarray(packed, dtype=np.float64)
    n = packed_u_size(p)
    full = np.zeros((n, n))
    full[np.triu_indices(n)] = p
    return full + np.triu(full, 1).T


# ---------------------------------------------------------------------------- module functions
def mean(a: Any) -> float:
    """Arithmetic mean (ValueError on an empty array, as scitbx)."""
    return float(_nonempty(a, "mean").mean())


def mean_weighted(a: Any, w: Any) -> float:
    x, wt = _plain(a, "a"), _plain(w, "w")
    if x.shape != wt.shape or x.size == 0:
        raise ValueError("flex.mean_weighted: arrays must be non-empty and of equal length")
    return float(np.sum(x * wt) / np.sum(wt))


def min(a: Any) -> Any:  # noqa: A001
    """Smallest element (ValueError on an empty array)."""
    return _to_python(_nonempty(a, "min").min())


def max(a: Any) -> Any:  # noqa: A001
    """Largest element (ValueError on an empty array)."""
    return _to_python(_nonempty(a, "max").max())


def sum(a: Any) -> Any:  # noqa: A001
    """Sum of all elements (0 for an empty array); vec3 arrays give a 3-tuple."""
    if isinstance(a, vec2_double):
        return a.sum()
    arr = _plain(a, "sum")
    if arr.dtype == np.bool_:
        return _builtin_int(np.count_nonzero(arr))
    return _to_python(arr.sum())


def sum_sq(a: Any) -> float:
    arr = _plain(a, "sum_sq")
    return _to_python(np.dot(arr.ravel(), arr.ravel()))


def abs(a: Any) -> FlexArray:  # noqa: A001
    return as_flex(np.abs(_plain(a, "abs")))


def sqrt(a: Any) -> double:
    return as_flex(np.sqrt(_plain(a, "sqrt")))


def exp(a: Any) -> double:
    return as_flex(np.exp(_plain(a, "exp")))


def log(a: Any) -> double:
    return as_flex(np.log(_plain(a, "log")))


def pow2(a: Any) -> FlexArray:
    arr = _plain(a, "pow2")
    return as_flex(arr * arr)


def pow(a: Any, e: Any) -> FlexArray:  # noqa: A001
    return as_flex(np.power(_plain(a, "pow"), e))


def mean_and_variance(values: Any, weights: Any = None) -> "_MeanAndVariance":
    """scitbx ``flex.mean_and_variance(values[, weights])``: weighted sums and derived statistics.

    Raises
    ------
    ValueError
        If ``values`` is empty or not 1-D, or ``weights`` differs in length or is not finite.
    """
    x = _nonempty(values, "mean_and_variance").astype(np.float64, copy=False)
    if x.ndim != 1:
        raise ValueError(f"flex.mean_and_variance: values must be 1-D (got shape {x.shape})")
    if weights is None:
        return _MeanAndVariance(x, None)
    w = _plain(weights, "weights").astype(np.float64, copy=False)
    if w.shape != x.shape:
        raise ValueError(f"flex.mean_and_variance: {w.size} weights for {x.size} values")
    if not np.all(np.isfinite(w)):
        raise ValueError("flex.mean_and_variance: weights must be finite")
    return _MeanAndVariance(x, w)


def min_max_mean_double(a: Any) -> "_MinMaxMean":
    return _MinMaxMean(_plain(a, "min_max_mean_double"))


def sort_permutation(
    data: Any, reverse: _builtin_bool = False, stable: _builtin_bool = True
) -> size_t:
    """Indices that sort ``data`` (ascending, or descending with ``reverse``); stable.

    Ties keep input order in both directions, as scitbx's stable sort does.
    """
    arr = _plain(data, "data")
    if arr.ndim == 2:  # tuples (miller indices, vec3): lexicographic by components
        keys = tuple(arr[:, k] for k in range(arr.shape[1] - 1, -1, -1))
        perm = np.lexsort(keys)
        if reverse:
            perm = _stable_reverse(perm, arr)
        return size_t._wrap(perm.astype(np.uint64))
    if arr.ndim != 1:
        raise ValueError("sort_permutation: data must be 1-D")
    if reverse:
        if arr.dtype.kind in "f":
            perm = np.argsort(-arr, kind="stable")
        elif arr.dtype.kind in "iub":
            perm = (
                np.argsort(-(arr.astype(np.float64)), kind="stable")
                if arr.dtype == np.uint64
                else np.argsort(-(arr.astype(np.int64)), kind="stable")
            )
        else:
            perm = _stable_reverse(np.argsort(arr, kind="stable"), arr)
    else:
        perm = np.argsort(arr, kind="stable")
    return size_t._wrap(perm.astype(np.uint64))


def _stable_reverse(perm: np.ndarray, arr: np.ndarray) -> np.ndarray:
    """Descending order with ties in input order, from an ascending stable permutation."""
    # Reverse the ascending order, then restore input order inside each run of equal keys.
    rev = perm[::-1]
    keys = arr[rev]
    same = (
        np.all(keys[1:] == keys[:-1], axis=tuple(range(1, keys.ndim)))
        if keys.ndim > 1
        else keys[1:] == keys[:-1]
    )
    starts = np.flatnonzero(np.concatenate([[True], ~same]))
    out = rev.copy()
    bounds = np.append(starts, len(rev))
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e - s > 1:
            out[s:e] = np.sort(rev[s:e])
    return out


# ---- random numbers: one generator, reseeded by set_random_seed (mirrors scitbx's global
# generator, which DIALS seeds at import; the streams differ from scitbx's by design).
class _Rng:
    def __init__(self) -> None:
        self.seed = 0
        self.gen = np.random.Generator(np.random.MT19937(0))


_rng = _Rng()


def set_random_seed(seed: Any) -> None:
    """Reseed the flex random generator (deterministic streams; not scitbx's exact stream)."""
    s = _check_size(seed, "seed")
    _rng.seed = s
    _rng.gen = np.random.Generator(np.random.MT19937(s))


def get_random_seed() -> _builtin_int:
    return _rng.seed


def random_selection(population_size: Any, sample_size: Any) -> size_t:
    """``sample_size`` distinct indices drawn from ``range(population_size)``, sorted ascending."""
    n = _check_size(population_size, "population_size")
    k = _check_size(sample_size, "sample_size")
    if k > n:
        raise ValueError(f"random_selection: sample_size {k} exceeds population_size {n}")
    idx = _rng.gen.choice(n, size=k, replace=False)
    return size_t._wrap(np.sort(idx).astype(np.uint64))


def random_permutation(size: Any) -> size_t:
    n = _check_size(size, "size")
    return size_t._wrap(_rng.gen.permutation(n).astype(np.uint64))


def random_double(size: Any, factor: float = 1.0) -> double:
    n = _check_size(size, "size")
    return double._wrap(_rng.gen.random(n) * factor)


def size_t_range(*args: Any) -> size_t:
    return size_t._wrap(np.arange(*[_check_size(a, "range bound") for a in args], dtype=np.uint64))


def int_range(*args: Any) -> int:
    return int._wrap(np.arange(*[operator_index(a) for a in args], dtype=np.int32))


def double_range(*args: Any) -> double:
    return double._wrap(np.arange(*args, dtype=np.float64))


def union(size: Any, iselections: Iterable[Any]) -> bool:
    """Bool mask of length ``size`` that is True at every index in any of ``iselections``."""
    n = _check_size(size, "size")
    m = np.zeros(n, dtype=np.bool_)
    for s in iselections:
        m[_as_selection(s, n, "iselection")] = True
    return bool._wrap(m)


def intersection(*masks: Any) -> bool:
    out = None
    for mk in masks:
        a = np.asarray(mk, dtype=np.bool_)
        out = a.copy() if out is None else out & a
    if out is None:
        raise ValueError("intersection needs at least one mask")
    return bool._wrap(out)


def first_index(a: Any, value: Any) -> Any:
    """Index of the first element equal to ``value``, or None."""
    hits = np.flatnonzero(_plain(a, "a") == value)
    return _builtin_int(hits[0]) if hits.size else None


def last_index(a: Any, value: Any) -> Any:
    """Index of the last element equal to ``value``, or None."""
    hits = np.flatnonzero(_plain(a, "a") == value)
    return _builtin_int(hits[-1]) if hits.size else None


class linear_correlation:
    """Pearson correlation of two equal-length arrays (scitbx ``flex.linear_correlation``)."""

    def __init__(self, x: Any, y: Any) -> None:
        xa = np.asarray(x, dtype=np.float64)
        ya = np.asarray(y, dtype=np.float64)
        if xa.shape != ya.shape or xa.ndim != 1:
            raise ValueError("linear_correlation: x and y must be 1-D of equal length")
        self._n = xa.size
        self._r = 0.0
        self._ok = False
        if xa.size > 1:
            dx, dy = xa - xa.mean(), ya - ya.mean()
            den = np.sqrt(np.dot(dx, dx) * np.dot(dy, dy))
            if den > 0:
                self._r, self._ok = float(np.dot(dx, dy) / den), True

    def is_well_defined(self) -> _builtin_bool:
        return self._ok

    def coefficient(self) -> float:
        return self._r

    def n(self) -> _builtin_int:
        return self._n


class _MinMaxMean:
    def __init__(self, a: np.ndarray) -> None:
        self.n = a.size
        if self.n == 0:
            self.min = self.max = self.mean = None
        else:
            self.min, self.max, self.mean = float(a.min()), float(a.max()), float(a.mean())
        self.sum = float(a.sum())


class _MeanAndVariance:
    """Weighted sums of one sample and the statistics scitbx's ``mean_and_variance`` derives.

    Unweighted, every weight is 1. With W = Σw, W2 = Σw², m = Σw·x / W and D = Σw·(x - m)²:
    ``gsl_stats_wvariance = W / (W² - W2) · D`` (GSL's weighted variance, = D / (n - 1)
    unweighted), ``standard_error_of_mean_calculated_from_sample_weights = 1 / sqrt(W)`` and
    the conservative variance is the larger of the two squared. The ``unweighted_*`` accessors
    refuse a weighted sample, as scitbx's do.
    """

    def __init__(self, x: np.ndarray, w: Any) -> None:
        self._have_weights = w is not None
        if w is None:
            self._sw = float(x.size)
            self._sw2 = float(x.size)
            self._swx = float(x.sum())
        else:
            self._sw = float(w.sum())
            self._sw2 = float(np.dot(w, w))
            self._swx = float(np.dot(w, x))
        if not self._sw > 0:
            raise ValueError("flex.mean_and_variance: the weights must sum to a positive value")
        m = self._swx / self._sw
        d = x - m
        self._swd2 = float(np.dot(d, d)) if w is None else float(np.dot(w, d * d))

    def have_weights(self) -> _builtin_bool:
        return self._have_weights

    def mean(self) -> float:
        return self._swx / self._sw

    def sum_weights(self) -> float:
        return self._sw

    def sum_weights_sq(self) -> float:
        return self._sw2

    def sum_weights_values(self) -> float:
        return self._swx

    def sum_weights_delta_sq(self) -> float:
        return self._swd2

    def gsl_stats_wvariance(self) -> float:
        denominator = self._sw * self._sw - self._sw2
        if not denominator > 0:
            raise ValueError("flex.mean_and_variance: the weighted variance needs at least two "
                             "values with non-zero weight")
        return self._sw / denominator * self._swd2

    def gsl_stats_wsd(self) -> float:
        return float(np.sqrt(self.gsl_stats_wvariance()))

    def standard_error_of_mean_calculated_from_sample_weights(self) -> float:
        return float(1.0 / np.sqrt(self._sw))

    def conservative_variance(self) -> float:
        return _builtin_max(self.gsl_stats_wvariance(), 1.0 / self._sw)

    def conservative_standard_deviation(self) -> float:
        return float(np.sqrt(self.conservative_variance()))

    # the older scitbx names of the same quantities
    gsl_variance = gsl_stats_wvariance
    gsl_standard_deviation = gsl_stats_wsd

    def cumulative_variance(self) -> float:
        return 1.0 / self._sw

    def cumulative_standard_deviation(self) -> float:
        return self.standard_error_of_mean_calculated_from_sample_weights()

    def _require_unweighted(self, what: str) -> None:
        if self._have_weights:
            raise ValueError(f"flex.mean_and_variance.{what}() is for unweighted samples only")

    def unweighted_sample_variance(self) -> float:
        self._require_unweighted("unweighted_sample_variance")
        if self._sw < 2:
            raise ValueError("sample variance needs at least two values")
        return self._swd2 / (self._sw - 1.0)

    def unweighted_sample_standard_deviation(self) -> float:
        return float(np.sqrt(self.unweighted_sample_variance()))

    def unweighted_standard_error_of_mean(self) -> float:
        return float(np.sqrt(self.unweighted_sample_variance() / self._sw))
