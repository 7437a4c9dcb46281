"""Merging scaled data: observations → unique reflections → merged MTZ (``xtalscale merge``).

Entry points for pipelines (and the scaling job)::

    from xtalscale.merge import (observations_from_reflections, observations_from_mtz,
                                 merge_observations, write_merged_mtz, french_wilson)

    obs = observations_from_reflections(experiments, reflections)   # dials.merge's selection
    merged = merge_observations(obs, anomalous=True, truncate=True)  # IMEAN, I(±), F, DANO, N
    write_merged_mtz("merged.mtz", merged)

``xtalscale merge`` (:mod:`xtalscale.cli.merge`) runs these with the PHIL parameters of
:mod:`xtalscale.merge.params`, adds the merging statistics (:mod:`xtalscale.merging_statistics`)
and writes the HTML report (:func:`xtalscale.report.write_html_report`).
"""
from __future__ import annotations

from .french_wilson import FrenchWilsonResult, expected_intensities, french_wilson
from .merging import MergedData, merge_observations, write_merged_mtz
from .observations import (
    NoScaledDataError,
    ScaledObservations,
    observations_from_mtz,
    observations_from_reflections,
)

__all__ = [
    "FrenchWilsonResult",
    "MergedData",
    "NoScaledDataError",
    "ScaledObservations",
    "expected_intensities",
    "french_wilson",
    "merge_observations",
    "observations_from_mtz",
    "observations_from_reflections",
    "write_merged_mtz",
]
