"""The dials.scale algorithm (spec §8.1, §8.7): prepare, scale in rounds, finish.

``ScalingAlgorithm(params, experiments, reflections).run()`` then ``.finish()`` gives the
scaled experiments and one joined reflection table with every input row (excluded rows
flagged with why). :func:`scaling_algorithm` is DIALS's sequence of rounds over a scaler.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import flex_arrays as fa
from ..reflection_table import Flags, reflection_table
from .combine_intensities import judges_on_minimisation_rows
from .prepare import (
    BadDatasetForScalingException,
    Reasons,
    apply_exclude_images,
    apply_resolution_and_partiality_cuts,
    calculate_prescaling_correction,
    choose_initial_scaling_intensities,
    filter_bad_reflections,
    parse_exclude_images,
)
from .reflection_selection import select_for_minimisation, use_all_for_last_round
from .scaler import MultiScaler, ScalerBase, SingleScaler, threads_of

__all__ = [
    "NoEquivalentsError",
    "ScalingAlgorithm",
    "create_scaler",
    "do_error_analysis",
    "do_intensity_combination",
    "expand_and_do_outlier_rejection",
    "prepare_input",
    "scaling_algorithm",
]

logger = logging.getLogger("xtalscale.scale")


class NoEquivalentsError(ValueError):
    """No unique reflection is measured more than once: there is nothing to scale against."""


def _split_tables(experiments: Any, tables: Sequence[Any], copy: bool = True) -> tuple[list[Any], list[Any]]:
    """One table per experiment, in experiment order, and the rows of no experiment (id < 0),
    which are kept (flagged excluded_for_scaling) so that no input row is lost. With
    ``copy=False`` (tables the job loaded itself) a part may be a view of its input's rows."""
    out: list[Any] = [None] * len(experiments)
    unassigned = []
    ids = experiments.identifiers()
    for table in tables:
        if "id" in table and len(table):
            neg = np.asarray(table["id"]) < 0
            if neg.any():
                orphans = table.select(neg)
                orphans.set_flags(np.ones(len(orphans), bool), Flags.excluded_for_scaling)
                unassigned.append(orphans)
                table = table.select(~neg)
        for sub in table.split_by_experiment_id(copy=copy) if len(table) else []:
            (k, ident), = sub.experiment_identifiers().items()
            try:
                pos = ids.index(ident)
            except ValueError:
                raise ValueError(f"reflections carry experiment identifier {ident!r}, which no "
                                 f"experiment has") from None
            out[pos] = sub
    for k, t in enumerate(out):
        if t is None:
            raise ValueError(f"experiment {k} ({ids[k]!r}) has no reflections")
    return out, unassigned


def prepare_input(params: Any, experiments: Any, reflections: Sequence[Any], copy: bool = True
                  ) -> tuple[Any, list[Any], Reasons, list[Any]]:
    """Select datasets, split tables per experiment, reset flags, apply the user's cuts.

    Returns (experiments, one table per experiment, reasons, tables of rows left out: rows of
    no experiment and of deselected experiments, kept for the output). ``copy=False``: the
    caller hands its tables over (they may be changed in place; no per-experiment copy)."""
    from ..experiments import ExperimentList

    use = params.dataset_selection.use_datasets
    exclude = params.dataset_selection.exclude_datasets
    tables, left_out = _split_tables(experiments, reflections, copy=copy)
    keep = list(range(len(experiments)))
    if use:
        keep = [k for k in keep if k in set(use)]
    if exclude:
        keep = [k for k in keep if k not in set(exclude)]
    if not keep:
        raise ValueError("dataset_selection leaves no experiment to scale")
    reasons = Reasons()
    experiments = ExperimentList([experiments[k] for k in keep])
    tables = [tables[k] for k in keep]
    if left_out:
        reasons.add_reason("no experiment (id < 0)", sum(len(t) for t in left_out))
    ranges = parse_exclude_images(params.exclude_images, len(experiments))
    for k, t in enumerate(tables):
        t.clear_flags(int(Flags.bad_for_scaling) | int(Flags.scaled))
        if "d" not in t:
            t.compute_d(ExperimentList([experiments[k]]))
        apply_exclude_images(t, experiments[k], [(s, e) for (x, s, e) in ranges if x == k], reasons)
        apply_resolution_and_partiality_cuts(t, params.cut_data.d_min, params.cut_data.d_max, reasons)
    return experiments, tables, reasons, left_out


