"""Benchmark of the fit kernels (issue 11): f+g, normal matrix, a Gauss–Newton fit, a stills fit.

Synthetic data shaped like a physical model with lmax 4 (k = 30 derivatives per observation:
3+3 smoother weights and 24 harmonics), multiplicity ~8, several datasets. Prints ns/observation
for 1 and 2 threads (the normal matrix also for one dataset, issue 11's target, and the row
quadratic forms diag(J V Jᵀ) of the scale variances), the same-run ratio against the
explicit-Jacobian path (scipy JᵀWJ) and a numpy reference f+g, the bytes per observation the kernels' inputs hold, and a stills-like fit
(one multiplier per image + a shared 5-point resolution smoother, voxel groups).

    PYTHONPATH=python python bench/bench_fit.py [--n-obs 1000000] [--stills-obs 1000000] [--physical-only]

--physical-only prints the physical model's section alone (its f+g, one-pass f+g, the one-pass
f+g of 3 datasets in one table against the three calls, normal matrix and bytes held), on the
same data as the full run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import best_time, best_times_alternating  # noqa: E402

from xtalscale._core import fit as core_fit  # noqa: E402
from xtalscale.fit import ModelBlockData, ModelObjective, refine  # noqa: E402


def physical_like(n_obs, n_datasets, multiplicity, rng, shuffle=False):
    """Per-dataset CSR blocks with 30 non-zeros per row (6 smoother + 24 harmonic columns)."""
    n_groups = n_obs // multiplicity
    group = np.sort(rng.integers(0, n_groups, n_obs))
    offsets = np.concatenate([[0], np.cumsum(np.bincount(group, minlength=n_groups))]).astype(np.int64)
    dataset = rng.integers(0, n_datasets, n_obs)
    n_scale, n_decay, n_abs = 20, 15, 24
    p_per = n_scale + n_decay + n_abs
    blocks, rows_of = [], []
    for d in range(n_datasets):
        rows = np.flatnonzero(dataset == d)  # table rows of this dataset (Ih-block order: sorted)
        if shuffle:
            rng.shuffle(rows)  # a model block in its own (image) order
        n = rows.size
        z = rng.uniform(0, n_scale - 3, n)
        start = np.floor(z).astype(np.int32)
        cols = np.concatenate([start[:, None] + np.arange(3), n_scale + np.minimum(start[:, None] * n_decay // n_scale
                               + np.arange(3), n_decay - 1 - 2 + np.arange(3)),
                               np.tile(n_scale + n_decay + np.arange(n_abs), (n, 1))], axis=1)
        cols = np.sort(cols, axis=1)
        # make the decay columns strictly increasing and distinct
        cols[:, 3:6] = n_scale + np.minimum(start[:, None] * (n_decay - 3) // (n_scale - 3), n_decay - 3) + np.arange(3)
        vals = rng.uniform(0.05, 0.5, (n, 30))
        indptr = np.arange(0, 30 * n + 1, 30, dtype=np.int64)
        g = rng.uniform(0.5, 1.5, n)
        blocks.append((g, indptr, cols.astype(np.int32).ravel(), vals.ravel(), p_per, d * p_per, rows.astype(np.int64)))
        rows_of.append(rows)
    inten = rng.uniform(10, 1000, n_obs)
    w = 1.0 / rng.uniform(10, 100, n_obs)
    return offsets, inten, w, blocks, n_datasets * p_per


def numpy_f_g(offsets, inten, w, blocks, n_params):
    """Reference: the same f+g with numpy/scipy (bincount group sums, sparse products)."""
    n = inten.size
    g = np.empty(n)
    for b in blocks:
        g[b[6]] = b[0]
    group = np.repeat(np.arange(offsets.size - 1), np.diff(offsets))
    s = np.bincount(group, w * g * g, minlength=offsets.size - 1)
    t = np.bincount(group, w * g * inten, minlength=offsets.size - 1)
    ih = np.divide(t, s, out=np.zeros_like(t), where=s > 0)[group]
    r = inten - g * ih
    coef = -2 * w * r * ih
    grad = np.zeros(n_params)
    for b in blocks:
        m = sp.csr_matrix((b[3], b[2], b[1]), shape=(b[0].size, b[4]))
        grad[b[5]:b[5] + b[4]] += m.T @ coef[b[6]]
    return float(np.sum(w * r * r)), grad


def explicit_normal_matrix(offsets, inten, w, blocks, n_params):
    """DIALS's route: explicit sparse J (with ∂Ĩ/∂p), then JᵀWJ (scipy)."""
    n = inten.size
    group = np.repeat(np.arange(offsets.size - 1), np.diff(offsets))
    g = np.empty(n)
    parts = []
    for b in blocks:
        g[b[6]] = b[0]
        m = sp.csr_matrix((b[3], b[2], b[1]), shape=(b[0].size, b[4])).tocoo()
        parts.append(sp.csr_matrix((m.data, (b[6][m.row], m.col + b[5])), shape=(n, n_params)))
    d = sum(parts[1:], parts[0])
    h = sp.csr_matrix((np.ones(n), (np.arange(n), group)), shape=(n, offsets.size - 1))
    s = h.T @ (w * g * g)
    ih = (h.T @ (w * g * inten)) / s
    ih_rows = ih[group]
    dih = sp.diags(1 / s) @ h.T @ sp.diags(w * (inten - 2 * g * ih_rows)) @ d
    jac = -(sp.diags(ih_rows) @ d) - sp.diags(g) @ (h @ dih)
    return (jac.T @ sp.diags(w) @ jac).toarray()


