"""Scalers (DIALS ``scaler.py``): datasets, their models and the rounds of the scaling job.

A scaler holds, per dataset, the *full* input table (no row is ever dropped), the rows that
are suitable for scaling, the scaling model (configured on the suitable rows) and the current
outliers. It offers DIALS's scaler protocol to the refinement engine (``Ih_table``,
``get_blocks_for_minimisation``, ``update_for_minimisation``) and DIALS's round methods:
``perform_scaling``, ``expand_scales_to_all_reflections``, ``round_of_outlier_rejection``,
``combine_intensities``, ``perform_error_optimisation``, ``make_ready_for_scaling``,
``prepare_reflection_tables_for_output``.

:class:`SingleScaler` is one dataset; :class:`MultiScaler` scales several on one Ĩ;
:class:`TargetScaler` scales unscaled datasets against scaled ones (fixed Ĩ).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .. import flex_arrays as fa
from .._core import job as _kern
from .._core import model_block as _mb
from .._lazy import LazyModule, is_scipy_sparse
from .._rows import take_rows
from ..components import SHScaleComponent
from ..csr_view import CsrView
from ..parameter_managers import single_managers
from ..reflection_table import Flags
from .grouped import GroupedObservations, asu_grouping, asu_grouping_and_groups, suitable_rows
from .outlier_rejection import (
    determine_Esq_outlier_index_arrays,
    determine_outlier_rows,
)
from .prepare import BadDatasetForScalingException

if TYPE_CHECKING:
    import scipy.sparse as sp
else:
    sp = LazyModule("scipy.sparse")  # imported on first use: see _lazy

__all__ = [
    "Dataset",
    "MultiScaler",
    "NullScaler",
    "ScalerBase",
    "SingleScaler",
    "TargetScaler",
    "calc_sf_variances",
]

logger = logging.getLogger("xtalscale.scale")


def calc_sf_variances(components: Any, var_cov: Any) -> np.ndarray:
    """Variance of each row's inverse scale factor from the var-cov matrix (DIALS's name)."""
    from ..parameter_managers import calc_sf_variances as _calc

    return _calc(components, var_cov)


def _manager_block_rows(apm: Any, block_id: int) -> int:
    """Rows of a single-dataset manager's data block ``block_id``: its first active component's,
    or its constant scales' when it has none."""
    for info in apm.components.values():
        return int(info["object"].n_refl[block_id])
    return int(np.asarray(apm.constant_g_values[block_id]).size)


class _BlockPlan:
    """One multi-dataset manager's evaluation on one data block, found once: each dataset's
    single manager, its C++ model block (None for a manager with fewer than two active
    components, evaluated through RefinerCalculator) and its rows in the block. The scaler
    evaluates every block through one (:meth:`ScalerBase._block_plan`).

    The model blocks are those RefinerCalculator keeps (``_refiner_block``), so a DIALS-style
    script calling RefinerCalculator and the scaler evaluate, release and reuse the same
    objects and get the same bits. When every dataset
    has one whose terms are all C++ (no Python-defined component) and there are enough
    datasets for the threads, g and the transposed product of all the datasets go in one C++ call (``_core.model_block.*_of_blocks``: the
    datasets over the threads, each on one; the same bits as one call per dataset)."""

    __slots__ = ("apm", "managers", "models", "starts", "cores", "_columns")

    #: datasets per thread from which the one-call path applies with several threads: it puts
    #: each dataset on one thread, so a few large datasets (3 sweeps of a streamed block) would
    #: leave threads idle that the per-dataset calls' row chunks keep busy
    BATCH_MIN_DATASETS_PER_THREAD = 4

    def __init__(self, apm: Any, block_id: int, n_threads: int = 1) -> None:
        from ..parameter_managers import _objects_and_constant, _refiner_block

        self.apm = apm
        self.managers = single_managers(apm)
        self.models: list[Any] = []
        for a in self.managers:
            objects, const = _objects_and_constant(a, block_id)
            self.models.append(_refiner_block(a, objects, block_id, const) if len(objects) >= 2 else None)
        sizes = [_manager_block_rows(a, block_id) for a in self.managers]
        self.starts = [0, *np.cumsum(sizes).tolist()]
        enough = n_threads <= 1 or len(self.models) >= self.BATCH_MIN_DATASETS_PER_THREAD * n_threads
        batched = len(self.models) > 1 and enough and all(m is not None and not m._external for m in self.models)
        self.cores = [m.core for m in self.models] if batched else None
        # each dataset's first column in the round's normal matrix
        self._columns = np.cumsum([0] + [a.n_active_params for a in self.managers]).tolist()

    def _parameters(self) -> list[np.ndarray]:
        """Each model block's parameter vector at its components' current parameters."""
        return [m.parameters() for m in self.models]

    def scales(self, block_id: int, n_threads: int, check: bool = False) -> np.ndarray:
        """g of the block's rows, dataset after dataset (a fresh array): what
        ``RefinerCalculator.calculate_scales`` gives for each manager, bit for bit. ``check``:
        raise NonFiniteScales at the first dataset whose g is not finite and > 0."""
        from ..fit.minimisers import NonFiniteScales
        from ..fit.objectives import require_usable_scales
        from ..parameter_managers import RefinerCalculator

        if self.cores is not None:
            g, usable = _mb.evaluate_scales_of_blocks(self.cores, self._parameters(), check, n_threads)
            if check and not usable:
                raise NonFiniteScales("scales are not finite and > 0")
            return g
        parts = []
        for a, m in zip(self.managers, self.models):
            parts.append(m.evaluate_scales(n_threads) if m is not None
                         else RefinerCalculator.calculate_scales(a, block_id, n_threads=n_threads))
            if check:
                require_usable_scales(parts[-1])
        # a model block's g is a view of its buffer, rewritten by its next evaluation
        return np.array(parts[0]) if len(parts) == 1 else np.concatenate(parts)

    def scales_and_derivatives(self, block_id: int, n_threads: int) -> list[tuple[np.ndarray, Any]]:
        """Each manager's ``(g, ∂g/∂p)`` as ``RefinerCalculator.calculate_scales_and_derivatives``
        gives it with ``copy=False`` (g a fresh array, ∂g/∂p a view of the block's buffers)."""
        from ..components import _csr_view
        from ..parameter_managers import RefinerCalculator

        if self.cores is not None:
            _mb.evaluate_blocks(self.cores, self._parameters(), n_threads)
            # as ComponentModelBlock.evaluate returns them: g and ∂g/∂p over the block's buffers
            return [(np.array(m.core.scales), _csr_view(m.core)) for m in self.models]
        out = []
        for a, m in zip(self.managers, self.models):
            if m is None:
                out.append(RefinerCalculator.calculate_scales_and_derivatives(a, block_id, copy=False,
                                                                              n_threads=n_threads))
            else:
                g, jac = m.evaluate(n_threads)
                out.append((g.copy(), jac))
        return out

    def table_models(self, block: Any) -> list[tuple[Any, ...]] | None:
        """The datasets of the Ih table block ``block`` as ``_core.fit.model_normal_equations``
        takes them: per dataset ``(model block, parameters, 0, first column, its rows' table
        rows)`` at the components' current parameters, the table rows read from the block's
        row map. None unless every dataset has a C++ model block whose terms all evaluate row
        ranges and whose rows are in group order (their table rows ascend, which the block
        finds once: :meth:`~xtalscale.fit.ih_table.IhTableBlock.rows_ascend`)."""
        if any(m is None or m._external or not m.core.evaluates_rows() for m in self.models):
            return None
        if not block.rows_ascend(self.starts):
            return None
        table_rows = block.table_arrays()[3]
        return [(m.core, m.parameters(), 0, self._columns[k], table_rows[self.starts[k]:self.starts[k + 1]])
                for k, m in enumerate(self.models)]

    def transpose_product(self, block_id: int, coefficients: np.ndarray, n_threads: int) -> np.ndarray:
        """``(∂g/∂p)ᵀ·c`` of the block, each dataset's columns after the previous datasets'."""
        if self.starts[-1] != coefficients.size:
            raise ValueError(f"coefficients have {coefficients.size} rows but block {block_id} has {self.starts[-1]}")
        if self.cores is not None:
            return _mb.transpose_product_of_blocks(self.cores, self._parameters(), coefficients, n_threads)
        parts = []
        for k, (a, m) in enumerate(zip(self.managers, self.models)):
            if m is not None:
                parts.append(m.transpose_product(coefficients[self.starts[k]:self.starts[k + 1]], n_threads))
            elif a.n_active_params:
                raise ValueError("a dataset's model has no C++ model block (check can_transpose_product)")
        if not parts:
            return np.zeros(0)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


