"""Active parameter managers: which model parameters a refinement engine sees.

A refinement engine works on one flat parameter vector ``x``. A parameter
manager concatenates the *free* parameters of the selected components of one
or more scaling models into ``x``, writes a new ``x`` back into the components,
and propagates parameter uncertainties (esds, variance-covariance blocks) back
to them (DIALS ``active_parameter_managers.py`` / ``parameter_handler.py``,
spec section 5).

Two construction styles are supported and can be mixed:

* DIALS form: ``active_parameter_manager(components, selection_list)`` where
  ``components`` is a ``{name: component}`` dict (the model's ``components``)
  and ``selection_list`` names the components refined in this cycle.
* Seed form: ``active_parameter_manager()`` followed by
  ``add_parameters(values)`` calls, read back with ``get_parameters()`` and
  written with ``set_parameters(x)``; several such managers are combined with
  ``multi_active_parameter_manager()`` and ``add_parameter_manager(apm)``.

All parameter vectors are 1-D float64 numpy arrays. Variance-covariance
matrices may be given as dense numpy arrays, scipy sparse matrices or
anything with ``.toarray()``/``as_dense_matrix()``; they are stored dense
(they are ``n_params x n_params`` with n_params in the tens to hundreds).
"""
from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from ._core import fit as _fit_kernels
from ._lazy import LazyModule, is_scipy_sparse
from .components import ComponentModelBlock, set_checked_free_parameters
from .scaling_utilities import row_multiply

if TYPE_CHECKING:
    import scipy.sparse as sp

    from . import sparse as _sparse
    from .sparse import SparseMatrix
else:
    sp = LazyModule("scipy.sparse")  # imported on first use: see _lazy
    _sparse = LazyModule("xtalscale.sparse")  # scipy-backed matrices, built only when asked for

__all__ = [
    "ParameterManagerError",
    "active_parameter_manager",
    "TargetInterface",
    "multi_active_parameter_manager",
    "shared_active_parameter_manager",
    "ParameterManagerGenerator",
    "scaling_active_parameter_manager",
    "ScalingParameterManagerGenerator",
    "calc_sf_variances",
    "calc_sf_variances_into",
    "full_model_var_cov",
    "RefinerCalculator",
    "row_multiply",
]


class ParameterManagerError(ValueError, AssertionError):
    """Invalid parameter-manager input.

    Subclasses ``ValueError`` (this project's convention for bad arguments)
    and ``AssertionError`` (what DIALS raises for the same conditions), so
    code written against either keeps working.
    """


# --------------------------------------------------------------------------
# small validation helpers
# --------------------------------------------------------------------------
def single_managers(apm: Any) -> list[Any]:
    """The single-dataset parameter managers of ``apm``: its ``apm_list`` (a multi-dataset
    manager) or ``[apm]``."""
    return list(apm.apm_list) if hasattr(apm, "apm_list") else [apm]


