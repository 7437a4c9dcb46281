"""The whole ``xtalscale scale`` job: read, scale, write, report, with time per stage.

:func:`run_scale_job` is what the command line runs; scripts can call it with a ``params``
object from :func:`xtalscale.job.phil.parse_phil_arguments`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..io.outputs import output_path
from ..reflection_table import Flags

__all__ = ["ScaleJobResult", "check_outputs_writable", "exclusion_summary", "run_scale_job"]

logger = logging.getLogger("xtalscale.scale")


@dataclass
class ScaleJobResult:
    """What the job produced: experiments, the joined table, statistics, files and timings."""

    experiments: Any
    reflections: Any
    statistics: Any = None
    algorithm: Any = None
    files: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    n_rows_in: int = 0
    work_free: dict | None = None


def _output_paths(params: Any) -> list[str]:
    out = params.output
    paths = (output_path(p) for p in (out.reflections, out.experiments, out.html, out.log, out.json,
                                      out.merged_mtz, out.unmerged_mtz))
    return [p for p in paths if p is not None]


def check_outputs_writable(params: Any) -> None:
    """Fail before any work if an output file's folder is missing or not writable (OSError)."""
    for path in _output_paths(params):
        folder = Path(path).resolve().parent
        if not folder.is_dir():
            raise OSError(f"cannot write {path}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise OSError(f"cannot write {path}: the folder {folder} is not writable")
        if Path(path).is_dir():
            raise OSError(f"cannot write {path}: it is a folder")


def exclusion_summary(table: Any) -> list[tuple[str, int]]:
    """Rows by final status, for the end-of-job summary."""
    flags = np.asarray(table["flags"]).astype(np.uint64)

    def has(f: Flags) -> np.ndarray:
        return (flags & np.uint64(int(f))) != 0

    user = has(Flags.user_excluded_in_scaling)
    excluded = has(Flags.excluded_for_scaling) & ~user
    outlier = has(Flags.outlier_in_scaling) & ~user & ~excluded
    scaled = has(Flags.scaled)
    return [("rows read", int(flags.size)), ("scaled", int(scaled.sum())),
            ("excluded by the user's options (d range, exclude_images, ...)", int(user.sum())),
            ("excluded as unfit (filters, no experiment, tiny scale)", int(excluded.sum())),
            ("outliers", int(outlier.sum()))]


def _statistics(experiments: Any, table: Any, params: Any) -> tuple[Any, Any]:
    """The report inputs (statistics, per-batch, deviations, resolution) of the scaled rows,
    and the scaled observations they were computed on."""
    from ..merge.observations import observations_from_reflections
    from ..report import statistics_for_report

    obs = observations_from_reflections(experiments, table)
    from .scaler import threads_of

    asu_grouping = _scaled_grouping(table, obs)
    obs = dataclasses.replace(obs, rows=None)  # (needed for the grouping only: 8 bytes a row not held)
    inputs = statistics_for_report(
        obs, n_bins=int(params.output.merging.nbins), anomalous=bool(params.anomalous),
        use_internal_variance=bool(params.output.use_internal_variance), n_threads=threads_of(params),
        asu_grouping=asu_grouping)
    return inputs, obs


def _scaled_grouping(table: Any, obs: Any) -> tuple | None:
    """The grouping of the observations' ASU indices and their Bijvoet-minus flags taken from
    the scaler's grouping of the suitable rows (kept in :mod:`.grouped`'s cache; the scaled
    observations are suitable rows less outliers), or None when it is not there."""
    from .._rows import take_rows
    from .grouped import cached_grouping_of_rows, suitable_rows

    rows = obs.rows
    if rows is None or len(rows) == 0:
        return None
    suitable = suitable_rows(table)
    hkl = np.asarray(table["miller_index"], dtype=np.int32).reshape(-1, 3)
    if not suitable.all():
        if not suitable[rows].all():
            return None
        hkl = take_rows(hkl, suitable)
        rows = np.take(np.cumsum(suitable, dtype=np.int64) - 1, rows)  # numbered among the suitable rows
    return cached_grouping_of_rows(hkl, obs.space_group, rows)


def _write_scaled_files(params: Any, experiments: Any, table: Any, result: ScaleJobResult) -> None:
    """Write scaled.refl and scaled.expt (recorded in ``result.files``); reads the table only."""
    out = params.output
    reflections, expts = output_path(out.reflections), output_path(out.experiments)
    if reflections is not None:
        table.as_file(reflections)
        result.files["reflections"] = reflections
    if expts is not None:
        experiments.as_file(expts)
        result.files["experiments"] = expts


def _merge_needed(params: Any) -> bool:
    """Whether a merged MTZ or the report needs the merged data."""
    return output_path(params.output.merged_mtz) is not None or output_path(params.output.html) is not None


def _merged(params: Any, obs: Any, groups: Any, log: bool = True) -> Any:
    """The merged data of the scaled observations when a merged MTZ or the report needs
    them (else None), merged on ``groups``, the grouping the statistics made of the same
    observations (None: the merge groups them). ``log``: see ``merge_observations``."""
    if obs is None or not _merge_needed(params):
        return None
    from ..merge import merge_observations
    from .scaler import threads_of

    return merge_observations(obs, anomalous=bool(params.anomalous), groups=groups, log=log,
                              n_threads=threads_of(params))


def _write(params: Any, experiments: Any, table: Any, obs: Any, report_inputs: Any,
           result: ScaleJobResult, scaled_files: Future | None = None,
           merging: Future | None = None) -> Any:
    """Write the output files (recorded in ``result.files``); returns the merged data of
    the scaled observations when a merged MTZ or the report needs them (else None).
    ``scaled_files``: scaled.refl/.expt are already being written (a future of
    :func:`_write_scaled_files`), so only wait for them; ``merging``: likewise the merged
    data (a future of :func:`_merged`)."""
    out = params.output
    if scaled_files is None:
        _write_scaled_files(params, experiments, table, result)
    else:
        scaled_files.result()  # re-raises a failed write
    unmerged_mtz, merged_mtz, json_path = (output_path(out.unmerged_mtz), output_path(out.merged_mtz),
                                           output_path(out.json))
    if unmerged_mtz is not None:
        from ..io.mtz import write_unmerged_mtz

        scaled = table.select(table.get_flags(Flags.scaled))
        write_unmerged_mtz(unmerged_mtz, scaled, experiments, project_name=out.project_name,
                           crystal_name=out.crystal_name)
        result.files["unmerged_mtz"] = unmerged_mtz
    if merging is None:
        merged = _merged(params, obs, _groups_of(report_inputs))
    else:  # (merged on a worker, logged here: the log's order does not depend on the threads)
        merged = merging.result()
        if merged is not None:
            from ..merge.merging import log_merged

            log_merged(merged)
    if merged is not None and merged_mtz is not None:
        from ..merge import write_merged_mtz

        write_merged_mtz(merged_mtz, merged, out.project_name, out.crystal_name)
        result.files["merged_mtz"] = merged_mtz
    stats = result.statistics
    if json_path is not None and stats is not None:
        Path(json_path).write_text(stats.as_json())
        result.files["json"] = json_path
    return merged


def _groups_of(report_inputs: Any) -> Any:
    return report_inputs.observation_groups if report_inputs is not None else None


def work_free_statistics(algorithm: Any, obs: Any, params: Any) -> dict[str, dict[str, float]] | None:
    """Rmeas and CC½ of the work and free groups (``use_free_set``), as DIALS reports them."""
    from ..stats.merging import MergingStatistics
    from ..symmetry import hkl_keys, map_to_asu

    free_hkl = getattr(algorithm.scaler, "free_asu_hkl", None)
    if free_hkl is None or obs is None or len(free_hkl) == 0:
        return None
    asu = map_to_asu(obs.miller_index, obs.space_group, anomalous=bool(params.anomalous)).asu_hkl
    is_free = np.isin(hkl_keys(asu), hkl_keys(np.asarray(free_hkl)))
    sigma = np.sqrt(obs.variance)
    out = {}
    for name, rows in (("work", ~is_free), ("free", is_free)):
        s = MergingStatistics.from_arrays(obs.miller_index[rows], obs.intensity[rows], sigma[rows],
                                          obs.space_group, obs.unit_cell, n_bins=1).overall
        out[name] = {"r_meas": float(s.r_meas), "cc_one_half": float(s.cc_one_half), "n_obs": int(s.n_obs)}
    return out


def _is_merged_mtz(path: str) -> bool:
    import gemmi

    return "M/ISYM" not in gemmi.read_mtz_file(path, with_data=False).column_labels()


def _add_reference(inputs: Any, path: str) -> int:
    """Put a reference (scaled .refl with its .expt beside it, or an MTZ) first in ``inputs``.

    An MTZ (merged or unmerged intensities) is read as a dataset too. Returns the number of
    reference experiments. Its models stay fixed during scaling and its rows are not written.
    """
    from .inputs import InputError, file_kind, load_inputs

    kind = file_kind(path)
    if kind == "mtz" and _is_merged_mtz(path):
        from .inputs import ScalingInputs
        from .reference import merged_mtz_reference

        try:
            ref_expts, ref_table = merged_mtz_reference(path)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        ref = ScalingInputs(ref_expts, [ref_table], [path])
    elif kind == "mtz":
        from .reference import unmerged_mtz_reference

        ref = unmerged_mtz_reference(path)
    elif kind == "reflections":
        expt = Path(path).with_suffix(".expt")
        if not expt.is_file():
            raise InputError(f"reference={path}: no experiment file {expt} beside it")
        ref = load_inputs([path, str(expt)])
    else:
        raise InputError(f"reference={path}: a scaled .refl (with its .expt beside it) or an MTZ "
                         f"file of intensities is needed (got {kind})")
    n_ref = len(ref.experiments)
    ref.tables = [t.select(np.asarray(t["id"]) >= 0) for t in ref.tables]  # rows of no experiment
    # renumber the inputs after the reference experiments
    from .. import flex_arrays as fa

    for table in inputs.tables:
        ids = table.experiment_identifiers()
        mapping = dict(ids.items())
        for key in list(ids.keys()):
            del ids[key]
        for key, value in mapping.items():
            ids[key + n_ref] = value
        id_col = np.asarray(table["id"]).astype(np.int64)
        table["id"] = fa.int(np.where(id_col >= 0, id_col + n_ref, id_col).astype(np.int32))
    for expt_ in inputs.experiments:
        ref.experiments.append(expt_)
    inputs.experiments = ref.experiments
    inputs.tables = ref.tables + inputs.tables
    return n_ref


def _statistics_stage(algorithm: Any, experiments: Any, table: Any, params: Any,
                      timings: dict[str, float]) -> tuple[Any, Any, Any, Any]:
    """``(statistics, observations, report inputs, work/free)`` of a scaled job (all None if
    it was not scaled), logged as the job logs them."""
    stats = obs = report_inputs = result_free = None
    if not algorithm.scaled:
        return stats, obs, report_inputs, result_free
    t0 = time.perf_counter()
    try:
        report_inputs, obs = _statistics(experiments, table, params)
    except ValueError as exc:
        logger.warning("merging statistics not computed: %s", exc)
    if report_inputs is not None:
        stats = report_inputs.statistics
        for note in report_inputs.notes:
            logger.info("%s", note)
        if stats is not None:
            logger.info("\n%s", stats.as_table())
        if report_inputs.anomalous_statistics is not None:
            logger.info("\n%s", report_inputs.anomalous_statistics.as_table())
        work_free = work_free_statistics(algorithm, obs, params) if params.scaling_options.use_free_set \
            else None
        if work_free:
            result_free = work_free
            logger.info("work/free: Rmeas %.4f / %.4f, CC½ %.4f / %.4f (%d / %d observations)",
                        work_free["work"]["r_meas"], work_free["free"]["r_meas"],
                        work_free["work"]["cc_one_half"], work_free["free"]["cc_one_half"],
                        work_free["work"]["n_obs"], work_free["free"]["n_obs"])
            report_inputs.notes.append(
                "Work/free Rmeas {:.4f}/{:.4f}, CC½ {:.4f}/{:.4f}".format(
                    work_free["work"]["r_meas"], work_free["free"]["r_meas"],
                    work_free["work"]["cc_one_half"], work_free["free"]["cc_one_half"]))
        if report_inputs.resolution is not None and report_inputs.resolution.d_min is not None:
            logger.info("resolution estimate (CC½ fit, 0.3): %.2f Å", report_inputs.resolution.d_min)
    timings["statistics"] = time.perf_counter() - t0
    return stats, obs, report_inputs, result_free


def run_scale_job(params: Any, files: Sequence[str]) -> ScaleJobResult:
    """Read ``files``, scale with ``params`` and write every requested output.

    The job's BLAS calls run with one thread (:func:`~xtalscale.fit.blas.single_threaded_blas`,
    as the command line does): the dense algebra here is small, and OpenBLAS's idle threads
    spin. Measured on the 1.1 M-observation bench: 12.6 s of CPU for 10.7 s of wall without
    the limit, 8.9 s for 8.7 s with it; with nproc=2 the spinning threads take the second
    worker's core.
    """
    from ..fit.blas import single_threaded_blas

    with single_threaded_blas():
        return _run_scale_job(params, files)


def _run_scale_job(params: Any, files: Sequence[str]) -> ScaleJobResult:
    from .algorithm import ScalingAlgorithm
    from .inputs import load_inputs
    from .scaler import threads_of

    timings: dict[str, float] = {}
    check_outputs_writable(params)
    t0 = time.perf_counter()
    inputs = load_inputs(files)
    timings["read"] = time.perf_counter() - t0
    n_in = inputs.n_reflections
    logger.info("read %d experiment(s), %d reflections from %s (%.2f s)", len(inputs.experiments), n_in,
                ", ".join(inputs.sources), timings["read"])

    n_reference = 0
    reference = params.scaling_options.reference
    if reference:
        n_reference = _add_reference(inputs, str(reference))
    t0 = time.perf_counter()
    # the tables were read here: the job takes them over (split without copies)
    algorithm = ScalingAlgorithm(params, inputs.experiments, inputs.tables, n_reference=n_reference,
                                 copy_input=False)
    inputs.tables = []  # the algorithm holds every row (split per experiment): free the input copy
    timings["prepare"] = time.perf_counter() - t0
    for name in algorithm.scaler.removed_datasets:
        logger.warning("dataset %s was removed: nothing left to scale after filtering", name)
    from ..report.terminal import progress

    t0 = time.perf_counter()
    with progress("scaling"):
        algorithm.run()
    timings["scale"] = time.perf_counter() - t0
    for stage, seconds in algorithm.scaler.timings.items():
        timings[f"  {stage}"] = seconds
    for journal in algorithm.scaler.journals:
        logger.debug("%s: %d steps, %s", getattr(journal, "round_engine", "?"), len(journal.rows),
                     journal.reason_for_termination)
    algorithm.release_scaling_memory()  # before the join's copy (the peak)
    experiments, table = algorithm.finish(consume=True)
    algorithm.release_tables()
    for ds in algorithm.scaler.datasets:
        if algorithm.scaled:
            ds.model.set_scaling_model_as_scaled()
        em = ds.error_model
        if em is not None:
            logger.info("error model %s: a = %.4f, b = %.4f", ds.experiment.identifier, em.a, em.b)
    result = ScaleJobResult(experiments, table, algorithm=algorithm, timings=timings, n_rows_in=n_in)
    if n_reference:
        logger.info("scaled against the reference %s (its model kept fixed; its rows not written)",
                    params.scaling_options.reference)
    if len(table) != n_in:
        raise RuntimeError(f"internal error: {n_in} rows read but {len(table)} to write")

    # With more than one thread, scaled.refl/.expt (~0.2 kB per row) are written while the
    # statistics are computed: both only read the joined table. Then the observations are
    # merged on a second worker while this thread compiles the report's template (pure
    # Python; the merge's kernels and numpy release the GIL). (Merged during the statistics,
    # the merge's arrays would add to theirs: measured up to 0.87 GB at the job's peak.)
    writer = ThreadPoolExecutor(max_workers=2) if threads_of(params) > 1 else None
    scaled_files = writer.submit(_write_scaled_files, params, experiments, table, result) if writer else None
    try:
        stats, obs, report_inputs, result_free = _statistics_stage(algorithm, experiments, table, params, timings)
        result.statistics = stats
        result.work_free = result_free
        t0 = time.perf_counter()
        merging = None
        if writer is not None:
            merging = writer.submit(_merged, params, obs, _groups_of(report_inputs), False)
            if output_path(params.output.html) is not None:
                from ..report import prepare_report

                prepare_report()
        merged = _write(params, experiments, table, obs, report_inputs, result, scaled_files, merging)
    finally:
        if writer is not None:
            writer.shutdown(wait=True)
    timings["write"] = time.perf_counter() - t0
    out = params.output

    html = output_path(out.html)
    if html is not None:
        t0 = time.perf_counter()
        from ..report import write_html_report

        arguments = report_inputs.report_arguments() if report_inputs is not None else {"notes": []}
        arguments["summary"] = [(k, str(v)) for k, v in exclusion_summary(table)] + list(
            arguments.get("summary", []))
        if not algorithm.scaled:
            arguments["notes"] = [getattr(algorithm, "no_equivalents", None) or "not scaled"]
        write_html_report(html, merged=merged, experiments=experiments,
                          title="xtalscale scale report", **arguments)
        result.files["html"] = html
        timings["report"] = time.perf_counter() - t0
    logger.info("\nrows: %s", "; ".join(f"{k}: {v}" for k, v in exclusion_summary(table)))
    for text, number in algorithm.reasons.reasons.items():
        if number:
            logger.info("  %-45s %d", text, number)
    for path in result.files.values():
        logger.info("wrote %s", path)
    return result


def timings_as_json(result: ScaleJobResult) -> str:
    return json.dumps(result.timings, indent=1)
