"""Kernels of the outlier rounds and error-model refinements: the threaded subset grouping and
the fused error-model variances, bit for bit their serial / numpy forms for any thread count,
and their input checks."""
from __future__ import annotations

import numpy as np
import pytest

from xtalscale._core import job as kernels
from xtalscale.error_model import BasicErrorModel


def _grouping(n: int, n_groups: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(n).astype(np.int64)
    cuts = np.sort(rng.integers(0, n, n_groups - 1))
    offsets = np.concatenate([[0], cuts, [n]]).astype(np.int64)
    return order, offsets


def _subset_reference(order: np.ndarray, offsets: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The subset's grouping by numpy: kept rows renumbered, empty groups dropped."""
    rank = np.cumsum(keep) - keep
    sizes = np.add.reduceat(keep[order].astype(np.int64), offsets[:-1]) if order.size else np.zeros(0, np.int64)
    sizes = np.where(np.diff(offsets) > 0, sizes, 0)  # reduceat of an empty group gives a row's value
    new_order = rank[order[keep[order]]]
    return new_order, np.concatenate([[0], np.cumsum(sizes[sizes > 0])])


@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("n, n_groups, fraction", [(300_001, 20_000, 0.3), (70_000, 9000, 0.97), (1000, 5, 0.5),
                                                     (100_000, 4097, 0.01),
                                                     (0, 1, 0.5)])
def test_threaded_subset_grouping_is_the_serial_one(n_threads, n, n_groups, fraction):
    order, offsets = _grouping(n, n_groups, n)
    keep = np.random.default_rng(1).random(n) < fraction
    got_order, got_offsets = kernels.subset_grouping(order, offsets, keep, n_threads=n_threads)
    want_order, want_offsets = _subset_reference(order, offsets, keep)
    np.testing.assert_array_equal(got_order, want_order)
    np.testing.assert_array_equal(got_offsets, want_offsets)
    assert got_order.dtype == np.int64 and got_offsets.dtype == np.int64
    serial = kernels.subset_grouping(order, offsets, keep)
    assert serial[0].tobytes() == got_order.tobytes() and serial[1].tobytes() == got_offsets.tobytes()


def test_subset_grouping_rejects_bad_input():
    order, offsets = _grouping(100, 10, 0)
    keep = np.ones(100, bool)
    with pytest.raises(ValueError, match="n_threads"):
        kernels.subset_grouping(order, offsets, keep, n_threads=0)
    with pytest.raises(IndexError, match="order"):  # rows beyond keep's length
        kernels.subset_grouping(order, offsets, keep[:50])
    with pytest.raises(ValueError, match="keep"):
        kernels.subset_grouping(order, offsets, np.ones((10, 10), bool))
    with pytest.raises(ValueError, match="last offset"):
        kernels.subset_grouping(order, offsets[:-1], keep)


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_error_model_variances_are_the_numpy_formula_bit_for_bit(n_threads):
    rng = np.random.default_rng(5)
    n = 200_003
    V = rng.uniform(0.1, 1e4, n)
    I = rng.normal(100.0, 400.0, n)
    model = BasicErrorModel(1.37, 0.0431)
    want = model.update_variances(V, I)
    got, weight = kernels.error_model_variances(V, I, model.a, model.b, n_threads=n_threads)
    assert got.tobytes() == want.tobytes()
    assert weight.tobytes() == (1.0 / want).tobytes()
    # the model's own fused form
    got2, weight2 = model.update_variances_and_weights(V, I, n_threads=n_threads)
    assert got2.tobytes() == want.tobytes() and weight2.tobytes() == weight.tobytes()
    # the job's refined model (a subclass) too; a subclass with its own formula keeps it

    class Doubled(BasicErrorModel):
        def update_variances(self, variances, intensities):
            return 2.0 * super().update_variances(variances, intensities)

    own, own_weight = Doubled(1.37, 0.0431).update_variances_and_weights(V, I, n_threads=n_threads)
    assert own.tobytes() == (2.0 * want).tobytes() and own_weight.tobytes() == (1.0 / (2.0 * want)).tobytes()
    from xtalscale.job.error_model import BasicErrorModel as RefinedModel

    refined = RefinedModel(1.37, 0.0431)
    assert refined.update_variances_and_weights(V, I, n_threads=n_threads)[0].tobytes() == want.tobytes()
    with pytest.raises(ValueError, match="same shape"):
        model.update_variances_and_weights(V, I[:-1])


def test_error_model_variances_reject_bad_input():
    V, I = np.ones(5), np.ones(5)
    with pytest.raises(ValueError, match="intensity"):
        kernels.error_model_variances(V, I[:4], 1.0, 0.02)
    with pytest.raises(ValueError, match="finite"):
        kernels.error_model_variances(V, I, float("nan"), 0.02)
    with pytest.raises(ValueError, match="n_threads"):
        kernels.error_model_variances(V, I, 1.0, 0.02, n_threads=0)


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_gather_values_is_numpy_take(n_threads):
    rng = np.random.default_rng(8)
    values = rng.normal(size=300_001)
    rows = rng.integers(0, values.size, 200_003)
    np.testing.assert_array_equal(kernels.gather_values(values, rows, n_threads=n_threads), values.take(rows))
    out = np.full(rows.size + 10, -1.0)
    got = kernels.gather_values(values, rows, out=out[5:-5], n_threads=n_threads)
    assert np.shares_memory(got, out)
    np.testing.assert_array_equal(out[5:-5], values.take(rows))
    assert (out[:5] == -1).all() and (out[-5:] == -1).all()
    assert kernels.gather_values(values, np.zeros(0, np.int64)).size == 0


def test_gather_values_rejects_bad_input():
    values = np.arange(10.0)
    with pytest.raises(IndexError, match="index 10 at position 2"):
        kernels.gather_values(values, np.array([0, 9, 10, 3]))
    with pytest.raises(IndexError, match="index -1"):
        kernels.gather_values(values, np.array([-1]), n_threads=2)
    with pytest.raises(ValueError, match="out must be"):
        kernels.gather_values(values, np.array([1, 2]), out=np.zeros(3))
    with pytest.raises(ValueError, match="out must be"):
        kernels.gather_values(values, np.array([1, 2]), out=np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="out must be"):
        kernels.gather_values(values, np.array([1, 2]), out=np.zeros(4)[::2])
    with pytest.raises(ValueError, match="n_threads"):
        kernels.gather_values(values, np.array([1]), n_threads=0)
    with pytest.raises(ValueError, match="1-dimensional"):
        kernels.gather_values(values.reshape(2, 5), np.array([1]))


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_threaded_normalised_deviations_are_the_serial_ones(n_threads):
    rng = np.random.default_rng(9)
    n = 150_001
    dev, V = rng.normal(0.0, 30.0, n), rng.uniform(1.0, 500.0, n)
    I, g = rng.normal(200.0, 300.0, n), rng.uniform(0.3, 3.0, n)
    serial = kernels.error_model_normalised_deviations(dev, V, I, g, 1.3, 0.04)
    threaded = kernels.error_model_normalised_deviations(dev, V, I, g, 1.3, 0.04, n_threads=n_threads)
    assert serial.tobytes() == threaded.tobytes()
    np.testing.assert_array_equal(serial, dev / (1.3 * np.sqrt(V + (0.04 * I) ** 2) / g))
    with pytest.raises(ValueError, match="n_threads"):
        kernels.error_model_normalised_deviations(dev, V, I, g, 1.3, 0.04, n_threads=0)


# ---------------------------------------------------------------- the rounds' kept subset
def _scaler(*args: str):
    from pathlib import Path

    from xtalscale.job.algorithm import ScalingAlgorithm
    from xtalscale.job.inputs import load_inputs
    from xtalscale.job.phil import parse_phil_arguments

    data = Path(__file__).resolve().parents[1] / "data" / "dials_l_cysteine_integrated"
    sweeps = [str(data / "20_integrated.pickle"), str(data / "20_integrated_experiments.json"),
              str(data / "25_integrated.pickle"), str(data / "25_integrated_experiments.json")]
    inputs = load_inputs(sweeps)
    params, _ = parse_phil_arguments(list(args))
    return ScalingAlgorithm(params, inputs.experiments, inputs.tables).scaler


def test_subset_rounds_reuse_their_layout_and_give_the_fresh_subset():
    """The groups holding the same rows, asked again (the subset rounds), come from the kept
    layout (no new grouping) with the current g, and equal a fresh subset of the grouping."""
    from xtalscale import flex_arrays as fa
    from xtalscale.job.scaler import _rows_of_groups_holding

    scaler = _scaler()
    every = scaler.global_Ih_table  # the cached grouping of every suitable row
    rng = np.random.default_rng(3)
    rows = rng.random(every.size) < 0.03

    def fresh():
        return scaler._grouped_suitable().subset(_rows_of_groups_holding(scaler._grouped_suitable(), rows))

    first = scaler._grouped_groups_holding(rows)
    held = scaler._subset_held
    assert held is not None and held.holding is not None
    # an expansion replaces g: the kept layout serves, with the new g
    for ds in scaler.datasets:
        ds.table["inverse_scale_factor"] = fa.double(rng.uniform(0.5, 2.0, len(ds.table)))
    again = scaler._grouped_groups_holding(rows.copy())
    assert scaler._subset_held is held and again.order is first.order
    want = fresh()
    for name in ("intensity", "variance", "weight", "scale", "asu_hkl", "dataset", "row", "order", "offsets"):
        assert getattr(again, name).tobytes() == getattr(want, name).tobytes(), name
    assert not np.array_equal(again.scale, first.scale)
    # a one-off subset of other rows leaves the kept layout in place
    scaler._cached_subset(rng.random(every.size) < 0.5)
    assert scaler._subset_held is held
    # most rows' groups: a subset not kept (the kept one stays); other few rows: kept instead
    scaler._grouped_groups_holding(~rows)
    assert scaler._subset_held is held
    other = rng.random(every.size) < 0.01
    scaler._grouped_groups_holding(other)
    assert scaler._subset_held is not held and np.array_equal(scaler._subset_held.holding, other)


def test_suitable_values_at_is_the_kept_values_taken():
    scaler = _scaler()
    n = int(scaler._suitable_starts()[-1])
    idx = np.flatnonzero(np.random.default_rng(2).random(n) < 0.3)
    for name in ("intensity", "inverse_scale_factor", "d"):
        scaler._suitable_values_held.pop(name, None)
        gathered = scaler.suitable_values_at(name, idx)  # from the tables (none kept)
        assert name not in scaler._suitable_values_held
        np.testing.assert_array_equal(gathered, scaler.suitable_values(name).take(idx))
        np.testing.assert_array_equal(scaler.suitable_values_at(name, idx), gathered)  # from the kept array
    np.testing.assert_array_equal(scaler.suitable_values_at("no_such_column", idx, 1.0), np.ones(idx.size))
    with pytest.raises(KeyError, match="no_such_column"):
        scaler.suitable_values_at("no_such_column", idx)