def exp_model(offsets, blocks, n_params, rng):
    """g = exp(a·p) on the same sparsity: a GN fit to convergence from a perturbed start."""
    mats = [sp.csr_matrix((b[3], b[2], b[1]), shape=(b[0].size, b[4])) for b in blocks]
    truth = 0.1 * rng.standard_normal(n_params)

    def model(x):
        out = []
        for b, m in zip(blocks, mats):
            g = np.exp(m @ x[b[5]:b[5] + b[4]])
            out.append(ModelBlockData(g, (b[1], b[2], b[3] * np.repeat(g, 30), b[4]), b[5], b[6]))
        return out
    return model, truth


def stills(n_obs, n_images, n_voxels, rng):
    image = np.sort(rng.integers(0, n_images, n_obs))
    voxel = rng.integers(0, n_voxels, n_obs)
    dstar = np.sqrt(rng.uniform(0.01, 1.0, n_voxels))[voxel]
    m_true = np.exp(0.3 * rng.standard_normal(n_images))
    nodes = np.linspace(0.1, 1.0, 5)
    s_true = np.array([1.0, 0.9, 0.75, 0.6, 0.5])
    basis = np.exp(-((dstar[:, None] - nodes) / 0.25) ** 2)
    basis /= basis.sum(axis=1, keepdims=True)
    ih = rng.uniform(50, 500, n_voxels)
    g_true = m_true[image] * (basis @ s_true)
    sigma = 0.03 * g_true * ih[voxel]
    inten = g_true * ih[voxel] + sigma * rng.standard_normal(n_obs)
    # The model's rows are put in table (voxel) order, so the kernels stream without a row map.
    order = np.argsort(voxel, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(voxel, minlength=n_voxels))])
    image, basis = image[order], np.ascontiguousarray(basis[order])
    indptr = np.arange(0, 6 * n_obs + 1, 6, dtype=np.int64)
    indices = np.concatenate([image[:, None], n_images + np.tile(np.arange(5), (n_obs, 1))], axis=1).astype(np.int32).ravel()
    vals = np.empty((n_obs, 6))

    def model(x):
        m, s = x[:n_images], x[n_images:]
        smooth = np.einsum("ij,j->i", basis, s)  # no BLAS threads
        mi = m[image]
        vals[:, 0] = smooth
        np.multiply(mi[:, None], basis, out=vals[:, 1:])
        return [ModelBlockData(mi * smooth, (indptr, indices, vals.ravel(), n_images + 5), 0, None)]
    return offsets, inten[order], 1 / sigma[order] ** 2, model, m_true, n_images


