"""DIALS's scaler factories (``scaler_factory.py``) over the job's scalers."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .algorithm import create_scaler
from .prepare import filter_bad_reflections
from .scaler import MultiScaler, NullScaler, SingleScaler, TargetScaler

__all__ = [
    "MultiScalerFactory",
    "NullScalerFactory",
    "ScalerFactory",
    "SingleScalerFactory",
    "TargetScalerFactory",
    "create_scaler",
]


class ScalerFactory:
    """Shared pre-processing (DIALS: ``filter_bad_reflections``)."""

    @staticmethod
    def filter_bad_reflections(reflections: Any, partiality_cutoff: float = 0.4, min_isigi: float = -5.0,
                               intensity_choice: str = "combine") -> Any:
        return filter_bad_reflections(reflections, partiality_cutoff, min_isigi, intensity_choice)


class SingleScalerFactory(ScalerFactory):
    @staticmethod
    def create(params: Any, experiment: Any, reflection_table: Any, for_multi: bool = False) -> SingleScaler:
        from .algorithm import _prepare_dataset
        from .prepare import Reasons

        _prepare_dataset(params, reflection_table, Reasons())
        return SingleScaler(params, experiment, reflection_table, for_multi=for_multi)


class NullScalerFactory(ScalerFactory):
    @staticmethod
    def create(params: Any, experiment: Any, reflection_table: Any) -> NullScaler:
        scaler = NullScaler(params, experiment, reflection_table)
        scaler.datasets[0].model.fixed_components = list(scaler.datasets[0].model.components)
        return scaler


class MultiScalerFactory(ScalerFactory):
    @staticmethod
    def create(params: Any, experiments: Sequence[Any], reflections: Sequence[Any]) -> MultiScaler:
        singles = [SingleScalerFactory.create(params, e, r, for_multi=True) for e, r in zip(experiments, reflections)]
        return MultiScaler(singles)

    @staticmethod
    def create_from_targetscaler(targetscaler: TargetScaler) -> MultiScaler:
        for ds in targetscaler.datasets:
            ds.model.fixed_components = []
        return MultiScaler(targetscaler.single_scalers)


class TargetScalerFactory(ScalerFactory):
    @staticmethod
    def create(params: Any, experiments: Sequence[Any], reflections: Sequence[Any],
               is_scaled_list: Sequence[bool]) -> TargetScaler:
        scaled, unscaled = [], []
        for e, r, done in zip(experiments, reflections, is_scaled_list):
            (scaled if done else unscaled).append(SingleScalerFactory.create(params, e, r, for_multi=True))
        return TargetScaler(scaled, unscaled)
