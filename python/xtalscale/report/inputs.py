"""Everything the report shows about scaled observations, computed in one call.

For a pipeline (``xtalscale merge`` now, the scaling job later)::

    from xtalscale.merge import observations_from_reflections, merge_observations
    from xtalscale.report import statistics_for_report, write_html_report

    obs = observations_from_reflections(experiments, reflections)
    merged = merge_observations(obs)
    inputs = statistics_for_report(obs)
    write_html_report("report.html", merged=merged, experiments=experiments,
                      **inputs.report_arguments())
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ReportInputs", "statistics_for_report"]


@dataclass
class ReportInputs:
    """Merging statistics, per-batch statistics, deviations and resolution estimate."""

    statistics: Any = None  #: dataset_statistics (non-anomalous), or None if it failed
    anomalous_statistics: Any = None  #: dataset_statistics (anomalous) or None
    batch_statistics: dict = field(default_factory=dict)  #: for plots.batch_plots
    normalised_deviations: np.ndarray | None = None
    resolution: Any = None  #: ResolutionEstimate or None
    notes: list = field(default_factory=list)  #: why something is missing
    #: the observations grouped by unique reflection (xtalscale.stats.ObservationGroups), for
    #: merge_observations(..., groups=) of the same observations
    observation_groups: Any = None

    def report_arguments(self) -> dict:
        """Keyword arguments for :func:`~xtalscale.report.write_html_report`."""
        summary = []
        if self.resolution is not None and self.resolution.d_min is not None:
            summary.append(("Resolution estimate (CC½ fit, 0.3)",
                            f"{self.resolution.d_min:.2f} Å"))
        return {"statistics": self.statistics, "batch_statistics": self.batch_statistics,
                "normalised_deviations": self.normalised_deviations, "notes": self.notes,
                "summary": summary}


def _batch_groups(batch: np.ndarray, dataset: np.ndarray, max_points: int) -> np.ndarray:
    """Each observation's batch, or the first batch of its group of consecutive batches when
    a dataset has more than ``max_points`` batches (so that each point has observations)."""
    _, grouped, index, pair_map = _grouped_batch_pairs(batch, dataset, max_points)
    return grouped[pair_map][index]


def _grouped_batch_pairs(batch: np.ndarray, dataset: np.ndarray, max_points: int
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The distinct (dataset, grouped batch) pairs of :func:`_batch_groups` (sorted), each
    row's (dataset, batch) pair number ``index`` and the grouped pair ``pair_map[k]`` of
    pair k: the rows' pairs without a second pass over the rows."""
    from ..stats.merging import _dataset_batch_groups

    # the distinct (dataset, batch) pairs, sorted: a dataset's first and last batch are the
    # ends of its run of pairs; the grouping is worked out per pair
    ds, b, index = _dataset_batch_groups(np.asarray(dataset, dtype=np.int64).ravel(),
                                         np.asarray(batch, dtype=np.int64).ravel())
    new_run = np.ones(len(ds), dtype=bool)
    new_run[1:] = ds[1:] != ds[:-1]
    run = np.cumsum(new_run) - 1
    starts = np.flatnonzero(new_run)
    ends = np.append(starts[1:], len(ds)) - 1
    first, last = b[starts][run], b[ends][run]
    width = -(-(last - first + 1) // max_points)  # ceil
    grouped = np.where(width > 1, first + (b - first) // width * width, b)  # width >= 1
    # a group's batch does not decrease with the batch within a dataset, so the distinct
    # grouped pairs are the changes along the sorted pairs (in sorted order)
    new_pair = new_run.copy()
    new_pair[1:] |= grouped[1:] != grouped[:-1]
    pair_map = np.cumsum(new_pair, dtype=np.int64) - 1
    return ds[new_pair], grouped[new_pair], index, pair_map


def _cache_in_group_order(prepared, pool) -> None:
    """Fill ``prepared.in_group_order`` (its rows' values in group order) with the intensity
    gathered on ``pool``'s thread while this one gathers the sigma and Friedel flags: the
    same arrays as the property makes."""
    grouping, friedel_minus, _ = prepared.grouped
    order = grouping.order
    intensity = pool.submit(np.take, prepared.intensity, order)
    sigma, minus = np.take(prepared.sigma, order), np.take(friedel_minus, order)
    prepared.__dict__["in_group_order"] = (intensity.result(), sigma, minus)


def _grouped_rows_pairs(prepared, batch_pairs) -> tuple | None:
    """The (dataset, batch) pairs of the prepared rows' groups (``_pairs_of_grouped_rows`` of
    :meth:`~xtalscale.stats.merging._Prepared.observation_groups` and the pairs of the future
    ``batch_pairs``), or None without those groups."""
    from ..stats import merging as ms

    groups = prepared.observation_groups()
    if groups is None:
        return None
    ds, batches, index, pair_map = batch_pairs.result()
    groups.check_length(len(index))
    return ms._pairs_of_grouped_rows(groups, ds, batches, index, pair_map)


def statistics_for_report(observations, n_bins: int = 20, anomalous: bool = True,
                          use_internal_variance: bool = False,
                          max_batch_points: int = 100, n_threads: int = 1,
                          asu_grouping: tuple | None = None) -> ReportInputs:
    """Statistics of scaled observations (a :class:`~xtalscale.merge.ScaledObservations`).

    Computed on exactly these observations, as dials.merge does. A statistic that cannot be
    computed (e.g. no reflection measured twice) is left out with a note saying why, so the
    report and the table say so instead of failing. Per-batch statistics of a dataset with
    more than ``max_batch_points`` batches are computed over groups of consecutive batches
    (each point at the group's first batch). With ``n_threads`` > 1 a second thread makes
    the batch pairs while the observations are grouped, gathers a third of the grouped
    values, then makes the resolution estimate while the merging and per-batch statistics
    are computed (it reads only the grouped observations they share; the results are the
    same). ``asu_grouping``: ``(grouping, friedel_minus)`` of the observations' ASU indices
    made already (see :meth:`xtalscale.stats.merging._Prepared.use_grouping`; the scaling
    job's), used instead of mapping and sorting them again when every observation is usable.
    """
    from ..stats import merging as ms  # the core module (merging_statistics is its facade)
    from ..stats.resolution import _estimate_resolution

    obs = observations
    out = ReportInputs()
    sigma = np.sqrt(obs.variance)
    arrays = (obs.miller_index, obs.intensity, sigma, obs.space_group, obs.unit_cell)
    settings = {"n_bins": n_bins, "use_internal_variance": use_internal_variance}

    def resolution(prepared) -> Any:
        """The estimate of the statistics of ``prepared`` (anomalous=False, seed 0: those of
        ``out.statistics``) or the ValueError that stopped it."""
        try:
            return _estimate_resolution(prepared, anomalous=False, seed=0)
        except ValueError as error:
            return error

    pending = batch_pairs = grouped_pairs = pool = None
    if n_threads > 1:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=1)
        # the batch pairs read the observations alone: made while this thread groups them
        batch_pairs = pool.submit(_grouped_batch_pairs, obs.batch, obs.dataset, max_batch_points)
    try:
        # MergingStatistics.from_arrays(*arrays, anomalous=False, **settings) in its two steps:
        # with n_threads > 1 the resolution estimate (which reads the prepared rows alone)
        # starts on the second thread once they are grouped
        prepared = ms._prepare(*arrays)
        prepared.n_threads = n_threads  # (its ASU mapping's threads; the same result)
        if asu_grouping is not None:
            prepared.use_grouping(*asu_grouping)
        if pool is not None and int(n_bins) >= 1:  # (a bad n_bins is reported first, as alone)
            prepared.grouped  # noqa: B018 - (cached before sharing)
            _cache_in_group_order(prepared, pool)
            # (the grouped rows' batch pairs, then the estimate: the per-batch statistics
            # after the merging statistics on this thread take as long)
            grouped_pairs = pool.submit(_grouped_rows_pairs, prepared, batch_pairs)
            pending = pool.submit(resolution, prepared)
        if anomalous and not obs.space_group.is_centric():
            # the statistics and their anomalous pass (same data and shells) from one pass
            # over the groups; should that fail, each as alone (the same values, or the same
            # error with the non-anomalous statistics kept)
            try:
                out.statistics, out.anomalous_statistics = ms.MergingStatistics._with_anomalous_pass(
                    prepared, **settings)
            except ValueError:
                out.statistics = ms.dataset_statistics(prepared, anomalous=False, **settings)
                out.anomalous_statistics = out.statistics.anomalous_pass()
        else:
            out.statistics = ms.dataset_statistics(prepared, anomalous=False, **settings)
    except ValueError as error:
        out.notes.append(f"Merging statistics could not be computed: {error}")
    finally:
        if pool is not None:
            pool.shutdown(wait=False)  # (its tasks still run; their results are waited for)
    if out.statistics is None:
        if pending is not None:
            pending.exception()  # (no estimate without statistics: waited for, not kept)
            pending = None
    elif pending is None:
        out.resolution = resolution(out.statistics._prepared)
    # one grouping of the observations for the per-observation statistics: the merging
    # statistics' own when they were computed on every usable row
    groups = out.statistics.observation_groups() if out.statistics is not None else None
    # (and then the groups' weighted means: those of the merging statistics)
    means = out.statistics.group_means() if groups is not None else None
    if groups is None:
        groups = ms.group_observations(obs.miller_index, obs.intensity, sigma, obs.space_group)
    out.observation_groups = groups
    # batch_statistics_and_deviations of the grouped batches, from the (dataset, batch) pairs
    # numbered once
    pairs = (batch_pairs.result() if batch_pairs is not None
             else _grouped_batch_pairs(obs.batch, obs.dataset, max_batch_points))
    # (those of the grouped rows, made on the second thread, when the groups are the
    # statistics' own)
    of_rows = grouped_pairs.result() if grouped_pairs is not None and means is not None else None
    per_batch, out.normalised_deviations = ms._pair_statistics_and_deviations(
        groups, *pairs, group_means=means, grouped_pairs=of_rows)
    if pending is not None:
        out.resolution = pending.result()  # (re-raises anything but a ValueError)
    if isinstance(out.resolution, ValueError):
        out.notes.append(f"Resolution estimate failed: {out.resolution}")
        out.resolution = None
    for d in ms.sorted_distinct(per_batch.dataset):  # (np.unique: without importing numpy.ma)
        mine = per_batch.dataset == d
        out.batch_statistics[f"dataset {int(d)}"] = {
            "batch": per_batch.batch[mine], "r_merge": per_batch.r_merge[mine],
            "i_over_sigma": per_batch.i_over_sigma_mean[mine]}
    return out