def physical_components(n, rng):
    """(scale, decay, absorption) components of a physical model over ``n`` random rows: a
    20-point scale smoother (first parameter fixed), a 15-point B smoother, lmax-4 harmonics
    from the lookup table; data set, as the job's large-data forms hold them."""
    from xtalscale.components import (
        SHScaleComponent,
        SmoothBScaleComponent1D,
        SmoothScaleComponent1D,
        sh_lookup_data,
    )

    scale = SmoothScaleComponent1D(rng.uniform(0.8, 1.2, 20))
    scale.fix_initial_parameter()
    decay = SmoothBScaleComponent1D(rng.uniform(-0.5, 0.5, 15))
    sh = SHScaleComponent(rng.uniform(-0.05, 0.05, 24))
    scale.data = {"x": rng.uniform(0, 36, n)}
    decay.data = {"x": rng.uniform(0, 36, n), "d": rng.uniform(0.8, 4.0, n)}
    sh.data = sh_lookup_data(rng.normal(size=(n, 3)), rng.normal(size=(n, 3)), 4)
    for comp in (scale, decay, sh):
        comp.update_reflection_data()
    return scale, decay, sh


def physical_model_f_g(offsets, inten, w, rng):
    """f+g of a real physical model (lean scale and decay smoothers, lmax-4 harmonics formed
    per row from the lookup grid's factors, 8 B/obs of grid indices held: the job's large-data
    regime) over one dataset, *including the model's
    evaluation*: through ∂g/∂p (evaluate, then the target kernel reads the CSR) and without it
    (g alone, ∂f/∂g from the target, then the model block's transposed product)."""
    from xtalscale.components import ComponentModelBlock

    n = inten.size
    block = ComponentModelBlock(list(physical_components(n, rng)))
    empty = (np.zeros(n + 1, np.int64), np.zeros(0, np.int32), np.zeros(0))

    def with_derivatives():
        g, jac = block.evaluate()
        one = (g, np.asarray(jac.indptr, np.int64), np.asarray(jac.indices, np.int32), np.asarray(jac.data),
               jac.shape[1], 0, None)
        return core_fit.functional_and_gradient(offsets, inten, w, [one], jac.shape[1], check_structure=False)[:2]

    def matrix_free(nt=1):
        g = block.evaluate_scales(nt)
        f, dfdg, _ = core_fit.functional_and_scale_gradient(offsets, inten, w, [(g, *empty, 0, 0, None)],
                                                            n_threads=nt)
        return f, block.transpose_product(dfdg, nt)

    def fused(nt=1):
        return block.core.functional_and_gradient(block.parameters(), offsets, inten, w, nt)

    (f1, g1), (f2, g2), (f3, g3) = with_derivatives(), matrix_free(), fused()
    agree = np.max(np.abs(g1 - g2)) / np.max(np.abs(g1))
    agree_fused = np.max(np.abs(g1 - g3)) / np.max(np.abs(g1))
    t_d = best_time(with_derivatives, 3)
    t_m = best_time(matrix_free, 3)
    t_m2 = best_time(lambda: matrix_free(2), 3)
    t_s = best_time(block.evaluate_scales, 3)
    print(f"physical model (lmax 4, lean smoothers, lookup harmonics from the grid's factors), f+g including the model's evaluation, 1 thread: "
          f"through dg/dp {t_d / n * 1e9:6.1f} ns/obs, without it (transposed product) {t_m / n * 1e9:6.1f} ns/obs "
          f"({t_d / t_m:.1f}x; 2 threads {t_m2 / n * 1e9:.1f} ns/obs; g alone {t_s / n * 1e9:.1f} ns/obs; "
          f"gradients agree to {agree:.1e}, f to {abs(f1 - f2) / f1:.1e})")
    t_f = [best_time(lambda nt=nt: fused(nt), 3) for nt in (1, 2)]
    print(f"  the same in one pass (ModelBlock.functional_and_gradient, chunks of whole groups): "
          f"{t_f[0] / n * 1e9:6.1f} ns/obs, 2 threads {t_f[1] / n * 1e9:6.1f} ns/obs "
          f"(gradient agrees to {agree_fused:.1e}, f to {abs(f1 - f3) / f1:.1e})")
    physical_models_f_g_datasets(offsets, inten, w, np.random.default_rng(13))
    physical_model_normal_matrix(block, offsets, inten, w)
    # held between evaluations without dg/dp: the table (I, w, offsets), the terms' data, g
    terms = sum(block.core.term(i).nbytes for i in range(block.core.n_terms))
    held = offsets.nbytes + inten.nbytes + w.nbytes + terms + 8 * n  # + g
    block.evaluate()
    csr = block.core.indices.size * 12 + block.core.indptr.size * 8
    print(f"  bytes held for it: {held / n:.0f} B/obs (table, g and the model's terms {terms / n:.0f}, of which "
          f"the absorption term's grid indices and factor tables {block.core.term(2).nbytes / n:.1f}); "
          f"forming dg/dp adds {csr / n:.0f} B/obs of CSR")


