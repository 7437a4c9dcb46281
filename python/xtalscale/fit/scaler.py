"""A minimal scaler implementing the protocol the refineries use (tests, examples, benchmarks).

The scaling-job layer has the full DIALS scalers; this one only wires models, reflection tables
and an :class:`~xtalscale.fit.ih_table.IhTable` together: ``Ih_table``,
``get_blocks_for_minimisation()``, ``update_for_minimisation(apm, block_id)`` and
``params.scaling_refinery.rmsd_tolerance``.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .._lazy import LazyModule
from ..parameter_managers import RefinerCalculator, single_managers
from .ih_table import IhTable

if TYPE_CHECKING:
    import scipy.sparse as sp
else:
    sp = LazyModule("scipy.sparse")  # imported on first use: see _lazy

__all__ = ["BasicScaler"]


class BasicScaler:
    """Datasets (a model with components holding their data, and a table) sharing one Ih table.

    Parameters
    ----------
    models : list of scaling models (or objects with ``components``), configured on ``tables``
    tables : list of reflection tables with ``intensity``, ``variance``, ``miller_index``
    space_group : SpaceGroup or str
    nblocks : int
    group_keys : optional explicit group keys per table (voxels)
    """

    def __init__(self, models: Sequence[Any], tables: Sequence[Any], space_group: Any = None,
                 nblocks: int = 1, group_keys: Sequence[Any] | None = None, rmsd_tolerance: float = 1e-4) -> None:
        self.models = list(models)
        self.params = SimpleNamespace(scaling_refinery=SimpleNamespace(rmsd_tolerance=rmsd_tolerance))
        self.Ih_table = IhTable(list(tables), space_group, nblocks=nblocks, group_keys=group_keys)
        for i, model in enumerate(self.models):
            sels = self.Ih_table.get_block_selections_for_dataset(i)
            for comp in model.components.values():
                comp.update_reflection_data(block_selections=sels)

    @property
    def components(self) -> dict[str, Any]:
        return self.models[0].components

    def get_blocks_for_minimisation(self) -> list[Any]:
        return self.Ih_table.blocked_data_list[: self.Ih_table.n_work_blocks]

    def update_for_minimisation(self, apm: Any, block_id: int) -> None:
        """Set g and ∂g/∂p of every dataset on the block (dataset rows in order) and Ĩ."""
        apms = single_managers(apm)
        scales, mats = [], []
        n_total = sum(a.n_active_params for a in apms)
        start = 0
        for a in apms:
            g, d = RefinerCalculator.calculate_scales_and_derivatives(a, block_id)
            d = sp.csr_matrix(d) if d.shape[1] else sp.csr_matrix((g.size, 0))
            pad = sp.hstack([sp.csr_matrix((g.size, start)), d,
                             sp.csr_matrix((g.size, n_total - start - d.shape[1]))], format="csr")
            scales.append(np.asarray(g, dtype=np.float64))
            mats.append(pad)
            start += a.n_active_params
        block = self.Ih_table.blocked_data_list[block_id]
        block.inverse_scale_factors = np.concatenate(scales)
        block.derivatives = sp.vstack(mats, format="csr")
        block.calc_Ih()