def _as_vector(values: Any, name: str) -> np.ndarray:
    """Return ``values`` as a finite 1-D float64 array (a copy)."""
    try:
        arr = np.array(values, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a 1-D sequence of numbers ({exc})") from None
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-dimensional (got shape {arr.shape})")
    if not np.isfinite(arr).all():  # the method, not np.all: called per dataset per evaluation
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(f"{name} must be finite (element {bad} is {arr[bad]})")
    return arr


def _as_dense_matrix(matrix: Any, name: str) -> np.ndarray:
    """Return a square-or-not 2-D float64 dense copy of ``matrix``."""
    if is_scipy_sparse(matrix):
        dense = matrix.toarray()
    elif hasattr(matrix, "as_dense_matrix") and not isinstance(matrix, np.ndarray):
        dense = np.asarray(matrix.as_dense_matrix())
    else:
        dense = np.asarray(matrix)
        focus = getattr(matrix, "focus", None)  # flex.double with a flex.grid
        if dense.ndim == 1 and callable(focus):
            dense = dense.reshape(tuple(focus()))
    dense = np.array(dense, dtype=np.float64)
    if dense.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix (got shape {dense.shape})")
    if not np.all(np.isfinite(dense)):
        raise ValueError(f"{name} must be finite")
    return dense


def _square(matrix: Any, n: int, name: str) -> np.ndarray:
    dense = _as_dense_matrix(matrix, name)
    if dense.shape != (n, n):
        raise ValueError(f"{name} must have shape ({n}, {n}) to match the active parameters (got {dense.shape})")
    return dense


# --------------------------------------------------------------------------
# single-dataset manager
# --------------------------------------------------------------------------
class _SeedInterface:
    """The commissioning API's names for the DIALS parameter-manager calls (shared by all managers)."""

    def get_parameters(self) -> np.ndarray:
        """Return a copy of all parameters (seed name for ``get_param_vals``)."""
        return self.get_param_vals()  # type: ignore[attr-defined]

    def set_parameters(self, values: Any) -> None:
        """Set all parameters (seed name for ``set_param_vals``)."""
        self.set_param_vals(values)  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return self.n_active_params  # type: ignore[attr-defined]


class active_parameter_manager(_SeedInterface):  # noqa: N801  (DIALS class name)
    """Manage the active (refined) parameters of one dataset.

    Parameters
    ----------
    components : dict, optional
        ``{name: component}``; each component exposes ``free_parameters``
        (read/write), ``free_parameter_esds`` and ``var_cov_matrix``. Omit it
        for the seed form, where parameters are registered with
        :meth:`add_parameters`.
    selection_list : list of str, optional
        Names of the components refined in this cycle, taken in the dict order
        of ``components`` (which fixes the parameter order). Defaults to all.

    Attributes
    ----------
    x : numpy.ndarray
        The active parameter vector.
    components : dict
        ``{name: {"object", "n_params", "start_idx", "end_idx"}}`` for the
        selected components.
    components_list : list of str
        Selected component names in parameter order.
    var_cov_matrix : numpy.ndarray or None
        The last variance-covariance matrix passed to
        :meth:`calculate_model_state_uncertainties`.

    Raises
    ------
    KeyError
        If ``selection_list`` names a component not in ``components``.
    TypeError
        If a selected component has no ``free_parameters``.
    """

    def __init__(self, components: Mapping[str, Any] | None = None,
                 selection_list: Sequence[str] | None = None) -> None:
        self.x = np.zeros(0)
        self.components: dict[str, dict[str, Any]] = {}
        self.components_list: list[str] = []
        self.derivatives = None
        self.var_cov_matrix: np.ndarray | None = None
        self._blocks: list[tuple[int, int]] = []  # seed-form add_parameters blocks
        if components is None:
            if selection_list is not None:
                raise ValueError("selection_list given without components")
            return
        if not isinstance(components, Mapping):
            raise TypeError(f"components must be a dict of name -> component (got {type(components).__name__})")
        selection = list(components) if selection_list is None else list(selection_list)
        unknown = [name for name in selection if name not in components]
        if unknown:
            raise KeyError(f"selection_list names unknown component(s) {unknown}; available: {list(components)}")
        for name, obj in components.items():
            if name in selection:
                self._add_component(name, obj)

    def _add_component(self, name: str, obj: Any) -> None:
        if not hasattr(obj, "free_parameters"):
            raise TypeError(f"component {name!r} has no 'free_parameters' attribute")
        values = _as_vector(obj.free_parameters, f"component {name!r} free_parameters")
        start = self.x.size
        self.x = np.concatenate([self.x, values])
        self.components[name] = {"object": obj, "n_params": values.size,
                                 "start_idx": start, "end_idx": self.x.size}
        self.components_list.append(name)

    # ---- sizes -----------------------------------------------------------
    @property
    def n_active_params(self) -> int:
        """int: Number of active parameters (the length of ``x``)."""
        return int(self.x.size)

    # ---- DIALS interface -------------------------------------------------
    def select_parameters(self, component: str) -> np.ndarray:
        """Return the slice of ``x`` belonging to the named component."""
        if component not in self.components:
            raise KeyError(f"component {component!r} is not active; active: {self.components_list}")
        info = self.components[component]
        return self.x[info["start_idx"]:info["end_idx"]].copy()

    def set_param_vals(self, x: Any) -> None:
        """Set the active parameters and write each component's slice back.

        Raises
        ------
        ValueError
            If ``x`` has the wrong length or non-finite values.
        """
        values = _as_vector(x, "x")
        if values.size != self.x.size:
            raise ValueError(f"x must have {self.x.size} values (the active parameters), got {values.size}")
        self._set_checked(values)

    def _set_checked(self, values: np.ndarray) -> None:
        """:meth:`set_param_vals` for ``values`` already checked (finite 1-D float64 of the
        right length, not shared with the caller): each component gets its slice (a fresh copy)
        through :func:`~xtalscale.components.set_checked_free_parameters`."""
        self.x = values
        for info in self.components.values():
            set_checked_free_parameters(info["object"], values[info["start_idx"]:info["end_idx"]].copy())

    def get_param_vals(self) -> np.ndarray:
        """Return a copy of the active parameter vector."""
        return self.x.copy()

    def get_param_names(self) -> list[str]:
        """Return ``"{component}_param{j}"`` for every active parameter."""
        names: list[str] = []
        for name, info in self.components.items():
            names.extend(f"{name}_param{j}" for j in range(info["n_params"]))
        for k, (start, end) in enumerate(self._blocks):
            names.extend(f"block{k}_param{j}" for j in range(end - start))
        return names

    def calculate_model_state_uncertainties(self, var_cov: Any) -> None:
        """Store ``var_cov`` and give each component its diagonal block.

        Parameters
        ----------
        var_cov : array_like or sparse matrix
            ``n_active_params x n_active_params`` variance-covariance matrix.
        """
        dense = _square(var_cov, self.n_active_params, "var_cov")
        for info in self.components.values():
            s, e = info["start_idx"], info["end_idx"]
            info["object"].var_cov_matrix = dense[s:e, s:e].copy()
        self.var_cov_matrix = dense

    def set_param_esds(self, esds: Any) -> None:
        """Write parameter esds back to the components' ``free_parameter_esds``."""
        values = _as_vector(esds, "esds")
        if values.size != self.n_active_params:
            raise ValueError(f"esds must have {self.n_active_params} values, got {values.size}")
        for info in self.components.values():
            info["object"].free_parameter_esds = values[info["start_idx"]:info["end_idx"]].copy()

    # ---- seed interface --------------------------------------------------
    def add_parameters(self, values: Any) -> slice:
        """Append a block of parameters (seed form) and return its slice of ``x``.

        Parameters
        ----------
        values : array_like
            Initial values of the new parameters.

        Returns
        -------
        slice
            Position of the block within :meth:`get_parameters`.
        """
        block = _as_vector(values, "values")
        start = self.x.size
        self.x = np.concatenate([self.x, block])
        self._blocks.append((start, self.x.size))
        return slice(start, self.x.size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_active_params={self.n_active_params}, components={self.components_list})"


# --------------------------------------------------------------------------
# multi-dataset managers
# --------------------------------------------------------------------------
class TargetInterface:
    """Forward target-function calls to ``self.target`` (DIALS ``TargetInterface``)."""

    target: Any = None

    def _require_target(self) -> Any:
        if self.target is None:
            raise RuntimeError(f"{type(self).__name__} was created without a target; pass target= to compute residuals")
        return self.target

    def compute_functional_gradients(self, block: Any) -> Any:
        return self._require_target().compute_functional_gradients(block)

    def compute_restraints_functional_gradients(self, block: Any) -> Any:
        return self._require_target().compute_restraints_functional_gradients(block)

    def compute_residuals_and_gradients(self, block: Any) -> Any:
        return self._require_target().compute_residuals_and_gradients(block)

    def compute_restraints_residuals_and_gradients(self, block: Any) -> Any:
        return self._require_target().compute_restraints_residuals_and_gradients(block)

    def compute_residuals(self, block: Any) -> Any:
        return self._require_target().compute_residuals(block)


class multi_active_parameter_manager(_SeedInterface, TargetInterface):  # noqa: N801
    """Concatenate the active parameters of several datasets (concurrent refinement).

    Parameters
    ----------
    target : object, optional
        Target function the ``compute_*`` calls are forwarded to.
    components_list : list of dict, optional
        One ``{name: component}`` dict per dataset.
    selection_lists : list of list of str, optional
        One selection per dataset (same length as ``components_list``).
    apm_class : type, optional
        Single-dataset manager class (default :class:`active_parameter_manager`).

    Notes
    -----
    With no arguments (seed form) the manager starts empty; sub-managers are
    appended with :meth:`add_parameter_manager`. ``x``, ``apm_data`` and
    ``components_list`` always reflect the current sub-managers, so a seed-form
    sub-manager may still grow after it was added.
    """

    def __init__(self, target: Any = None, components_list: Sequence[Mapping[str, Any]] | None = None,
                 selection_lists: Sequence[Sequence[str]] | None = None,
                 apm_class: type = active_parameter_manager) -> None:
        self.target = target
        self.derivatives = None
        self.apm_list: list[Any] = []
        if components_list is None:
            if selection_lists is not None:
                raise ValueError("selection_lists given without components_list")
            return
        if selection_lists is None:
            selection_lists = [list(c) for c in components_list]
        if len(components_list) != len(selection_lists):
            raise ValueError(f"components_list and selection_lists must have the same length "
                             f"(got {len(components_list)} and {len(selection_lists)})")
        for components, selection in zip(components_list, selection_lists):
            self.apm_list.append(apm_class(components, selection))

    def add_parameter_manager(self, apm: Any) -> None:
        """Append a single-dataset manager (seed form).

        Raises
        ------
        TypeError
            If ``apm`` lacks ``get_param_vals``/``set_param_vals``.
        """
        if not (hasattr(apm, "get_param_vals") and hasattr(apm, "set_param_vals")):
            raise TypeError(f"apm must be a parameter manager (got {type(apm).__name__})")
        self.apm_list.append(apm)

    # ---- derived bookkeeping -------------------------------------------
    @property
    def apm_data(self) -> dict[int, dict[str, int]]:
        """dict: ``{i: {"start_idx", "end_idx"}}`` of each dataset within ``x``."""
        data, start = {}, 0
        for i, apm in enumerate(self.apm_list):
            end = start + apm.n_active_params
            data[i] = {"start_idx": start, "end_idx": end}
            start = end
        return data

    @property
    def x(self) -> np.ndarray:
        """numpy.ndarray: the concatenated active parameters of all datasets (assignable)."""
        if not self.apm_list:
            return np.zeros(0)
        return np.concatenate([apm.get_param_vals() for apm in self.apm_list])

    @x.setter
    def x(self, values: Any) -> None:
        self.set_param_vals(values)

    @property
    def n_active_params(self) -> int:
        """int: total number of active parameters over all datasets."""
        return int(sum(apm.n_active_params for apm in self.apm_list))

    @property
    def components_list(self) -> list[str]:
        """list of str: component names of all datasets, in parameter order."""
        names: list[str] = []
        for apm in self.apm_list:
            names.extend(apm.components_list)
        return names

    # ---- DIALS interface -------------------------------------------------
    def select_parameters(self, apm_number: int) -> np.ndarray:
        """Return the parameters of dataset ``apm_number``."""
        data = self.apm_data
        if apm_number not in data:
            raise IndexError(f"apm_number {apm_number} is out of range for {len(self.apm_list)} datasets")
        return self.x[data[apm_number]["start_idx"]:data[apm_number]["end_idx"]]

    def _check_length(self, values: np.ndarray, name: str) -> None:
        if values.size != self.x.size:
            raise ValueError(f"{name} must have {self.x.size} values, got {values.size}")

    def set_param_vals(self, x: Any) -> None:
        """Set all parameters and push each dataset's slice to its manager."""
        values = _as_vector(x, "x")
        # each dataset's length read once (``x`` and ``apm_data`` would rebuild the whole
        # vector and layout: this runs at every evaluation of a many-dataset fit)
        sizes = [apm.n_active_params for apm in self.apm_list]
        if values.size != sum(sizes):
            raise ValueError(f"x must have {sum(sizes)} values, got {values.size}")
        start = 0
        for apm, n in zip(self.apm_list, sizes):
            part = values[start:start + n]
            # a manager whose set_param_vals is active_parameter_manager's takes the slice of
            # the vector checked above as it is (a copy: the managers must not share memory)
            if type(apm).set_param_vals is active_parameter_manager.set_param_vals:
                apm._set_checked(part.copy())
            else:
                apm.set_param_vals(part)
            start += n

    def get_param_vals(self) -> np.ndarray:
        """Return the concatenated parameter vector."""
        return self.x

    def get_param_names(self) -> list[str]:
        """Return ``"{component}_expt{i}_param{j}"`` for every active parameter."""
        names: list[str] = []
        for i, apm in enumerate(self.apm_list):
            for name, info in apm.components.items():
                names.extend(f"{name}_expt{i}_param{j}" for j in range(info["n_params"]))
            for k, (start, end) in enumerate(getattr(apm, "_blocks", [])):
                names.extend(f"block{k}_expt{i}_param{j}" for j in range(end - start))
        return names

    def set_param_esds(self, esds: Any) -> None:
        """Write esds back, dataset by dataset."""
        values = _as_vector(esds, "esds")
        self._check_length(values, "esds")
        for apm, data in zip(self.apm_list, self.apm_data.values()):
            apm.set_param_esds(values[data["start_idx"]:data["end_idx"]])

    def calculate_model_state_uncertainties(self, var_cov: Any) -> None:
        """Give each dataset its diagonal block of ``var_cov``.

        Cross-dataset covariances are dropped, as in DIALS (spec section 11.18).
        """
        n = self.n_active_params
        dense = _square(var_cov, n, "var_cov")
        start = 0
        for apm in self.apm_list:
            m = apm.n_active_params
            apm.calculate_model_state_uncertainties(dense[start:start + m, start:start + m])
            start += m

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_datasets={len(self.apm_list)}, n_active_params={self.n_active_params})"