def physical_models_f_g_datasets(offsets, inten, w, rng, n_datasets=3):
    """f+g of the same physical model over several datasets in one table (each row's dataset
    drawn at random, so groups span datasets; each dataset its own model block, its columns
    after the previous ones'): in one pass (model_functional_and_gradient) and through the
    three calls (g per block, ∂f/∂g from the target, each block's transposed product), timed
    in alternation, best of each."""
    from xtalscale.components import ComponentModelBlock

    n = inten.size
    dataset = rng.integers(0, n_datasets, n)
    blocks, models, n_params = [], [], 0
    for d in range(n_datasets):
        rows = np.flatnonzero(dataset == d).astype(np.int64)
        block = ComponentModelBlock(list(physical_components(rows.size, rng)))
        blocks.append((block, rows))
        models.append((block.core, block.parameters(), 0, n_params, rows))
        n_params += block.core.n_cols
    empty = (np.zeros(n + 1, np.int64), np.zeros(0, np.int32), np.zeros(0))

    def three_calls(nt):
        g = np.empty(n)
        for block, rows in blocks:
            g[rows] = block.evaluate_scales(nt)
        f, dfdg, _ = core_fit.functional_and_scale_gradient(offsets, inten, w, [(g, *empty, 0, 0, None)],
                                                            n_threads=nt)
        return f, np.concatenate([block.transpose_product(dfdg[rows], nt) for block, rows in blocks])

    g_table = np.empty(inten.size)  # held between calls, as a ModelBlock holds its g

    def one_pass(nt):
        return core_fit.model_functional_and_gradient(offsets, inten, w, models, n_params, n_threads=nt,
                                                      g_out=g_table)[:2]

    (f3, g3), (f1, g1) = three_calls(1), one_pass(1)
    agree = np.max(np.abs(g1 - g3)) / np.max(np.abs(g3))
    line = []
    for nt in (1, 2):
        t_3, t_1 = best_times_alternating(lambda nt=nt: three_calls(nt), lambda nt=nt: one_pass(nt))
        line.append(f"{nt} thread(s): one pass {t_1 / n * 1e9:6.1f} ns/obs, three calls {t_3 / n * 1e9:6.1f} ns/obs")
    print(f"  {n_datasets} datasets in one table (groups spanning them, one model block each; "
          f"model_functional_and_gradient), " + "; ".join(line)
          + f" (gradient agrees to {agree:.1e}, f to {abs(f1 - f3) / f3:.1e})")


