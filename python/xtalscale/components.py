"""Scale components: the factors whose product is a reflection's inverse scale ``g``.

Each component holds its parameters and, once :meth:`~ScaleComponentBase.update_reflection_data`
has split its ``data`` into blocks, returns per-block scales and the sparse derivative matrix
``∂s/∂p`` (``n_refl × n_free_params``, a ``scipy.sparse.csr_matrix``). Names, signatures and the
per-block protocol follow DIALS's ``dials.algorithms.scaling.model.components`` (spec §1.1–1.3,
§2). Kernels run in C++ (``xtalscale._core.components``); everything that does not depend on the
parameters (smoother weights, 1/(2d²), harmonic tables) is computed once per block and cached,
so a call only does the parameter-dependent work.

Derivative matrices share their index arrays (and, for the smooth and SH components, their data)
with the component's caches; those arrays are marked read-only, so modify a copy
(``d.copy()``) rather than the returned matrix in place.

For a whole model, :class:`ComponentModelBlock` evaluates every component's scales and
derivatives and the product rule in one C++ call (``xtalscale._core.model_block.ModelBlock``,
the fit layer's ``DerivativesView``): each component hands it a C++ term
(:meth:`ScaleComponentBase.model_term`) built from its per-block state, and user-written
components join through external terms filled from their ``calculate_scales_and_derivatives``.

Two constructor forms of :class:`ScaleComponentBase` are accepted: DIALS's
``(initial_values, parameter_esds=None)`` and the commissioning API's
``(active_parameter_manager, params=None)`` for user-written components (see
:meth:`ScaleComponentBase.as_sparse_derivatives`).

:func:`product_rule` forms ``g = Π s_c`` and ``∂g/∂p`` of already computed component results
with the same C++ product rule.
Weights (exactness policy): 1-D smooth components below ``lean_min_reflections`` hold weights
computed with DIALS's own operations (bit-identical to DIALS's); 2-D/3-D components hold no
weights: their scales are the smoother bulk kernel's values Σwp/Σw (as DIALS's 2-D/3-D
components take them; weights within ~1e-15 relative of DIALS's formula), their derivative
matrix is built by the same kernel on first read (a ``DeferredSparseMatrix``) and their model
block terms recompute the weights per evaluation; large 1-D blocks recompute theirs (product
form, a few ulp).
DIALS's stored scales are reproduced to 1e-12 (tests/python/test_golden_dials_scales.py).

Memory (``held_bytes()`` reports each component's own state): below 100k reflections the
smooth components hold their weight matrices (≈ 40 B/reflection for a 1-D smoother)
and the SH component its float64 harmonic matrix (8·n_params B/reflection). Above it
(``lean_min_reflections``, ``float32_min_reflections``) a 1-D smoother holds the normalised
coordinate and a 10-byte window record (+ 1/(2d²) for the B form) and recomputes its weights
per call, and the SH component in lookup mode holds only its two int32 grid indices (its
harmonics are formed per call from the lookup grid's separable factors; a user-assigned
lookup table, whose factors are unknown, gets a float32 block of 4·n_params B/reflection: see
:class:`SHScaleComponent`). With ``SHScaleComponent.cache_harmonics`` False, lookup mode holds
only the grid indices.
"""
from __future__ import annotations

import threading
from math import ceil, floor
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional, Sequence

import numpy as np

from ._core import components as _kern
from ._core import model_block as _mb
from ._lazy import LazyModule, is_scipy_sparse
from .csr_view import CsrView

if TYPE_CHECKING:
    import scipy.sparse as sp

    from . import sparse as _sparse
    from .sparse import SparseMatrix
else:
    sp = LazyModule("scipy.sparse")  # imported on first use: see _lazy
    _sparse = LazyModule("xtalscale.sparse")  # scipy-backed matrices, built only when asked for

__all__ = [
    "ComponentError",
    "ScaleComponentBase",
    "SingleScaleFactor",
    "SingleBScaleFactor",
    "LinearDoseDecay",
    "QuadraticDoseDecay",
    "SHScaleComponent",
    "AnalyticalComponent",
    "SmoothMixin",
    "SmoothScaleComponent1D",
    "SmoothBScaleComponent1D",
    "SmoothScaleComponent2D",
    "SmoothScaleComponent3D",
    "create_sph_harm_lookup_table",
    "SHLookupColumns",
    "sh_lookup_factors",
    "ensure_sh_lookup_table",
    "sh_lookup_data",
    "product_rule",
    "ComponentModelBlock",
    "SH_POINTS_PER_DEGREE",
]

#: Grid density DIALS uses for the harmonic lookup table ("memory" mode): 0.5° steps.
SH_POINTS_PER_DEGREE = 2


class ComponentError(ValueError, AssertionError):
    """Invalid input to a scale component.

    A ``ValueError`` (this project's convention for bad arguments) that is also an
    ``AssertionError``, which is what DIALS raises for the same conditions.
    """


