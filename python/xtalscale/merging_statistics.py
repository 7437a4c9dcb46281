"""iotbx.merging_statistics-shaped access to xtalscale's merging statistics (thin re-export).

Scripts written against cctbx read naturally::

    from xtalscale import merging_statistics
    stats = merging_statistics.dataset_statistics.from_mtz("scaled_unmerged.mtz", n_bins=20)
    print(stats.overall.cc_one_half, [b.r_pim for b in stats.bins])
    print(stats.as_table())

Everything is defined in :mod:`xtalscale.stats.merging`; this module only re-exports it.
"""
from .stats.merging import (
    BatchStatistics,
    MergedArray,
    MergingShell,
    MergingStatistics,
    MergingStatisticsError,
    batch_statistics,
    batch_statistics_from_reflections,
    dataset_statistics,
    normalised_deviations,
    shell_limits,
)

# iotbx's names for the per-shell object and its error
from .stats.merging import MergingShell as merging_stats  # noqa: E402
from .stats.merging import MergingStatisticsError as StatisticsError  # noqa: E402

__all__ = [
    "BatchStatistics",
    "MergedArray",
    "MergingShell",
    "MergingStatistics",
    "MergingStatisticsError",
    "StatisticsError",
    "batch_statistics",
    "batch_statistics_from_reflections",
    "dataset_statistics",
    "merging_stats",
    "normalised_deviations",
    "shell_limits",
]