def _prepare_dataset(params: Any, table: Any, reasons: Reasons) -> Any:
    choice = params.reflection_selection.intensity_choice
    filter_bad_reflections(table, params.cut_data.partiality_cutoff, params.cut_data.min_isigi, choice, reasons)
    calculate_prescaling_correction(table)
    choose_initial_scaling_intensities(table, choice)
    table["inverse_scale_factor"] = fa.double(np.ones(len(table)))
    return table


def _map_in_threads(function: Any, items: Sequence[Any], n_threads: int) -> list[Any]:
    """``[function(item) for item in items]``, on up to ``n_threads`` threads for several items."""
    items = list(items)
    if n_threads == 1 or len(items) < 2:
        return [function(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    with ThreadPoolExecutor(max_workers=min(n_threads, len(items))) as pool:
        return list(pool.map(function, items))


def _make_single_scalers(params: Any, experiments: Any, reflections: Sequence[Any],
                         prepare: Any = None) -> list[Any]:
    """A SingleScaler per dataset, or the BadDatasetForScalingException that removes it. With
    nproc > 1 the datasets are set up concurrently (their models and components are their own;
    the heavy parts are C++ and numpy that release the GIL), unless a table lacks s1: setting
    up such a dataset changes the shared params for a moment (no absorption surface).
    ``prepare(k)``: run on dataset k's table first, in the same task (one round of tasks
    instead of two: with 3 datasets on 2 threads a second round has one thread idle)."""
    def make(k: int) -> Any:
        if prepare is not None:
            prepare(k)
        try:
            return SingleScaler(params, experiments[k], reflections[k], for_multi=len(experiments) > 1)
        except BadDatasetForScalingException as exc:
            return exc

    n_threads = 1 if any("s1" not in table for table in reflections) else threads_of(params)
    return _map_in_threads(make, range(len(reflections)), n_threads)


def large_data_forms(scalers: Sequence[Any]) -> bool:
    """Give a job's components their large-data forms when the job's suitable rows together
    exceed the components' thresholds (100k), even if each dataset is below them: every 1-D
    smoother recomputes its weights from 10-byte window records (a few ulp from DIALS's
    operations, as for one large dataset) instead of holding a DIALS-exact weight matrix per
    dataset (~40 B per observation per smoother), and the absorption term holds its exact
    harmonics per block as float32 (6e-8 rounding, as in the lookup regime; 96 B per
    observation less). 24 sweeps of 46k rows: 0.2 s and 0.1 GB less. The absorption term keeps
    DIALS's per-dataset choice of exact or lookup harmonics. Returns whether it changed any
    (jobs below the thresholds keep DIALS's exact forms)."""
    components = [comp for s in scalers for ds in s.datasets for comp in ds.model.components.values()]
    total = sum(int(np.count_nonzero(ds.suitable)) for s in scalers for ds in s.datasets)
    changed = False
    for comp in components:
        for setting in ("lean_min_reflections", "float32_min_reflections"):
            if hasattr(comp, setting) and total > getattr(comp, setting):
                setattr(comp, setting, 0)  # an instance setting: the class default stays
                changed = True
    return changed


def create_scaler(params: Any, experiments: Any, reflections: Sequence[Any],
                  reasons: Reasons | None = None) -> ScalerBase:
    """A SingleScaler (one dataset) or MultiScaler; datasets that empty are removed with a
    message (dials#2045)."""
    reasons = reasons if reasons is not None else Reasons()
    singles, removed = [], []
    # each dataset counts its exclusions apart (concurrently with nproc > 1: numpy's passes
    # release the GIL), added up in dataset order: the counts and their order as done in turn
    own = [Reasons() for _ in reflections]
    prepare = lambda k: _prepare_dataset(params, reflections[k], own[k])  # noqa: E731
    if any("s1" not in table for table in reflections):  # the scalers are then made in turn
        _map_in_threads(prepare, range(len(own)), threads_of(params))
        made_scalers = _make_single_scalers(params, experiments, reflections)
    else:  # each task prepares its dataset and makes its scaler
        made_scalers = _make_single_scalers(params, experiments, reflections, prepare=prepare)
    for counts in own:
        for text, number in counts.reasons.items():
            reasons.add_reason(text, number)
    for expt, made in zip(experiments, made_scalers):
        if isinstance(made, BadDatasetForScalingException):
            logger.warning("removing dataset %s: %s", expt.identifier, made)
            removed.append(expt.identifier)
        else:
            singles.append(made)
    if not singles:
        raise BadDatasetForScalingException("no dataset has reflections left to scale")
    large_data_forms(singles)
    scaler: ScalerBase = singles[0] if len(singles) == 1 else MultiScaler(singles)
    scaler.removed_datasets = removed
    scaler.reasons = reasons
    return scaler


def _check_equivalents(scaler: ScalerBase) -> None:
    grouped = scaler.global_Ih_table
    if grouped.n_groups == 0 or grouped.group_sizes().max() < 2:
        raise NoEquivalentsError("no unique reflection has more than one observation: "
                                 "the data cannot be scaled (the unscaled data are written)")


def expand_and_do_outlier_rejection(scaler: ScalerBase, calc_cov: bool = False,
                                    minimisation_rows_only: bool = False) -> None:
    """DIALS's expansion and outlier round; ``minimisation_rows_only``: g and the outlier flags
    of the minimisation subset's groups only (see :func:`scaling_algorithm`)."""
    scaler.expand_scales_to_all_reflections(calc_cov=calc_cov, minimisation_rows_only=minimisation_rows_only)
    scaler.round_of_outlier_rejection(minimisation_groups_only=minimisation_rows_only)


def do_intensity_combination(scaler: ScalerBase, reselect: bool = True,
                             minimisation_rows_only: bool = False) -> None:
    scaler.combine_intensities()
    if scaler.params.scaling_options.outlier_rejection:
        scaler.round_of_outlier_rejection(minimisation_groups_only=minimisation_rows_only)
    if reselect:
        scaler.make_ready_for_scaling()


def do_error_analysis(scaler: ScalerBase, reselect: bool = True) -> None:
    scaler.perform_error_optimisation()
    if reselect:
        scaler.make_ready_for_scaling()


def scaling_algorithm(scaler: ScalerBase) -> ScalerBase:
    """DIALS's rounds (§8.7) with this job's engine choice."""
    params = scaler.params
    so = params.scaling_options
    use_error_model = params.weighting.error_model.error_model is not None
    # the rounds before a full-matrix round skip their var-cov matrices (O(P³) each): the
    # final round's replace them before the final expansion reads them
    final_var_cov = bool(so.full_matrix) and params.refinement.full_matrix_engine in ("GaussNewton", "LevMar")
    select_for_minimisation(scaler)
    if so.outlier_rejection:  # only the first minimisation reads these flags
        scaler.round_of_outlier_rejection(minimisation_groups_only=True)
    scaler.make_ready_for_scaling()
    scaler.perform_scaling(var_cov=not final_var_cov)
    # With a main-rounds subset (a large job), what follows up to the second minimisation
    # reads g and the outlier flags of the subset's groups only (the Imid refits and their
    # Rmeas, the second minimisation): those alone are made. The round after the second
    # minimisation makes them for every row again, for the last round's table.
    subset_only = bool(getattr(scaler, "subset_for_main_rounds", False)) and judges_on_minimisation_rows(scaler)
    if params.reflection_selection.intensity_choice == "combine" or so.outlier_rejection:
        expand_and_do_outlier_rejection(scaler, minimisation_rows_only=subset_only)
        do_intensity_combination(scaler, reselect=True, minimisation_rows_only=subset_only)
    if use_error_model or so.outlier_rejection:
        scaler.perform_scaling(var_cov=not final_var_cov)
        expand_and_do_outlier_rejection(scaler)
        if use_error_model:
            do_error_analysis(scaler, reselect=False)
        use_all_for_last_round(scaler)
        scaler.make_ready_for_scaling()
    elif getattr(scaler, "subset_for_main_rounds", False):
        use_all_for_last_round(scaler)
        scaler.make_ready_for_scaling()
    if so.full_matrix:
        engine = params.refinement.full_matrix_engine
        scaler.perform_scaling(engine=engine, max_iterations=params.refinement.full_matrix_max_iterations or 100)
    else:
        scaler.perform_scaling()
    # the final expansion starts from the last minimisation table's model data (see
    # expand_scales_to_all_reflections); as DIALS, the table is then dropped (~0.1 kB/row)
    scaler.expand_scales_to_all_reflections(calc_cov=True)
    scaler.clear_Ih_table()
    scaler.round_of_outlier_rejection()
    scaler.release_grouping()  # the last use of the suitable rows' grouping (~80 B/row)
    if use_error_model:
        do_error_analysis(scaler, reselect=False)
    scaler.prepare_reflection_tables_for_output()
    return scaler


class ScalingAlgorithm:
    """dials.scale's ``ScalingAlgorithm``: ``run()`` scales, ``finish()`` joins the output."""

    def __init__(self, params: Any, experiments: Any, reflections: Sequence[Any], n_reference: int = 0,
                 copy_input: bool = True) -> None:
        """``copy_input=False``: the caller hands ``reflections`` over (the job may change them in
        place and split them without copying; the command line does, with the tables it read)."""
        t0 = time.perf_counter()
        self.params = params
        self.experiments, self.reflections, self.reasons, self.left_out = prepare_input(
            params, experiments, list(reflections), copy=copy_input)
        self.scaler = create_scaler(params, self.experiments, self.reflections, self.reasons)
        # the first n_reference datasets are a reference: models fixed, rows not written
        self.n_reference = n_reference
        for ds in self.scaler.datasets[:n_reference]:
            ds.model.fixed_components = list(ds.model.components)
            ds.is_reference = True  # type: ignore[attr-defined]  # not in the error-model fit
        self.scaled = False
        self.emptied_datasets: list[str] = []  # every row rejected as an outlier
        self.timings = {"prepare": time.perf_counter() - t0}

    def run(self) -> None:
        """Scale; if there are no equivalents the data stay unscaled (with a message)."""
        try:
            _check_equivalents(self.scaler)
        except NoEquivalentsError as exc:
            logger.warning("%s", exc)
            self.no_equivalents = str(exc)
            self.scaler.prepare_reflection_tables_for_output()
            return
        self.no_equivalents = None
        try:
            scaling_algorithm(self.scaler)
        finally:
            self.scaler.shutdown_threads()
        self.remove_bad_data()
        self.report_emptied_datasets()
        self.scaled = True

    def report_emptied_datasets(self) -> None:
        """A dataset whose every suitable row was rejected as an outlier (dials#2045) stays in
        the output with its rows flagged, but its model was not determined: say so."""
        self.emptied_datasets = [ds.experiment.identifier for ds in self.scaler.datasets
                                 if ds.outliers.size and ds.outliers.all()]
        for name in self.emptied_datasets:
            logger.warning("dataset %s: every reflection was rejected as an outlier; its scales were "
                           "not determined (its rows are written, flagged as outliers)", name)

    def remove_bad_data(self) -> None:
        """Flag ``excluded_for_scaling`` where g < small_scale_cutoff."""
        cutoff = float(self.params.cut_data.small_scale_cutoff)
        for ds in self.scaler.datasets:
            g = np.asarray(ds.table["inverse_scale_factor"], dtype=np.float64)
            small = g < cutoff
            if small.any():
                ds.table.set_flags(small, Flags.excluded_for_scaling)
                ds.table.unset_flags(small, Flags.scaled)
                self.reasons.add_reason(f"inverse scale < {cutoff}", int(small.sum()))

    def finish(self, consume: bool = False) -> tuple[Any, Any]:
        """(experiments, one joined reflection table); working columns removed. ``consume``:
        the per-experiment tables are emptied column by column as they are joined (the
        command line, which reads only the joined table afterwards)."""
        from ..experiments import ExperimentList

        kept = [ds for ds in self.scaler.datasets[self.n_reference:]]
        experiments = ExperimentList([ds.experiment for ds in kept])
        tables = []
        for k, ds in enumerate(kept):
            t = ds.table
            for name in ("variance", "intensity", "s0c", "s1c", "prescaling_correction", "batch",
                         "asu_miller_index"):
                if name in t:
                    del t[name]
            ident = ds.experiment.identifier
            t["id"] = fa.int(np.full(len(t), k, dtype=np.int32))
            ids = t.experiment_identifiers()
            for key in list(ids.keys()):
                del ids[key]
            ids[k] = ident
            tables.append(t)
        for orphans in self.left_out:
            orphans["id"] = fa.int(np.full(len(orphans), -1, dtype=np.int32))
            ids = orphans.experiment_identifiers()
            for key in list(ids.keys()):
                del ids[key]
            tables.append(_with_columns_of(orphans, tables[0]))
        joined = (reflection_table.concat(tables, consume=consume, n_threads=self.scaler.n_threads)
                  if len(tables) > 1 else tables[0])
        return experiments, joined

    def release_scaling_memory(self) -> None:
        """Drop what only scaling needed (minimisation table, grouped caches, derivative
        buffers, var-cov, the SH components' harmonic matrices): for the job, whose later
        stages read the tables, the models' parameters and the free-set indices. The job calls
        it before ``finish``, so that the join's copy does not add to them at the peak. (The
        components keep their other per-reflection data: coordinates, windows, grid indices.)"""
        from ..components import SHScaleComponent

        scaler = self.scaler
        scaler.clear_Ih_table()
        scaler.release_grouping()
        scaler._update_keys = {}
        for ds in scaler.datasets:
            ds.var_cov = None
            for comp in ds.model.components.values():
                # the last expansion left the harmonic matrix of every row (~0.1 kB/row):
                # keep only the grid indices, as an expansion for scales does
                if isinstance(comp, SHScaleComponent) and comp.data:
                    comp.update_reflection_data(scales_only=True)

    def release_tables(self) -> None:
        """Drop the per-experiment tables once ``finish`` has joined them."""
        for ds in self.scaler.datasets:
            ds.table = None
        self.reflections = []  # the same per-experiment tables
        self.left_out = []

    def release_working_memory(self) -> None:
        """:meth:`release_scaling_memory` and :meth:`release_tables`."""
        self.release_scaling_memory()
        self.release_tables()


def _with_columns_of(table: Any, template: Any) -> Any:
    """``table`` with the columns of ``template`` (missing ones zero-filled, extra ones dropped)."""
    for name in template.keys():  # noqa: SIM118 (a reflection table, not a dict)
        if name not in table:
            col = template[name]
            table[name] = type(col)(len(table))
    for name in list(table.keys()):
        if name not in template:
            del table[name]
    return table