class shared_active_parameter_manager(multi_active_parameter_manager):  # noqa: N801
    """A multi-dataset manager in which one named component is shared.

    The shared component's parameters are refined once (the first dataset's
    copy) and written to every dataset. ``x`` holds only the unique parameters;
    ``reducing_matrix`` (scipy CSR, ``n_active_params x n_unique``) maps
    per-dataset derivatives onto them: gradients become ``g @ M`` and Jacobians
    ``J @ M`` (spec section 5.3).

    Parameters
    ----------
    target, components_list, selection_lists, apm_class
        As for :class:`multi_active_parameter_manager`.
    shared : str
        Name of the shared component.
    """

    def __init__(self, target: Any, components_list: Sequence[Mapping[str, Any]],
                 selection_lists: Sequence[Sequence[str]], apm_class: type = active_parameter_manager,
                 shared: str | None = None) -> None:
        super().__init__(target, components_list, selection_lists, apm_class)
        if not isinstance(shared, str):
            raise ValueError("shared must name the shared component (a str)")
        self.shared = shared
        self._build_reduction(shared)

    def _build_reduction(self, shared: str) -> None:
        rows: list[int] = []
        cols: list[int] = []
        unique_rows: list[int] = []
        self._apm_data = super().apm_data
        shared_cols: tuple[int, int] | None = None
        n_unique = 0
        for i, apm in enumerate(self.apm_list):
            offset = self._apm_data[i]["start_idx"]
            sel: list[int] = []
            for name, info in apm.components.items():
                first, last = offset + info["start_idx"], offset + info["end_idx"]
                if name == shared and shared_cols is not None:
                    if shared_cols[1] - shared_cols[0] != last - first:
                        raise ParameterManagerError(
                            f"shared component {shared!r} has {last - first} parameters in dataset {i} "
                            f"but {shared_cols[1] - shared_cols[0]} in the first dataset sharing it")
                    new = list(range(*shared_cols))
                else:
                    new = list(range(n_unique, n_unique + last - first))
                    unique_rows.extend(range(first, last))
                    if name == shared:
                        shared_cols = (n_unique, n_unique + last - first)
                    n_unique += last - first
                rows.extend(range(first, last))
                cols.extend(new)
                sel.extend(new)
            self._apm_data[i]["apm_sel"] = np.asarray(sel, dtype=np.int64)
        n_active = self.n_active_params
        self.reducing_matrix = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_active, n_unique))
        full = super().x
        self._x = full[np.asarray(unique_rows, dtype=np.int64)] if unique_rows else np.zeros(0)

    @property
    def apm_data(self) -> dict[int, dict[str, Any]]:
        """dict: per dataset ``start_idx``/``end_idx`` (unreduced) and ``apm_sel`` into ``x``."""
        return self._apm_data

    @property
    def x(self) -> np.ndarray:
        """numpy.ndarray: the unique (reduced) parameters (assignable)."""
        return self._x

    @x.setter
    def x(self, values: Any) -> None:
        self.set_param_vals(values)

    def select_parameters(self, apm_number: int) -> np.ndarray:
        if apm_number not in self._apm_data:
            raise IndexError(f"apm_number {apm_number} is out of range for {len(self.apm_list)} datasets")
        return self._x[self._apm_data[apm_number]["apm_sel"]]

    def set_param_vals(self, x: Any) -> None:
        values = _as_vector(x, "x")
        self._check_length(values, "x")
        self._x = values
        for i, apm in enumerate(self.apm_list):
            apm.set_param_vals(values[self._apm_data[i]["apm_sel"]])

    def get_param_vals(self) -> np.ndarray:
        return self._x.copy()

    def _reduce_gradient(self, g: Any) -> np.ndarray:
        return np.asarray(self.reducing_matrix.T @ np.asarray(g, dtype=np.float64)).ravel()

    def compute_functional_gradients(self, block: Any) -> Any:
        f, g = self._require_target().compute_functional_gradients(block)
        return f, self._reduce_gradient(g)

    def compute_restraints_functional_gradients(self, block: Any) -> Any:
        res = self._require_target().compute_restraints_functional_gradients(block)
        if res is None:
            return None
        return res[0], self._reduce_gradient(res[1])

    def compute_residuals_and_gradients(self, block: Any) -> Any:
        r, jac, w = self._require_target().compute_residuals_and_gradients(block)
        return r, jac @ self.reducing_matrix, w

    def compute_restraints_residuals_and_gradients(self, block: Any) -> Any:
        res = self._require_target().compute_restraints_residuals_and_gradients(block)
        if res is None:
            return None
        return res[0], res[1] @ self.reducing_matrix, res[2]

    def set_param_esds(self, esds: Any) -> None:
        values = _as_vector(esds, "esds")
        self._check_length(values, "esds")
        for i, apm in enumerate(self.apm_list):
            apm.set_param_esds(values[self._apm_data[i]["apm_sel"]])

    def calculate_model_state_uncertainties(self, var_cov: Any) -> None:
        """Assemble each dataset's var-cov from per-component diagonal blocks of the reduced ``var_cov``."""
        n = self._x.size
        dense = _square(var_cov, n, "var_cov")
        for i, apm in enumerate(self.apm_list):
            sub = np.zeros((apm.n_active_params, apm.n_active_params))
            sel = self._apm_data[i]["apm_sel"]
            pos = 0
            for info in apm.components.values():
                m = info["n_params"]
                if m:
                    s = int(sel[pos])
                    sub[pos:pos + m, pos:pos + m] = dense[s:s + m, s:s + m]
                pos += m
            apm.calculate_model_state_uncertainties(sub)


