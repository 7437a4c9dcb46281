"""DIALS ``scaling_library``: the scaling job's building blocks as functions for scripts."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .prepare import calculate_prescaling_correction, choose_initial_scaling_intensities

__all__ = [
    "calculate_prescaling_correction",
    "choose_initial_scaling_intensities",
    "create_Ih_table",
    "create_auto_scaling_model",
    "create_scaling_model",
    "merging_stats_from_scaled_array",
    "scale_against_target",
    "scale_single_dataset",
]


def _params(params: Any, **overrides: str) -> Any:
    from .phil import parse_phil_arguments

    if params is not None:
        return params
    return parse_phil_arguments([f"{k}={v}" for k, v in overrides.items()])[0]


def create_auto_scaling_model(experiment: Any) -> str:
    """The automatic model name for an experiment (physical, or KB for stills/narrow wedges)."""
    from .scaler import _auto_model

    return _auto_model(experiment)


def create_scaling_model(params: Any, experiments: Sequence[Any], reflections: Sequence[Any]) -> Any:
    """Give every experiment without a model (or all, with overwrite_existing_models) a new one."""
    from ..models import create_scaling_model as _create

    params = _params(params)
    for expt, table in zip(experiments, reflections):
        if getattr(expt, "scaling_model", None) is None or params.overwrite_existing_models:
            name = params.model or create_auto_scaling_model(expt)
            expt.scaling_model = _create(name, params, expt, table)
    return experiments


def create_Ih_table(experiments: Sequence[Any], reflections: Sequence[Any],
                    selections: Sequence[Any] | None = None, n_blocks: int = 1, anomalous: bool = False) -> Any:
    """An Ih table of the tables (rows ``selections``), grouped in the first experiment's space group."""
    from ..fit import IhTable

    sgs = {str(e.crystal.get_space_group()) for e in experiments}
    if len(sgs) > 1:
        raise ValueError(f"all experiments must share a space group (got {sorted(sgs)})")
    indices = None
    if selections is not None:
        indices = [np.flatnonzero(np.asarray(s, dtype=bool)) for s in selections]
    return IhTable(list(reflections), experiments[0].crystal.get_space_group(), indices_lists=indices,
                   nblocks=n_blocks, anomalous=anomalous)


def scale_single_dataset(reflections: Any, experiment: Any, params: Any = None, model: str = "physical") -> Any:
    """Scale one dataset with the job's algorithm and return its reflection table."""
    from ..experiments import ExperimentList
    from .algorithm import ScalingAlgorithm

    params = _params(params, model=model)
    algorithm = ScalingAlgorithm(params, ExperimentList([experiment]), [reflections])
    algorithm.run()
    return algorithm.finish()[1]


def scale_against_target(reflection_table: Any, experiment: Any, target_reflection_table: Any,
                         target_experiment: Any, params: Any = None, model: str = "KB") -> Any:
    """Scale a dataset against an already scaled one (its model fixed) and return the table."""
    from ..experiments import ExperimentList
    from .algorithm import ScalingAlgorithm

    params = _params(params, model=model)
    algorithm = ScalingAlgorithm(params, ExperimentList([target_experiment, experiment]),
                                 [target_reflection_table, reflection_table])
    target_model = algorithm.scaler.datasets[0].model
    target_model.fixed_components = list(target_model.components)
    algorithm.run()
    _, joined = algorithm.finish()
    return joined.select(np.asarray(joined["id"]) == 1)


def merging_stats_from_scaled_array(experiments: Any, reflections: Any, n_bins: int = 20,
                                    use_internal_variance: bool = False) -> Any:
    """Merging statistics of scaled reflections (iotbx conventions)."""
    from ..stats.merging import MergingStatistics

    return MergingStatistics.from_reflections(experiments, reflections, n_bins=n_bins,
                                               use_internal_variance=use_internal_variance)
