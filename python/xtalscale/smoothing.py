"""DIALS-exact Gaussian smoothers in 1, 2 and 3 dimensions.

These are the smoothers of DIALS (``dials_refinement_helpers_ext.GaussianSmoother{,2D,3D}`` and
``dials_scaling_ext.GaussianSmootherFirstFixed``), computed by the C++ core
(:mod:`xtalscale._core.smoothers`). A smoother holds a grid of values (parameters) and evaluates

    value(x) = sum_i w_i p_i / sum_i w_i,   w_i = exp(-((z - pos_i) / sigma)**2),
    z = (x - x0) / spacing

over a small window of neighbouring values (see ``docs/dials_scaling_spec.md`` section 3).

Constructor forms
-----------------
Both DIALS's and the seed API's forms are accepted; they are told apart by the first argument:

* a 2-sequence first means DIALS: ``GaussianSmoother1D(x_range, num_intervals)``,
  ``GaussianSmoother2D(x_range, nx, y_range, ny)``,
  ``GaussianSmoother3D(x_range, nx, y_range, ny, z_range, nz)``;
* an int first means the seed form, in which counts are numbers of smoother *values*:
  ``GaussianSmoother1D(n_parameters, value_range)``,
  ``GaussianSmoother2D(n_x_params, n_y_params, x_range, y_range)``,
  ``GaussianSmoother3D(n_x_params, n_y_params, n_z_params, x_range, y_range, z_range)``.
  A count of values n becomes DIALS intervals with DIALS's ``SmoothMixin.nparam_to_val`` rule
  (n - 1 for n in {2, 3}, n - 2 for n >= 4). A DIALS smoother has 2, 3, 5, 6, ... values, never
  4, so ``n == 4`` (which that rule would silently turn into 3 values) raises ``ValueError``.

Differences from DIALS (deliberate)
-----------------------------------
* ``multi_value_weight`` accepts any number of points (DIALS asserts more than one).
* The first-fixed single-point weights hold ``w_j`` at ``j - 1`` only; DIALS's C++ also writes a
  stray ``w_j`` at ``j`` (possibly out of bounds), spec section 3.4.
* Bad input raises ``ValueError`` naming the argument instead of a DIALS assertion.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ._core import smoothers as _ext
from ._lazy import LazyModule

#: The smoother's weight matrices are the package's scitbx-like CSR matrices.
if TYPE_CHECKING:
    from . import sparse as _sparse
    from .sparse import SparseMatrix, SparseVector

    WeightMatrix = SparseMatrix
else:
    # scipy-backed types, imported when a weight matrix is first built (see _lazy)
    _sparse = LazyModule("xtalscale.sparse")


def __getattr__(name: str) -> Any:
    """``WeightMatrix`` (= SparseMatrix), ``SparseMatrix`` and ``SparseVector``, on first use."""
    if name in ("SparseMatrix", "SparseVector"):
        return getattr(_sparse, name)
    if name == "WeightMatrix":
        return _sparse.SparseMatrix
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "GaussianSmoother",
    "GaussianSmoother1D",
    "GaussianSmoother2D",
    "GaussianSmoother3D",
    "GaussianSmootherFirstFixed",
    "SparseVector",
    "ValueWeight",
    "WeightMatrix",
    "nparam_to_val",
]

_AXES = ("x", "y", "z")


# ------------------------------------------------------------------------------ result types
class ValueWeight(tuple):
    """``(value, weight, sumweight)``, also offering DIALS's ``get_value()`` style accessors.

    DIALS's C++ returns an object with ``get_value()``, ``get_weight()`` and ``get_sumweight()``;
    its Python wrappers return the plain tuple. This type is both.
    """

    __slots__ = ()

    def __new__(cls, value: Any, weight: Any, sumweight: Any) -> ValueWeight:  # noqa: PYI034
        return super().__new__(cls, (value, weight, sumweight))

    @property
    def value(self) -> Any:
        """The smoothed value(s)."""
        return self[0]

    @property
    def weight(self) -> Any:
        """The raw weights: a :class:`SparseVector` or a :class:`WeightMatrix`."""
        return self[1]

    @property
    def sumweight(self) -> Any:
        """The sum(s) of the weights."""
        return self[2]

    def get_value(self) -> Any:
        """Return the value(s)."""
        return self[0]

    def get_weight(self) -> Any:
        """Return the weights."""
        return self[1]

    def get_sumweight(self) -> Any:
        """Return the sum(s) of weights."""
        return self[2]


# ------------------------------------------------------------------------------ argument helpers
def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


# DIALS smoothers have tens of intervals per axis; a million per axis (or ten million
# values in all) is far beyond any model and still allocates only ~100 MB, whereas an
# unchecked 10**9 allocated 7.7 GB and 2**31 failed with a bare bad_alloc.
MAX_INTERVALS = 10**6
MAX_VALUES = 10**7


def _count(v: Any, name: str) -> int:
    """An interval count: a positive integer no larger than MAX_INTERVALS."""
    if not _is_int(v):
        raise ValueError(f"{name} must be an integer (got {v!r})")
    if int(v) <= 0:
        raise ValueError(f"{name} must be > 0 (got {int(v)})")
    if int(v) > MAX_INTERVALS:
        raise ValueError(f"{name} must be <= {MAX_INTERVALS} (got {int(v)})")
    return int(v)


def _check_total(intervals: list) -> list:
    total = 1
    for n in intervals:
        total *= n + 3  # values per axis never exceed intervals + 3
    if total > MAX_VALUES:
        raise ValueError(f"a smoother with {intervals} intervals would hold over {MAX_VALUES} "
                         "values")
    return intervals


def nparam_to_val(n_params: int) -> int:
    """Convert a number of smoother values to DIALS's number of intervals.

    Parameters
    ----------
    n_params : int
        Number of values (parameters), at least 2.

    Returns
    -------
    int
        ``n - 1`` for n in {2, 3}, else ``n - 2`` (DIALS ``SmoothMixin.nparam_to_val``).
    """
    if not _is_int(n_params) or int(n_params) < 2:
        raise ValueError(f"n_params must be an integer >= 2 (got {n_params!r})")
    return int(_ext.nparam_to_val(int(n_params)))


def _values_to_intervals(n: Any, name: str) -> int:
    """Seed form: a count of smoother values -> DIALS intervals (see module docstring)."""
    if not _is_int(n) or int(n) < 2:
        raise ValueError(f"{name} must be an integer >= 2 (got {n!r})")
    if int(n) > MAX_INTERVALS:
        raise ValueError(f"{name} must be <= {MAX_INTERVALS} (got {int(n)})")
    if int(n) == 4:
        raise ValueError(
            f"{name}=4 cannot be realised: a DIALS smoother has 2, 3, 5, 6, ... values "
            "(nparam_to_val(4) would give 3 values); use 3 or 5")
    return nparam_to_val(int(n))


def _as_range(r: Any, name: str) -> tuple[float, float]:
    """A (start, end) range with finite, increasing ends."""
    try:
        a = np.asarray(r, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a pair of numbers (got {r!r})") from err
    if a.shape != (2,):
        raise ValueError(f"{name} must be a pair (start, end) (got shape {a.shape})")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite (got {a.tolist()})")
    if not a[1] > a[0]:
        raise ValueError(f"{name} must be increasing and non-empty (got {a.tolist()})")
    return float(a[0]), float(a[1])


def _is_pair(v: Any) -> bool:
    if isinstance(v, (str, bytes)) or _is_int(v):
        return False
    try:
        return len(v) == 2
    except TypeError:
        return False


def _scalar(v: Any, name: str) -> float:
    a = np.asarray(v, dtype=np.float64)
    if a.size != 1:
        raise ValueError(f"{name} must be a single number (got shape {a.shape})")
    return float(a.reshape(()))


def _vector(v: Any, name: str) -> np.ndarray:
    """A 1-D float64 array (no copy when v already is one)."""
    try:
        a = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a 1-D array of numbers") from err
    if a.ndim == 0:
        a = a.reshape(1)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-dimensional (got shape {a.shape})")
    return a


def _parse_form(dim: int, args: tuple, kwargs: dict) -> tuple[list, list]:
    """Return per-axis (range, n_intervals) from either constructor form (see module docstring)."""
    seed_keys = ["n_parameters", "value_range"] if dim == 1 else (
        [f"n_{a}_params" for a in _AXES[:dim]] + [f"{a}_range" for a in _AXES[:dim]])
    dials_keys = ["x_range", "num_intervals"] if dim == 1 else [
        k for a in _AXES[:dim] for k in (f"{a}_range", f"n{a}")]
    is_seed = bool(args) and _is_int(args[0])
    if not args:
        is_seed = any(k in kwargs for k in ("n_parameters", "value_range", "n_x_params"))
    elif not is_seed and not _is_pair(args[0]):
        raise TypeError(
            f"first argument must be a (start, end) range (DIALS form) or an int count of values "
            f"(seed form), got {args[0]!r}")
    keys = seed_keys if is_seed else dials_keys
    if len(args) > len(keys):
        raise TypeError(f"expected at most {len(keys)} arguments, got {len(args)}")
    bound = dict(zip(keys, args))
    for k, v in kwargs.items():
        if k not in keys or k in bound:
            raise TypeError(f"unexpected or repeated argument {k!r} (expected {keys})")
        bound[k] = v
    missing = [k for k in keys if k not in bound]
    if missing:
        raise TypeError(f"missing arguments {missing}")
    if is_seed:
        counts = keys[:dim]
        ranges = keys[dim:]
        return ([_as_range(bound[r], r) for r in ranges],
                _check_total([_values_to_intervals(bound[c], c) for c in counts]))
    ranges = keys[0::2]
    counts = keys[1::2]
    if dim == 1:
        counts = ["num_intervals"]
    return ([_as_range(bound[r], r) for r in ranges],
            _check_total([_count(bound[c], c) for c in counts]))


# ------------------------------------------------------------------------------ the smoothers
class _SmootherBase:
    """Shared machinery; subclasses fix the dimension and the DIALS accessor names."""

    _dim = 1
    _kernel: Any = _ext.Smoother1D

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        ranges, intervals = _parse_form(self._dim, args, kwargs)
        self._build(ranges, intervals)

    def _build(self, ranges: list, intervals: list) -> None:
        self._layout = (list(ranges), list(intervals))
        self._smoothing: tuple[int, float] | None = None
        self._core = self._kernel(ranges, intervals)
        self._parameters: np.ndarray | None = None
        self._esds: np.ndarray | None = None

    # -- pickling / copying (the compiled kernel is rebuilt from the layout) ---------------
    def __reduce__(self) -> tuple:
        state = (self._layout, self._smoothing, self._parameters, self._esds)
        return (_restore, (type(self), state))

    def __deepcopy__(self, memo: dict) -> _SmootherBase:
        cls, state = self.__reduce__()[1]
        return _restore(cls, state)

    # -- smoothing -------------------------------------------------------------------------
    def set_smoothing(self, num_average: int, sigma: float) -> None:
        """Set the window size and Gaussian width (DIALS ``set_smoothing``).

        Parameters
        ----------
        num_average : int
            Values averaged per axis; min(num_average, values on the axis) must lie in 1..5.
        sigma : float
            Gaussian width in normalised units; negative selects the default
            ``0.65 + 0.05 * (naverage - 2)``. Zero is an error.
        """
        if not _is_int(num_average):
            raise ValueError(f"num_average must be an integer (got {num_average!r})")
        self._core.set_smoothing(int(num_average), float(sigma))
        self._smoothing = (int(num_average), float(sigma))

    def sigma(self) -> float:
        """The Gaussian width in normalised units."""
        return float(self._core.sigma)

    def num_values(self) -> int:
        """Total number of smoother values (the parameter-vector length)."""
        return int(self._core.num_values)

    @property
    def n_parameters(self) -> int:
        """Total number of smoother values (seed API name)."""
        return int(self._core.num_values)

    # -- stored parameters (seed API) ------------------------------------------------------
    def set_parameters(self, values: Any) -> None:
        """Store the parameter values used when ``values`` is omitted from evaluation calls."""
        v = self._checked_params(values, "values")
        self._parameters = v
        if self._esds is not None and self._esds.size != v.size:
            self._esds = None

    def set_parameter_esds(self, esds: Any) -> None:
        """Store parameter esds for :meth:`value_error_for_location`."""
        self._esds = self._checked_params(esds, "esds")

    @property
    def parameters(self) -> np.ndarray | None:
        """The stored parameter values (None until :meth:`set_parameters`)."""
        return self._parameters

    @property
    def parameter_esds(self) -> np.ndarray | None:
        """The stored parameter esds (None until :meth:`set_parameter_esds`)."""
        return self._esds

    def _checked_params(self, values: Any, name: str) -> np.ndarray:
        v = np.array(_vector(values, name), dtype=np.float64, copy=True)
        if v.size != self.num_values():
            raise ValueError(f"{name} must have length {self.num_values()} (the number of "
                             f"smoother values), got {v.size}")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{name} must be finite")
        return v

    def _values(self, values: Any) -> np.ndarray:
        if values is None:
            if self._parameters is None:
                raise ValueError("values not given and no parameters stored: call "
                                 "set_parameters(values) first or pass values")
            return self._parameters
        return _vector(values, "values")

    # -- evaluation ------------------------------------------------------------------------
    def _single(self, coord: Sequence[float], values: Any, first_fixed: bool) -> ValueWeight:
        value, idx, w, sw = self._core.value_weight(list(coord), self._values(values), first_fixed)
        size = self.num_values() - (1 if first_fixed else 0)
        return ValueWeight(float(value), _sparse.SparseVector(size, idx, w), float(sw))

    def _multi(self, coords: Sequence[Any], values: Any, first_fixed: bool) -> ValueWeight:
        arrays = [_vector(c, a) for c, a in zip(coords, _AXES)]
        value, sw, data, indices, indptr = self._core.multi_value_weight(
            arrays, self._values(values), False, first_fixed)
        n_cols = self.num_values() - (1 if first_fixed else 0)
        weight = _sparse.SparseMatrix((data, indices, indptr), shape=(value.size, n_cols), copy=False)
        weight.has_sorted_indices = True  # the kernel writes ascending columns
        return ValueWeight(value, weight, sw)

    def _locations(self, locations: Any) -> list:
        a = np.asarray(locations, dtype=np.float64)
        if self._dim == 1:
            return [_vector(a, "locations")]
        if a.ndim == 1 and a.size == self._dim:
            a = a.reshape(1, self._dim)
        if a.ndim != 2 or self._dim not in a.shape:
            raise ValueError(f"locations must have shape (n, {self._dim}) (got {a.shape})")
        if a.shape[1] != self._dim:  # given as (dim, n): one row per axis
            a = a.T
        return [np.ascontiguousarray(a[:, k]) for k in range(self._dim)]

    def value_error_for_location(self, locations: Any) -> tuple[np.ndarray, np.ndarray]:
        """Smoothed values and their propagated errors at many locations (seed API).

        Uses the stored parameters and esds (esds default to 0). The error is
        ``sqrt(sum_i (w_i / sum w)**2 * esd_i**2)``, i.e. independent parameter errors.

        Parameters
        ----------
        locations : array_like
            1D: the coordinates. 2D/3D: shape (n, dim), or (dim, n) when n != dim.

        Returns
        -------
        (numpy.ndarray, numpy.ndarray)
            Values and errors, one per location.
        """
        coords = self._locations(locations)
        return self._core.value_error(coords, self._values(None), self._esds)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_values={self.num_values()}, sigma={self.sigma():.4g})"


def _restore(cls: type, state: tuple) -> _SmootherBase:
    """Rebuild a pickled or copied smoother (see ``_SmootherBase.__reduce__``)."""
    (ranges, intervals), smoothing, parameters, esds = state
    obj = cls.__new__(cls)
    obj._build(ranges, intervals)
    if smoothing is not None:
        obj.set_smoothing(*smoothing)
    if parameters is not None:
        obj.set_parameters(parameters)
    if esds is not None:
        obj.set_parameter_esds(esds)
    return obj


def _axis_accessors(axis: int) -> dict:
    """DIALS per-axis accessor methods, e.g. ``num_x_values`` / ``x_positions``."""
    a = _AXES[axis]

    def num_values(self: _SmootherBase) -> int:
        return int(self._core.axis_num_values(axis))

    def num_samples(self: _SmootherBase) -> int:
        return int(self._core.axis_num_samples(axis))

    def num_average(self: _SmootherBase) -> int:
        return int(self._core.axis_num_average(axis))

    def spacing(self: _SmootherBase) -> float:
        return float(self._core.axis_spacing(axis))

    def positions(self: _SmootherBase) -> list:
        return self._core.axis_positions(axis).tolist()

    methods = {
        f"num_{a}_values": (num_values, f"Number of smoother values along {a}."),
        f"num_{a}_samples": (num_samples, f"Number of intervals along {a}."),
        f"num_{a}_average": (num_average, f"Window size naverage along {a}."),
        f"{a}_spacing": (spacing, f"Interval width along {a} in the input coordinate."),
        f"{a}_positions": (positions, f"Positions of the {a} values in normalised units."),
    }
    for name, (fn, doc) in methods.items():
        fn.__name__ = fn.__qualname__ = name
        fn.__doc__ = doc
    return {name: fn for name, (fn, _) in methods.items()}


class GaussianSmoother1D(_SmootherBase):
    """DIALS's 1D Gaussian smoother with first-fixed variants (``GaussianSmootherFirstFixed``).

    Parameters
    ----------
    *args, **kwargs
        ``(x_range, num_intervals)`` (DIALS) or ``(n_parameters, value_range)`` (seed; a count
        of values), see the module docstring.

    Examples
    --------
    >>> s = GaussianSmoother1D((0, 10), 10)
    >>> s.num_values(), s.spacing()
    (12, 1.0)
    >>> value, weight, sumweight = s.value_weight(0.5, list(range(12)))
    >>> round(value, 12)
    1.0
    """

    _dim = 1
    _kernel = _ext.Smoother1D

    def num_samples(self) -> int:
        """Number of intervals."""
        return int(self._core.axis_num_samples(0))

    def num_average(self) -> int:
        """Window size naverage."""
        return int(self._core.axis_num_average(0))

    def spacing(self) -> float:
        """Interval width in the input coordinate."""
        return float(self._core.axis_spacing(0))

    def positions(self) -> list:
        """Positions of the values in normalised units."""
        return self._core.axis_positions(0).tolist()

    def value_weight(self, x: float, values: Any = None) -> ValueWeight:
        """Value, sparse raw weights and sum of weights at one point.

        Parameters
        ----------
        x : float
            Coordinate (any finite number; no extrapolation beyond the window clipping).
        values : array_like, optional
            Parameter values (length ``num_values()``); the stored parameters if omitted.

        Returns
        -------
        ValueWeight
            ``(value, weight, sumweight)`` with ``weight`` a :class:`SparseVector`.
        """
        return self._single([_scalar(x, "x")], values, False)

    def multi_value_weight(self, x: Any, values: Any = None) -> ValueWeight:
        """Values, CSR raw-weight matrix (points x values) and sums of weights at many points."""
        return self._multi([x], values, False)

    def value_weight_first_fixed(self, x: float, values: Any = None) -> ValueWeight:
        """As :meth:`value_weight`, with weights for values 1.. only (column j-1 holds w_j).

        The value and sumweight still include value 0. This is the intended DIALS behaviour;
        DIALS's own C++ also writes a stray entry (spec section 3.4).
        """
        return self._single([_scalar(x, "x")], values, True)

    def multi_value_weight_first_fixed(self, x: Any, values: Any = None) -> ValueWeight:
        """As :meth:`multi_value_weight`, with the column of value 0 dropped."""
        return self._multi([x], values, True)


class GaussianSmoother2D(_SmootherBase):
    """DIALS's 2D Gaussian smoother; values are indexed ``i + j * nx`` (x fastest).

    Parameters
    ----------
    *args, **kwargs
        ``(x_range, nx, y_range, ny)`` (DIALS, interval counts) or
        ``(n_x_params, n_y_params, x_range, y_range)`` (seed, value counts).
    """

    _dim = 2
    _kernel = _ext.Smoother2D

    def value_weight(self, x: Any, y: Any = None, values: Any = None) -> ValueWeight:
        """Value, sparse raw weights and sum of weights at one point ``(x, y)``.

        ``value_weight((x, y))`` with stored parameters is also accepted.
        """
        if y is None and _is_pair(x):
            x, y = x
        return self._single([_scalar(x, "x"), _scalar(y, "y")], values, False)

    def multi_value_weight(self, x: Any, y: Any, values: Any = None) -> ValueWeight:
        """Values, CSR raw-weight matrix and sums of weights at the points ``(x[k], y[k])``."""
        return self._multi([x, y], values, False)


class GaussianSmoother3D(_SmootherBase):
    """DIALS's 3D Gaussian smoother; values are indexed ``i + j * nx + k * nx * ny``.

    Parameters
    ----------
    *args, **kwargs
        ``(x_range, nx, y_range, ny, z_range, nz)`` (DIALS, interval counts) or
        ``(n_x_params, n_y_params, n_z_params, x_range, y_range, z_range)`` (seed, value counts).
    """

    _dim = 3
    _kernel = _ext.Smoother3D

    def value_weight(self, x: Any, y: Any = None, z: Any = None,
                     values: Any = None) -> ValueWeight:
        """Value, sparse raw weights and sum of weights at one point ``(x, y, z)``.

        ``value_weight((x, y, z))`` with stored parameters is also accepted.
        """
        if y is None and z is None and not np.isscalar(x):
            x, y, z = _vector(x, "coord")
        return self._single([_scalar(x, "x"), _scalar(y, "y"), _scalar(z, "z")], values, False)

    def multi_value_weight(self, x: Any, y: Any, z: Any, values: Any = None) -> ValueWeight:
        """Values, CSR raw-weight matrix and sums of weights at the points ``(x, y, z)``."""
        return self._multi([x, y, z], values, False)


# DIALS names its per-axis accessors num_x_values(), x_spacing(), x_positions(), ...
for _cls in (GaussianSmoother2D, GaussianSmoother3D):
    for _axis in range(_cls._dim):
        for _name, _fn in _axis_accessors(_axis).items():
            setattr(_cls, _name, _fn)
del _cls, _axis, _name, _fn

#: DIALS's ``dials_scaling_ext.GaussianSmootherFirstFixed`` is the 1D smoother.
GaussianSmootherFirstFixed = GaussianSmoother1D


def _param_values(param: Any) -> Any:
    """DIALS refinement passes a ScanVaryingParameterSet (with ``.value``) or plain values."""
    if param is not None and not isinstance(param, np.ndarray) and hasattr(param, "value"):
        return param.value
    return param


class GaussianSmoother(GaussianSmoother1D):
    """DIALS refinement's smoother (``scan_varying_model_parameters.GaussianSmoother``).

    ``value_weight(x, param)`` and ``multi_value_weight(x, param)`` accept the parameter values
    or a ``ScanVaryingParameterSet``-like object with a ``.value`` sequence.
    """

    def value_weight(self, x: float, param: Any = None) -> ValueWeight:
        """Value, weights and sumweight at one point (as :meth:`GaussianSmoother1D.value_weight`)."""
        return super().value_weight(x, _param_values(param))

    def multi_value_weight(self, x: Any, param: Any = None) -> ValueWeight:
        """Values, weight matrix and sumweights at many points."""
        return super().multi_value_weight(x, _param_values(param))
