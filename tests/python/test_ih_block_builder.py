"""The Ih table's blocks built in one C++ pass (``_core.fit.build_ih_block``) are the blocks
the former numpy path built (gather each column, then ``_complete``): bit for bit, dtype for
dtype, on the shipped sweeps (several datasets, a free set, many blocks) and on edge cases;
bad input to the kernel is refused with Python exceptions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xtalscale._core import fit as _fit
from xtalscale.fit.ih_table import IhTableBlock, IhTableError, _given_group_parts, _stable_group_order

DATA = Path(__file__).resolve().parents[1] / "data" / "dials_l_cysteine_integrated"
SWEEP20 = [str(DATA / "20_integrated.pickle"), str(DATA / "20_integrated_experiments.json")]
SWEEP25 = [str(DATA / "25_integrated.pickle"), str(DATA / "25_integrated_experiments.json")]


def _numpy_block(n_groups, parts):
    """The former path: each column gathered with numpy into the block, then _complete()."""
    sizes = [int(rows.size) for _, _, rows, _ in parts]
    block = IhTableBlock(n_groups, sum(sizes), len(parts))
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(starts[-1])
    for name in parts[0][1]:
        dtype = np.result_type(*(np.asarray(columns[name]).dtype for _, columns, _, _ in parts))
        out = np.empty(n, dtype=dtype)
        for k, (_, columns, rows, _) in enumerate(parts):
            np.take(np.asarray(columns[name]), rows, out=out[starts[k]:starts[k + 1]])
        block._arrays[name] = out
    block._arrays["dataset_id"] = np.repeat(np.arange(len(parts), dtype=np.int64), sizes)
    block._group_ids = np.concatenate([np.asarray(groups, np.int64) for groups, _, _, _ in parts])
    block._hkl = np.concatenate([np.asarray(hkl).reshape(-1, 3)[rows] for _, _, rows, hkl in parts])
    loc = block._arrays["loc_indices"]
    for k in range(len(parts)):
        block.block_selections[k] = loc[starts[k]:starts[k + 1]].astype(np.int64)
        block.dataset_info[k] = {"start_index": int(starts[k]), "end_index": int(starts[k + 1])}
    block._n_filled, block._next_dataset = n, len(parts)
    block._complete()
    return block


def _numpy_table_blocks(cols, hkls, group_index, nblocks, pct, offset):
    """The former make_ready_for_scaling + IhTable._build: gathered columns per dataset, the
    rows' groups, the blocks' partition, each block by _numpy_block."""
    parts, offs = _given_group_parts(group_index, [c["intensity"].size for c in cols])
    gidx = np.concatenate(parts)
    n_unique = offs.size - 1
    is_free = np.zeros(n_unique, bool)
    if pct > 0:
        pos = offset + int(100 / pct) * np.arange(int(pct * n_unique / 100))
        is_free[pos[pos < n_unique]] = True
    n_work = max(1, min(nblocks, int(n_unique - is_free.sum())))
    bounds = [int(i * n_unique / n_work) for i in range(n_work)] + [n_unique]
    block_of_group = np.searchsorted(np.asarray(bounds[1:]), np.arange(n_unique), side="right")
    block_of_group[is_free] = n_work
    starts = np.cumsum([0] + [c["intensity"].size for c in cols])
    blocks = []
    for b in range(n_work + (1 if pct > 0 else 0)):
        groups_b = np.flatnonzero(block_of_group == b)
        local = np.full(n_unique, -1, np.int64)
        local[groups_b] = np.arange(groups_b.size)
        parts = []
        for d, c in enumerate(cols):
            g = gidx[starts[d]:starts[d + 1]]
            rows = np.flatnonzero(block_of_group[g] == b)
            rows = rows[np.argsort(g[rows], kind="stable")]
            parts.append((local[g[rows]], c, rows, hkls[d]))
        blocks.append(_numpy_block(groups_b.size, parts))
    return blocks


def _assert_same_block(new, old):
    assert list(new.Ih_table) == list(old.Ih_table)  # same columns, same order
    for name, values in old.Ih_table.items():
        assert new.Ih_table[name].dtype == values.dtype, name
        assert new.Ih_table[name].tobytes() == values.tobytes(), name
    for attr in ("_group_ids", "_order", "_offsets", "_table_rows", "exclusion"):
        a, b = getattr(new, attr), getattr(old, attr)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), attr
    assert new.n_groups == old.n_groups and new.size == old.size
    assert new.dataset_info == old.dataset_info
    assert len(new.block_selections) == len(old.block_selections)
    for k, (a, b) in enumerate(zip(new.block_selections, old.block_selections)):
        assert a.dtype == np.int64 and a.tobytes() == b.tobytes()
        assert not np.shares_memory(a, new.Ih_table["loc_indices"])  # its own array
        for other in new.block_selections[k + 1:]:
            assert not np.shares_memory(a, other)
    h_new, h_old = new.asu_miller_index, old.asu_miller_index
    assert h_new.dtype == h_old.dtype and h_new.tobytes() == h_old.tobytes()


@pytest.mark.parametrize("free_set", [False, True])
def test_job_blocks_are_the_numpy_paths_blocks(monkeypatch, free_set):
    """Two sweeps' minimisation table (streamed in ~1,000-row blocks, with and without a free
    set): every block equals the former numpy path's, bit for bit."""
    from xtalscale._rows import take_rows
    from xtalscale.job import scaler as scaler_module
    from xtalscale.job.algorithm import ScalingAlgorithm
    from xtalscale.job.inputs import load_inputs
    from xtalscale.job.phil import parse_phil_arguments
    from xtalscale.job.reflection_selection import select_for_minimisation

    monkeypatch.setattr(scaler_module, "STREAM_MIN_ROWS", 1000)
    monkeypatch.setattr(scaler_module, "STREAM_BLOCK_ROWS", 1000)
    monkeypatch.setattr(scaler_module, "FUSED_BLOCK_ROWS", 1000)
    inputs = load_inputs(SWEEP20 + SWEEP25)
    args = ["output.html=None"] + (["use_free_set=True", "free_set_percentage=10", "free_set_offset=3"]
                                   if free_set else [])
    params, _ = parse_phil_arguments(args)
    scaler = ScalingAlgorithm(params, inputs.experiments, inputs.tables).scaler
    select_for_minimisation(scaler)
    assert scaler.global_Ih_table is not None  # the job's grouping of the suitable rows, cached
    scaler.make_ready_for_scaling()
    table = scaler.Ih_table
    assert len(scaler.datasets) == 2 and table.n_work_blocks >= 4
    assert bool(table.free_Ih_table) == free_set

    # the former make_ready_for_scaling's inputs: the rows' columns gathered first
    cached = scaler._grouped_cache
    group_of_row = cached.group_of_row()
    cols, hkls, group_index, start = [], [], [], 0
    for ds in scaler.datasets:
        n_suitable = int(ds.suitable.sum())
        sel = ds.minimisation.copy() if ds.minimisation is not None else np.ones(n_suitable, bool)
        if ds.outliers.size:
            sel &= ~ds.outliers
        idx = np.flatnonzero(sel)
        names = ("intensity", "variance", "inverse_scale_factor")
        c = dict(zip(names, ds.columns(names, idx)))
        c["loc_indices"] = idx
        cols.append(c)
        hkls.append(take_rows(cached.asu_hkl, start + idx))
        group_index.append(group_of_row.take(start + idx))
        start += n_suitable
    so = params.scaling_options
    pct = float(so.free_set_percentage) if so.use_free_set else 0.0
    n_rows = sum(c["intensity"].size for c in cols)
    old = _numpy_table_blocks(cols, hkls, group_index, -(-n_rows // 1000), pct, int(so.free_set_offset))
    assert len(old) == len(table.blocked_data_list)
    some_dataset_missing = False
    for new_block, old_block in zip(table.blocked_data_list, old):
        _assert_same_block(new_block, old_block)
        some_dataset_missing |= any(info["start_index"] == info["end_index"]
                                    for info in new_block.dataset_info.values())
    # and the public constructor on the gathered tables makes the same blocks
    from xtalscale.fit import IhTable

    public = IhTable([{**c, "asu_miller_index": h} for c, h in zip(cols, hkls)], scaler.space_group,
                     nblocks=-(-n_rows // 1000), free_set_percentage=pct, free_set_offset=int(so.free_set_offset),
                     group_index=group_index)
    for new_block, old_block in zip(public.blocked_data_list, old):
        _assert_same_block(new_block, old_block)
    # and so does it on the whole columns with indices_lists, grouping the ASU indices itself
    whole, start = [], 0
    for ds in scaler.datasets:
        rows, n = ds.suitable_idx, int(ds.suitable.sum())
        whole.append({name: np.asarray(ds.table[name], np.float64)[rows]
                      for name in ("intensity", "variance", "inverse_scale_factor")}
                     | {"asu_miller_index": np.asarray(cached.asu_hkl)[start:start + n]})
        start += n
    by_hkl = IhTable(whole, scaler.space_group, indices_lists=[c["loc_indices"] for c in cols],
                     nblocks=-(-n_rows // 1000), free_set_percentage=pct, free_set_offset=int(so.free_set_offset),
                     anomalous=bool(params.anomalous))
    for new_block, old_block in zip(by_hkl.blocked_data_list, old):
        _assert_same_block(new_block, old_block)


def _edge_parts(rng):
    """Three datasets, one with no rows in the block; NaN and infinite intensities, σ² <= 0,
    NaN and infinite σ², an extra float32 and an extra float64 column."""
    parts = []
    for n, n_take in ((12, 9), (5, 0), (8, 6)):
        inten = rng.uniform(1, 10, n)
        var = rng.uniform(0.5, 2, n)
        inten[:3] = [np.nan, np.inf, -np.inf]
        var[3:7 if n > 7 else n] = [0.0, -1.0, np.nan, np.inf][: min(4, n - 3)]
        var[0] = 0.0  # both bad: the intensity's code wins
        columns = {"intensity": inten, "variance": var, "inverse_scale_factor": rng.uniform(0.8, 1.2, n),
                   "d": rng.uniform(1, 3, n).astype(np.float32), "x": rng.uniform(0, 1, n),
                   "loc_indices": rng.permutation(40)[:n].astype(np.int64)}
        rows = rng.permutation(n)[:n_take]
        groups = np.sort(rng.integers(0, 5, rows.size))
        parts.append((groups, columns, rows, rng.integers(-5, 5, (n, 3)).astype(np.int32)))
    return parts


def test_edge_cases_match_the_numpy_path():
    rng = np.random.default_rng(11)
    parts = _edge_parts(rng)
    new, old = IhTableBlock._gathered(5, parts), _numpy_block(5, parts)
    _assert_same_block(new, old)
    assert new.dataset_info[1] == {"start_index": 9, "end_index": 9}
    assert new.block_selections[1].size == 0 and new.block_selections[1].dtype == np.int64
    assert set(np.unique(new.exclusion)) == {0, 1, 2}
    assert new.Ih_table["d"].dtype == np.float32
    # every dataset empty: an empty block
    empty = [(g[:0], c, r[:0], h) for g, c, r, h in parts]
    _assert_same_block(IhTableBlock._gathered(5, empty), _numpy_block(5, empty))
    # as add_data once per dataset gives it
    one_by_one = IhTableBlock(5, new.size, 3)
    for k, (groups, columns, rows, hkl) in enumerate(parts):
        one_by_one.add_data(k, groups, {name: v[rows] for name, v in columns.items()}, hkl[rows])
    for name, values in one_by_one.Ih_table.items():
        assert new.Ih_table[name].tobytes() == values.tobytes(), name


def test_integer_and_float32_core_columns_keep_their_dtype():
    rng = np.random.default_rng(5)
    parts = _edge_parts(rng)
    for _, columns, _, _ in parts:
        columns["intensity"] = np.round(np.nan_to_num(columns["intensity"], posinf=7, neginf=-7)).astype(np.int32)
        columns["variance"] = columns["variance"].astype(np.float32)
        columns["loc_indices"] = columns["loc_indices"].astype(np.int32)
    _assert_same_block(IhTableBlock._gathered(5, parts), _numpy_block(5, parts))


def test_non_finite_scale_factor_or_weight_is_refused():
    rng = np.random.default_rng(2)
    parts = _edge_parts(rng)
    parts[0][1]["inverse_scale_factor"][parts[0][2][0]] = np.nan
    with pytest.raises(IhTableError, match="inverse scale factor"):
        IhTableBlock._gathered(5, parts)
    parts = _edge_parts(rng)
    row = parts[2][2][0]
    parts[2][1]["intensity"][row] = 1.0
    parts[2][1]["variance"][row] = 1e-320  # finite and > 0, but 1/σ² overflows
    with pytest.raises(IhTableError, match="weight"):
        IhTableBlock._gathered(5, parts)


def _kernel_source(n=6, **over):
    src = {"rows": np.arange(n, dtype=np.int64), "n_selected": n, "groups": np.zeros(n, np.int64),
           "per_row": True, "column_rows": None, "loc": None, "columns": [np.ones(n)] * 3}
    src.update(over)
    return tuple(src.values())


@pytest.mark.parametrize(("over", "group_map", "n_groups", "error", "match"), [
    ({"rows": np.arange(6.0)}, None, 1, TypeError, "integer dtype"),
    ({"rows": np.arange(6).reshape(2, 3)}, None, 1, ValueError, "1-dimensional"),
    ({"rows": np.array([0, 1, 2, 3, 4, 6])}, None, 1, ValueError, "outside"),
    ({"rows": np.array([0, -1, 2, 3, 4, 5])}, None, 1, ValueError, "outside"),
    ({"groups": np.zeros(5, np.int64)}, None, 1, ValueError, "groups must hold"),
    ({"groups": np.full(6, 3)}, None, 3, ValueError, "block group"),
    ({"groups": np.full(6, 1), "per_row": False}, np.array([0]), 1, ValueError, "group number"),
    ({"groups": np.full(6, 0), "per_row": False}, np.array([4]), 1, ValueError, "block group"),
    ({"groups": np.full(6, 2)}, np.array([0, 0]), 1, ValueError, "group number"),
    ({"column_rows": np.arange(5)}, None, 1, ValueError, "column_rows must hold"),
    ({"column_rows": np.array([0, 1, 2, 3, 4, 9])}, None, 1, ValueError, "column row"),
    ({"loc": np.arange(7)}, None, 1, ValueError, "loc_indices must hold"),
    ({"columns": [np.ones(6)] * 2}, None, 1, ValueError, ">= 3"),
    ({"columns": [np.ones(6), np.ones(6), np.ones(5)]}, None, 1, ValueError, "one length"),
    ({"columns": [np.ones(6), np.ones(6), np.ones(6, np.int64)]}, None, 1, TypeError, "floating dtype"),
    ({"columns": [np.ones(6), np.ones(6), [1.0] * 6]}, None, 1, TypeError, "numpy float array"),
    ({"n_selected": 9}, None, 1, ValueError, "n_selected"),
    ({"n_selected": -1}, None, 1, ValueError, ">= 0"),
])
def test_kernel_refuses_bad_input(over, group_map, n_groups, error, match):
    with pytest.raises(error, match=match):
        _fit.build_ih_block([_kernel_source(**over)], group_map, n_groups)


def test_kernel_refuses_bad_arguments():
    with pytest.raises(ValueError, match="n_groups"):
        _fit.build_ih_block([_kernel_source()], None, -1)
    with pytest.raises(ValueError, match="at least one"):
        _fit.build_ih_block([], None, 1)
    with pytest.raises(TypeError, match="tuple"):
        _fit.build_ih_block([(1, 2)], None, 1)
    with pytest.raises(TypeError):
        _fit.build_ih_block([_kernel_source()], np.zeros(2), 1)


def test_kernel_reads_through_row_maps():
    """rows → column_rows → columns, loc_indices by selected row, groups mapped by group_map:
    what numpy's composed takes give; Ĩ as calc_Ih_rows."""
    rng = np.random.default_rng(8)
    n_col, n_sel, n_map = 50, 20, 7
    cols = [rng.uniform(1, 5, n_col), rng.uniform(0.5, 2, n_col), rng.uniform(0.9, 1.1, n_col), rng.normal(size=n_col)]
    column_rows = rng.permutation(n_col)[:n_sel]
    loc = rng.permutation(100)[:n_sel]
    groups = rng.integers(0, n_map, n_sel)
    group_map = np.array([0, 2, 1, 3, 0, 1, 2])
    rows = rng.permutation(n_sel)[:15]
    (c_out, loc_out, sels, ds_id, gids, w, excl, order, offsets, table_rows, ih) = _fit.build_ih_block(
        [(rows, n_sel, groups, False, column_rows, loc, cols)], group_map, 4)
    for a, b in zip(c_out, cols):
        np.testing.assert_array_equal(a, b[column_rows[rows]])
    np.testing.assert_array_equal(loc_out, loc[rows])
    np.testing.assert_array_equal(sels[0], loc[rows])
    np.testing.assert_array_equal(gids, group_map[groups[rows]])
    np.testing.assert_array_equal(ds_id, 0)
    np.testing.assert_array_equal(w, 1.0 / c_out[1])
    np.testing.assert_array_equal(excl, 0)
    o, off = _stable_group_order(gids, 4)
    np.testing.assert_array_equal(order, o)
    np.testing.assert_array_equal(offsets, off)
    np.testing.assert_array_equal(table_rows[order], np.arange(rows.size))
    assert ih.tobytes() == _fit.calc_Ih_rows(order, offsets, c_out[0], w, c_out[2]).tobytes()
    # the same rows with their group numbers given per block row (read in order, mapped alike)
    per_row = _fit.build_ih_block([(rows, n_sel, groups[rows], True, column_rows, loc, cols)], group_map, 4)
    for a, b in zip(per_row, (c_out, loc_out, sels, ds_id, gids, w, excl, order, offsets, table_rows, ih)):
        for x, y in (zip(a, b) if isinstance(a, list) else [(a, b)]):
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