# --------------------------------------------------------------------------
# generators for concurrent / consecutive refinement
# --------------------------------------------------------------------------
class ParameterManagerGenerator:
    """Build the parameter managers for each refinement cycle.

    Parameters
    ----------
    data_managers : list
        Objects with ``components`` (dict), ``fixed_components`` (list) and, for
        consecutive mode, ``consecutive_refinement_order`` (nested list); a
        scaler or a scaling model both qualify.
    apm_type : type
        Single-dataset manager class.
    target : object
        Target function passed to the multi manager.
    mode : {"concurrent", "consecutive"}
        Concurrent: one manager refining all non-fixed components. Consecutive:
        one manager per cycle of ``consecutive_refinement_order``.
    shared : str, optional
        Name of a component shared across datasets.

    Attributes
    ----------
    param_lists : list
        Per dataset: the selection (concurrent) or the list of per-cycle
        selections (consecutive).
    """

    def __init__(self, data_managers: Sequence[Any], apm_type: type, target: Any,
                 mode: str = "concurrent", shared: str | None = None) -> None:
        if mode not in ("concurrent", "consecutive"):
            raise ValueError(f"Bad value for refinement order mode: {mode!r}, expected 'concurrent' or 'consecutive'")
        self.target = target
        self.data_managers = list(data_managers)
        self.apm_type = apm_type
        self.mode = mode
        self.shared = shared
        self.param_lists: list[Any] = []
        for dm in self.data_managers:
            fixed = set(getattr(dm, "fixed_components", None) or [])
            if mode == "concurrent":
                self.param_lists.append([c for c in dm.components if c not in fixed])
            else:
                cycles = []
                for cycle in dm.consecutive_refinement_order:
                    names = [c for c in cycle if c in dm.components and c not in fixed]
                    if names:
                        cycles.append(names)
                self.param_lists.append(cycles)

    def parameter_managers(self) -> Any:
        """Return a one-element list (concurrent) or a lazy generator (consecutive).

        Consecutive managers are built only when requested, after the previous
        cycle's refinement, because they evaluate the fixed components' scales
        at construction.
        """
        if self.mode == "concurrent":
            return [self._make(self.param_lists)]
        return self._consecutive()

    def _make(self, selections: list[list[str]]) -> multi_active_parameter_manager:
        components = [dm.components for dm in self.data_managers]
        if self.shared:
            return shared_active_parameter_manager(self.target, components, selections, self.apm_type,
                                                   self.shared)
        return multi_active_parameter_manager(self.target, components, selections, self.apm_type)

    def _consecutive(self) -> Any:
        while any(self.param_lists):
            selections = [cycles.pop(0) if cycles else [] for cycles in self.param_lists]
            yield self._make(selections)


