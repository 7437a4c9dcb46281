"""Statistics layer: merging statistics and resolution estimates (C++ kernels underneath)."""
from .merging import (
    BatchStatistics,
    MergedArray,
    MergingShell,
    MergingStatistics,
    MergingStatisticsError,
    batch_statistics,
    dataset_statistics,
    normalised_deviations,
    shell_limits,
)

__all__ = [
    "BatchStatistics",
    "MergedArray",
    "MergingShell",
    "MergingStatistics",
    "MergingStatisticsError",
    "batch_statistics",
    "dataset_statistics",
    "normalised_deviations",
    "shell_limits",
]
