"""Reflection selection for the minimisation (spec §8.3): DIALS's class-matrix ("quasi-random")
selection, checked on the worked examples DIALS's own tests use, and on real sweeps."""
from __future__ import annotations

import numpy as np
import pytest

from xtalscale.job.grouped import GroupedObservations
from xtalscale.job.reflection_selection import class_matrix_selection, select_connected_across_datasets
from xtalscale.symmetry import SpaceGroup

# reflections per class (row) and symmetry group (column), columns in preference order
MATRIX = np.array([[3, 1, 3, 2, 1, 1, 0],
                   [2, 2, 0, 0, 3, 0, 0],
                   [1, 4, 2, 1, 0, 0, 5]], dtype=float)


@pytest.mark.parametrize("limits, unused, totals", [
    ((1, 8, 20), [2, 3, 4, 5, 6], [4, 4, 5]),     # the minimum total is not met: stop anyway
    ((2, 3, 8), [2, 3, 4, 5, 6], [4, 4, 5]),      # the maximum total is reached
    ((9, 50, 100), [], [11, 7, 13]),              # more asked than there is: everything
])
def test_class_matrix_selection_limits(limits, unused, totals):
    total, used = class_matrix_selection(MATRIX, *limits)
    assert list(np.flatnonzero(~used)) == unused
    assert list(total) == totals


def test_class_matrix_worked_example():
    """The example of DIALS's module notes: target 5 per class takes groups 1, 5, 0, 4 (in that
    order of connectivity) and gives 8, 7, 7 reflections per class."""
    counts = np.array([[3, 3, 2, 0, 1, 1, 1], [0, 2, 0, 0, 3, 2, 1], [2, 1, 1, 5, 0, 4, 0]], float)
    order = np.argsort(-(counts > 0).sum(axis=0), kind="stable")
    total, used = class_matrix_selection(counts[:, order], 5, 0, 100)
    assert list(order[used]) == [1, 5, 0, 4]
    assert list(total) == [8, 7, 7]


def _grouped_three_datasets():
    def table(per_group):
        hkl = np.array([(0, 0, g + 1) for g, n in enumerate(per_group) for _ in range(n)], np.int32)
        n = len(hkl)
        return {"intensity": np.ones(n), "variance": np.ones(n), "inverse_scale_factor": np.ones(n),
                "miller_index": hkl, "d": np.full(n, 2.0)}

    tables = [table([3, 3, 2, 0, 1, 1, 1]), table([0, 2, 0, 0, 3, 2, 1]), table([2, 1, 1, 5, 0, 4, 0])]
    return GroupedObservations.from_tables(tables, SpaceGroup("P 1"), extra_columns=("d",))


def test_connected_across_datasets_as_dials():
    """DIALS's cross-dataset test case: with 30 reflections wanted (one resolution bin) the
    rows chosen in each dataset are DIALS's; with 120 wanted, 11, 8 and 13."""
    grouped = _grouped_three_datasets()
    rows = select_connected_across_datasets(grouped, 30, isigma_cutoff=0.0, n_bins=1)
    per_dataset = [sorted(r.tolist()) for r in grouped.rows_per_dataset(np.flatnonzero(rows))]
    assert per_dataset == [[0, 1, 2, 3, 4, 5, 8, 9], [0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 9, 10, 11, 12]]
    rows = select_connected_across_datasets(grouped, 120, isigma_cutoff=0.0, n_bins=1)
    assert [r.size for r in grouped.rows_per_dataset(np.flatnonzero(rows))] == [11, 8, 13]


def test_no_group_with_multiplicity_raises():
    def table():
        return {"intensity": np.ones(2), "variance": np.ones(2), "inverse_scale_factor": np.ones(2),
                "miller_index": np.array([[1, 0, 0], [2, 0, 0]], np.int32), "d": np.full(2, 2.0)}

    grouped = GroupedObservations.from_tables([table()], SpaceGroup("P 1"), extra_columns=("d",))
    with pytest.raises(ValueError, match="more than one observation"):
        select_connected_across_datasets(grouped, 10)