class scaling_active_parameter_manager(active_parameter_manager):  # noqa: N801
    """Single-dataset manager that caches the product of the fixed components' scales.

    Parameters
    ----------
    components : dict
        ``{name: component}``; every component must already hold reflection
        data (``n_refl`` is a per-block list) and the same blocks.
    selection_list : list of str
        Components refined in this cycle.

    Attributes
    ----------
    constant_g_values : list of numpy.ndarray or None
        Per block, the product of ``calculate_scales(block)`` over the
        components *not* selected; None when all are selected.
    n_obs : list of int
        Per-block reflection counts.

    Raises
    ------
    ParameterManagerError
        If the components hold different per-block reflection counts.
    """

    def __init__(self, components: Mapping[str, Any], selection_list: Sequence[str]) -> None:
        counts = {name: list(obj.n_refl) for name, obj in components.items()}
        first = next(iter(counts.values()), [])
        unequal = {n: c for n, c in counts.items() if c != first}
        if unequal:
            raise ParameterManagerError(f"components hold different reflection counts per block: {counts}")
        self.constant_g_values: list[np.ndarray] | None = None
        for name, obj in components.items():
            if name in selection_list:
                continue
            scales = [np.asarray(obj.calculate_scales(b), dtype=np.float64) for b in range(len(obj.n_refl))]
            if self.constant_g_values is None:
                self.constant_g_values = [s.copy() for s in scales]
            else:
                self.constant_g_values = [g * s for g, s in zip(self.constant_g_values, scales)]
        super().__init__(components, selection_list)
        self.n_obs = first


