"""DIALS import path ``dials.algorithms.scaling.outlier_rejection``. Implemented in
:mod:`xtalscale.job.outlier_rejection`."""
from __future__ import annotations

from xtalscale.job.outlier_rejection import (
    NormDevOutlierRejection,
    OutlierRejectionBase,
    SimpleNormDevOutlierRejection,
    TargetedOutlierRejection,
    determine_Esq_outlier_index_arrays,
    determine_outlier_index_arrays,
    limit_outlier_weights,
    reject_outliers,
)

__all__ = ["NormDevOutlierRejection", "OutlierRejectionBase", "SimpleNormDevOutlierRejection",
           "TargetedOutlierRejection", "determine_Esq_outlier_index_arrays",
           "determine_outlier_index_arrays", "limit_outlier_weights", "reject_outliers"]