def physical_model_normal_matrix(block, offsets, inten, w):
    """The normal matrix (kind dials) of the physical model's block *including the model's
    evaluation*: through dg/dp (evaluate, then normal_equations reads the CSR) and fused
    (model_normal_equations: rows evaluated chunk by chunk into per-thread scratch, no dg/dp
    formed; the same bits). The two are timed in alternation, best of each."""
    n = inten.size
    rows = np.arange(n, dtype=np.int64)  # the block's rows are the table's, in order

    def through_derivatives(nt):
        g, jac = block.evaluate(nt)
        one = (g, np.asarray(jac.indptr, np.int64), np.asarray(jac.indices, np.int32), np.asarray(jac.data),
               jac.shape[1], 0, None)
        return core_fit.normal_equations(offsets, inten, w, [one], jac.shape[1], kind="dials", n_threads=nt,
                                         check_structure=False)

    def fused(nt):
        return core_fit.model_normal_equations(offsets, inten, w, [(block.core, block.parameters(), 0, 0, rows)],
                                               block.core.n_cols, kind="dials", n_threads=nt)

    same = all(np.array_equal(a, b) for a, b in zip(through_derivatives(1)[:2], fused(1)[:2]))
    line = []
    for nt in (1, 2):
        t_d, t_f = best_times_alternating(lambda nt=nt: through_derivatives(nt), lambda nt=nt: fused(nt))
        line.append(f"{nt} thread(s): through dg/dp {t_d / n * 1e9:6.1f} ns/obs, fused {t_f / n * 1e9:6.1f} ns/obs")
    print("  normal matrix including the model's evaluation (kind dials), " + "; ".join(line)
          + f" ({'the same bits' if same else 'NOT the same bits'})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-obs", type=int, default=1_000_000)
    ap.add_argument("--datasets", type=int, default=5)
    ap.add_argument("--stills-obs", type=int, default=1_000_000)
    ap.add_argument("--stills-images", type=int, default=10_000)
    ap.add_argument("--stills-voxels", type=int, default=100_000)
    ap.add_argument("--physical-only", action="store_true",
                    help="only the physical model's section (its own data, as in the full run)")
    a = ap.parse_args()
    if a.physical_only:
        o1, i1, w1, _, _ = physical_like(a.n_obs, 1, 8, np.random.default_rng(7))
        physical_model_f_g(o1, i1, w1, np.random.default_rng(11))
        return
    rng = np.random.default_rng(7)
    offsets, inten, w, blocks, P = physical_like(a.n_obs, a.datasets, 8, rng)
    n = a.n_obs
    held = offsets.nbytes + inten.nbytes + w.nbytes + sum(sum(x.nbytes for x in b[:4]) + b[6].nbytes for b in blocks)
    from xtalscale import _core

    print(f"problem: {n} obs, {offsets.size - 1} groups, {a.datasets} datasets, P = {P}, k = 30, "
          f"threads available {core_fit.max_threads()}, SIMD level {_core.simd_level()} "
          f"(2 AVX-512, 1 AVX2+FMA, 0 plain)")
    print(f"bytes held by the kernel inputs: {held / n:.0f} B/obs (CSR doubles: 30 x 12 B = 360 B/obs of it)")
    args = (offsets, inten, w, blocks, P)
    res = {}
    for nt in (1, 2):
        t = best_time(lambda nt=nt: core_fit.functional_and_gradient(*args, n_threads=nt, check_structure=False), 5)
        res[("fg", nt)] = t
        print(f"f+g            {nt} thread(s): {t / n * 1e9:7.1f} ns/obs")
    t_np = best_time(lambda: numpy_f_g(*args), 2)
    t_chk = best_time(lambda: core_fit.functional_and_gradient(*args, check_structure=True), 3)
    print(f"f+g with the full structure check (first call): {t_chk / n * 1e9:7.1f} ns/obs")
    print(f"f+g numpy reference:       {t_np / n * 1e9:7.1f} ns/obs  (C++ 1 thread is {t_np / res[('fg', 1)]:.1f}x faster)")
    for nt in (1, 2):
        t = best_time(lambda nt=nt: core_fit.normal_equations(*args, kind="dials", n_threads=nt, check_structure=False), 2)
        res[("ne", nt)] = t
        print(f"normal matrix  {nt} thread(s): {t / n * 1e9:7.1f} ns/obs")
    # issue 11's target (≤ 150 ns/obs at k = 30) is for one dataset (P = 59): DIALS's JᵀWJ
    # (kind="dials", a rank-2 correction per group) and the Schur complement of the joint
    # (p, Ĩ) Gauss-Newton matrix (kind="schur", rank 1)
    o1, i1, w1, b1, p1 = physical_like(n, 1, 8, np.random.default_rng(7))
    for kind in ("dials", "schur"):
        for nt in (1, 2):
            t = best_time(lambda nt=nt, kind=kind: core_fit.normal_equations(
                o1, i1, w1, b1, p1, kind=kind, n_threads=nt, check_structure=False), 3)
            if kind == "dials":
                res[("ne1", nt)] = t
            print(f"normal matrix, 1 dataset (P = {p1}), kind {kind}, {nt} thread(s): {t / n * 1e9:7.1f} ns/obs")
    # diag(J V Jᵀ) of the scale variances: one dataset's rows against a dense 59 x 59 V
    jb = b1[0]
    a_v = np.random.default_rng(3).standard_normal((p1, p1))
    v_dense = a_v @ a_v.T
    for nt in (1, 2):
        t = best_time(lambda nt=nt: core_fit.row_quadratic_forms(jb[1], jb[2], jb[3], v_dense, n_threads=nt), 3)
        print(f"row quadratic forms diag(J V Jᵀ), {nt} thread(s): {t / jb[0].size * 1e9:7.1f} ns/row")
    sub = min(n, 200_000)
    so, si, sw, sb, sP = physical_like(sub, a.datasets, 8, np.random.default_rng(8))
    t_exp = best_time(lambda: explicit_normal_matrix(so, si, sw, sb, sP), 1)
    t_ours = best_time(lambda: core_fit.normal_equations(so, si, sw, sb, sP, kind="dials"), 2)
    print(f"explicit-J JᵀWJ (scipy, {sub} obs): {t_exp / sub * 1e9:7.0f} ns/obs  (no-Jacobian kernel {t_exp / t_ours:.0f}x faster)")
    ro, ri, rw, rb, rP = physical_like(n, a.datasets, 8, np.random.default_rng(7), shuffle=True)
    t = best_time(lambda: core_fit.functional_and_gradient(ro, ri, rw, rb, rP, check_structure=False), 3)
    print(f"f+g, model rows in random order vs the table (1 thread): {t / n * 1e9:7.1f} ns/obs")
    print(f"thread scaling: f+g {res[('fg', 1)] / res[('fg', 2)]:.2f}x, normal matrix {res[('ne', 1)] / res[('ne', 2)]:.2f}x "
          f"(1 dataset {res[('ne1', 1)] / res[('ne1', 2)]:.2f}x)")

    physical_model_f_g(o1, i1, w1, np.random.default_rng(11))

    model, truth = exp_model(offsets, blocks, P, rng)
    obj = ModelObjective(offsets, inten, w, model, np.zeros(P))
    inten_sim = np.empty(n)
    obj_truth = ModelObjective(offsets, inten, w, model, truth)
    ih_true = rng.uniform(10, 1000, offsets.size - 1)
    ih_rows = np.repeat(ih_true, np.diff(offsets))
    _, _, g_truth = obj_truth.table_rows()
    inten_sim[:] = g_truth * ih_rows * (1 + 0.01 * rng.standard_normal(n))
    obj = ModelObjective(offsets, inten_sim, w, model, np.zeros(P))
    t0 = time.perf_counter()
    journal = refine(obj, "GaussNewton")
    t_fit = time.perf_counter() - t0
    print(f"Gauss-Newton fit to convergence: {journal.get_nrows()} steps, {t_fit:.2f} s = {t_fit / n * 1e9:.0f} ns/obs "
          f"({journal.reason_for_termination})")

    so, si, sw, smodel, m_true, n_img = stills(a.stills_obs, a.stills_images, a.stills_voxels, np.random.default_rng(9))
    obj = ModelObjective(so, si, sw, smodel, np.ones(n_img + 5))
    t0 = time.perf_counter()
    journal = refine(obj, "auto")
    t_st = time.perf_counter() - t0
    m = obj.get_x()[:n_img]
    lr = np.log(m / m_true)
    lr -= lr.mean()
    per_image = a.stills_obs / a.stills_images
    print(f"stills: {a.stills_images} images, {a.stills_obs} obs, {a.stills_voxels} voxels: {t_st:.1f} s, "
          f"{journal.get_nrows()} steps [{journal.solver}]; multipliers rms {np.sqrt(np.mean(lr ** 2)):.4f} "
          f"(noise-limited ~{0.03 / np.sqrt(per_image):.4f})")


if __name__ == "__main__":
    main()