class ScalingParameterManagerGenerator(ParameterManagerGenerator):
    """:class:`ParameterManagerGenerator` using :class:`scaling_active_parameter_manager`."""

    def __init__(self, data_managers: Sequence[Any], target: Any, mode: str,
                 shared: str | None = None) -> None:
        super().__init__(data_managers, scaling_active_parameter_manager, target, mode, shared)


# --------------------------------------------------------------------------
# scales and derivatives for minimisation (spec section 5.4)
# --------------------------------------------------------------------------
#: Model blocks of the parameter managers RefinerCalculator has evaluated, per data block: the
#: derivative pattern is built once per manager and block (dropped with the manager).
_REFINER_BLOCKS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _refiner_block(apm: Any, objects: list, block_id: int, const: Any) -> ComponentModelBlock:
    """The manager's model block for ``block_id``, rebuilt when its components' terms changed."""
    try:
        blocks = _REFINER_BLOCKS.setdefault(apm, {})
    except TypeError:  # a manager that cannot be weakly referenced: no reuse
        blocks = {}
    block = blocks.get(block_id)
    if block is None or not block.is_current(objects, const):
        block = blocks[block_id] = ComponentModelBlock(objects, block_id, fixed_scales=const)
    return block


def release_refiner_values(apm: Any, block_id: int, pattern: bool = False) -> None:
    """Free the derivative values (and with ``pattern`` the derivative pattern) of the
    manager's model block for ``block_id``; g is kept and the next evaluation allocates (and
    builds) them again. No-op if there is none."""
    try:
        block = _REFINER_BLOCKS.get(apm, {}).get(block_id)
    except TypeError:
        return
    if block is not None:
        block.core.release_values(pattern)


def _objects_and_constant(apm: Any, block_id: int) -> tuple[list, Optional[np.ndarray]]:
    """The manager's active component objects and, if it has them, the fixed components'
    constant scales of block ``block_id``."""
    constant = getattr(apm, "constant_g_values", None)
    const = None if constant is None else np.asarray(constant[block_id], dtype=np.float64)
    return [info["object"] for info in apm.components.values()], const


