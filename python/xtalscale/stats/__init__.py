"""Statistics layer: merging statistics and resolution estimates (C++ kernels underneath)."""
from .merging import (
    BatchStatistics,
    MergedArray,
    MergingShell,
    MergingStatistics,
    MergingStatisticsError,
    ObservationGroups,
    batch_statistics,
    batch_statistics_and_deviations,
    batch_statistics_from_reflections,
    dataset_statistics,
    group_observations,
    normalised_deviations,
    shell_limits,
)
from .resolution import ResolutionEstimate, ResolutionResult, estimate_resolution

__all__ = [
    "BatchStatistics",
    "MergedArray",
    "MergingShell",
    "MergingStatistics",
    "MergingStatisticsError",
    "ObservationGroups",
    "ResolutionEstimate",
    "ResolutionResult",
    "batch_statistics",
    "batch_statistics_and_deviations",
    "batch_statistics_from_reflections",
    "dataset_statistics",
    "estimate_resolution",
    "group_observations",
    "normalised_deviations",
    "shell_limits",
]