# ----------------------------------------------------------------------------- helpers
def _vector(values: Any, name: str, finite: bool = True) -> np.ndarray:
    """``values`` as a fresh 1-D float64 array; raises ComponentError naming ``name``."""
    try:
        arr = np.array(np.asarray(values), dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        raise ComponentError(f"{name} must be a 1-D array of numbers ({exc})") from None
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ComponentError(f"{name} must be 1-dimensional (got shape {arr.shape})")
    if finite and not np.isfinite(arr).all():  # the method: np.all's wrapper cost more than the test
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ComponentError(f"{name} must be finite (element {bad} is {arr[bad]})")
    return arr


def _column(values: Any, name: str, owner: str, positive: bool = False) -> np.ndarray:
    """A per-reflection data column as float64, checked finite (and > 0 if ``positive``)."""
    arr = np.asarray(values)
    if arr.dtype != np.float64:
        arr = arr.astype(np.float64)
    if arr.ndim != 1:
        raise ComponentError(f"{owner}: data['{name}'] must be 1-dimensional (got shape {arr.shape})")
    # A finite sum means every element is finite (a NaN or ±inf makes the sum NaN or ±inf):
    # one vectorised pass without a temporary; the element-wise scan runs only when it is not.
    if np.isfinite(arr.sum()) and (not positive or arr.size == 0 or arr.min() > 0.0):
        return arr
    bad = ~np.isfinite(arr)
    if positive:
        bad |= arr <= 0.0
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        need = "finite and > 0" if positive else "finite"
        raise ComponentError(f"{owner}: data['{name}'] must be {need} (element {i} is {arr[i]})")
    return arr


def _readonly(*arrays: np.ndarray) -> None:
    for a in arrays:
        if a is not None:
            a.flags.writeable = False


def _nbytes_held(arrays: Sequence[Any], given: Sequence[Any]) -> int:
    """Bytes of the distinct numpy buffers in ``arrays`` that are not (views of) ``given``.

    ``given`` are the caller's arrays (data columns the component only references); views
    of one buffer are counted once.
    """
    seen: dict = {}
    given = [g for g in given if isinstance(g, np.ndarray)]
    for a in arrays:
        if not isinstance(a, np.ndarray) or a.size == 0:
            continue
        if any(np.may_share_memory(a, g) for g in given):
            continue
        base = a
        while isinstance(base.base, np.ndarray):
            base = base.base
        key = base.__array_interface__["data"][0]
        seen[key] = max(seen.get(key, 0), base.nbytes)
    return int(sum(seen.values()))


def _csr(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape: tuple) -> sp.csr_matrix:
    """Wrap CSR arrays without copying (scipy keeps int32 indices when they fit)."""
    # SparseMatrix: a csr_matrix that also answers scitbx's sparse-matrix calls (n_rows, col(j)...)
    m = _sparse.SparseMatrix((data, indices, indptr), shape=shape, copy=False)
    return m


def _empty_derivatives(n_rows: int = 0, n_cols: int = 0) -> sp.csr_matrix:
    return _sparse.SparseMatrix((n_rows, n_cols), dtype=np.float64)


def _is_parameter_manager(obj: Any) -> bool:
    """True for an object used as the seed API's parameter manager (not a parameter array)."""
    return hasattr(obj, "add_parameters") or hasattr(obj, "get_parameters")


def _apm_size(apm: Any) -> int:
    try:
        return len(apm.get_parameters())
    except Exception:  # noqa: BLE001  (a fresh manager may have nothing to report yet)
        return 0


def _seed_register(apm: Any) -> int:
    """Record where a seed-form component's parameters start in its manager."""
    offset = _apm_size(apm)
    try:
        starts = apm.__dict__.setdefault("_xtalscale_seed_offsets", [])
        starts.append(offset)
    except AttributeError:  # a manager without __dict__: spans end at the manager's end
        pass
    return offset


def _seed_span(comp: Any) -> tuple:
    """(start, count) of a seed-form component's parameters within its manager.

    A subclass's own ``n_params`` wins; otherwise the span runs to the next seed component
    registered on the same manager (or to the end of the manager's parameters).
    """
    start = comp._apm_offset
    own = type(comp).n_params
    if own is not ScaleComponentBase.n_params:
        return start, int(own.fget(comp) if isinstance(own, property) else own)
    apm = comp.active_parameter_manager
    later = [o for o in getattr(apm, "_xtalscale_seed_offsets", []) if o > start]
    end = min(later) if later else _apm_size(apm)
    return start, end - start


def _block_indices(selection: Any, block_selections: Any, n: int, owner: str) -> list:
    """Per-block row selections into the stored data: a list of index arrays or ``None`` (all).

    ``selection`` is a bool mask over the data (one block); ``block_selections`` a list of index
    arrays (one block each). Validates lengths and index bounds.
    """
    if selection is not None:
        mask = np.asarray(selection)
        if mask.dtype != np.bool_:
            raise ComponentError(f"{owner}: selection must be a boolean mask")
        if mask.shape != (n,):
            raise ComponentError(
                f"{owner}: selection has length {mask.size} but the data has {n} reflections")
        return [np.flatnonzero(mask)]
    if block_selections is not None and len(block_selections) > 0:
        blocks = []
        for b, sel in enumerate(block_selections):
            idx = np.asarray(sel)
            if idx.size == 0:
                blocks.append(np.zeros(0, dtype=np.int64))
                continue
            if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
                raise ComponentError(f"{owner}: block_selections[{b}] must be a 1-D integer array")
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= n:
                bad = lo if lo < 0 else hi
                raise IndexError(f"{owner}: block_selections[{b}] index {bad} is out of range "
                                 f"for {n} reflections")
            blocks.append(idx)
        return blocks
    return [None]


def _take(arr: np.ndarray, idx: Optional[np.ndarray]) -> np.ndarray:
    return arr if idx is None else arr[idx]


# ----------------------------------------------------------------------------- base class
class ScaleComponentBase:
    """Base scale component: parameters, esds and the per-block scale/derivative protocol.

    Parameters
    ----------
    initial_values : array_like or parameter manager
        DIALS form: the initial parameter values. Seed form: an object with
        ``add_parameters``/``get_parameters`` (an active parameter manager), stored as
        ``self.active_parameter_manager``; the subclass adds its parameters to it, and
        ``parameters``/``n_params`` then serve this component's slice of the manager
        (unless the subclass defines them itself).
    parameter_esds : array_like, optional
        DIALS form: estimated standard deviations, same length as the parameters.
        Seed form: the user's ``params`` object, stored as ``self.params``.

    Notes
    -----
    ``data`` is a dict of full-length per-reflection arrays whose keys each subclass fixes.
    ``update_reflection_data`` builds the per-block state; ``calculate_scales_and_derivatives``
    returns ``(scales (n,), csr_matrix (n, n_free_params))`` for one block.
    """

    null_parameter_value: ClassVar[float] = 1.0
    _data_keys: ClassVar[Optional[frozenset]] = None

    def __init__(self, initial_values: Any = None, parameter_esds: Any = None) -> None:
        self._seed_form = _is_parameter_manager(initial_values)
        if self._seed_form:
            self.active_parameter_manager = initial_values
            self.params = parameter_esds
            self._parameters = np.zeros(0)
            self._parameter_esds = None
            # The subclass appends its parameters to the manager next; remember where they start.
            self._apm_offset = _seed_register(initial_values)
        else:
            if initial_values is None:
                raise ComponentError(f"{type(self).__name__}: initial_values are required")
            self._parameters = _vector(initial_values, "initial_values")
            self._parameter_esds = None
            if parameter_esds is not None:
                self._parameter_esds = self._checked_esds(parameter_esds, self._parameters.size)
        self._n_params = int(self._parameters.size)
        self._var_cov = None
        self._n_refl: list = []
        self._parameter_restraints = None
        self._data: dict = {}
        self._terms: dict = {}  # block id -> C++ model term (see model_term)

    # ---------------------------------------------------------------- pickling
    #: Attributes rebuilt on demand (C++ caches, smoother objects), left out of pickles.
    _transient: ClassVar[tuple] = ()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in self._transient:
            state.pop(key, None)
        state.pop("_given", None)  # the caller's arrays: referenced only for held_bytes
        state.pop("_terms", None)  # C++ terms: rebuilt on demand
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._terms = {}
        self._reset_transient()

    def _reset_transient(self) -> None:
        """Recreate the attributes named in ``_transient`` (empty caches)."""

    # ---------------------------------------------------------------- seed-form support
    @staticmethod
    def as_sparse_derivatives(derivatives: Any, n_rows: Optional[int] = None) -> sp.csr_matrix:
        """Turn a derivative return of any supported form into a ``csr_matrix``.

        Parameters
        ----------
        derivatives : scipy sparse, numpy array, flex grid array or nested sequence
            ``∂s_i/∂p_j`` with one row per reflection; a 1-D array is one column.
        n_rows : int, optional
            Expected number of rows (reflections); checked when given.

        Returns
        -------
        scipy.sparse.csr_matrix
            float64, shape ``(n_rows, n_params)``.
        """
        if is_scipy_sparse(derivatives):
            m = sp.csr_matrix(derivatives, dtype=np.float64)
        else:
            if hasattr(derivatives, "as_dense_matrix"):  # scitbx-like sparse
                derivatives = derivatives.as_dense_matrix()
            arr = np.asarray(derivatives, dtype=np.float64)
            if arr.ndim == 1:
                arr = arr.reshape(-1, 1)
            if arr.ndim != 2:
                raise ComponentError(f"derivatives must be 2-dimensional (got shape {arr.shape})")
            if not np.all(np.isfinite(arr)):
                raise ComponentError("derivatives must be finite")
            m = sp.csr_matrix(arr)
        if n_rows is not None and m.shape[0] != n_rows:
            raise ComponentError(f"derivatives have {m.shape[0]} rows but there are {n_rows} "
                                 "reflections")
        return m

    # ---------------------------------------------------------------- data
    @property
    def data(self) -> dict:
        """Full-length per-reflection arrays this component uses (keys fixed per subclass)."""
        return self._data

    @data.setter
    def data(self, data: dict) -> None:
        if self._data_keys is not None:
            keys = set(data.keys())
            if keys != set(self._data_keys):
                missing = sorted(set(self._data_keys) - keys)
                extra = sorted(keys - set(self._data_keys))
                raise ComponentError(
                    f"{type(self).__name__}.data needs exactly the keys "
                    f"{sorted(self._data_keys)} (missing {missing}, unexpected {extra})")
        self._given = [v for v in data.values() if isinstance(v, np.ndarray)]
        self._data = self._convert_data(dict(data))
        self._terms = {}

    @data.deleter
    def data(self) -> None:
        self._data = {}

    def _convert_data(self, data: dict) -> dict:
        """Validate and convert data columns (subclasses override)."""
        return data

    def _held_arrays(self) -> list:
        """Arrays this component holds between calls (subclasses extend)."""
        return list(self._data.values())

    def held_bytes(self) -> int:
        """Bytes of per-reflection state this component holds between calls.

        Counts the buffers it allocated and keeps (converted data columns, normalised
        coordinates, weight matrices, harmonic blocks, grid indices), each once; excludes the
        data columns it was given and only references, class-wide shared tables (see
        :meth:`SHScaleComponent.shared_table_bytes`) and the outputs returned to the caller.
        """
        return _nbytes_held(self._held_arrays(), getattr(self, "_given", []))

    def _data_length(self) -> int:
        if not self._data:
            raise ComponentError(f"{type(self).__name__}: set .data before update_reflection_data")
        return len(next(iter(self._data.values())))

    # ---------------------------------------------------------------- parameters
    @property
    def parameter_restraints(self) -> Optional[np.ndarray]:
        """Restraint weights, one per parameter (or None)."""
        return self._parameter_restraints

    @parameter_restraints.setter
    def parameter_restraints(self, restraints: Any) -> None:
        r = _vector(restraints, "parameter_restraints")
        if r.size != self._parameters.size:
            raise ComponentError(f"parameter_restraints has {r.size} weights but the component "
                                 f"has {self._parameters.size} parameters")
        self._parameter_restraints = r

    @property
    def n_params(self) -> int:
        """Number of parameters (read-only)."""
        if self._seed_form:
            return _seed_span(self)[1]
        return self._n_params

    @property
    def parameters(self) -> np.ndarray:
        """Parameter values (float64 array; the setter keeps the length).

        In the seed form these are this component's slice of the manager's parameters.
        """
        if self._seed_form:
            start, n = _seed_span(self)
            return np.asarray(self.active_parameter_manager.get_parameters(),
                              dtype=np.float64)[start:start + n]
        return self._parameters

    @parameters.setter
    def parameters(self, new_parameters: Any) -> None:
        self._store_parameters(new_parameters, "parameters")

    def _store_parameters(self, new_parameters: Any, name: str) -> None:
        """Store all parameter values: in ``_parameters`` (DIALS form) or the manager slice
        (seed form), never through the public ``parameters`` property."""
        p = _vector(new_parameters, name)
        if self._seed_form:
            start, n = _seed_span(self)
            if p.size != n:
                raise ComponentError(f"{name} needs {n} values (got {p.size})")
            full = np.array(self.active_parameter_manager.get_parameters(), dtype=np.float64)
            full[start:start + n] = p
            self.active_parameter_manager.set_parameters(full)
            return
        if p.size != self._parameters.size:
            raise ComponentError(
                f"attempting to set a new set of parameters of different length than previous "
                f"assignment: was {self._parameters.size}, attempting {p.size}")
        self._parameters = p

    @property
    def free_parameters(self) -> np.ndarray:
        """The refined parameters (all of them unless a subclass fixes some)."""
        return self.parameters

    @free_parameters.setter
    def free_parameters(self, parameters: Any) -> None:
        # As DIALS: store the values directly (``_parameters``), not through the public
        # ``parameters`` property, which a subclass may make read-only.
        self._store_parameters(parameters, "free_parameters")

    @staticmethod
    def _checked_esds(esds: Any, n: int) -> np.ndarray:
        e = _vector(esds, "parameter_esds", finite=False)
        if e.size != n:
            raise ComponentError(f"parameter_esds has {e.size} values but there are {n} parameters")
        return e

    @property
    def parameter_esds(self) -> Optional[np.ndarray]:
        """Estimated standard deviations of the parameters (or None)."""
        return self._parameter_esds

    @parameter_esds.setter
    def parameter_esds(self, esds: Any) -> None:
        self._parameter_esds = self._checked_esds(esds, self._parameters.size)

    @property
    def free_parameter_esds(self) -> Optional[np.ndarray]:
        """Esds of the free parameters."""
        return self._parameter_esds

    @free_parameter_esds.setter
    def free_parameter_esds(self, esds: Any) -> None:
        self._parameter_esds = self._checked_esds(esds, self.free_parameters.size)

    @property
    def var_cov_matrix(self) -> Any:
        """Variance-covariance matrix of the parameters (set by the refiner)."""
        return self._var_cov

    @var_cov_matrix.setter
    def var_cov_matrix(self, var_cov: Any) -> None:
        self._var_cov = var_cov

    @property
    def n_refl(self) -> list:
        """Number of reflections in each block."""
        return self._n_refl

    # ---------------------------------------------------------------- model blocks
    def model_term(self, block_id: int = 0) -> Any:
        """The C++ term of block ``block_id`` for a :class:`ComponentModelBlock`, or None.

        The term evaluates this component's scales and derivatives in C++ from the state
        built by ``update_reflection_data`` (shared, not copied), reading the full parameter
        vector (``parameters``) at each evaluation. It is made once per block and dropped when
        the data, the blocks or the parameter layout change. None means the component has no
        C++ term (a user-written component): a model block then fills an external term from
        :meth:`calculate_scales_and_derivatives` before each evaluation.
        """
        if self._seed_form or not self._n_refl:
            return None
        b = self._check_block(block_id)
        term = self._terms.get(b)
        if term is None:
            term = self._make_term(b)
            if term is not None:
                self._terms[b] = term
        return term

    def _make_term(self, b: int) -> Any:
        """Build the C++ term of block ``b`` (subclasses; None: no C++ term)."""
        return None

    # ---------------------------------------------------------------- restraints
    def calculate_restraints(self) -> Optional[tuple]:
        """``(residuals, gradient)`` of the restraint term, or None if unrestrained."""
        return None

    def calculate_jacobian_restraints(self) -> Optional[tuple]:
        """``(residuals, jacobian, weights)`` for least-squares restraints, or None."""
        return None

    def _quadratic_restraints(self) -> tuple:
        w = self._require_restraints()
        p = self._parameters
        return w * p * p, 2.0 * w * p

    def _quadratic_jacobian_restraints(self) -> tuple:
        w = self._require_restraints()
        n = self._n_params
        # the identity as a CsrView: scipy is imported only if a caller uses it as a scipy matrix
        identity = CsrView(np.ones(n), np.arange(n, dtype=np.int32), np.arange(n + 1, dtype=np.int32), (n, n))
        return self._parameters.copy(), identity, w

    def _require_restraints(self) -> np.ndarray:
        if self._parameter_restraints is None:
            raise ComponentError(f"{type(self).__name__}: parameter_restraints are not set")
        return self._parameter_restraints

    # ---------------------------------------------------------------- protocol
    def update_reflection_data(self, selection: Any = None, block_selections: Any = None) -> None:
        """Split ``data`` into blocks (a bool ``selection`` or a list of index arrays).

        In the seed form (``update_reflection_data(reflection_table)``) the base does nothing;
        seed components that need data override it.
        """
        if self._seed_form:
            return
        raise NotImplementedError()

    def calculate_scales_and_derivatives(self, block_id: int = 0) -> tuple:
        """``(scales, csr derivatives)`` for one block."""
        raise NotImplementedError()

    def calculate_scales(self, block_id: int = 0) -> np.ndarray:
        """Scales for one block."""
        raise NotImplementedError()

    def _check_block(self, block_id: int) -> int:
        if block_id is None:
            block_id = 0
        if not self._n_refl:
            raise ComponentError(f"{type(self).__name__}: call update_reflection_data first")
        if not -len(self._n_refl) <= block_id < len(self._n_refl):
            raise IndexError(f"block_id {block_id} is out of range for {len(self._n_refl)} blocks")
        return block_id


# ----------------------------------------------------------------------------- simple components
class _OneColumnDerivatives:
    """Shared index arrays of an n × 1 derivative matrix, grown as needed."""

    def __init__(self) -> None:
        self._cols = np.zeros(0, dtype=np.int32)
        self._rows = np.zeros(1, dtype=np.int32)

    def matrix(self, data: np.ndarray) -> sp.csr_matrix:
        n = data.size
        if self._cols.size < n:
            self._cols = np.zeros(n, dtype=np.int32)
            self._rows = np.arange(n + 1, dtype=np.int32)
            _readonly(self._cols, self._rows)
        return _csr(data, self._cols[:n], self._rows[: n + 1], (n, 1))


class SingleScaleFactor(ScaleComponentBase):
    """One overall scale parameter: ``s = p₀`` and ``∂s/∂p₀ = 1`` (KB "scale")."""

    null_parameter_value = 1.0
    _data_keys = frozenset({"id"})

    def __init__(self, initial_values: Any, parameter_esds: Any = None) -> None:
        super().__init__(initial_values, parameter_esds)
        if self._n_params != 1:
            raise ComponentError("This model component can only hold a single parameter.")
        self._ones = _OneColumnDerivatives()
        self._unit: Optional[np.ndarray] = None

    def update_reflection_data(self, selection: Any = None, block_selections: Any = None) -> None:
        n = self._data_length()
        blocks = _block_indices(selection, block_selections, n, type(self).__name__)
        self._n_refl = [n if idx is None else int(idx.size) for idx in blocks]
        self._terms = {}

    def _make_term(self, b: int) -> Any:
        return _mb.ScaleFactorTerm(self._n_refl[b])

    def calculate_scales_and_derivatives(self, block_id: int = 0) -> tuple:
        b = self._check_block(block_id)
        n = self._n_refl[b]
        if self._unit is None or self._unit.size < n:
            self._unit = np.ones(n)
            _readonly(self._unit)
        return self.calculate_scales(b), self._ones.matrix(self._unit[:n])

    def calculate_scales(self, block_id: int = 0) -> np.ndarray:
        b = self._check_block(block_id)
        return np.full(self._n_refl[b], self._parameters[0])


class _ExpFactorComponent(ScaleComponentBase):
    """``s = exp(p₀·f)``, ``∂s/∂p₀ = s·f`` with a per-reflection factor f fixed per block."""

    def __init__(self, initial_values: Any, parameter_esds: Any = None) -> None:
        super().__init__(initial_values, parameter_esds)
        if self._n_params != 1:
            raise ComponentError(f"{type(self).__name__} holds exactly one parameter "
                                 f"(got {self._n_params})")
        self._factors: list = []
        self._d_values: list = []
        self._one_col = _OneColumnDerivatives()

    @property
    def d_values(self) -> list:
        """d-spacings of each block."""
        return self._d_values

    def _factor(self, idx: Optional[np.ndarray]) -> np.ndarray:
        raise NotImplementedError()

    def update_reflection_data(self, selection: Any = None, block_selections: Any = None) -> None:
        n = self._data_length()
        blocks = _block_indices(selection, block_selections, n, type(self).__name__)
        self._d_values = [_take(self._data["d"], idx) for idx in blocks]
        self._factors = [np.ascontiguousarray(self._factor(idx)) for idx in blocks]
        _readonly(*self._factors)
        self._n_refl = [int(f.size) for f in self._factors]
        self._terms = {}

    def _make_term(self, b: int) -> Any:
        return _mb.ExpFactorTerm(self._factors[b])

    def calculate_scales_and_derivatives(self, block_id: int = 0) -> tuple:
        b = self._check_block(block_id)
        scales, derivs = _kern.exp_scales(self._factors[b], float(self._parameters[0]), True)
        return scales, self._one_col.matrix(derivs)

    def calculate_scales(self, block_id: int = 0) -> np.ndarray:
        b = self._check_block(block_id)
        return _kern.exp_scales(self._factors[b], float(self._parameters[0]), False)[0]


class SingleBScaleFactor(_ExpFactorComponent):
    """One overall B factor: ``s = exp(B/(2d²))``, ``∂s/∂B = s/(2d²)`` (KB "decay")."""

    null_parameter_value = 0.0
    _data_keys = frozenset({"d"})

    def _convert_data(self, data: dict) -> dict:
        return {"d": _column(data["d"], "d", type(self).__name__, positive=True)}

    def _factor(self, idx: Optional[np.ndarray]) -> np.ndarray:
        d = _take(self._data["d"], idx)
        return 1.0 / (2.0 * d * d)


class LinearDoseDecay(_ExpFactorComponent):
    """Dose decay linear in 1/d: ``s = exp(C·x/d)`` with x the raw image number (z px)."""

    null_parameter_value = 0.0
    _data_keys = frozenset({"d", "x"})

    def _convert_data(self, data: dict) -> dict:
        name = type(self).__name__
        out = {"d": _column(data["d"], "d", name, positive=True), "x": _column(data["x"], "x", name)}
        if out["d"].size != out["x"].size:
            raise ComponentError(f"{name}: data['d'] and data['x'] must have the same length")
        return out

    def _factor(self, idx: Optional[np.ndarray]) -> np.ndarray:
        return _take(self._data["x"], idx) / _take(self._data["d"], idx)

    @property
    def x_values(self) -> list:
        """Raw z coordinates of each block."""
        return [f * d for f, d in zip(self._factors, self._d_values)]


class QuadraticDoseDecay(LinearDoseDecay):
    """Dose decay quadratic in 1/d: ``s = exp(C·x/d²)``."""

    def _factor(self, idx: Optional[np.ndarray]) -> np.ndarray:
        d = _take(self._data["d"], idx)
        return _take(self._data["x"], idx) / (d * d)

    @property
    def x_values(self) -> list:
        return [f * d * d for f, d in zip(self._factors, self._d_values)]


class AnalyticalComponent(ScaleComponentBase):
    """A fixed, externally computed correction: ``s = correction``; no parameters."""

    null_parameter_value = 1.0
    _data_keys = frozenset({"correction"})

    def __init__(self, initial_values: Any = (), parameter_esds: Any = None) -> None:
        super().__init__(np.zeros(0) if initial_values is None else initial_values, parameter_esds)
        self._corrections: list = []

    @property
    def free_parameters(self) -> np.ndarray:
        """Always empty: the correction is not refined."""
        return np.zeros(0)

    @free_parameters.setter
    def free_parameters(self, parameters: Any) -> None:
        if len(parameters) != 0:
            raise ComponentError("AnalyticalComponent has no free parameters")

    def _convert_data(self, data: dict) -> dict:
        return {"correction": _column(data["correction"], "correction", type(self).__name__)}

    def update_reflection_data(self, selection: Any = None, block_selections: Any = None) -> None:
        n = self._data_length()
        blocks = _block_indices(selection, block_selections, n, type(self).__name__)
        self._corrections = [np.ascontiguousarray(_take(self._data["correction"], idx))
                             for idx in blocks]
        self._n_refl = [int(c.size) for c in self._corrections]
        self._terms = {}

    def _make_term(self, b: int) -> Any:
        return _mb.FixedScalesTerm(self._corrections[b])

    def calculate_scales_and_derivatives(self, block_id: int = 0) -> tuple:
        b = self._check_block(block_id)
        return self.calculate_scales(b), _empty_derivatives(self._n_refl[b], 0)

    def calculate_scales(self, block_id: int = 0) -> np.ndarray:
        b = self._check_block(block_id)
        return self._corrections[b].copy()


# ----------------------------------------------------------------------------- spherical harmonics
class SHScaleComponent(ScaleComponentBase):
    """Spherical-harmonic absorption surface: ``s = 1 + Σ C_lm·Ȳ_lm`` (spec §2.5).

    ``data`` is either ``{"sph_harm_table": (n_params × n_refl) matrix}`` ("speed" mode: the
    exact per-reflection harmonics) or ``{"s0_lookup", "s1_lookup"}`` grid indices ("memory"
    mode, read from the class-wide ``coefficients_list`` lookup table). Either way the block's
    ``n_refl × n_params`` harmonic matrix is built once in ``update_reflection_data`` and kept
    dense; a call is one matrix-vector product, and the derivative matrix shares its memory.

    Large-data ("memory"/lookup) regime, above ``float32_min_reflections``: no harmonic block
    is held. The lookup grid is separable (every harmonic is a θ factor times a φ factor), so
    when the class table is one xtalscale built (:func:`create_sph_harm_lookup_table`, which
    keeps the factor tables beside it) a block holds only its two int32 grid indices (8
    B/reflection) and its model-block term (``LookupHarmonicsTerm``) forms each row from the
    factor tables (~200 KB for lmax 4, in cache) as it goes: the float64 lookup harmonics bit
    for bit, faster than streaming a held block from memory. Its scales (and transposed
    product) go through per-θ-row sums of the grid (the φ factors depend on m alone), so they
    equal 1 + h·C to the last bits, not bit for bit. Callers that want the matrix
    (:meth:`calculate_scales_and_derivatives`, :meth:`calculate_scales_and_dense_derivatives`,
    :attr:`harmonic_values`) get float64 rows built per call and not kept; scales come from the
    term, the model block's own bits.

    A user-assigned ``coefficients_list`` (any table, whose factors are unknown) keeps the
    **float32** block instead (4·n_params B/reflection, built once in
    ``update_reflection_data``): in this regime the harmonics come from DIALS's 0.5° lookup
    table, whose values differ from the exact harmonics by up to ~1e-2, and float32 rounding
    (2⁻²⁴ ≈ 6e-8 relative per value, so |Δs| ≤ 6e-8·Σ|C_lm·Ȳ_lm|) is five orders of magnitude
    smaller. Its scales are accumulated in double, and the dense derivative block is the held
    block itself (no per-call copy). ``exact_harmonics`` True holds a float64 block instead.
    The exact float64 path is kept for "speed" data (exact harmonics, used by models up to
    100k reflections). No column-index pattern is held: ``calculate_scales_and_derivatives``
    builds the CSR pattern per call.
    """

    null_parameter_value = 0.0
    coefficients_list: ClassVar[Optional[list]] = None
    _table_cache: ClassVar[dict] = {}
    #: "Memory" mode: keep a block's harmonic matrix once its derivatives have been built
    #: (faster repeated calls, 8·n_params bytes per reflection). Set False on the class or an
    #: instance to rebuild it on each derivative call instead and hold only 8 bytes/reflection.
    cache_harmonics: ClassVar[bool] = True
    #: "Memory" mode: hold the float64 lookup harmonics instead of the large-data forms
    #: (exact averages of the table rows; 8·n_params bytes per reflection).
    exact_harmonics: ClassVar[bool] = False
    #: The large-data forms (harmonics formed from the grid's factors, or a float32 block for a
    #: user-assigned table) are used only above this many reflections (DIALS's own switch to
    #: the lookup table); smaller lookup data keep the float64 path.
    float32_min_reflections: ClassVar[int] = 100_000

    _transient = ("_table", "_factors")

    def _reset_transient(self) -> None:
        # The lookup table and its factors are class-wide; re-read them in this process.
        self._table = None  # (the class table, fetched again on first need)
        self._factors = None
        if getattr(self, "_factored", False):
            self._factors = self._lookup_factors(self._n_params)
            if self._factors is None:  # this process's table is not xtalscale's own
                self._hold_float32_blocks()

    def __init__(self, initial_values: Any, parameter_esds: Any = None) -> None:
        super().__init__(initial_values, parameter_esds)
        self._mode: Optional[str] = None
        self._blocks: list = []  # dense (n_b, n_params) harmonic matrices (or None), read-only
        self._lookup_blocks: list = []  # memory mode: per block (s0, s1) int32 grid indices
        self._table: Optional[np.ndarray] = None
        #: large lookup data: rows formed from the grid's factors (``_factors``), none held
        self._factored = False
        self._factors: Any = None

    @ScaleComponentBase.data.setter  # type: ignore[attr-defined]
    def data(self, data: dict) -> None:
        keys = set(data.keys())
        name = type(self).__name__
        self._given = [v for v in data.values() if isinstance(v, np.ndarray)]
        self._terms = {}
        if keys == {"s0_lookup", "s1_lookup"}:
            self._mode = "memory"
            self._data = {k: self._lookup_column(data[k], k) for k in ("s0_lookup", "s1_lookup")}
            if self._data["s0_lookup"].size != self._data["s1_lookup"].size:
                raise ComponentError(f"{name}: s0_lookup and s1_lookup must have the same length")
        elif keys == {"sph_harm_table"}:
            self._mode = "speed"
            self._data = {"sph_harm_table": data["sph_harm_table"]}
            self._dense_table = self._harmonics_by_row(data["sph_harm_table"])
        else:
            raise ComponentError(f"{name}.data needs the keys ['sph_harm_table'] or "
                                 f"['s0_lookup', 's1_lookup'] (got {sorted(keys)})")

    @staticmethod
    def _lookup_column(values: Any, name: str) -> np.ndarray:
        arr = np.asarray(values)
        if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise ComponentError(f"SHScaleComponent: data['{name}'] must be a 1-D integer array")
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
            bad = int(arr.min() if arr.min() < 0 else arr.max())
            raise IndexError(f"SHScaleComponent: data['{name}'] index {bad} is out of range")
        return arr.astype(np.int32, copy=False)  # grid indices: 4 bytes each

    def _harmonics_by_row(self, table: Any) -> np.ndarray:
        """(n_params × n_refl) table (sparse or dense) → C-contiguous (n_refl × n_params)."""
        if is_scipy_sparse(table) and table.format == "csc" and table.shape[0] == self._n_params:
            n = table.shape[1]
            p = self._n_params
            # sph_harm_table's full-pattern CSC already holds the row-major (n × p) values.
            if table.nnz == n * p and table.has_sorted_indices and np.array_equal(
                    table.indptr[[0, -1]], [0, n * p]) and np.all(np.diff(table.indptr) == p):
                dense = np.asarray(table.data, dtype=np.float64).reshape(n, p)
                if not np.all(np.isfinite(dense)):
                    raise ComponentError("SHScaleComponent: sph_harm_table must be finite")
                return dense
        dense = table.toarray() if is_scipy_sparse(table) else np.asarray(
            table.as_dense_matrix() if hasattr(table, "as_dense_matrix") else table,
            dtype=np.float64)
        if dense.ndim != 2 or dense.shape[0] != self._n_params:
            raise ComponentError(
                f"SHScaleComponent: sph_harm_table must have shape (n_params={self._n_params}, "
                f"n_refl) (got {dense.shape})")
        if not np.all(np.isfinite(dense)):
            raise ComponentError("SHScaleComponent: sph_harm_table must be finite")
        return np.ascontiguousarray(dense.T, dtype=np.float64)

    @property
    def sph_harm_table(self) -> Any:
        """The full (n_params × n_refl) harmonic table ("speed" mode data)."""
        return self._data["sph_harm_table"]

    @sph_harm_table.setter
    def sph_harm_table(self, sht: Any) -> None:
        self.data = {"sph_harm_table": sht}

    @property
    def harmonic_values(self) -> list:
        """Per block: the (n_refl × n_params) harmonic matrix as ``csr_matrix`` ("speed"), or
        one array per parameter ("memory"), as in DIALS."""
        blocks = [self._block_matrix(b) for b in range(len(self._n_refl))]
        if self._mode == "memory":
            return [[h[:, k] for k in range(h.shape[1])] for h in blocks]
        return [self._matrix(h) for h in blocks]

    def dense_harmonic_values(self, block_id: int = 0) -> np.ndarray:
        """The block's harmonic matrix as a read-only dense (n_refl × n_params) array."""
        return self._block_matrix(self._check_block(block_id))

    def _grid_table(self) -> np.ndarray:
        """The class lookup table (:meth:`_lookup_table`), fetched on first need: blocks formed
        from the grid's factors never read it."""
        if self._table is None:
            self._table = self._lookup_table(self._n_params)
        return self._table

    @classmethod
    def _lookup_table(cls, n_params: int) -> np.ndarray:
        """The class lookup table stacked row-major (n_grid × n_params_max), cached by identity.
        Unset, it is xtalscale's own table, built here (:func:`ensure_sh_lookup_table`) for the
        largest lmax whose factors the process made (a job's models make only the factors)."""
        own = _own_default_grid_factors()
        coeffs = cls.coefficients_list
        # xtalscale's own table (unset, or built for a smaller lmax earlier in the process) is
        # (re)built to cover the factors made since; a table a user assigned is left alone
        own_table = coeffs is None or isinstance(coeffs, SHLookupColumns)
        if own_table and own is not None and (coeffs is None or len(coeffs) < n_params):
            ensure_sh_lookup_table(own.lmax)
        coeffs = cls.coefficients_list
        if coeffs is None:
            raise ComponentError(
                "SHScaleComponent.coefficients_list is not set: assign "
                "create_sph_harm_lookup_table(lmax, points_per_degree) before using lookup data")
        cached = cls._table_cache.get("table")
        if cached is None or cached[0] is not coeffs:
            if isinstance(coeffs, np.ndarray) and coeffs.ndim == 2:
                table = np.ascontiguousarray(coeffs, dtype=np.float64)
            else:
                table = np.ascontiguousarray(np.stack([np.asarray(c, dtype=np.float64)
                                                       for c in coeffs], axis=1))
            _readonly(table)
            cls._table_cache["table"] = (coeffs, table, id(coeffs))
            cached = cls._table_cache["table"]
        table = cached[1]
        if table.shape[1] < n_params:
            raise ComponentError(f"coefficients_list has {table.shape[1]} harmonics but the "
                                 f"component has {n_params} parameters")
        return table

    @classmethod
    def _lookup_factors(cls, n_params: int) -> Any:
        """The separable factors of the class lookup table when xtalscale built that table
        (an unchanged :class:`SHLookupColumns`) or will build it (no table yet, the factors
        made by :func:`sh_lookup_factors`), if they cover ``n_params``; else None (a
        user-assigned table, whose factors are unknown)."""
        coeffs = cls.coefficients_list
        if coeffs is None:  # no table yet: it will be xtalscale's own, from these factors
            factors = _own_default_grid_factors()
        else:
            factors = coeffs.unchanged_factors() if isinstance(coeffs, SHLookupColumns) else None
        return factors if factors is not None and factors.n_params >= n_params else None

    def update_reflection_data(self, selection: Any = None, block_selections: Any = None, *,
                               scales_only: bool = False) -> None:
        """Select each block's harmonics ("speed") or grid indices ("memory").

        In "memory" mode above ``float32_min_reflections`` only the two grid indices per
        reflection are kept (8 bytes) and the harmonics are formed per call from the grid's
        factors, or, with a user-assigned table, a float32 block is built here (see the class
        notes; float64 with ``exact_harmonics``). With ``cache_harmonics`` False, or for this
        call with ``scales_only`` (a caller that wants only scales, e.g. an expansion to
        every reflection), only the grid indices are kept; scales then come from the grid's
        factors (large data with xtalscale's own table) or the shared table, and the harmonic
        matrix is built on the first derivative call.
        """
        name = type(self).__name__
        if self._mode is None:
            raise ComponentError(f"{name}: set .data before update_reflection_data")
        self._terms = {}
        # (a component given new data holds nothing of its previous blocks' form)
        self._factored, self._factors, self._lookup_blocks = False, None, []
        if self._mode == "speed":
            n = self._dense_table.shape[0]
            blocks = _block_indices(selection, block_selections, n, name)
            self._blocks = [self._dense_table if idx is None else self._dense_table[idx]
                            for idx in blocks]
            if (self.cache_harmonics and not scales_only and not self.exact_harmonics
                    and n > self.float32_min_reflections):
                # exact harmonics held per block as float32, as the lookup regime's (a job of
                # many small datasets lowers the threshold: see job.algorithm.large_data_forms)
                self._blocks = [h.astype(np.float32) for h in self._blocks]
            _readonly(*self._blocks)
            self._n_refl = [int(h.shape[0]) for h in self._blocks]
            return
        n = self._data["s0_lookup"].size
        blocks = _block_indices(selection, block_selections, n, name)
        large = not self.exact_harmonics and n > self.float32_min_reflections
        factors = self._lookup_factors(self._n_params) if large else None
        # (xtalscale's own table need not exist: its factors are all a large block reads)
        n_grid = factors.grid_size if factors is not None else self._grid_table().shape[0]
        self._lookup_blocks = []
        for idx in blocks:
            pair = []
            for key in ("s0_lookup", "s1_lookup"):
                sel = _take(self._data[key], idx)
                if sel.size and (sel.min() < 0 or sel.max() >= n_grid):
                    bad = int(sel.min() if sel.min() < 0 else sel.max())
                    raise IndexError(f"{name}: {key} index {bad} is out of range for the "
                                     f"{n_grid}-point lookup table")
                pair.append(np.ascontiguousarray(sel, dtype=np.int32))
            self._lookup_blocks.append(tuple(pair))
        self._blocks = [None] * len(blocks)
        self._n_refl = [int(p[0].size) for p in self._lookup_blocks]
        # Large data: rows formed from the grid's factors (the grid indices are all it holds,
        # and every path, scales alone included, takes the model block's scales); a
        # user-assigned table: a float32 block, unless only scales are wanted
        self._factored, self._factors = factors is not None, factors
        if large and factors is None and self.cache_harmonics and not scales_only:
            self._hold_float32_blocks()

    def _hold_float32_blocks(self) -> None:
        """Replace the blocks' grid indices by float32 harmonic blocks (a user-assigned lookup
        table: see the class notes). The grid indices stay in ``_data``."""
        for b, (i0, i1) in enumerate(self._lookup_blocks):
            h = _kern.harmonics_from_lookup_f32(i0, i1, self._grid_table(), self._n_params)
            _readonly(h)
            self._blocks[b] = h
        self._lookup_blocks = [None] * len(self._blocks)
        self._factored, self._factors = False, None

    def _make_term(self, b: int) -> Any:
        if self._factored:
            i0, i1 = self._lookup_blocks[b]
            return _mb.LookupHarmonicsTerm(self._factors, i0, i1, self._n_params)
        if self._blocks[b] is None and not self.cache_harmonics:
            return None  # only the grid indices are held: evaluated through Python
        return _mb.HarmonicsTerm(self._block_matrix(b))

    def prepare_model_terms(self) -> None:
        """Build the C++ term of every block now (what :meth:`model_term` then returns) where
        the blocks' harmonics are formed from the grid's factors (large data with xtalscale's
        own table): those terms hold only the grid indices and the factors, so making them on
        a worker thread (the scaler's minimisation table set-up) costs no memory. Nothing in
        the other forms (their terms hold harmonic blocks, built on first use as before)."""
        if not self._factored:
            return
        for b, n in enumerate(self._n_refl):
            if n:
                self.model_term(b)

    def _lookup_term(self, b: int) -> Any:
        """Block ``b``'s ``LookupHarmonicsTerm`` (factored mode), made once and shared with
        :meth:`model_term`."""
        term = self._terms.get(b)
        if term is None:
            term = self._terms[b] = self._make_term(b)
        return term

    def _block_matrix(self, b: int) -> np.ndarray:
        h = self._blocks[b]
        if h is None:  # memory mode: build this block's harmonics (float64) on use
            i0, i1 = self._lookup_blocks[b]
            h = _kern.harmonics_from_lookup(i0, i1, self._grid_table(), self._n_params)
            _readonly(h)
            if self.cache_harmonics and not self._factored:  # factored: formed per call, not kept
                self._blocks[b] = h
        return h

    @staticmethod
    def _matrix(h: np.ndarray) -> sp.csr_matrix:
        """The dense block as float64 CSR. The column pattern is built here, per call, and not
        held (it would cost 4·n_params bytes per reflection); float64 blocks share their values."""
        n, p = h.shape
        indices = np.tile(np.arange(p, dtype=np.int32), n)
        indptr = np.arange(0, n * p + 1, max(p, 1), dtype=np.int32)[: n + 1]
        data = h.reshape(-1) if h.dtype == np.float64 else h.reshape(-1).astype(np.float64)
        return _csr(data, indices, indptr, (n, p))

    def calculate_scales_and_derivatives(self, block_id: int = 0) -> tuple:
        b = self._check_block(block_id)
        h = self._block_matrix(b)
        # Scales by the same path calculate_scales will take, so the two always agree.
        scales = self.calculate_scales(b) if self._blocks[b] is None else self._scales(h)
        return scales, self._matrix(h)

    def calculate_scales_and_dense_derivatives(self, block_id: int = 0) -> tuple:
        """``(scales, ∂s/∂C)`` with the derivatives as the dense read-only (n_refl × n_params)
        harmonic block itself (float32 in the lookup regime, see the class notes): no copy and
        no sparse pattern, so a call costs one pass over the block."""
        b = self._check_block(block_id)
        h = self._block_matrix(b)
        scales = self.calculate_scales(b) if self._blocks[b] is None else self._scales(h)
        return scales, h

    def _scales(self, h: np.ndarray) -> np.ndarray:
        if h.dtype == np.float32:
            return _kern.sh_scales_f32(h, self._parameters)
        return _kern.sh_scales(h, self._parameters)

    def calculate_scales(self, block_id: int = 0) -> np.ndarray:
        b = self._check_block(block_id)
        if self._factored:  # the model block's scales, bit for bit, and no row stored
            return self._lookup_term(b).scales(self._parameters)
        if self._blocks[b] is None:
            i0, i1 = self._lookup_blocks[b]
            return _kern.lookup_sh_scales(i0, i1, self._grid_table(), self._parameters)
        return self._scales(self._blocks[b])

    def _held_arrays(self) -> list:
        arrays = list(self._data.values()) + [h for h in self._blocks if h is not None]
        for pair in self._lookup_blocks:
            if pair is not None:
                arrays += list(pair)
        return arrays

    @classmethod
    def shared_table_bytes(cls) -> int:
        """Bytes of the class-wide lookup tables (``coefficients_list`` and its stacked copy),
        shared by every instance in the process and not counted by :meth:`held_bytes`."""
        total = 0
        if cls.coefficients_list is not None:
            total += sum(np.asarray(c).nbytes for c in cls.coefficients_list)
        cached = cls._table_cache.get("table")
        if cached is not None:
            total += cached[1].nbytes
        return int(total)

    def calculate_restraints(self) -> tuple:
        """``(w·C², 2·w·C)`` with w the ``parameter_restraints``."""
        return self._quadratic_restraints()

    def calculate_jacobian_restraints(self) -> tuple:
        """``(C, identity, w)``."""
        return self._quadratic_jacobian_restraints()


# ----------------------------------------------------------------------------- smooth components
def _smoother_classes() -> tuple:
    """The DIALS-style smoother classes (xtalscale.smoothing), imported on first use."""
    from . import smoothing

    return smoothing.GaussianSmoother1D, smoothing.GaussianSmoother2D, smoothing.GaussianSmoother3D


def _call(attr: Any) -> Any:
    return attr() if callable(attr) else attr


def _smoothing_settings(smoother: Any, n_axes: int) -> tuple:
    """(num_average to pass to set_smoothing, sigma) currently set on ``smoother``.

    Per-axis averages are min(num_average, nvalues_axis); passing their maximum back
    reproduces every axis's value, so the weights can be rebuilt from plain numbers.
    """
    sigma = float(_call(smoother.sigma))
    if n_axes == 1:
        averages = [int(_call(smoother.num_average))]
    elif hasattr(smoother, "num_x_average"):
        names = ("num_x_average", "num_y_average", "num_z_average")[:n_axes]
        averages = [int(_call(getattr(smoother, nm))) for nm in names]
    else:
        averages = [int(smoother.axis_num_average(a)) for a in range(n_axes)]
    return max(averages), sigma


def _smooth_range(values: np.ndarray) -> list:
    """DIALS's data-driven smoother extent: [floor(round(min,10)), max(ceil(round(max,10)), 1)]."""
    return [floor(round(float(values.min()), 10)), max(ceil(round(float(values.max()), 10)), 1)]


class SmoothMixin:
    """Shared helpers of the smooth components: ``value``, ``smoother``, ``nparam_to_val``."""

    def __init__(self) -> None:
        self._smoother = None

    @property
    def value(self) -> np.ndarray:
        """The parameters, as the smoother's values."""
        return self._parameters

    @property
    def smoother(self) -> Any:
        """The Gaussian smoother built by the last ``update_reflection_data``."""
        return self._smoother

    @staticmethod
    def nparam_to_val(n_params: int) -> int:
        """Number of smoother intervals for ``n_params`` values (n−1 for 2, 3; n−2 above)."""
        if n_params < 2:
            raise ComponentError("cannot initialise a smooth scale factor for <2 parameters.")
        if n_params in (2, 3):
            return n_params - 1
        return n_params - 2


class _WeightCache:
    """Per-block normalised weight matrix (a C++ ``WeightMatrix``) and the smoother settings
    it was built with. The CSR arrays are read-only views of the C++ buffers.

    The component drops its caches whenever the coordinates change (``update_reflection_data``,
    the normalised-value setters, ``set_new_parameters``); the settings are compared by value,
    since ``smoother.set_smoothing`` may change them in between.
    """

    __slots__ = ("key", "matrix", "indptr", "indices", "data")

    def __init__(self, key: tuple, matrix: Any) -> None:
        self.key = key
        self.matrix = matrix
        self.indptr, self.indices, self.data = matrix.indptr, matrix.indices, matrix.data

    @classmethod
    def of_arrays(cls, key: tuple, indptr: np.ndarray, indices: np.ndarray,
                  data: np.ndarray) -> "_WeightCache":
        """A cache of bare CSR arrays (no ``WeightMatrix``), made read-only like its views."""
        _readonly(indptr, indices, data)
        cache = cls.__new__(cls)
        cache.key, cache.matrix = key, None
        cache.indptr, cache.indices, cache.data = indptr, indices, data
        return cache


class _SmoothComponentND(ScaleComponentBase, SmoothMixin):
    """Common machinery of the 1-, 2- and 3-D smooth components."""

    null_parameter_value = 1.0
    _axes: ClassVar[tuple] = ("x",)
    _transient = ("_caches", "_smoother", "_lean_windows")
    #: 1-D blocks with more reflections than this hold no weights ("lean" mode): the component
    #: holds the normalised coordinate (8 B/reflection) and a window record (uint16 first/count
    #: and q = exp(2ad), 10 B), and each call recomputes the normalised weights in C++ from
    #: them without an exponential (product form, within a few ulp of DIALS's direct formula),
    #: straight into the outputs (caller buffers with ``out=``). The B-factor form also holds
    #: 1/(2d²) (8 B). Smaller data (all blocks together) hold DIALS-exact weight matrices
    #: (~40 B/reflection).
    lean_min_reflections: ClassVar[int] = 100_000

    def _reset_transient(self) -> None:
        self._invalidate()
        self._smoother = self._make_smoother() if self._ranges else None

    def __init__(self, initial_values: Any, parameter_esds: Any = None) -> None:
        ScaleComponentBase.__init__(self, initial_values, parameter_esds)
        SmoothMixin.__init__(self)
        self._fixed_initial = False
        self._normalised: list = []  # per axis: list of per-block arrays
        #: 2-D/3-D single-block case: _normalised holds the data itself, read as data − shift
        #: by the kernels (see _SmoothGridComponent.update_reflection_data); else None.
        self._shifts: Optional[list] = None
        self._ranges: list = []
        self._invalidate()

    def _invalidate(self) -> None:
        """Drop everything built from the coordinates (weights, window records, C++ terms)."""
        self._caches: dict = {}
        self._lean_windows: dict = {}  # lean blocks: (settings key, window uint16, q float64)
        self._terms = {}

    # -- subclass hooks
    def _shape(self) -> tuple:
        raise NotImplementedError()

    def _convert_data(self, data: dict) -> dict:
        name = type(self).__name__
        out = {k: _column(data[k], k, name) for k in self._axes}
        for extra in set(data) - set(self._axes):
            out[extra] = data[extra]
        lengths = {v.size for k, v in out.items() if k in self._axes}
        if len(lengths) > 1:
            raise ComponentError(f"{name}: data columns {list(self._axes)} must have the same length")
        return out

    def update_reflection_data(self, selection: Any = None, block_selections: Any = None) -> None:
        """Shift each coordinate to start at 0, size the smoother to the data, split into blocks."""
        name = type(self).__name__
        n = self._data_length()
        sel = None
        if selection is not None:
            sel = _block_indices(selection, None, n, name)[0]
        # Block selections index into the (bool-)selected data, as in DIALS.
        blocks = _block_indices(None, block_selections, n if sel is None else sel.size, name)
        normalised, self._ranges = [], []
        for axis in self._axes:
            values = _take(self._data[axis], sel)
            if values.size == 0:
                raise ComponentError(f"{name}: no reflections selected for data['{axis}']")
            values = values - values.min()
            self._ranges.append(_smooth_range(values))
            normalised.append([np.ascontiguousarray(_take(values, idx)) for idx in blocks])
        self._normalised = normalised
        self._shifts = None
        self._smoother = self._make_smoother()
        self._invalidate()
        self._n_refl = [int(v.size) for v in normalised[0]]

    def _make_smoother(self) -> Any:
        intervals = [self.nparam_to_val(n) for n in self._shape()]
        classes = _smoother_classes()
        cls = classes[len(self._axes) - 1]
        args = []
        for rng, k in zip(self._ranges, intervals):
            args += [rng, k]
        return cls(*args)

    def _block_coords(self, b: int) -> tuple:
        return tuple(axis_blocks[b] for axis_blocks in self._normalised)

    def _settings_key(self) -> tuple:
        """What the weights depend on besides the coordinates: smoothing settings, fixed p₀."""
        return (_smoothing_settings(self._smoother, len(self._axes)), self._fixed_initial)

    def _weights(self, b: int) -> _WeightCache:
        key = self._settings_key()
        cache = self._caches.get(b)
        if cache is None or cache.key != key:
            coords = self._block_coords(b)
            intervals = [self.nparam_to_val(n) for n in self._shape()]
            matrix = _kern.weight_matrix(
                [np.ascontiguousarray(c, dtype=np.float64) for c in coords],
                [tuple(r) for r in self._ranges], intervals, key[0][0], key[0][1],
                self._fixed_initial)
            cache = _WeightCache(key, matrix)
            self._caches[b] = cache
        return cache

    def _n_free(self) -> int:
        return self._n_params - 1 if self._fixed_initial else self._n_params

    def _values(self, w: _WeightCache) -> np.ndarray:
        return w.matrix.values(self._parameters)

    def _is_lean(self, b: int) -> bool:
        # decided on all the component's rows, not per block: the blocks of a streamed
        # minimisation table (60k or 240k rows each) must not each hold a weight matrix
        return len(self._axes) == 1 and sum(self._n_refl) > self.lean_min_reflections

    def _lean_factor(self, b: int) -> Optional[np.ndarray]:
        return None  # the B-factor subclass passes 1/(2d²)

    def _lean_setup(self, b: int) -> tuple:
        """(smoother set-up arguments, window records, q) of lean block ``b``.

        Windows and q = exp(2ad) per point (10 B) do not depend on the parameters, so they are
        computed once (again after the coordinates or smoother settings change).
        """
        num_average, sigma = _smoothing_settings(self._smoother, 1)
        x = np.ascontiguousarray(self._normalised[0][b], dtype=np.float64)
        setup = (x, 0.0, tuple(self._ranges[0]), self.nparam_to_val(self._n_params), num_average,
                 sigma)
        key = setup[2:]
        held = self._lean_windows.get(b)
        if held is None or held[0] != key:
            held = (key, *_kern.smooth_1d_prepare(*setup))
            _readonly(held[1], held[2])
            self._lean_windows[b] = held
        return setup, held[1], held[2]

    def _lean_eval(self, b: int, derivatives: bool, out: Optional[Sequence[np.ndarray]]) -> tuple:
        """Lean 1-D evaluation (see ``lean_min_reflections``) into ``out`` or fresh arrays."""
        if out is None:
            out = (None, None, None, None)
        elif len(out) != 4:
            raise ValueError("out must be (scales, indptr, indices, data) buffers, e.g. from "
                             "derivative_buffers()")
        setup, window, q = self._lean_setup(b)
        return _kern.smooth_1d_apply(*setup, window, q, self._parameters, self._fixed_initial,
                                     self._lean_factor(b), derivatives, *out)

    def _make_term(self, b: int) -> Any:
        factor = self._lean_factor(b)
        if self._is_lean(b):
            setup, window, q = self._lean_setup(b)
            return _mb.LeanSmoothTerm(*setup, window, q, self._fixed_initial, factor)
        return _mb.SmoothTerm(self._weights(b).matrix, factor)

    def prepare_model_terms(self) -> None:
        """Build the C++ term of every lean block now (what :meth:`model_term` then returns
        while the data and settings stay): for a caller that holds the data on a worker thread
        (the scaler's minimisation table set-up), so that a streamed round's first evaluation
        of each block does not compute its window records on one core. Nothing for
        weight-matrix blocks (built on first use, as before)."""
        if self._seed_form:
            return
        for b, n in enumerate(self._n_refl):
            if n and self._is_lean(b):
                self.model_term(b)

    def model_term(self, block_id: int = 0) -> Any:
        """The block's C++ term (see :meth:`ScaleComponentBase.model_term`); rebuilt when the
        smoothing settings or the fixed first parameter change."""
        b = self._check_block(block_id)
        key = self._settings_key()
        held = self._terms.get(b)
        if held is None or held[0] != key:
            held = self._terms[b] = (key, self._make_term(b))
        return held[1]

    def derivative_buffers(self, block_id: int = 0) -> tuple:
        """Caller-owned output buffers ``(scales, indptr, indices, data)`` sized for block
        ``block_id``, to pass as ``out=`` to :meth:`calculate_scales_and_derivatives`."""
        b = self._check_block(block_id)
        n = self._n_refl[b]
        if not self._is_lean(b):
            raise ValueError(f"block_id {block_id}: derivative_buffers is for lean 1-D blocks "
                             f"(more than lean_min_reflections={self.lean_min_reflections} rows)")
        num_average = _smoothing_settings(self._smoother, 1)[0]
        p = self._n_params  # the smoother's window bound (max_row_nnz)
        width = p if p <= 3 else max(min(num_average, p), 2)
        return (np.empty(n), np.empty(n + 1, dtype=np.int32), np.empty(n * width, dtype=np.int32),
                np.empty(n * width))

    def calculate_scales_and_derivatives(self, block_id: int = 0,
                                         out: Optional[Sequence[np.ndarray]] = None) -> tuple:
        """Scales and ``∂s/∂p`` (CSR) of block ``block_id``.

        ``out`` (lean 1-D blocks only, else ignored): caller-owned ``(scales, indptr, indices,
        data)`` buffers (see :meth:`derivative_buffers`) written in place; the returned arrays
        are views of them, valid until the next call with the same buffers. (A model block,
        :class:`ComponentModelBlock`, holds the pattern in C++ and rewrites only the values.)
        """
        b = self._check_block(block_id)
        n = self._n_refl[b]
        if n == 0:
            return np.zeros(0), _empty_derivatives()
        if self._is_lean(b):
            scales, indptr, indices, data, nnz = self._lean_eval(b, True, out)
            return scales[:n], _csr(data[:nnz], indices[:nnz], indptr[: n + 1], (n, self._n_free()))
        return self._exact_scales_and_derivatives(b, n)

    def _exact_scales_and_derivatives(self, b: int, n: int) -> tuple:
        w = self._weights(b)
        return self._values(w), _csr(w.data, w.indices, w.indptr, (n, self._n_free()))

    def calculate_scales(self, block_id: int = 0) -> np.ndarray:
        b = self._check_block(block_id)
        if self._n_refl[b] == 0:
            return np.zeros(0)
        if self._is_lean(b):
            return self._lean_eval(b, False, None)[0]
        return self._exact_scales(b)

    def _exact_scales(self, b: int) -> np.ndarray:
        return self._values(self._weights(b))

    def _held_arrays(self) -> list:
        arrays = list(self._data.values())
        for axis_blocks in self._normalised:
            arrays += list(axis_blocks)
        for cache in self._caches.values():
            arrays += [cache.indptr, cache.indices, cache.data]
            first = getattr(cache.matrix, "first_col", None)
            if first is not None:
                arrays.append(np.asarray(first))
        for held in self._lean_windows.values():
            arrays += [held[1], held[2]]
        arrays += list(getattr(self, "_b_factors", []))
        arrays += list(getattr(self, "_d_blocks", []))
        return arrays


class SmoothScaleComponent1D(_SmoothComponentND):
    """A scale smoothly varying along one coordinate (physical "scale", spec §2.6).

    ``s = Σ_j w_j p_j / Σ_j w_j`` with Gaussian weights of the normalised coordinate ``x``.
    ``fix_initial_parameter()`` removes p₀ from the free parameters and derivative columns
    (its value still contributes to the scale).
    """

    null_parameter_value = 1.0
    _data_keys = frozenset({"x"})
    _axes = ("x",)

    def __init__(self, initial_values: Any, parameter_esds: Any = None) -> None:
        super().__init__(initial_values, parameter_esds)
        self.nparam_to_val(self._n_params)

    def _shape(self) -> tuple:
        return (self._n_params,)

    def fix_initial_parameter(self) -> None:
        """Fix the first parameter (it stays in the scale but is no longer refined)."""
        self._fixed_initial = True

    @property
    def free_parameters(self) -> np.ndarray:
        if self._fixed_initial:
            return self._parameters[1:].copy()
        return self._parameters

    @free_parameters.setter
    def free_parameters(self, parameters: Any) -> None:
        if not self._fixed_initial:
            self._store_parameters(parameters, "free_parameters")
            return
        p = _vector(parameters, "free_parameters")
        if p.size != self._n_params - 1:
            raise ComponentError(f"free_parameters needs {self._n_params - 1} values "
                                 f"(got {p.size})")
        new = self._parameters.copy()
        new[1:] = p
        self._parameters = new

    @property
    def free_parameter_esds(self) -> Optional[np.ndarray]:
        if self._fixed_initial and self._parameter_esds is not None:
            return self._parameter_esds[1:].copy()
        return self._parameter_esds

    @free_parameter_esds.setter
    def free_parameter_esds(self, esds: Any) -> None:
        e = self._checked_esds(esds, self.free_parameters.size)
        if not self._fixed_initial:
            self._parameter_esds = e
            return
        full = np.zeros(self._n_params)
        full[1:] = e  # the fixed parameter has no uncertainty
        self._parameter_esds = full

    def set_new_parameters(self, new_parameters: Any) -> None:
        """Replace the parameters by a vector of a different length (esds are reset)."""
        p = _vector(new_parameters, "new_parameters")
        self.nparam_to_val(p.size)
        self._parameters = p
        self._parameter_esds = None
        self._n_params = int(p.size)
        self._invalidate()

    @property
    def normalised_values(self) -> list:
        """Per block: the coordinate shifted to start at 0 (smoother units)."""
        return self._normalised[0] if self._normalised else []

    @property
    def _normalised_values(self) -> list:  # DIALS attribute name, used by DIALS tests
        return self.normalised_values

    @_normalised_values.setter
    def _normalised_values(self, values: list) -> None:
        self._normalised = [[np.ascontiguousarray(v, dtype=np.float64) for v in values]]
        self._invalidate()


class SmoothBScaleComponent1D(SmoothScaleComponent1D):
    """A smoothly varying B factor: ``s = exp(B(x)/(2d²))`` (physical "decay", spec §2.7)."""

    null_parameter_value = 0.0
    _data_keys = frozenset({"x", "d"})

    def __init__(self, initial_values: Any, parameter_esds: Any = None) -> None:
        super().__init__(initial_values, parameter_esds)
        self._d_blocks: list = []
        self._b_factors: list = []  # per block: 1/(2d²), read-only

    def _convert_data(self, data: dict) -> dict:
        out = super()._convert_data(data)
        out["d"] = _column(data["d"], "d", type(self).__name__, positive=True)
        if out["d"].size != out["x"].size:
            raise ComponentError(f"{type(self).__name__}: data['x'] and data['d'] must have "
                                 "the same length")
        return out

    @property
    def d_values(self) -> list:
        """d-spacings of each block."""
        return self._d_blocks

    @property
    def _d_values(self) -> list:  # DIALS attribute name, used by DIALS tests to inject blocks
        return self._d_blocks

    @_d_values.setter
    def _d_values(self, values: list) -> None:
        self._d_blocks = [np.asarray(d, dtype=np.float64) for d in values]
        self._b_factors = [np.ascontiguousarray(1.0 / (2.0 * d * d)) for d in self._d_blocks]
        _readonly(*self._b_factors)
        self._invalidate()

    def update_reflection_data(self, selection: Any = None, block_selections: Any = None) -> None:
        super().update_reflection_data(selection, block_selections)
        n = self._data_length()
        d = self._data["d"]
        if selection is not None:
            d = d[_block_indices(selection, None, n, type(self).__name__)[0]]
        blocks = _block_indices(None, block_selections, d.size, type(self).__name__)
        self._d_values = [_take(d, idx) for idx in blocks]

    def _factor(self, b: int) -> np.ndarray:
        return self._b_factors[b]

    def _b_scales(self, b: int, derivatives: bool) -> tuple:
        w = self._weights(b)
        return w, w.matrix.b_scales(self._parameters, self._factor(b), derivatives)

    def _lean_factor(self, b: int) -> Optional[np.ndarray]:
        return self._factor(b)  # 1/(2d²), held (8 B/reflection): saves a division per call

    def _exact_scales_and_derivatives(self, b: int, n: int) -> tuple:
        w, (scales, d_data) = self._b_scales(b, True)
        return scales, _csr(d_data, w.indices, w.indptr, (n, self._n_free()))

    def _exact_scales(self, b: int) -> np.ndarray:
        return self._b_scales(b, False)[1][0]

    def calculate_restraints(self) -> tuple:
        """``(w·B², 2·w·B)`` with w the ``parameter_restraints``."""
        return self._quadratic_restraints()

    def calculate_jacobian_restraints(self) -> tuple:
        """``(B, identity, w)``."""
        return self._quadratic_jacobian_restraints()


class _SmoothGridComponent(_SmoothComponentND):
    """2-D/3-D smooth components: a flat parameter grid with x fastest.

    They hold no weights: scales are the smoother's values Σwp/Σw (as DIALS's 2-D/3-D
    components take them), computed from the normalised coordinates on each call; the
    derivative matrix (normalised weights, 9 or 27 per row) is built on first read and then
    held; a model block's term (``GridSmoothTerm2D/3D``) recomputes the weights per
    evaluation in C++ instead of streaming a held matrix.
    """

    def __init__(self, initial_values: Any, shape: Sequence[int], parameter_esds: Any = None) -> None:
        super().__init__(initial_values, parameter_esds)
        self._grid_shape = self._checked_shape(shape, self._n_params)

    def _checked_shape(self, shape: Sequence[int], n: int) -> tuple:
        shape = tuple(int(s) for s in shape)
        if len(shape) != len(self._axes):
            raise ComponentError(f"{type(self).__name__}: shape must have {len(self._axes)} "
                                 f"entries (got {shape})")
        if int(np.prod(shape)) != n:
            raise ComponentError(
                f"The shape information {shape} to initialise a {len(self._axes)}D smoother is "
                f"inconsistent with the length of the initial parameter list ({n}).")
        for s in shape:
            self.nparam_to_val(s)
        return shape

    def _shape(self) -> tuple:
        return self._grid_shape

    def update_reflection_data(self, selection: Any = None, block_selections: Any = None) -> None:
        """As the base class; without selections the data are not copied: the kernels read
        each coordinate as data − min(data) (the same doubles as DIALS's shifted copy)."""
        if selection is not None or block_selections is not None:
            super().update_reflection_data(selection, block_selections)
            return
        data = [np.ascontiguousarray(self._data[axis], dtype=np.float64) for axis in self._axes]
        if data[0].size == 0:
            raise ComponentError(f"{type(self).__name__}: no reflections selected for "
                                 f"data['{self._axes[0]}']")
        lows = [float(v.min()) for v in data]
        # max(v − low) is fl(max(v) − low): subtracting one number keeps the order.
        self._ranges = [_smooth_range(np.array([0.0, float(v.max()) - low]))
                        for v, low in zip(data, lows)]
        self._normalised = [[v] for v in data]
        self._shifts = lows
        self._smoother = self._make_smoother()
        self._invalidate()
        self._n_refl = [int(data[0].size)]

    # -- 2-D/3-D evaluation: no weights held (see _SmoothGridComponent's class notes)
    def _coords(self, b: int) -> list:
        return [np.ascontiguousarray(c, dtype=np.float64) for c in self._block_coords(b)]

    def _kernel_smoother(self) -> Any:
        """The C++ smoother the kernels use: the component's settings and coordinate shift."""
        num_average, sigma = _smoothing_settings(self._smoother, len(self._axes))
        core = self._smoother._core
        kernel = type(core)([tuple(r) for r in self._ranges],
                            [self.nparam_to_val(n) for n in self._shape()])
        kernel.set_smoothing(num_average, sigma)
        if self._shifts is not None:
            kernel.coordinate_shift = tuple(self._shifts)
        return kernel

    def _exact_scales(self, b: int) -> np.ndarray:
        return self._kernel_smoother().values(self._coords(b), self._parameters)

    def _exact_scales_and_derivatives(self, b: int, n: int) -> tuple:
        return self._exact_scales(b), self._derivatives(b, n)

    def _derivatives(self, b: int, n: int) -> SparseMatrix:
        """∂s/∂p of block ``b``: the held weight matrix once built, else one built on first
        read (and then held, unless the coordinates or settings changed in between)."""
        key = self._settings_key()
        shape = (n, self._n_free())
        cache = self._caches.get(b)
        if cache is not None and cache.key == key:
            return _csr(cache.data, cache.indices, cache.indptr, shape)
        # What the weights depend on, captured now: the deferred matrix keeps this state.
        kernel, coords, parameters, caches = (self._kernel_smoother(), self._coords(b),
                                              self._parameters, self._caches)

        def build() -> tuple:
            built = caches.get(b)
            if built is None or built.key != key:
                _, _, data, indices, indptr = kernel.multi_value_weight(coords, parameters,
                                                                        normalised=True)
                built = caches[b] = _WeightCache.of_arrays(key, indptr, indices, data)
            return built.data, built.indices, built.indptr

        return _sparse.DeferredSparseMatrix(shape=shape, build=build)

    def _make_term(self, b: int) -> Any:
        term = _mb.GridSmoothTerm2D if len(self._axes) == 2 else _mb.GridSmoothTerm3D
        return term(self._kernel_smoother(), self._coords(b))

    def set_new_parameters(self, new_parameters: Any, shape: Sequence[int]) -> None:
        """Replace the parameters and grid shape (esds are reset)."""
        p = _vector(new_parameters, "new_parameters")
        self._grid_shape = self._checked_shape(shape, p.size)
        self._parameters = p
        self._parameter_esds = None
        self._n_params = int(p.size)
        self._invalidate()

    @property
    def n_x_params(self) -> int:
        """Number of parameters along x."""
        return self._grid_shape[0]

    @property
    def n_y_params(self) -> int:
        """Number of parameters along y."""
        return self._grid_shape[1]

    def _axis_values(self, a: int) -> Optional[list]:
        if not self._normalised:
            return None
        if self._shifts is not None:  # the data, read shifted by the kernels
            return [v - self._shifts[a] for v in self._normalised[a]]
        return self._normalised[a]

    def _set_axis_values(self, a: int, values: list) -> None:
        if self._shifts is not None:
            self._normalised = [self._axis_values(k) for k in range(len(self._axes))]
            self._shifts = None
        if not self._normalised:
            self._normalised = [[] for _ in self._axes]
        self._normalised[a] = [np.ascontiguousarray(v, dtype=np.float64) for v in values]
        self._invalidate()

    @property
    def normalised_x_values(self) -> Optional[list]:
        """Per block: x shifted to start at 0."""
        return self._axis_values(0)

    @property
    def normalised_y_values(self) -> Optional[list]:
        """Per block: y shifted to start at 0."""
        return self._axis_values(1)

    # DIALS attribute names (used by DIALS's own tests to inject blocks)
    _normalised_x_values = property(lambda self: self._axis_values(0),
                                    lambda self, v: self._set_axis_values(0, v))
    _normalised_y_values = property(lambda self: self._axis_values(1),
                                    lambda self, v: self._set_axis_values(1, v))


class SmoothScaleComponent2D(_SmoothGridComponent):
    """A scale smooth in two coordinates (array "decay"/"modulation", spec §2.8).

    Parameters are a flat array of length nx·ny with x fastest (index i + j·nx).
    """

    _data_keys = frozenset({"x", "y"})
    _axes = ("x", "y")


class SmoothScaleComponent3D(_SmoothGridComponent):
    """A scale smooth in three coordinates (array "absorption", spec §2.9).

    Parameters are a flat array of length nx·ny·nz, index i + j·nx + k·nx·ny.
    """

    _data_keys = frozenset({"x", "y", "z"})
    _axes = ("x", "y", "z")

    @property
    def n_z_params(self) -> int:
        """Number of parameters along z."""
        return self._grid_shape[2]

    @property
    def normalised_z_values(self) -> Optional[list]:
        """Per block: z shifted to start at 0."""
        return self._axis_values(2)

    _normalised_z_values = property(lambda self: self._axis_values(2),
                                    lambda self, v: self._set_axis_values(2, v))


# ----------------------------------------------------------------------------- SH lookup helpers
class SHLookupColumns(list):
    """The per-harmonic columns of a lookup table xtalscale built
    (:func:`create_sph_harm_lookup_table`): a list of arrays like any ``coefficients_list``,
    which also carries the grid's separable factors (``factors``, a ``LookupFactors``), so
    that :class:`SHScaleComponent` can form the table's harmonics from them. Pickles as a plain
    list (the factors are rebuilt with the table in another process)."""

    def __init__(self, columns: Sequence[np.ndarray], factors: Any) -> None:
        super().__init__(columns)
        self.factors = factors
        self._built = tuple(columns)

    def unchanged_factors(self) -> Any:
        """``factors`` while the list still holds the columns it was built with, else None (an
        edited list is a user table)."""
        if len(self) != len(self._built) or any(a is not b for a, b in zip(self, self._built)):
            return None
        return self.factors

    def __reduce__(self) -> tuple:
        return (list, (list(self),))


def create_sph_harm_lookup_table(lmax: int, points_per_degree: int = SH_POINTS_PER_DEGREE) -> list:
    """DIALS's lookup table: one array per harmonic (l = 1..lmax, m = -l..l).

    Entry i of each array is the full real harmonic at θ = floor(i/(360·ppd))·π/(180·ppd),
    φ = (i mod 360·ppd)·π/(180·ppd). The arrays are column views of one row-major
    (grid × n_params) table (kept alive by the views), which SHScaleComponent reads directly;
    the list is an :class:`SHLookupColumns`, which carries the table's separable factors, so
    that large lookup data form their harmonics from them (see :class:`SHScaleComponent`).
    """
    table = _kern.sph_harm_lookup_table(int(lmax), int(points_per_degree))
    _readonly(table)
    # the table's separable factors (its entries are their products, bit for bit) go with it
    factors = sh_lookup_factors(lmax, points_per_degree)
    columns = SHLookupColumns([table[:, k] for k in range(table.shape[1])], factors)
    SHScaleComponent._table_cache["table"] = (columns, table, id(columns))
    return columns


def ensure_sh_lookup_table(lmax: int, points_per_degree: int = SH_POINTS_PER_DEGREE) -> None:
    """Make sure the class-wide ``SHScaleComponent.coefficients_list`` covers ``lmax`` (built
    once per process, or rebuilt for a larger lmax; thread-safe)."""
    n_params = int(_kern.n_sph_harm_params(int(lmax)))
    with _OWN_TABLE_LOCK:
        coeffs = SHScaleComponent.coefficients_list
        if coeffs is None or len(coeffs) < n_params:
            SHScaleComponent.coefficients_list = create_sph_harm_lookup_table(lmax, points_per_degree)


#: xtalscale's lookup-grid factors by (lmax, points per degree): ~200 KB each, made once
_OWN_FACTORS: dict[tuple[int, int], Any] = {}
_OWN_TABLE_LOCK = threading.RLock()  # (re-entrant: a table build makes its factors under it)


def _own_default_grid_factors() -> Any:
    """xtalscale's factors of the largest lmax made so far on the default grid
    (``SH_POINTS_PER_DEGREE``), or None: what the class table will be built from when a path
    first needs it."""
    lmaxes = [lmax for lmax, ppd in _OWN_FACTORS if ppd == SH_POINTS_PER_DEGREE]
    return _OWN_FACTORS[(max(lmaxes), SH_POINTS_PER_DEGREE)] if lmaxes else None


def sh_lookup_factors(lmax: int, points_per_degree: int = SH_POINTS_PER_DEGREE) -> Any:
    """The separable θ and φ factors of xtalscale's lookup table for ``lmax`` (a
    ``LookupFactors``; made once per process, thread-safe). Large lookup data form their
    harmonics from these alone: a job that makes only them never builds the 50 MB table
    (:func:`create_sph_harm_lookup_table`), which is built on first need instead."""
    key = (int(lmax), int(points_per_degree))
    with _OWN_TABLE_LOCK:
        factors = _OWN_FACTORS.get(key)
        if factors is None:
            factors = _OWN_FACTORS[key] = _kern.sph_harm_lookup_factors(*key)
    return factors


def sh_lookup_data(s0c: Any, s1c: Any, lmax: int,
                   points_per_degree: int = SH_POINTS_PER_DEGREE) -> dict:
    """"Memory"-mode data for :class:`SHScaleComponent` from aligned crystal-frame vectors:
    ``{"s0_lookup": ..., "s1_lookup": ...}`` grid indices.

    Makes the grid's factors for ``lmax`` (:func:`sh_lookup_factors`); the class table
    ``SHScaleComponent.coefficients_list``, if unset, is built on its first need (large
    data never need it; :func:`ensure_sh_lookup_table` builds it now).
    """
    sh_lookup_factors(lmax, points_per_degree)
    out = {}
    for name, vectors in (("s0_lookup", s0c), ("s1_lookup", s1c)):
        v = np.asarray(vectors, dtype=np.float64)
        if v.ndim != 2 or v.shape[1] != 3:
            raise ComponentError(f"sh_lookup_data: {name[:2]}c must have shape (n, 3) (got {v.shape})")
        # θ = π exactly indexes one row past the table (DIALS reads out of bounds there): the
        # kernel uses the last θ row instead
        out[name] = _kern.grid_lookup_indices(v, int(points_per_degree))
    return out


# ----------------------------------------------------------------------------- checked parameters
def _store_checked(comp: Any, p: np.ndarray) -> bool:
    """ScaleComponentBase's free_parameters setter for a checked ``p`` (see
    :func:`set_checked_free_parameters`); False where the setter itself must run (the seed
    form, or a length it refuses with its own message)."""
    if comp._seed_form or p.size != comp._parameters.size:
        return False
    comp._parameters = p
    return True


def _store_checked_smooth_1d(comp: Any, p: np.ndarray) -> bool:
    """SmoothScaleComponent1D's free_parameters setter (a fixed first parameter kept) for a
    checked ``p``; False where the setter itself must run."""
    if not comp._fixed_initial:
        return _store_checked(comp, p)
    if p.size != comp._n_params - 1:
        return False
    new = comp._parameters.copy()
    new[1:] = p
    comp._parameters = new
    return True


#: this module's free_parameters properties whose setter's work on a checked vector is done by
#: the function (found by the property object, so a subclass with its own setter is not)
_CHECKED_SETTERS: dict[Any, Callable[[Any, np.ndarray], bool]] = {
    ScaleComponentBase.__dict__["free_parameters"]: _store_checked,
    SmoothScaleComponent1D.__dict__["free_parameters"]: _store_checked_smooth_1d,
}


def set_checked_free_parameters(component: Any, values: np.ndarray) -> None:
    """``component.free_parameters = values`` for ``values`` that a parameter manager has
    checked: a fresh (not shared) finite 1-D float64 array. Where the component's class uses
    one of this module's setters, the values are stored without the setter's copy and checks
    (a many-dataset fit sets every component of every dataset at each evaluation: 180
    setters at 60 sweeps cost more than the model's evaluation); any other component (a
    subclass with its own setter, a user component) gets its setter, as always."""
    store = _CHECKED_SETTERS.get(getattr(type(component), "free_parameters", None))
    if store is None or not store(component, values):
        component.free_parameters = values


# ----------------------------------------------------------------------------- model assembly
def _external_term(n: int, width: int, scales: Any, derivatives: Any, name: str) -> Any:
    """An ExternalTerm holding one component's (scales, derivatives) for one block."""
    term = _mb.ExternalTerm(n, width)
    _set_external(term, scales, derivatives, name)
    return term


def _set_external(term: Any, scales: Any, derivatives: Any, name: str) -> None:
    """Copy a component's scales and derivatives (sparse or dense) into its external term."""
    s = np.ascontiguousarray(scales, dtype=np.float64).reshape(-1)
    if s.size != term.n_rows:
        raise ComponentError(f"{name}: {s.size} scales for {term.n_rows} reflections")
    if isinstance(derivatives, np.ndarray) and derivatives.ndim == 2 \
            and derivatives.shape == (term.n_rows, term.n_cols):
        term.set_dense(s, derivatives)
        return
    m = derivatives if is_scipy_sparse(derivatives) and derivatives.format == "csr" \
        else ScaleComponentBase.as_sparse_derivatives(derivatives)
    if m.shape[0] != term.n_rows:
        raise ComponentError(f"{name}: derivatives have {m.shape[0]} rows but there are "
                             f"{term.n_rows} reflections (one row per reflection)")
    if m.shape[1] > term.n_cols:
        raise ComponentError(f"{name}: derivatives have {m.shape[1]} columns, more than the "
                             f"{term.n_cols} reserved")
    if not m.has_canonical_format:
        m = m.copy()
        m.sum_duplicates()
    term.set(s, m.indptr, m.indices, m.data)


def _csr_view(block: Any) -> CsrView:
    """∂g/∂p of an evaluated C++ model block as a :class:`~xtalscale.csr_view.CsrView` over the
    block's own buffers (read-only; rewritten by the block's next evaluation): the arrays for
    the kernels without importing scipy or copying (the row starts stay 64-bit, as the kernels
    read them); used as a scipy matrix it becomes a :class:`SparseMatrix` (with 32-bit row
    starts when they fit). The C++ block checked its pattern (strictly ascending columns in
    each row): canonical, so consumers need not scan the entries again."""
    view = CsrView(block.values, block.indices, block.indptr, (block.n_rows, block.n_cols))
    view.verified_pattern = True
    return view


class ComponentModelBlock:
    """``g = Π s_c`` and ``∂g/∂p`` of several components over one data block, in C++.

    The Python face of the fit contract: ``core`` is the C++ ``ModelBlock`` (what the target
    and normal equations read, as a ``DerivativesView``; pass it to C++ as is). It holds each
    component's :meth:`~ScaleComponentBase.model_term` (sharing the component's weights,
    harmonics and factors), builds the derivative sparsity pattern on the first evaluation and
    afterwards rewrites only ``g`` and the values. Build one per data selection; rebuild it
    after ``update_reflection_data`` or a change in parameter layout (``set_new_parameters``,
    ``fix_initial_parameter``).

    Components without a C++ term (user-written ones) join through an external term, filled
    from their ``calculate_scales_and_derivatives`` (dense or scipy) before each evaluation,
    and take part in the product rule in C++ like the others.

    Parameters
    ----------
    components : sequence of components
        All holding data split into the same blocks.
    block_id : int
        The data block.
    active : sequence of bool, optional
        Which components get derivative columns (default all); the others multiply ``g`` only.
    fixed_scales : array_like, optional
        Extra fixed factors of ``g`` (no columns), e.g. the product of the components not
        refined in this cycle.
    """

    def __init__(self, components: Sequence[Any], block_id: int = 0,
                 active: Optional[Sequence[bool]] = None, fixed_scales: Any = None) -> None:
        self.components = list(components)
        if not self.components and fixed_scales is None:
            raise ComponentError("a model block needs at least one component or fixed scales")
        self.block_id = int(block_id)
        active = [True] * len(self.components) if active is None else [bool(a) for a in active]
        if len(active) != len(self.components):
            raise ComponentError(f"{len(active)} active flags for {len(self.components)} components")
        n = self._rows(fixed_scales)
        self.core = _mb.ModelBlock(n)
        self._native: list = []  # components whose C++ term reads parameters
        self._external: list = []  # (component, external term)
        self._terms: list = []  # each component's term as added (see is_current)
        self._fixed_source = fixed_scales
        for comp, act in zip(self.components, active):
            term = comp.model_term(self.block_id) if hasattr(comp, "model_term") else None
            self._terms.append(term)
            if term is None:
                s, d = comp.calculate_scales_and_derivatives(self.block_id)
                width = np.shape(d)[1] if np.ndim(d) == 2 else 1
                term = _external_term(n, int(width), s, d, type(comp).__name__)
                self._external.append((comp, term))
            elif term.n_params:
                if term.n_params != np.size(comp.parameters):
                    raise ComponentError(f"{type(comp).__name__}: its term reads {term.n_params} "
                                         f"parameters but it has {np.size(comp.parameters)}")
                self._native.append(comp)
            self.core.add_term(term, act)
        if fixed_scales is not None:
            self._fixed = np.ascontiguousarray(fixed_scales, dtype=np.float64)
            self.core.add_term(_mb.FixedScalesTerm(self._fixed), False)
        self._fresh_externals = True

    def _rows(self, fixed_scales: Any) -> int:
        if fixed_scales is not None:
            return int(np.size(fixed_scales))
        counts = {int(c.n_refl[self.block_id]) for c in self.components}
        if len(counts) != 1:
            raise ComponentError(f"the components hold different reflection counts in block "
                                 f"{self.block_id}: {sorted(counts)}")
        return counts.pop()

    def is_current(self, components: Sequence[Any], fixed_scales: Any = None) -> bool:
        """True while this block still describes ``components`` (the same objects, in order)
        with ``fixed_scales``: each component still has the term the block holds (a component
        drops its term on ``update_reflection_data``, new data or a new parameter layout)."""
        if len(components) != len(self.components) or fixed_scales is not self._fixed_source:
            return False
        for comp, mine, term in zip(components, self.components, self._terms):
            if comp is not mine:
                return False
            now = comp.model_term(self.block_id) if hasattr(comp, "model_term") else None
            if now is not term:
                return False
        return True

    def parameters(self) -> np.ndarray:
        """The vector ``evaluate`` passes to C++: each native term's full parameters, in order."""
        if not self._native:
            return np.zeros(0)
        return np.concatenate([np.asarray(c.parameters, dtype=np.float64) for c in self._native])

    def _refresh_externals(self) -> None:
        """Copy the Python-defined components' scales and derivatives into their terms (unless
        they were just set) before the C++ evaluation."""
        if not self._fresh_externals:
            for comp, term in self._external:
                s, d = comp.calculate_scales_and_derivatives(self.block_id)
                _set_external(term, s, d, type(comp).__name__)
        self._fresh_externals = False

    def evaluate(self, n_threads: int = 1) -> tuple:
        """Evaluate at the components' current parameters; returns ``(g, ∂g/∂p)``.

        ``g`` and the CSR matrix are read-only views of the block's buffers, rewritten in place
        by the next evaluation (copy them to keep them). ``n_threads``: chunks of rows on up to
        that many threads where every term evaluates row ranges (the same values for any count).
        """
        self._refresh_externals()
        self.core.evaluate(self.parameters(), n_threads)
        return self.core.scales, _csr_view(self.core)

    def evaluate_scales(self, n_threads: int = 1) -> np.ndarray:
        """``g`` only at the components' current parameters (no derivatives, no pattern): a
        read-only view of the block's buffer, rewritten by the next evaluation."""
        self._refresh_externals()
        self.core.evaluate_scales(self.parameters(), n_threads)
        return self.core.scales

    def transpose_product(self, coefficients: Any, n_threads: int = 1) -> np.ndarray:
        """``(∂g/∂p)ᵀ·c`` at the components' current parameters without forming ``∂g/∂p``
        (the gradient of a target through ``g`` when ``c = ∂f/∂g`` per row; one value per
        column of :meth:`evaluate`'s matrix). ``g`` is written as :meth:`evaluate_scales`
        does (read it from :attr:`scales`)."""
        self._refresh_externals()
        return self.core.transpose_product(self.parameters(), np.ascontiguousarray(coefficients, dtype=np.float64),
                                           n_threads)

    @property
    def scales(self) -> np.ndarray:
        """``g`` of the last evaluation (read-only view)."""
        return self.core.scales

    def jacobian(self) -> sp.csr_matrix:
        """``∂g/∂p`` of the last evaluation as scipy CSR (read-only views, no copy)."""
        return _csr_view(self.core).as_scipy()


def product_rule(results: Sequence[tuple], widths: Optional[Sequence[int]] = None,
                 out: Optional[sp.csr_matrix] = None) -> tuple:
    """Inverse scales ``g = Π s_c`` and ``∂g/∂p`` of several components, in one C++ pass.

    Parameters
    ----------
    results : sequence of (scales, derivatives)
        What each component's ``calculate_scales_and_derivatives`` returned for one block
        (derivatives sparse or dense, ``n × width_c``).
    widths : sequence of int, optional
        Number of columns reserved for each component (default: its derivative's width);
        component c's columns start at the sum of the earlier widths.
    out : scipy.sparse.csr_matrix, optional
        A Jacobian returned by an earlier call: if the new one has its shape it is returned
        again, holding the new arrays (no new matrix object). Otherwise a new matrix is built.

    Returns
    -------
    (numpy.ndarray, scipy.sparse.csr_matrix)
        ``g`` (n,) and the Jacobian ``n × Σ widths`` whose row i holds
        ``∂s_c/∂p_c[i, :] · Π_{c'≠c} s_c'[i]`` for every component c. To evaluate a model
        repeatedly, build a :class:`ComponentModelBlock` once instead.
    """
    if len(results) == 0:
        raise ComponentError("product_rule needs at least one component")
    n = np.asarray(results[0][0]).size
    if widths is None:
        widths = [np.shape(d)[1] if np.ndim(d) == 2 else 1 for _, d in results]
    widths = [int(w) for w in widths]
    if len(widths) != len(results):
        raise ComponentError(f"product_rule: {len(widths)} widths for {len(results)} components")
    block = _mb.ModelBlock(n)
    for c, ((s, d), w) in enumerate(zip(results, widths)):
        block.add_term(_external_term(n, w, s, d, f"product_rule: component {c}"))
    block.evaluate(np.zeros(0))
    g, jac = np.array(block.scales), _csr_view(block).as_scipy()
    if out is not None and sp.isspmatrix_csr(out) and out.shape == jac.shape:
        out.data, out.indices, out.indptr = jac.data, jac.indices, jac.indptr
        return g, out
    return g, jac