class RefinerCalculator:
    """Inverse scales and their derivatives for one dataset block (DIALS ``basis_functions``)."""

    @staticmethod
    def calculate_scales_and_derivatives(apm: Any, block_id: int, copy: bool = True,
                                         n_threads: int = 1) -> tuple[np.ndarray, SparseMatrix]:
        """``g`` and ``dg/dp`` (``n_b x n_active``) of the active components of ``apm``.

        ``g`` is the product of the active components' scales and, when the
        manager has them (:class:`scaling_active_parameter_manager`), the
        fixed components' ``constant_g_values``. Component c's derivative
        columns are its block times the other factors.

        With ``copy=False`` the derivative values of a several-component model are views of
        the manager's model-block buffers, rewritten by its next evaluation: for a caller that
        consumes them before evaluating again (the scalers; at 1.1 M observations the copy
        costs about 0.3 GB and 0.1 s per evaluation). ``g`` is always a fresh array.

        Notes
        -----
        DIALS quirk kept for parity (spec 5.4, verified): with exactly one
        active component its derivative block is returned unchanged, *not*
        multiplied by the constant (fixed) factors. With no active component
        the derivative matrix is ``0 x 0``.
        """
        objects, const = _objects_and_constant(apm, block_id)
        if not objects:
            if const is None:
                raise ValueError("the parameter manager has neither active components nor constant scales")
            return const.copy(), _sparse.SparseMatrix((0, 0))
        if len(objects) == 1:
            scales, derivs = objects[0].calculate_scales_and_derivatives(block_id)
            scales = np.asarray(scales, dtype=np.float64)
            g = scales * const if const is not None else scales.copy()
            return g, _sparse.as_sparse_matrix(sp.csr_matrix(derivs))
        # The fixed factors join the product with no columns of their own. The block (its
        # pattern) is kept per manager; the returned values are a copy, the pattern is shared.
        g, jac = _refiner_block(apm, objects, block_id, const).evaluate(n_threads)
        if not copy:
            return g.copy(), jac
        return g.copy(), _sparse.as_sparse_matrix(sp.csr_matrix(
            (jac.data.copy(), jac.indices, jac.indptr), shape=jac.shape, copy=False))

    @staticmethod
    def calculate_scales(apm: Any, block_id: int, n_threads: int = 1) -> np.ndarray:
        """``g`` alone, as :meth:`calculate_scales_and_derivatives` gives it (the same
        product, bit for bit), without derivatives: for residuals at a trial point.
        ``n_threads``: as :meth:`ComponentModelBlock.evaluate` (the same values for any count)."""
        objects, const = _objects_and_constant(apm, block_id)
        if not objects:
            if const is None:
                raise ValueError("the parameter manager has neither active components nor constant scales")
            return const.copy()
        if len(objects) == 1:
            scales = np.asarray(objects[0].calculate_scales(block_id), dtype=np.float64)
            return scales * const if const is not None else scales.copy()
        return _refiner_block(apm, objects, block_id, const).evaluate_scales(n_threads).copy()

    @staticmethod
    def transpose_product(apm: Any, block_id: int, coefficients: Any, n_threads: int = 1) -> Optional[np.ndarray]:
        """``(∂g/∂p)ᵀ·c`` for the matrix :meth:`calculate_scales_and_derivatives` gives, without
        forming it (the manager's C++ model block, :meth:`ComponentModelBlock.transpose_product`);
        ``None`` with fewer than two active components (no model block: DIALS's single-component
        quirk applies there, so the caller uses the derivative matrix)."""
        objects, const = _objects_and_constant(apm, block_id)
        if len(objects) < 2:
            return None
        return _refiner_block(apm, objects, block_id, const).transpose_product(coefficients, n_threads)

    @staticmethod
    def _calc_component_scales_derivatives(apm: Any, block_id: int) -> tuple[list, list]:
        """Each active component's scales and derivatives for one block (DIALS's helper)."""
        scales, derivatives = [], []
        for info in apm.components.values():
            s, d = info["object"].calculate_scales_and_derivatives(block_id)
            scales.append(s)
            derivatives.append(d)
        return scales, derivatives


# --------------------------------------------------------------------------
# uncertainty propagation to the scales
# --------------------------------------------------------------------------
def full_model_var_cov(components: Mapping[str, Any], apm: Any) -> np.ndarray:
    """Place a single-dataset manager's var-cov into the full model's parameter space.

    DIALS ``SingleScaler.update_var_cov``: the result is ``n_model x n_model``
    with n_model counting *all* parameters of every component; each active
    (component, component) block of ``apm.var_cov_matrix`` lands at the
    components' full-model offsets. A fixed-first component's ``n - 1`` free
    parameters occupy offsets ``0..n-2`` of its block (matching the ``n - 1``
    derivative columns used by :func:`calc_sf_variances`); rows and columns of
    inactive components stay zero.

    Parameters
    ----------
    components : dict
        The model's ``{name: component}``.
    apm : active_parameter_manager
        After ``calculate_model_state_uncertainties``.

    Returns
    -------
    numpy.ndarray
    """
    if apm.var_cov_matrix is None:
        raise ValueError("the parameter manager has no var_cov_matrix yet (call calculate_model_state_uncertainties)")
    V = _square(apm.var_cov_matrix, apm.n_active_params, "apm.var_cov_matrix")
    offsets, start = {}, 0
    for name, comp in components.items():
        offsets[name] = start
        start += int(comp.n_params)
    full = np.zeros((start, start))
    for name_i, info_i in apm.components.items():
        if name_i not in offsets:
            raise KeyError(f"active component {name_i!r} is not in the model's components")
        oi, si, ni = offsets[name_i], info_i["start_idx"], info_i["n_params"]
        for name_j, info_j in apm.components.items():
            oj, sj, nj = offsets[name_j], info_j["start_idx"], info_j["n_params"]
            full[oi:oi + ni, oj:oj + nj] = V[si:si + ni, sj:sj + nj]
    return full


def _var_cov_in_block_columns(components: Mapping[str, Any], V: np.ndarray,
                              block: ComponentModelBlock) -> np.ndarray:
    """The full-model var-cov ``V`` re-indexed into ``block``'s column layout (a small matrix),
    so the Jacobian's own column indices are used as they are (no per-entry gather).
    Component c's derivative columns sit at its full-model offset, the cumulative parameter
    count (a fixed-first smoother's ``n_params - 1`` columns fill the first of its block)."""
    column_map, start = [], 0
    for i, (name, comp) in enumerate(components.items()):
        width = int(block.core.term(i).n_cols)
        if width > comp.n_params:
            raise ValueError(f"component {name!r} returned {width} derivative columns for "
                             f"{comp.n_params} parameters")
        column_map.append(np.arange(start, start + width, dtype=np.int32))
        start += int(comp.n_params)
    model_columns = np.concatenate(column_map)
    return np.ascontiguousarray(np.asarray(V, dtype=np.float64)[np.ix_(model_columns, model_columns)])