@dataclass
class Dataset:
    """One experiment and its table inside a scaler."""

    experiment: Any
    table: Any
    model: Any
    suitable: np.ndarray                       # bool over table rows
    outliers: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # over suitable rows
    minimisation: np.ndarray | None = None     # bool over suitable rows (selection method)
    var_cov: Any = None
    error_model: Any = None
    _suitable_held: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False,
                                                                 compare=False)

    @property
    def suitable_idx(self) -> np.ndarray:
        """Table rows of the suitable rows (read-only; made once per ``suitable`` array: the
        job reads the suitable rows' columns dozens of times)."""
        held = self._suitable_held
        if held is None or held[0] is not self.suitable:
            idx = np.flatnonzero(self.suitable)
            idx.setflags(write=False)
            held = self._suitable_held = (self.suitable, idx)
        return held[1]

    def column(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """The suitable rows' values of a column (float64, a fresh array); with ``rows``
        (positions among the suitable rows) those rows' only."""
        return self.columns((name,), rows)[0]

    def columns(self, names: Sequence[str], rows: np.ndarray | None = None) -> list[np.ndarray]:
        """:meth:`column` of each of ``names``, the table rows found once."""
        table_rows = self.suitable_idx if rows is None else self.suitable_idx.take(rows)
        return [np.asarray(self.table[name], dtype=np.float64).take(table_rows) for name in names]


#: Minimisation tables with more rows are streamed (see make_ready_for_scaling) in blocks of
#: about STREAM_BLOCK_ROWS rows where the blocks' ∂g/∂p are formed: a block's model buffers
#: (~0.5 kB/row) then stay below glibc's largest mmap threshold (32 MB), so each block reuses
#: the memory the previous one freed. Where every dataset's model evaluates its rows in C++
#: (the fused normal equations and f+g, chunked variances: no ∂g/∂p is ever formed) the
#: blocks hold FUSED_BLOCK_ROWS rows: fewer per-block calls and buffers. Measured on the 3-,
#: 24- and 60-sweep sets (1.1-1.4 × 10⁶ rows), alternating with 60k-row blocks throughout:
#: 1.45-1.53 s against 1.52-1.92 s, 3.67 s against 4.38 s and 4.68 s against 6.20 s at nproc
#: 2, with 30-80 MB less at the peak.
STREAM_MIN_ROWS = 300_000
#: Minimisation tables of at least this many rows let LevMar reuse its previous normal matrix
#: for a step near the optimum (minimisers.levenberg_marquardt, ``reuse_matrix``); below it a
#: build is cheap and the fit stays DIALS's LevMar step for step.
REUSE_MATRIX_MIN_ROWS = 100_000
STREAM_BLOCK_ROWS = 60_000
FUSED_BLOCK_ROWS = 240_000
#: Streamed blocks free their derivative pattern too (rebuilt at the next evaluation): at 10⁶
#: observations 0.06 GB less at the peak for no measurable time (the rebuild reuses the memory).
STREAM_RELEASE_PATTERN = True


class _SubsetLayout(NamedTuple):
    """A subset of the scaler's cached grouping of every suitable row, as
    :meth:`ScalerBase._subset_layout` keeps it: what it was made from (``source_order``: the
    cached grouping's order array, ``suitable``: each dataset's suitable-row array, ``keep``:
    the rows; ``holding``: the rows whose groups they are, if asked so), the subset's grouping
    (``order``, ``offsets``), its positions ``idx`` among every suitable row, each dataset's
    part of them (``cuts``) and table rows (``table_rows``), the columns that never change
    (``asu_hkl``, ``dataset``, ``row``, ``extra``) and the subsets' shared ``derived`` cache
    (the E² bins of its grouping...)."""

    source_order: np.ndarray
    suitable: list
    keep: np.ndarray
    holding: np.ndarray | None
    order: np.ndarray
    offsets: np.ndarray
    idx: np.ndarray
    cuts: np.ndarray
    table_rows: list
    asu_hkl: np.ndarray
    dataset: np.ndarray
    row: np.ndarray
    extra: dict
    derived: dict

    def fits(self, scaler: ScalerBase, cache: GroupedObservations) -> bool:
        """Whether it was made from ``cache``'s grouping and the scaler's suitable rows."""
        return (self.source_order is cache.order and len(self.suitable) == len(scaler.datasets)
                and all(a is ds.suitable for a, ds in zip(self.suitable, scaler.datasets)))


def threads_of(params: Any) -> int:
    """The threads the job may use: ``scaling_options.nproc`` (1 when absent or unset)."""
    nproc = getattr(getattr(params, "scaling_options", None), "nproc", None)
    return max(1, int(nproc or 1))


class ScalerBase:
    """What every scaler does (DIALS ``ScalerBase``)."""

    def __init__(self, params: Any) -> None:
        self._params = params
        self.datasets: list[Dataset] = []
        self.Ih_table: Any = None
        self.removed_datasets: list[str] = []
        self.journals: list[Any] = []
        self.timings: dict[str, float] = {}
        self.n_threads = threads_of(params)
        self.error_model: Any = None
        self.free_asu_hkl: np.ndarray | None = None
        self._update_keys: dict[int, tuple] = {}
        #: whether the last minimisation found every dataset's model evaluating its rows in C++
        #: (table_models): then no ∂g/∂p is formed and the streamed blocks may be larger
        self._models_evaluate_rows = False
        self._grouped_cache: GroupedObservations | None = None
        self._asu_groupings: dict[Any, Any] = {}  # see suitable_asu_grouping
        self._subset_held: _SubsetLayout | None = None  # see _subset_layout
        #: per column name: (the columns and suitable arrays they were gathered from, the
        #: values, whether every value is finite (None: not yet known)); see suitable_values
        self._suitable_values_held: dict[str, list] = {}
        self._suitable_layout_held: tuple | None = None  # see _suitable_layout
        self._suitable_starts_held: tuple | None = None  # see _suitable_starts
        #: the components hold the model data of the minimisation table's blocks (set by
        #: make_ready_for_scaling, cleared by an expansion, which gives them other rows)
        self._components_hold_minimisation_blocks = False
        self._observers: dict[str, list] = {}
        self.stream_derivatives = False
        #: per (manager, block) evaluation plans while a round's minimiser runs (None outside:
        #: see _block_plan)
        self._plans: dict[tuple[int, int], _BlockPlan] | None = None

    # ------------------------------------------------------------------ properties
    @property
    def params(self) -> Any:
        return self._params

    @property
    def active_scalers(self) -> list[Dataset]:
        return self.datasets

    @property
    def space_group(self) -> Any:
        return self.datasets[0].experiment.crystal.get_space_group()

    @property
    def global_Ih_table(self) -> GroupedObservations:
        return self._grouped_suitable()

    def _tick(self, stage: str, t0: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t0

    # ------------------------------------------------------------------ weights
    def _error_model_for(self, ds: Dataset) -> Any:
        """The error model that weights ``ds``: its own, else the scaler's shared one (or None)."""
        return ds.error_model if ds.error_model is not None else self.error_model

    def _variances(self, ds: Dataset, rows: np.ndarray | None = None) -> np.ndarray:
        """σ² of the suitable rows (or of ``rows`` of them, positions among the suitable rows),
        through the error model if there is one."""
        var = ds.column("variance", rows)
        em = self._error_model_for(ds)
        if em is not None:
            var = np.asarray(em.update_variances(var, ds.column("intensity", rows)), dtype=np.float64)
        return var

    # ------------------------------------------------------------------ suitable-row columns
    def _kernel_threads(self) -> int:
        """Threads for a C++ kernel called here: the job's, or one on a thread of the scaler's
        own pool (work mapped there is already spread over the threads, e.g. the first
        grouping's gathers beside the ASU mapping)."""
        if self.n_threads > 1 and threading.current_thread().name.startswith(self.POOL_THREAD_PREFIX):
            return 1
        return self.n_threads

    def _gather(self, values: np.ndarray, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``np.take(values, rows, out=out)`` of float64 values over :meth:`_kernel_threads`
        threads (C++, GIL released): the rounds gather 10⁶-row columns."""
        return _kern.gather_values(values, rows, out=out, n_threads=self._kernel_threads())

    def _suitable_starts(self) -> np.ndarray:
        """The first position of each dataset's suitable rows among every dataset's
        (concatenated in dataset order) and the total (read-only). Made once per set of
        ``suitable`` arrays and kept for the job (a few integers)."""
        key = [ds.suitable for ds in self.datasets]
        held = self._suitable_starts_held
        if held is None or len(held[0]) != len(key) or any(a is not b for a, b in zip(held[0], key)):
            sizes = [int(ds.suitable_idx.size) for ds in self.datasets]
            starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
            starts.setflags(write=False)
            held = self._suitable_starts_held = (key, starts)
        return held[1]

    def _suitable_layout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(starts, dataset, row)`` of the concatenated suitable rows (dataset order): the
        first position of each dataset (and the total, :meth:`_suitable_starts`), and per
        position its dataset and its row among that dataset's suitable rows. Made once per set
        of ``suitable`` arrays (until :meth:`_drop_suitable_values`)."""
        starts = self._suitable_starts()
        held = self._suitable_layout_held
        if held is None or held[0] is not starts:
            sizes = np.diff(starts)
            dataset = np.repeat(np.arange(sizes.size, dtype=np.int64), sizes)
            row = np.concatenate([np.arange(n, dtype=np.int64) for n in sizes]) if sizes.size else np.zeros(0, np.int64)
            for a in (dataset, row):
                a.setflags(write=False)
            held = self._suitable_layout_held = (starts, (starts, dataset, row))
        return held[1]

    def suitable_values(self, name: str, default: float | None = None) -> np.ndarray:
        """Every dataset's suitable rows' values of column ``name`` (float64, concatenated in
        dataset order; ``default`` for a dataset without the column, else KeyError), gathered
        straight into one array and kept (read-only) until a table's column or a dataset's
        ``suitable`` array is replaced: the job replaces a column when it changes it (the
        intensity combination its intensities and variances, an expansion g), so the outlier
        rounds and error-model refinements in between read the same values without a gather."""
        key = self._suitable_values_key(name)
        held = self._kept_suitable_values(name, key)
        if held is not None:
            return held
        # the per-row layout too: the first grouping reads it after gathering here on the pool
        starts = self._suitable_layout()[0]
        out = np.empty(int(starts[-1]))
        for k, ds in enumerate(self.datasets):
            part = out[starts[k]:starts[k + 1]]
            if key[k][0] is not None:
                self._gather(np.asarray(key[k][0], dtype=np.float64), ds.suitable_idx, out=part)
            elif default is None:
                raise KeyError(f"the reflection table of dataset {k} has no column '{name}'")
            else:
                part.fill(float(default))
        out.setflags(write=False)
        self._suitable_values_held[name] = [key, out, None]
        return out

    def _suitable_values_key(self, name: str) -> list[tuple[Any, np.ndarray]]:
        """What :meth:`suitable_values` ``name`` is gathered from: per dataset its column (None
        when absent) and its ``suitable`` array."""
        return [(ds.table[name] if name in ds.table else None, ds.suitable) for ds in self.datasets]

    def _kept_suitable_values(self, name: str, key: list | None = None) -> np.ndarray | None:
        """The array :meth:`suitable_values` keeps for ``name`` if it is current, else None."""
        key = self._suitable_values_key(name) if key is None else key
        held = self._suitable_values_held.get(name)
        if held is not None and len(held[0]) == len(key) and all(
                a[0] is b[0] and a[1] is b[1] for a, b in zip(held[0], key)):
            return held[1]
        return None

    def suitable_values_at(self, name: str, idx: np.ndarray, default: float | None = None) -> np.ndarray:
        """``suitable_values(name, default).take(idx)`` (``idx``: ascending positions among every
        dataset's suitable rows) as a fresh array: from the kept array when it is current, else
        gathered from the tables for those rows alone (an error model's rows need the
        partiality of some of the rows once, not every row's)."""
        key = self._suitable_values_key(name)
        held = self._kept_suitable_values(name, key)
        if held is not None:
            return self._gather(held, idx)
        starts = self._suitable_starts()
        cuts = np.searchsorted(idx, starts)  # each dataset's part of idx
        out = np.empty(idx.size)
        for k, ds in enumerate(self.datasets):
            part = out[cuts[k]:cuts[k + 1]]
            if key[k][0] is not None:
                self._gather(np.asarray(key[k][0], dtype=np.float64),
                             ds.suitable_idx.take(idx[cuts[k]:cuts[k + 1]] - starts[k]), out=part)
            elif default is None:
                raise KeyError(f"the reflection table of dataset {k} has no column '{name}'")
            else:
                part.fill(float(default))
        return out

    #: what :meth:`suitable_values` keeps for the whole job (I, σ² and 1/σ²: 24 B per suitable
    #: row, read by every outlier round until the intensity choice changes them); the rest is
    #: kept from an all-row outlier round to the error-model refinement after it only
    KEPT_FOR_THE_JOB = ("intensity", "variance", "1/variance")

    def _drop_suitable_values(self) -> None:
        """Forget what :meth:`suitable_values` keeps beyond :attr:`KEPT_FOR_THE_JOB` (g,
        partiality, the rows' datasets: some 30 B per suitable row), not held into the
        minimisation that follows."""
        for name in [k for k in self._suitable_values_held if k not in self.KEPT_FOR_THE_JOB]:
            del self._suitable_values_held[name]
        self._suitable_layout_held = None

    def _all_finite(self, name: str, values: np.ndarray) -> bool:
        """Whether every value of :meth:`suitable_values` ``name`` (``values``) is finite
        (checked once per gathered array)."""
        held = self._suitable_values_held.get(name)
        if held is None or held[1] is not values:
            return bool(np.all(np.isfinite(values)))
        if held[2] is None:
            held[2] = bool(np.all(np.isfinite(values)))
        return held[2]

    def suitable_weights(self) -> np.ndarray:
        """1/σ² of :meth:`suitable_values` ``"variance"`` (no error model), kept with them."""
        V = self.suitable_values("variance")
        held = self._suitable_values_held.get("1/variance")
        if held is None or held[0] is not V:
            with np.errstate(divide="ignore", invalid="ignore"):
                w = 1.0 / V
            w.setflags(write=False)
            held = self._suitable_values_held["1/variance"] = [V, w]
        return held[1]

    def _suitable_variances_and_weights(self, I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # noqa: N803
        """σ² of every suitable row through each dataset's error model (:meth:`_variances`,
        element for element) and the weights 1/σ²; ``I``: :meth:`suitable_values` of the
        intensities."""
        V = self.suitable_values("variance")
        models = [self._error_model_for(ds) for ds in self.datasets]
        if all(em is None for em in models):
            return V, self.suitable_weights()
        starts = self._suitable_starts()
        if all(em is models[0] for em in models):  # one model: one pass over every row
            fused = getattr(models[0], "update_variances_and_weights", None)
            if fused is not None:  # σ'² and 1/σ'² in one threaded pass (the same bits)
                return fused(V, I, n_threads=self._kernel_threads())
            var = np.asarray(models[0].update_variances(V, I), dtype=np.float64)
        else:
            var = np.empty(V.size)
            for k, em in enumerate(models):
                a, b = starts[k], starts[k + 1]
                var[a:b] = V[a:b] if em is None else em.update_variances(V[a:b], I[a:b])
        return var, 1.0 / var

    def _grouped_groups_holding(self, rows: np.ndarray) -> GroupedObservations | None:
        """The suitable rows of the groups holding at least one of ``rows`` (a bool array over
        every dataset's suitable rows), with their current I, σ², weights and g, gathered for
        those rows alone (a large job's subset rounds: some 5 % of the rows); their ``row``
        numbers are suitable rows. None without the cached grouping (then
        :meth:`_grouped_suitable` and a subset serve) or if a row has unusable values."""
        cache = self._grouped_cache
        if cache is None:
            return None
        held = self._subset_held
        if held is not None and held.holding is not None and held.fits(self, cache) \
                and np.array_equal(held.holding, rows):
            # the subset rounds ask with the same minimisation subset: its groups' rows again
            return self._cached_subset(held.keep, hold=True)
        keep = _rows_of_groups_holding(cache, rows)
        subset = self._cached_subset(keep, hold=True)
        held = self._subset_held
        if held is not None and held.keep is keep:  # kept: remember which rows chose it
            self._subset_held = held._replace(holding=np.array(rows, dtype=bool))
        return subset

    #: :meth:`_cached_subset` keeps (``hold``) the layout of a subset of at most this fraction
    #: of the suitable rows for the next call with the same rows (the subset rounds: some 5 %)
    SUBSET_HELD_FRACTION = 0.25

    def _subset_layout(self, cache: GroupedObservations, keep: np.ndarray, hold: bool = False) -> _SubsetLayout:
        """What :meth:`_cached_subset` takes from the cached grouping for the rows ``keep``
        (their grouping, positions, table rows and the columns that do not change). With
        ``hold`` it is kept while the same rows are asked for (the subset rounds between an
        expansion and the intensity choice ask three times) and the grouping and suitable
        rows stay; a one-off subset (``hold`` False) leaves the kept one in place."""
        held = self._subset_held
        if held is not None and held.fits(self, cache) and (held.keep is keep or np.array_equal(held.keep, keep)):
            return held
        order, offsets = _kern.subset_grouping(cache.order, cache.offsets, keep, n_threads=self.n_threads)
        idx = np.flatnonzero(keep)  # positions among every dataset's suitable rows (the cache's)
        starts = self._suitable_starts()
        cuts = np.searchsorted(idx, starts)  # each dataset's part of idx
        table_rows = [ds.suitable_idx.take(idx[cuts[k]:cuts[k + 1]] - starts[k]) for k, ds in enumerate(self.datasets)]
        layout = _SubsetLayout(
            cache.order, [ds.suitable for ds in self.datasets], keep, None, order, offsets, idx, cuts, table_rows,
            take_rows(cache.asu_hkl, idx), cache.dataset.take(idx), cache.row.take(idx),
            {k: np.take(v, idx, axis=0) for k, v in cache.extra.items()}, {})
        if hold and idx.size <= self.SUBSET_HELD_FRACTION * cache.size:
            for a in (order, offsets, idx, cuts, *table_rows, layout.asu_hkl, layout.dataset, layout.row,
                      *layout.extra.values()):
                a.setflags(write=False)  # shared by the subsets made from it
            self._subset_held = layout
        return layout

    def _cached_subset(self, keep: np.ndarray, hold: bool = False) -> GroupedObservations | None:
        """The rows ``keep`` (bool over every dataset's suitable rows, in the cached grouping's
        order) of the cached grouping, without a new sort, and their current I, σ², weights and
        g gathered for them alone; ``row`` numbers suitable rows. None if a row has unusable
        values (the caller's fresh grouping then raises as it should). ``hold``: keep the
        subset's layout for the next call with the same rows (:meth:`_subset_layout`)."""
        cache = self._grouped_cache
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (cache.size,):
            raise ValueError(f"keep must be a bool array of length {cache.size}")
        layout = self._subset_layout(cache, keep, hold)
        idx, cuts = layout.idx, layout.cuts
        # I and σ² from the arrays suitable_values keeps (they change with the intensity
        # choice only), g (new after every expansion) gathered from the tables for these rows
        I = self._gather(self.suitable_values("intensity"), idx)
        V = self._gather(self.suitable_values("variance"), idx)
        g = np.empty(idx.size)
        for k, ds in enumerate(self.datasets):
            a, b = cuts[k], cuts[k + 1]
            self._gather(np.asarray(ds.table["inverse_scale_factor"], dtype=np.float64), layout.table_rows[k],
                         out=g[a:b])
            em = self._error_model_for(ds)
            if em is not None:
                V[a:b] = em.update_variances(V[a:b], I[a:b])
        if not (np.all(V > 0) and np.all(np.isfinite(I)) and np.all(np.isfinite(g))):
            return None
        return replace(cache, intensity=I, variance=V, weight=1.0 / V, scale=g, asu_hkl=layout.asu_hkl,
                       dataset=layout.dataset, row=layout.row, order=layout.order, offsets=layout.offsets,
                       extra=dict(layout.extra), derived=layout.derived)

    def _group_every_suitable_row(self) -> GroupedObservations | None:
        """The first grouping of every suitable row (what :meth:`_grouped_suitable` caches),
        made with the values gathered straight into the arrays :meth:`suitable_values` keeps
        (no per-dataset copies to concatenate; the job's next readers find them gathered).
        With several threads the values are gathered and checked on the scaler's pool while
        this thread maps the Miller indices to the ASU and sorts them (independent work).
        None if a row has unusable values or a column is missing: the caller's
        :meth:`GroupedObservations.from_tables` then raises as it should."""
        if any(name not in ds.table for ds in self.datasets for name in ("miller_index", "d")):
            return None
        # each dataset's suitable rows (and their starts) found here, before both threads read them
        starts = self._suitable_starts()

        def values() -> tuple[np.ndarray, ...] | None:
            I = self.suitable_values("intensity")
            g = self.suitable_values("inverse_scale_factor", 1.0)
            if not (self._all_finite("intensity", I) and self._all_finite("inverse_scale_factor", g)):
                return None
            V, w = self._suitable_variances_and_weights(I)
            # from_tables' checks: σ² finite and positive
            if not (np.all(np.isfinite(V)) and np.all(V > 0)):
                return None
            return I, V, w, g, self.suitable_values("d")

        from concurrent.futures import wait  # noqa: PLC0415

        pending = self._thread_pool().submit(values) if self.n_threads > 1 else None
        try:
            hkl = np.empty((int(starts[-1]), 3), dtype=np.int32)
            for k, ds in enumerate(self.datasets):
                table_hkl = np.asarray(ds.table["miller_index"], dtype=np.int32).reshape(-1, 3)
                np.take(table_hkl, ds.suitable_idx, axis=0, out=hkl[starts[k]:starts[k + 1]], mode="clip")
            grouping, group_of_row = asu_grouping_and_groups(hkl, self.space_group, bool(self._params.anomalous),
                                                             n_threads=self.n_threads, copy=False)
        except ValueError:
            grouping = None  # (bad indices) from_tables raises, after its checks of the values
        finally:
            if pending is not None:  # (also when this thread failed: the pool's work reads the scaler)
                wait([pending])
        gathered = values() if pending is None else pending.result()
        if gathered is None or grouping is None:
            return None
        I, V, w, g, d = gathered
        _, dataset, row = self._suitable_layout()  # (made by suitable_values)
        grouped = GroupedObservations(I, V, w, g, grouping.asu_hkl, dataset, row, grouping.order, grouping.offsets,
                                      len(self.datasets), self.space_group, {"d": d})
        if group_of_row is not None:  # the sort's: what group_of_row() would compute again
            grouped.derived_of_grouping("group_of_row", lambda: group_of_row)
        return grouped

    def _grouped_suitable(self, keep: Sequence[np.ndarray] | None = None) -> GroupedObservations:
        """The suitable rows of every dataset (or ``keep`` of them), current g and weights.

        The suitable rows never change, so their grouping (ASU mapping and sort) is made once
        and later calls only refresh I, σ², the weights and g."""
        if keep is not None and all(np.all(k) for k in keep):
            keep = None  # every suitable row: the cached grouping serves
        if keep is not None and self._grouped_cache is not None:
            # the kept rows of the cached grouping (what grouping them afresh gives), their
            # rows numbered within each dataset's kept rows as a fresh grouping numbers them
            masks = [np.asarray(k, dtype=bool) for k in keep]
            sub = self._cached_subset(np.concatenate(masks))
            if sub is not None:
                kept_before = [np.cumsum(m) - 1 for m in masks]  # a suitable row's kept number
                row = np.empty_like(sub.row)
                for k, numbers in enumerate(kept_before):
                    mine = sub.dataset == k
                    row[mine] = numbers.take(sub.row[mine])
                return replace(sub, row=row)
        if keep is None and self._grouped_cache is None:
            grouped = self._group_every_suitable_row()
            if grouped is not None:
                self._grouped_cache = grouped
                return grouped
        if keep is None and self._grouped_cache is not None:
            # the columns as suitable_values keeps them (gathered once per column), σ² through
            # the error models
            I = self.suitable_values("intensity")
            g = self.suitable_values("inverse_scale_factor")
            if self._all_finite("intensity", I) and self._all_finite("inverse_scale_factor", g):
                V, w = self._suitable_variances_and_weights(I)
                if np.all(V > 0):
                    return replace(self._grouped_cache, intensity=I, variance=V, weight=w, scale=g)
        tables = []
        for k, ds in enumerate(self.datasets):
            suitable_hkl = take_rows(np.asarray(ds.table["miller_index"]).reshape(-1, 3), ds.suitable)
            cols = {"intensity": ds.column("intensity"), "variance": self._variances(ds),
                    "inverse_scale_factor": ds.column("inverse_scale_factor"), "miller_index": suitable_hkl,
                    "d": ds.column("d")}
            if keep is not None:  # (every suitable row: the columns as they are, no copy)
                rows = np.asarray(keep[k], dtype=bool)
                cols = {name: take_rows(v, rows) for name, v in cols.items()}
            tables.append(cols)
        grouped = GroupedObservations.from_tables(
            tables, self.space_group, anomalous=bool(self._params.anomalous),
            selections=[np.ones(t["intensity"].size, bool) for t in tables], extra_columns=("d",),
            n_threads=self.n_threads)
        if keep is None:
            self._grouped_cache = grouped
        return grouped

    # ------------------------------------------------------------------ minimisation table
    def make_ready_for_scaling(self, outlier: bool = True) -> None:
        """Build the minimisation Ih table from the selected, non-outlier suitable rows."""
        from ..fit import IhTable
        from ..fit.ih_table import _RowSource

        t0 = time.perf_counter()
        tables, indices, group_index, sources = [], [], [], []
        cached = self._grouped_cache  # every suitable row, mapped to the ASU and grouped
        if cached is not None:
            group_of_row = cached.group_of_row()
            # the cache holds each dataset's suitable rows in order, dataset after dataset
            starts = self._suitable_starts()

            def source(k: int) -> tuple[_RowSource, np.ndarray]:
                # nothing gathered here: each block reads its rows' columns straight from the
                # reflection table (through suitable_idx[idx]) and their ASU indices (on first
                # use) from the cache; the rows' groups from the cache's grouping
                ds = self.datasets[k]
                idx = np.flatnonzero(self._minimisation_selection(ds, outlier))
                names = ("intensity", "variance", "inverse_scale_factor")
                columns = {name: np.asarray(ds.table[name], dtype=np.float64) for name in names}
                rows = starts[k] + idx
                return (_RowSource(columns, idx.size, ds.suitable_idx.take(idx), idx, cached.asu_hkl, rows, None),
                        group_of_row.take(rows))

            # the datasets' row selections are their own (numpy's gathers release the GIL)
            for src, groups in self._map_datasets(source, range(len(self.datasets))):
                sources.append(src)
                group_index.append(groups)
        else:
            for ds in self.datasets:
                tables.append({"intensity": ds.column("intensity"), "variance": ds.column("variance"),
                               "inverse_scale_factor": ds.column("inverse_scale_factor"),
                               "miller_index": take_rows(np.asarray(ds.table["miller_index"]).reshape(-1, 3),
                                                         ds.suitable)})
                indices.append(np.flatnonzero(self._minimisation_selection(ds, outlier)))
        so = self._params.scaling_options
        pct = float(so.free_set_percentage) if so.use_free_set else 0.0
        self._update_keys = {}
        # A large table is cut into blocks of whole groups that the engine evaluates and
        # consumes one after another (stream_derivatives): one block's ∂g/∂p in memory at a time.
        n_rows = sum(src.n_selected for src in sources) + sum(i.size for i in indices)
        self.stream_derivatives = n_rows > STREAM_MIN_ROWS
        nblocks = -(-n_rows // self._stream_block_rows()) if self.stream_derivatives else 1
        if cached is not None:
            self.Ih_table = IhTable._from_sources(sources, self.space_group, group_index, nblocks=nblocks,
                                                  free_set_percentage=pct, free_set_offset=int(so.free_set_offset),
                                                  anomalous=bool(self._params.anomalous), mapper=self._map_datasets)
        else:
            self.Ih_table = IhTable(tables, self.space_group, indices_lists=indices or None, nblocks=nblocks,
                                    free_set_percentage=pct, free_set_offset=int(so.free_set_offset),
                                    anomalous=bool(self._params.anomalous), mapper=self._map_datasets)
        free = self.Ih_table.extract_free_set() if pct > 0 else None
        # the free groups' ASU indices, for work/free statistics after scaling
        self.free_asu_hkl = None if free is None else np.unique(np.asarray(free.asu_miller_index), axis=0)
        # block selections are rows of the table given to the Ih table (here: suitable rows)
        selections = [self.Ih_table.get_block_selections_for_dataset(k) for k in range(len(self.datasets))]

        def give_blocks(k: int, comp: Any) -> None:
            comp.update_reflection_data(block_selections=selections[k])
            prepare = getattr(comp, "prepare_model_terms", None)
            if prepare is not None:
                prepare()  # the blocks' C++ terms now, not one by one in the minimisation

        # One pass over the threads: every component's blocks of data and C++ terms (each
        # component is independent of the others: one task each, so a few datasets' still
        # spread over the threads; the longest tasks first), then every block's error-model
        # weights and table-order arrays (each block's own). Their kernels release the GIL.
        weigh = self._block_weigher(table_order=True)
        tasks = [partial(give_blocks, k, comp) for k, ds in enumerate(self.datasets)
                 for comp in ds.model.components.values()]
        tasks += [partial(weigh, b) for b in range(len(self.Ih_table.blocked_data_list))]
        self._map_datasets(_run, tasks)
        self._components_hold_minimisation_blocks = True
        self._tick("prepare minimisation", t0)

    @staticmethod
    def _minimisation_selection(ds: Dataset, outlier: bool) -> np.ndarray:
        """The dataset's suitable rows the minimisation table takes (bool over its suitable
        rows): its minimisation subset (every row without one), less its outliers with
        ``outlier``."""
        sel = np.ones(ds.suitable_idx.size, bool) if ds.minimisation is None else ds.minimisation.copy()
        if outlier and ds.outliers.size:
            sel &= ~ds.outliers
        return sel

    def apply_error_model_weights(self) -> None:
        """The minimisation table's weights from each dataset's error model (if any)."""
        if any(self._error_model_for(ds) is not None for ds in self.datasets):
            # each block's weights are its own (numpy's arithmetic releases the GIL)
            self._map_datasets(self._block_weigher(), range(len(self.Ih_table.blocked_data_list)))

    def _block_weigher(self, table_order: bool = False) -> Callable[[int], None]:
        """``weigh(b)``: give block ``b`` of the minimisation table its datasets' error-model
        weights (where they have one); with ``table_order`` then, for a work block, its
        table-order I and w (``IhTableBlock.table_arrays``, kept by the block until its weights
        change), which a fit reads at its first pass over the blocks on one core."""
        models = [self._error_model_for(ds) for ds in self.datasets]
        blocks, n_work = self.Ih_table.blocked_data_list, self.Ih_table.n_work_blocks

        def weigh(b: int) -> None:
            for k, em in enumerate(models):
                if em is not None:
                    blocks[b].update_weights(em, dataset_id=k)
            if table_order and b < n_work:
                blocks[b].table_arrays()

        return weigh

    def get_blocks_for_minimisation(self) -> list[Any]:
        return self.Ih_table.blocked_data_list[: self.Ih_table.n_work_blocks]

    def update_for_minimisation(self, apm: Any, block_id: int, derivatives: bool = True,
                                check_scales: bool = False) -> None:
        """g and ∂g/∂p of every dataset on a block (dataset rows in order), then Ĩ.
        ``derivatives=False``: a caller that needs only g and Ĩ (residuals) is served without
        an evaluation when they are current (after :meth:`release_block_derivatives`).
        ``check_scales`` (with ``derivatives=False``): raise
        :class:`~xtalscale.fit.NonFiniteScales` at the first dataset whose g is not finite and
        > 0, before the later datasets and Ĩ are evaluated (a line search's rejected trial
        point); the block is then left to be evaluated afresh by the next call."""
        from ..fit.target import StackedDerivatives

        block = self.Ih_table.blocked_data_list[block_id]
        # The engine asks again for the same parameters (set_x, then each evaluation): the
        # block's g and dg/dp are still right for them, even if the target consumed (freed) the
        # derivatives, which are then handed back from this cache instead of recomputed.
        key = (id(apm), np.asarray(apm.get_param_vals(), dtype=np.float64).tobytes())
        cached = self._update_keys.get(block_id)
        if cached is not None and cached[0] == key and (cached[1] is not None or not derivatives):
            if block.derivatives is None:
                block.derivatives = cached[1]
            return
        plan = self._block_plan(apm, block_id)
        apms = plan.managers
        if not derivatives:  # g only (the same product as with derivatives, bit for bit)
            try:
                g_all = plan.scales(block_id, self.n_threads, check_scales)
            except ArithmeticError:
                self._update_keys.pop(block_id, None)  # g and Ĩ on the block are not this point's
                raise
            block.inverse_scale_factors = g_all
            block.derivatives = None
            self._update_keys[block_id] = (key, None)
            block.calc_Ih()
            return
        n_total = int(sum(a.n_active_params for a in apms))
        scales, pieces, row_starts, col_offsets, start, row_offset = [], [], [], [], 0, 0
        # views of the model blocks' buffers (no copy): the target consumes them before the
        # next evaluation, and the cache below is replaced by that evaluation. Each model
        # block spreads its own row chunks over n_threads C++ threads (balanced whatever the
        # number of datasets; the results do not depend on the thread count).
        evaluated = plan.scales_and_derivatives(block_id, self.n_threads)
        for a, (g, d) in zip(apms, evaluated):
            if not d.shape[1]:
                d = CsrView(np.zeros(0), np.zeros(0, np.int32), np.zeros(len(g) + 1, np.int64), (len(g), 0))
                d.verified_pattern = True  # empty: nothing to scan
            elif not isinstance(d, CsrView) and not (is_scipy_sparse(d) and d.format == "csr"):
                d = sp.csr_matrix(d)
            scales.append(np.asarray(g, dtype=np.float64))
            pieces.append(d)
            row_starts.append(row_offset)
            col_offsets.append(start)
            row_offset += len(g)
            start += a.n_active_params
        g_all = scales[0] if len(scales) == 1 else np.concatenate(scales)
        block.inverse_scale_factors = g_all
        # each dataset's columns start after the previous datasets' (block-diagonal): the
        # pieces go to the kernels as they are, never concatenated
        block.derivatives = pieces[0] if len(pieces) == 1 else StackedDerivatives(
            pieces, row_starts, col_offsets, n_total)
        self._update_keys[block_id] = (key, block.derivatives)
        block.calc_Ih()

    @staticmethod
    def can_transpose_product(apm: Any) -> bool:
        """True when every dataset's manager has a C++ model block (two or more active
        components) or no active parameter: :meth:`transpose_product` then serves it."""
        return all(len(a.components) >= 2 or not a.n_active_params for a in single_managers(apm))

    def transpose_product(self, apm: Any, block_id: int, coefficients: np.ndarray) -> np.ndarray:
        """``(∂g/∂p)ᵀ·c`` of a block without forming ``∂g/∂p`` (:meth:`update_for_minimisation`'s
        matrix: the datasets' rows stacked and their columns side by side), each dataset's
        model block evaluated for it (its row chunks on n_threads threads). Needs
        :meth:`can_transpose_product`. With ``c = ∂f/∂g`` this is the target's gradient."""
        coefficients = np.asarray(coefficients, dtype=np.float64)
        return self._block_plan(apm, block_id).transpose_product(block_id, coefficients, self.n_threads)

    def table_models(self, apm: Any, block_id: int) -> list[tuple[Any, ...]] | None:
        """Block ``block_id``'s datasets as C++ model blocks over its table rows, for a normal-
        equations build that evaluates them itself (``_core.fit.model_normal_equations``, no
        ∂g/∂p formed); None when a dataset has no such block (:meth:`_BlockPlan.table_models`).
        The caller hands the g and Ĩ it evaluated back through :meth:`take_block_scales`."""
        models = self._block_plan(apm, block_id).table_models(self.Ih_table.blocked_data_list[block_id])
        self._models_evaluate_rows = models is not None
        return models

    def _stream_block_rows(self) -> int:
        """Rows per streamed block (and per chunk of the expansion's rows outside the table):
        FUSED_BLOCK_ROWS once a minimisation evaluated every dataset's model row by row in C++
        (:meth:`table_models`), else STREAM_BLOCK_ROWS (∂g/∂p formed per block)."""
        return FUSED_BLOCK_ROWS if self._models_evaluate_rows else STREAM_BLOCK_ROWS

    def take_block_scales(self, apm: Any, block_id: int, g: np.ndarray, Ih: np.ndarray | None) -> None:  # noqa: N803
        """Store g and Ĩ (block row order; Ĩ None: recomputed from g) that a caller evaluated
        at ``apm``'s current parameters: the block is then as :meth:`update_for_minimisation`
        with ``derivatives=False`` leaves it (g and Ĩ current, no ∂g/∂p)."""
        block = self.Ih_table.blocked_data_list[block_id]
        block.inverse_scale_factors = g
        block.derivatives = None
        if Ih is None:
            block.calc_Ih()
        else:
            block.Ih_table["Ih_values"] = Ih
        key = (id(apm), np.asarray(apm.get_param_vals(), dtype=np.float64).tobytes())
        self._update_keys[block_id] = (key, None)

    def _block_plan(self, apm: Any, block_id: int) -> _BlockPlan:
        """The evaluation plan of ``apm`` on block ``block_id``: while a round's minimiser runs
        (:meth:`perform_scaling`) the round's, kept for its later calls; otherwise one made for
        this call (the model blocks found and checked afresh, as a DIALS-style script calling
        :meth:`update_for_minimisation` needs).

        Within a round nothing replaces the components' data, terms or parameter layout, so
        the per-dataset model blocks found (and checked) at the round's first evaluation serve
        every later one: at 60 datasets the per-call look-ups and checks (each smoother's
        settings read back from Python) cost more than the C++ evaluations they guard."""
        plans = self._plans
        if plans is None:
            return _BlockPlan(apm, block_id, self.n_threads)
        key = (id(apm), block_id)
        plan = plans.get(key)
        if plan is None or plan.apm is not apm:
            plan = plans[key] = _BlockPlan(apm, block_id, self.n_threads)
        return plan

    def release_block_derivatives(self, apm: Any, block_id: int) -> None:
        """Drop a block's ∂g/∂p after use and free the model blocks' value buffers (its g and Ĩ
        stay current): with :attr:`stream_derivatives` the engine consumes one block at a time,
        so one block's derivatives are alive at once and the allocator reuses their memory."""
        from ..parameter_managers import release_refiner_values

        self.Ih_table.blocked_data_list[block_id].derivatives = None
        cached = self._update_keys.get(block_id)
        if cached is not None:
            self._update_keys[block_id] = (cached[0], None)
        for a in single_managers(apm):
            release_refiner_values(a, block_id, pattern=STREAM_RELEASE_PATTERN)

    def _map_datasets(self, function: Any, items: Sequence[Any]) -> list[Any]:
        """``[function(item) for item in items]``, on up to ``n_threads`` threads when there
        are several items (for per-dataset work whose heavy part is C++ that releases the GIL).
        The threads are the scaler's own pool, started once: a streamed round maps hundreds of
        small per-block calls, and starting threads for each cost ~0.4 s at 10⁶ observations."""
        if self.n_threads <= 1 or len(items) <= 1:
            return [function(item) for item in items]
        return list(self._thread_pool().map(function, items))

    #: the names of the scaler's pool threads start so (see _kernel_threads)
    POOL_THREAD_PREFIX = "xtalscale-scaler"

    def _thread_pool(self) -> Any:
        pool = getattr(self, "_pool", None)
        if pool is None:
            import weakref
            from concurrent.futures import ThreadPoolExecutor

            pool = self._pool = ThreadPoolExecutor(max_workers=self.n_threads,
                                                   thread_name_prefix=self.POOL_THREAD_PREFIX)
            weakref.finalize(self, pool.shutdown, wait=False)  # idle threads end with the scaler
        return pool

    def shutdown_threads(self) -> None:
        """Stop the scaler's worker threads (started again if needed)."""
        pool = getattr(self, "_pool", None)
        if pool is not None:
            self._pool = None
            pool.shutdown(wait=True)

    # ------------------------------------------------------------------ scaling
    def _refinement_steps(self) -> list[list[list[str]]]:
        """Per step, the component names refined for each dataset."""
        order = self._params.refinement.refinement_order
        if order == "concurrent":
            return [[[n for n in ds.model.components if n not in ds.model.fixed_components]
                     for ds in self.datasets]]
        orders = [ds.model.consecutive_refinement_order for ds in self.datasets]
        n_steps = max(len(o) for o in orders)
        return [[[n for n in (o[i] if i < len(o) else []) if n in ds.model.components
                  and n not in ds.model.fixed_components] for o, ds in zip(orders, self.datasets)]
                for i in range(n_steps)]

    def perform_scaling(self, engine: str | None = None, max_iterations: int | None = None,
                        tolerance: float | None = None, var_cov: bool = True) -> None:
        """One round of minimisation over the minimisation table. ``var_cov=False``: the round
        leaves the datasets' var-cov matrices as they are (for a round a later full-matrix
        round follows, which sets them)."""
        from ..fit import ScalingTarget, scaling_refinery
        from ..parameter_managers import (
            multi_active_parameter_manager,
            scaling_active_parameter_manager,
        )

        t0 = time.perf_counter()
        ref_params = self._params.refinement
        engine = engine or ref_params.engine
        if max_iterations is None:
            max_iterations = ref_params.max_iterations
        for selection in self._refinement_steps():
            if not any(selection):
                continue
            target = ScalingTarget()
            # the fixed (or not-this-step) components enter g as constant factors
            apm = multi_active_parameter_manager(target, [ds.model.components for ds in self.datasets],
                                                 selection, apm_class=scaling_active_parameter_manager)
            if apm.n_active_params == 0:
                continue
            chosen = _engine_for(engine, apm.n_active_params)
            refinery = scaling_refinery(chosen, self, target, apm, max_iterations)
            refinery.n_threads = self.n_threads
            if chosen != engine:  # L-BFGS standing in for the dense matrix: more history
                from ..fit.refiner import SUBSTITUTE_LBFGS_HISTORY

                refinery.lbfgs_history = SUBSTITUTE_LBFGS_HISTORY
                refinery.lbfgs_blocks = True
            refinery.want_var_cov = bool(var_cov)
            # large tables: a normal-matrix build costs ~3 f+g passes, so near the optimum
            # LevMar first tries the previous matrix with a new gradient
            refinery.reuse_matrix = self.Ih_table.size >= REUSE_MATRIX_MIN_ROWS
            refinery.set_tolerance(float(tolerance if tolerance is not None else ref_params.rmsd_tolerance))
            self._plans = {}  # the round's evaluation plans (see _block_plan)
            try:
                journal = refinery.run()
            finally:
                self._plans = None
            journal.round_engine = engine
            self.journals.append(journal)
            round_var_cov = refinery.get_var_cov()
            if round_var_cov is not None:
                self._store_var_cov(apm, np.asarray(round_var_cov))
            self._release_derivatives()
        self._tick("minimisation", t0)

    def _release_derivatives(self) -> None:
        """Free the cached ∂g/∂p after a round (the largest per-observation array)."""
        self._update_keys = {}
        for block in self.Ih_table.blocked_data_list:
            block.derivatives = None

    def _store_var_cov(self, apm: Any, var_cov: np.ndarray) -> None:
        """Keep each dataset's diagonal block (cross-dataset terms are dropped, as DIALS)."""
        apms = single_managers(apm)
        start = 0
        for ds, a in zip(self.datasets, apms):
            n = a.n_active_params
            # the layout of the active parameters, not the manager itself: the manager keeps
            # its model blocks (the derivative buffers, ~0.4 GB at 10⁶ observations) alive
            layout = {name: {"start_idx": int(info["start_idx"]), "end_idx": int(info["end_idx"])}
                      for name, info in getattr(a, "components", {}).items()}
            ds.var_cov = (var_cov[start:start + n, start:start + n], layout)
            start += n

    def fix_initial_parameter(self) -> bool:
        fixed = False
        for ds in self.datasets:
            fixed |= bool(ds.model.fix_initial_parameter(self._params))
        return fixed

    # ------------------------------------------------------------------ expansion
    def _all_row_scales(self, components: Mapping[str, Any], n_rows: int) -> np.ndarray:
        """g of every suitable row of a dataset (scales only): each component set up on all
        rows and evaluated, then their product in component order (:func:`_scales_product`'s
        products, the same bits). A job of one dataset has no other dataset to put on the
        second thread, so its components go concurrently on the scaler's pool (each holds its
        own data; their set-up and evaluation are C++ that releases the GIL)."""
        def scales_of(comp: Any) -> np.ndarray:
            _update_all_rows(comp, scales_only=True)
            return np.asarray(comp.calculate_scales(0), dtype=np.float64)

        items = list(components.values())
        # (several datasets are already mapped over the pool, one per task: not nested)
        scales = self._map_datasets(scales_of, items) if len(self.datasets) == 1 else [
            scales_of(comp) for comp in items]
        g = np.ones(n_rows)
        for s in scales:  # in component order, in place: _scales_product's arithmetic
            g *= s
        return g

    def expand_scales_to_all_reflections(self, caller: Any = None, calc_cov: bool = False,
                                         minimisation_rows_only: bool = False) -> None:
        """g (and, with ``calc_cov``, its variance) for every suitable row of every dataset.

        ``minimisation_rows_only``: g of each dataset's minimisation subset rows only
        (``Dataset.minimisation``; every row where there is none), the other rows' g left as
        they are. For the rounds of a large job that read g only there (see
        :func:`~xtalscale.job.algorithm.scaling_algorithm`)."""
        t0 = time.perf_counter()
        if minimisation_rows_only and not calc_cov and all(ds.minimisation is not None for ds in self.datasets):
            self._map_datasets(lambda k: self._expand_on_minimisation_rows(self.datasets[k]),
                               range(len(self.datasets)))
            self._components_hold_minimisation_blocks = False
            self._tick("expansion", t0)
            return

        def blocks_into(ds: Dataset, blocks: list[np.ndarray], g: np.ndarray, var: np.ndarray) -> bool:
            """g and var g on the components' current data blocks (rows ``blocks``), written to
            those rows of ``g`` and ``var``: each block's from one evaluation of its model block
            (g is the product of the component scales in the same order, bit for bit), all
            blocks in one C++ call. False (g alone) when no active parameter has a variance."""
            from ..parameter_managers import calc_sf_variances_into

            V = self._full_var_cov(ds)
            if V is None:
                for b, rows in enumerate(blocks):
                    if rows.size:
                        g[rows] = _scales_product(ds.model.components, b, rows.size)
                return False
            calc_sf_variances_into(ds.model.components, V, blocks, var, g, n_threads=self.n_threads)
            return True

        def holds_minimisation_blocks(ds: Dataset, blocks: list[np.ndarray]) -> bool:
            """Whether the components still hold the data of the minimisation table's blocks
            (set by make_ready_for_scaling, not replaced since)."""
            if self.Ih_table is None or not self._components_hold_minimisation_blocks:
                return False
            sizes = [int(b.size) for b in blocks]
            return all(list(getattr(comp, "n_refl", [])) == sizes for comp in ds.model.components.values())

        def scales_and_variances(k: int, ds: Dataset) -> tuple[np.ndarray, np.ndarray | None]:
            """One dataset's g (and var g) on its suitable rows: its own model only. With
            variances the rows go in blocks: each block's ∂g/∂p (a model block, ~0.5 kB/row) is
            built, reduced to diag(J V Jᵀ) and freed, so the memory is reused instead of
            touching ~0.5 GB of fresh pages at 10⁶ rows. The blocks are first those of the last
            minimisation table, whose model data the components still hold (no set-up again:
            at 10⁶ rows the harmonics and smoother weights cost 60-80 ms), then chunks of the
            rows it did not hold (outliers, the free set)."""
            with_var = calc_cov and ds.var_cov is not None
            comps = ds.model.components
            n = int(ds.suitable.sum())
            if not with_var:
                return self._all_row_scales(comps, n), None
            if n <= STREAM_MIN_ROWS:
                for comp in comps.values():
                    _update_all_rows(comp, scales_only=False)
                return _scales_product(comps, 0, n), self._scale_variances(ds)
            g, var = np.empty(n), np.empty(n)
            rest = np.arange(n, dtype=np.int64)
            has_var = True
            held = self.Ih_table.get_block_selections_for_dataset(k) if self.Ih_table is not None else []
            if holds_minimisation_blocks(ds, held):
                has_var = blocks_into(ds, held, g, var)
                covered = np.zeros(n, dtype=bool)
                for rows in held:
                    covered[rows] = True
                rest = np.flatnonzero(~covered)
            step = self._stream_block_rows()
            chunks = [rest[a:a + step] for a in range(0, rest.size, step)]
            if chunks:
                for comp in comps.values():
                    comp.update_reflection_data(block_selections=chunks)
                has_var = blocks_into(ds, chunks, g, var) and has_var
            return g, var if has_var else None

        # the datasets are independent: concurrently with n_threads > 1 (tables written here),
        # except with variances, whose chunked C++ reduction takes the threads itself
        results = ([scales_and_variances(k, ds) for k, ds in enumerate(self.datasets)] if calc_cov
                   else self._map_datasets(lambda k: scales_and_variances(k, self.datasets[k]),
                                           range(len(self.datasets))))
        self._components_hold_minimisation_blocks = False
        for ds, (g, var) in zip(self.datasets, results):
            full = np.asarray(ds.table["inverse_scale_factor"], dtype=np.float64).copy()
            full[ds.suitable] = g
            ds.table["inverse_scale_factor"] = fa.double(full)
            if var is not None:
                out = np.zeros(len(ds.table))
                out[ds.suitable] = var
                ds.table["inverse_scale_factor_variance"] = fa.double(out)
        self._tick("expansion", t0)

    @staticmethod
    def _expand_on_minimisation_rows(ds: Dataset) -> None:
        """g of the dataset's minimisation subset rows written into its table (the model's
        data set to those rows only)."""
        rows = np.flatnonzero(ds.minimisation)
        comps = ds.model.components
        for comp in comps.values():
            comp.update_reflection_data(block_selections=[rows])
        full = np.asarray(ds.table["inverse_scale_factor"], dtype=np.float64).copy()
        full[ds.suitable_idx[rows]] = _scales_product(comps, 0, rows.size)
        ds.table["inverse_scale_factor"] = fa.double(full)

    @staticmethod
    def _full_var_cov(ds: Dataset) -> np.ndarray | None:
        """The dataset's var-cov of its active parameters embedded in the full parameter layout
        of its model (zero elsewhere), as calc_sf_variances expects; None when no active
        parameter has a variance."""
        V_active, active = ds.var_cov
        comps = ds.model.components
        n_full = int(sum(int(c.n_params) for c in comps.values()))
        # An active component's free parameters (a fixed-first smoother has n - 1) fill the
        # first columns of its block of the full layout, as calc_sf_variances expects.
        full_idx, active_idx, start = [], [], 0
        for name, comp in comps.items():
            if name in active:
                info = active[name]
                n_free = int(info["end_idx"] - info["start_idx"])
                full_idx.extend(range(start, start + n_free))
                active_idx.extend(range(int(info["start_idx"]), int(info["end_idx"])))
            start += int(comp.n_params)
        if not active_idx or max(active_idx) >= V_active.shape[0]:
            return None
        V = np.zeros((n_full, n_full))
        V[np.ix_(full_idx, full_idx)] = V_active[np.ix_(active_idx, active_idx)]
        return V

    @classmethod
    def _scale_variances(cls, ds: Dataset) -> np.ndarray | None:
        """diag(J V Jᵀ) on the components' data (block 0), with V embedded in the full parameter
        layout of the model; None when no active parameter has a variance."""
        from ..parameter_managers import calc_sf_variances as _calc

        V = cls._full_var_cov(ds)
        if V is None:
            return None
        return np.asarray(_calc(ds.model.components, V), dtype=np.float64)

    # ------------------------------------------------------------------ outliers
    def round_of_outlier_rejection(self, minimisation_groups_only: bool = False) -> None:
        """Replace each dataset's outliers by a fresh rejection on all suitable rows.

        ``minimisation_groups_only``: the standard method tests only the groups holding a row
        of the minimisation subset (``Dataset.minimisation``); rows of other groups get no flag.
        The method works on each group alone, so every subset row gets the flag a rejection of
        all groups would give it. For the round before the first minimisation, whose flags
        only that minimisation reads (the next round replaces them all): at 10⁶ unscaled
        observations, a third of them outliers, the whole rejection took 0.1 s."""
        t0 = time.perf_counter()
        so = self._params.scaling_options
        method = so.outlier_rejection
        if method is None:
            if not self._error_model_configured():
                self._drop_suitable_values()  # (g handed over by an expansion)
            return
        if minimisation_groups_only and method == "standard" and all(ds.minimisation is not None
                                                                     for ds in self.datasets):
            # the subset groups' rows alone (their own copy): the rejection and the Wilson
            # test (its resolution bins' means too) on them
            in_subset = np.concatenate([ds.minimisation for ds in self.datasets])
            grouped = self._grouped_groups_holding(in_subset)
            if grouped is None:
                grouped = self._grouped_suitable()
                grouped = grouped.subset(_rows_of_groups_holding(grouped, in_subset))
        else:
            self._subset_held = None  # the subset rounds are over
            grouped = self._grouped_suitable()
        rows = determine_outlier_rows(grouped, method, float(so.outlier_zmax), n_threads=self.n_threads)
        per_dataset = grouped.rows_per_dataset(rows)
        if so.emax:
            esq = determine_Esq_outlier_index_arrays(grouped, self.datasets[0].experiment, float(so.emax),
                                                     n_threads=self.n_threads)
        else:
            esq = [np.zeros(0, np.int64)] * len(self.datasets)
        for ds, out, e in zip(self.datasets, per_dataset, esq):
            mask = np.zeros(ds.suitable_idx.size, dtype=bool)
            mask[out] = True
            mask[e] = True
            ds.outliers = mask
        if not self._error_model_configured():
            self._drop_suitable_values()  # no error model reads them next
        self._tick("outlier rejection", t0)

    def _error_model_configured(self) -> bool:
        weighting = getattr(self._params, "weighting", None)
        return getattr(getattr(weighting, "error_model", None), "error_model", None) is not None

    # ------------------------------------------------------------------ error model
    def perform_error_optimisation(self, update_Ih: bool = True) -> None:
        """Refine the basic error model(s) on the current scales (spec §8.6)."""
        from .error_model import refine_error_models

        t0 = time.perf_counter()
        try:
            refine_error_models(self)
        finally:
            self._drop_suitable_values()  # (a minimisation or the output follows)
        self._tick("error model", t0)

    # ------------------------------------------------------------------ intensity combination
    def combine_intensities(self) -> None:
        """Choose the profile/summation combination with the lowest Rmeas (spec §8.5)."""
        from .combine_intensities import combine_scaler_intensities

        t0 = time.perf_counter()
        combine_scaler_intensities(self)
        self._tick("intensity combination", t0)

    # ------------------------------------------------------------------ output
    def prepare_reflection_tables_for_output(self) -> None:
        """Final variances, flags and the ``intensity.scale.*`` columns (spec §8.8)."""
        for ds in self.datasets:
            t = ds.table
            n = len(t)
            var = np.asarray(t["variance"], dtype=np.float64).copy()
            inten = np.asarray(t["intensity"], dtype=np.float64)
            em = self._error_model_for(ds)
            if em is not None:
                var = np.asarray(em.update_variances(var, inten), dtype=np.float64)
            g = np.asarray(t["inverse_scale_factor"], dtype=np.float64)
            if "inverse_scale_factor_variance" in t:
                gv = np.asarray(t["inverse_scale_factor_variance"], dtype=np.float64)
                if np.any(gv != 0):
                    # var · (1 + sqrt(max(gv, 0)) / g), the fraction 0 where g <= 0, in one
                    # buffer (the same operations as with a temporary for each)
                    factor = np.maximum(gv, 0)
                    with np.errstate(divide="ignore", invalid="ignore"):
                        np.sqrt(factor, out=factor)
                        np.divide(factor, g, out=factor)
                    factor[~(g > 0)] = 0.0
                    factor += 1.0
                    var = np.multiply(var, factor, out=factor)
            else:
                t["inverse_scale_factor_variance"] = fa.double(np.zeros(n))
            outl = np.zeros(n, dtype=bool)
            if ds.outliers.size:
                outl[ds.suitable] = ds.outliers
            t.assign_flags(outl, Flags.outlier_in_scaling)
            t["intensity.scale.value"] = fa.double(inten)
            t["intensity.scale.variance"] = fa.double(var)
            bad = np.asarray(t.get_flags(Flags.bad_for_scaling, all=False))
            t.assign_flags(~bad, Flags.scaled)

    def clear_Ih_table(self) -> None:
        self.Ih_table = None

    def release_grouping(self) -> None:
        """Drop the cached grouping of the suitable rows (rebuilt if asked for again)."""
        self._grouped_cache = None

    def suitable_asu_grouping(self, anomalous: bool) -> Any:
        """The ASU indices of every dataset's suitable rows (concatenated in dataset order) and
        their grouping (:func:`~xtalscale.job.grouped.asu_grouping`), made once per setting:
        the suitable rows never change, so later calls skip gathering and comparing 10⁶ Miller
        indices. The arrays are the grouping cache's own (read-only, shared)."""
        held = self._asu_groupings.get(anomalous)
        cache = self._grouped_cache
        if held is None and cache is not None and cache.order.size == int(self._suitable_starts()[-1]):
            # the cached grouping of every suitable row came from asu_grouping of these same
            # indices: that cache entry's, without gathering and comparing 10⁶ indices again
            from .grouped import cached_asu_grouping_of

            held = cached_asu_grouping_of(cache.order, anomalous)
            if held is not None:
                self._asu_groupings[anomalous] = held
        if held is None:
            hkl = np.concatenate([take_rows(np.asarray(ds.table["miller_index"]).reshape(-1, 3), ds.suitable)
                                  for ds in self.datasets])
            held = self._asu_groupings[anomalous] = asu_grouping(hkl, self.space_group, anomalous=anomalous,
                                                                   n_threads=self.n_threads)
        return held


def _run(task: Callable[[], Any]) -> Any:
    """``task()``: for mapping a list of prepared calls over the scaler's threads."""
    return task()


def _rows_of_groups_holding(grouped: GroupedObservations, rows: np.ndarray) -> np.ndarray:
    """Every row (bool over ``grouped``) of the groups holding at least one of ``rows``."""
    group_of_row = grouped.group_of_row()
    wanted = np.zeros(grouped.n_groups, dtype=bool)
    wanted[group_of_row[rows]] = True
    return wanted[group_of_row]


def _scales_product(components: Mapping[str, Any], block_id: int, n_rows: int) -> np.ndarray:
    """g of a data block: the product of every component's scales, in component order."""
    g = np.ones(n_rows)
    for comp in components.values():  # in place: the same products, no temporary per component
        g *= np.asarray(comp.calculate_scales(block_id), dtype=np.float64)
    return g


def _update_all_rows(comp: Any, scales_only: bool) -> None:
    """``comp.update_reflection_data()`` on every row. For scales only, a harmonic (SH)
    component keeps just its two grid indices per row and reads its scales from the shared
    surface (float64), instead of building the n × 24 harmonic block it would need only for
    derivatives (about a quarter of an expansion's time at 10⁶ observations)."""
    if scales_only and isinstance(comp, SHScaleComponent):
        comp.update_reflection_data(scales_only=True)
    else:
        comp.update_reflection_data()


class SingleScaler(ScalerBase):
    """One dataset (DIALS ``SingleScaler(params, experiment, reflection_table, for_multi)``)."""

    def __init__(self, params: Any, experiment: Any, reflection_table: Any, for_multi: bool = False) -> None:
        super().__init__(params)
        self.datasets.append(_make_dataset(params, experiment, reflection_table))
        self.for_multi = for_multi

    @property
    def experiment(self) -> Any:
        return self.datasets[0].experiment

    @property
    def reflection_table(self) -> Any:
        return self.datasets[0].table

    @property
    def outliers(self) -> np.ndarray:
        return self.datasets[0].outliers

    @property
    def suitable_refl_for_scaling_sel(self) -> np.ndarray:
        return self.datasets[0].suitable

    @property
    def n_suitable_refl(self) -> int:
        return int(self.datasets[0].suitable.sum())


class MultiScaler(ScalerBase):
    """Several datasets scaled together on one Ĩ (DIALS ``MultiScaler(single_scalers)``)."""

    def __init__(self, single_scalers: Sequence[SingleScaler]) -> None:
        if not single_scalers:
            raise ValueError("MultiScaler needs at least one SingleScaler")
        super().__init__(single_scalers[0].params)
        self.single_scalers = list(single_scalers)
        for s in single_scalers:
            self.datasets.extend(s.datasets)


class TargetScaler(MultiScaler):
    """Unscaled datasets scaled against already scaled ones (DIALS ``TargetScaler``).

    The scaled datasets' models stay fixed: only the unscaled ones are refined, on one Ĩ
    (a simplification of DIALS's per-dataset fixed-Ĩ rounds, giving the same fixed point).
    """

    def __init__(self, scaled_scalers: Sequence[SingleScaler], unscaled_scalers: Sequence[SingleScaler]) -> None:
        super().__init__(list(scaled_scalers) + list(unscaled_scalers))
        self.n_fixed = len(scaled_scalers)
        for ds in self.datasets[: self.n_fixed]:
            ds.model.fixed_components = list(ds.model.components)


def _engine_for(engine: str, n_params: int) -> str:
    """``engine``, or SimpleLBFGS when a dense normal matrix would be too large (many stills:
    2 parameters per image; the engine's automatic choice, fit.FULL_MATRIX_MAX_PARAMS)."""
    from ..fit import refiner

    if engine in ("GaussNewton", "LevMar") and n_params > refiner.FULL_MATRIX_MAX_PARAMS:
        logger.info("%d parameters: SimpleLBFGS instead of %s (no dense %d x %d normal matrix)",
                    n_params, engine, n_params, n_params)
        return "SimpleLBFGS"
    return engine


class NullScaler(SingleScaler):
    """A dataset with a fixed unit scale (a reference)."""


def _make_dataset(params: Any, experiment: Any, table: Any) -> Dataset:
    """Model and suitable rows for one prepared table."""
    from ..models import MODEL_COLUMNS, create_scaling_model, model_from_dict

    suitable = suitable_rows(table)
    if "d" in table:
        suitable &= np.asarray(table["d"], dtype=np.float64) > 0
    if not suitable.any():
        raise BadDatasetForScalingException(
            f"experiment {experiment.identifier!r}: no reflections left after filtering")
    if "inverse_scale_factor" not in table:
        table["inverse_scale_factor"] = fa.double(np.ones(len(table)))
    existing = getattr(experiment, "scaling_model", None)
    # The built-in models read only these columns of the suitable rows (copying every column
    # of a wide table cost ~0.2 s and ~200 B/row at 10⁶ rows); a stored or user model gets all.
    fresh = existing is None or params.overwrite_existing_models
    columns = [c for c in MODEL_COLUMNS if c in table] if fresh else None
    sub = _suitable_part(table, suitable, columns)
    if existing is not None and not params.overwrite_existing_models:
        model = existing if hasattr(existing, "components") else model_from_dict(existing)
    else:
        name = params.model or _auto_model(experiment)
        if name == "physical" and "s1" not in table and params.physical.absorption_correction is not False:
            # MTZ and XDS inputs carry no scattering vectors: no absorption surface for them
            logger.info("experiment %s: no s1 column, so no absorption correction", experiment.identifier)
            saved = params.physical.absorption_correction, params.physical.absorption_level
            params.physical.absorption_correction, params.physical.absorption_level = False, None
            try:
                model = create_scaling_model(name, params, experiment, sub)
            finally:
                params.physical.absorption_correction, params.physical.absorption_level = saved
        else:
            model = create_scaling_model(name, params, experiment, sub)
    model.configure_components(sub, experiment, params)
    experiment.scaling_model = model
    return Dataset(experiment, table, model, suitable, np.zeros(int(suitable.sum()), bool))


def _suitable_part(table: Any, suitable: np.ndarray, columns: Sequence[str] | None) -> Any:
    """The suitable rows of ``table`` (only ``columns``, if given) that the model is set up
    from. When every row is suitable, a table of read-only views of the columns instead of
    copies (the set-up only reads them; some it keeps): at 10⁶ rows the copies cost ~30 ms and
    70 MB of fresh memory."""
    if not suitable.all():
        return table.select(suitable, columns=columns)
    from ..reflection_table import reflection_table

    part = reflection_table(len(table))
    for name in table.keys() if columns is None else columns:
        col = table[name]
        view = np.asarray(col).view()
        view.setflags(write=False)
        part[name] = type(col)._wrap(view)
    ids = part.experiment_identifiers()
    for key, value in table.experiment_identifiers().items():
        ids[key] = value
    return part


def _auto_model(experiment: Any) -> str:
    """physical for rotation sweeps of at least 1°, KB otherwise (DIALS's auto)."""
    scan = getattr(experiment, "scan", None)
    if experiment.is_still() or scan is None:
        return "KB"
    lo, hi = scan.get_oscillation_range(deg=True)
    return "physical" if abs(hi - lo) >= 1.0 else "KB"