def calc_sf_variances_into(components: Mapping[str, Any], var_cov: Any, rows: Sequence[Any],
                           variances: np.ndarray, g: np.ndarray, n_threads: int = 1) -> None:
    """:func:`calc_sf_variances` with ``with_scales`` of several data blocks, written in place.

    Block ``b``'s ``(var, g)`` go to ``variances[rows[b]]`` and ``g[rows[b]]`` (blocks with no
    rows are skipped), bit for bit as ``calc_sf_variances(components, var_cov, block_id=b,
    with_scales=True)``. When every block's terms evaluate row ranges, all blocks go to C++ in
    one call (their chunks shared over ``n_threads`` threads, each row written in place).

    Parameters
    ----------
    components : dict
        ``{name: component}`` of one model, holding reflection data split into blocks.
    var_cov : array_like or sparse matrix
        ``n_model_params x n_model_params`` matrix (as :func:`calc_sf_variances`).
    rows : sequence of array_like
        Per data block, the output positions of its rows (int, ``n_refl[b]`` of them;
        distinct over all blocks).
    variances, g : numpy.ndarray
        float64 C-contiguous outputs, written at the ``rows`` positions only.
    n_threads : int, optional
        Threads of the C++ reduction; the result does not depend on it.
    """
    names = list(components)
    n_param = int(sum(components[n].n_params for n in names))
    V = _square(var_cov, n_param, "var_cov")
    used = [b for b, r in enumerate(rows) if np.size(r)]
    if not names or not used:
        return
    blocks = [ComponentModelBlock([components[n] for n in names], b) for b in used]
    if all(block.core.evaluates_rows() for block in blocks):
        v_block = _var_cov_in_block_columns(components, V, blocks[0])
        widths = [int(blocks[0].core.term(i).n_cols) for i in range(len(names))]
        if any([int(block.core.term(i).n_cols) for i in range(len(names))] != widths for block in blocks):
            raise ValueError("the components' data blocks have different derivative columns")
        _fit_kernels.model_row_variances_into([block.core for block in blocks], blocks[0].parameters(), v_block,
                                              [np.asarray(rows[b], dtype=np.int64) for b in used],
                                              variances, g, n_threads=n_threads)
        return
    for b in used:  # a Python-defined term: block by block through its evaluated matrix
        variances[rows[b]], g[rows[b]] = calc_sf_variances(components, V, block_id=b, with_scales=True,
                                                           n_threads=n_threads)


def calc_sf_variances(components: Mapping[str, Any], var_cov: Any, block_id: int = 0,
                      with_scales: bool = False, n_threads: int = 1) -> Any:
    """Variance of each reflection's inverse scale factor from a parameter var-cov matrix.

    Builds the full-model Jacobian ``J_i = dg_i/dp`` by the product rule
    (component c's derivative block times the scales of all other components)
    and returns ``diag(J V J^T)`` (DIALS ``scaler.calc_sf_variances``).

    Parameters
    ----------
    components : dict
        ``{name: component}`` of one model, holding reflection data.
    var_cov : array_like or sparse matrix
        ``n_model_params x n_model_params`` matrix, where n_model_params counts
        *all* parameters of every component (including a fixed first one).
    block_id : int, optional
        Component data block to evaluate (default 0).
    with_scales : bool, optional
        Also return ``g``: the product of every component's scales from the same evaluation,
        bit for bit the product ``Π_c s_c`` in component order (a caller that needs both then
        evaluates the model once instead of twice).
    n_threads : int, optional
        Threads of the chunked C++ reduction (models whose terms all evaluate row ranges);
        the result does not depend on it.

    Returns
    -------
    numpy.ndarray or tuple
        ``var(g_i)`` per reflection; ``(var, g)`` with ``with_scales``.

    Notes
    -----
    Component c's columns start at the cumulative full parameter count, so a
    fixed-first smoother (whose derivative has ``n_params - 1`` columns) fills
    columns 0..n-2 of its block: the same layout as DIALS (spec section 5.5).
    """
    names = list(components)
    n_param = int(sum(components[n].n_params for n in names))
    V = _square(var_cov, n_param, "var_cov")
    if not names:
        return (np.zeros(0), np.zeros(0)) if with_scales else np.zeros(0)
    block = ComponentModelBlock([components[n] for n in names], block_id)
    fused = block.core.evaluates_rows()  # then ∂g/∂p is never formed (model_row_variances)
    if not fused:
        g, model_jac = block.evaluate()
    v_block = _var_cov_in_block_columns(components, V, block)
    if fused:  # chunks of rows: their ∂g/∂p evaluated in cache and reduced at once
        var, g = _fit_kernels.model_row_variances(block.core, block.parameters(), v_block, n_threads=n_threads)
        return (var, g) if with_scales else var
    # Σ_ab J_ia V_ab J_ib per row in C++ (k² per row, no N x n_param temporary)
    var = _fit_kernels.row_quadratic_forms(np.asarray(model_jac.indptr, dtype=np.int64),
                                           np.asarray(model_jac.indices, dtype=np.int32),
                                           np.asarray(model_jac.data, dtype=np.float64), v_block)
    return (var, np.array(g, dtype=np.float64)) if with_scales else var  # g: a copy (the block goes)
