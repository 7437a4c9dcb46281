"""Benchmark of the scale components on 10⁶ reflections (prints figures; asserts nothing).

For each component: time per reflection of ``calculate_scales_and_derivatives`` and of
``calculate_scales`` (median of repeats, after one warm-up call that fills the caches), the
bytes per reflection the component holds between calls (its per-block caches, not the input
``data``), and the same calculation written in numpy in the same run. The numpy versions
recompute everything that depends only on the data (smoother windows, 1/(2d²)) on each call,
as DIALS does; for SH the numpy version is given the cached harmonic matrix too.

Run: ``PYTHONPATH=python python bench/bench_components.py [n_refl]``
"""
from __future__ import annotations

import sys
import time

import numpy as np
import scipy.sparse as sp
from numpy_windows import numpy_axis_window

from xtalscale.components import (
    QuadraticDoseDecay,
    SHScaleComponent,
    SingleBScaleFactor,
    SingleScaleFactor,
    SmoothBScaleComponent1D,
    SmoothScaleComponent1D,
    SmoothScaleComponent2D,
    SmoothScaleComponent3D,
    product_rule,
    sh_lookup_data,
)
from xtalscale.scaling_utilities import sph_harm_table


def _median_time(fn, repeats: int = 7) -> float:
    fn()  # warm-up: fills caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _held_bytes(comp) -> int:
    """Bytes of numpy arrays reachable from the component, excluding its input ``data``."""
    seen: set = set()
    total = 0

    def visit(obj, depth=0):
        nonlocal total
        if depth > 6:
            return
        if isinstance(obj, np.ndarray):
            base = obj
            while isinstance(base.base, np.ndarray):
                base = base.base
            if id(base) not in seen:
                seen.add(id(base))
                total += base.nbytes
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                visit(o, depth + 1)
        elif isinstance(obj, dict):
            for o in obj.values():
                visit(o, depth + 1)
        elif hasattr(obj, "__slots__"):
            for s in obj.__slots__:
                visit(getattr(obj, s, None), depth + 1)

    # Input data and the class-wide lookup table (shared by every SH component, reported
    # separately) are not this component's own state.
    for key, value in vars(comp).items():
        if key not in ("_data", "_dense_table", "_table"):
            visit(value)
    return total


# ----------------------------------------------------------------------------- numpy versions
def _np_windows(z, nvalues, naverage, sigma):
    """Vectorised DIALS window + raw Gaussian weights: (n, k) columns and weights."""
    first, count, width, pos0 = numpy_axis_window(z, nvalues, naverage)
    k = np.arange(width)
    valid = k[None, :] < count[:, None]
    colc = np.minimum(first[:, None] + k[None, :], nvalues - 1)
    w = np.exp(-(((z[:, None] - (colc + pos0)) / sigma) ** 2)) * valid
    return colc, w


def _np_smooth(coords, shape, p, sigma=0.7):
    """numpy Gaussian smoother: (values, csr of w/Σw) for 1-3 axes, recomputed per call."""
    cols, ws = [], []
    for z, nv in zip(coords, shape):
        c, w = _np_windows(z, nv, min(3, nv), sigma)
        cols.append(c)
        ws.append(w)
    col = cols[0]
    w = ws[0]
    stride = shape[0]
    for c, wa, nv in zip(cols[1:], ws[1:], shape[1:]):
        col = (col[:, :, None] + stride * c[:, None, :]).reshape(col.shape[0], -1)
        w = (w[:, :, None] * wa[:, None, :]).reshape(w.shape[0], -1)
        stride *= nv
    sumw = w.sum(axis=1)
    wn = w / sumw[:, None]
    values = (wn * p[col]).sum(axis=1)
    n, k = col.shape
    deriv = sp.csr_matrix((wn.ravel(), col.ravel(), np.arange(0, n * k + 1, k)),
                          shape=(n, int(np.prod(shape))))
    return values, deriv


def _np_exp(factor, coef):
    s = np.exp(coef * factor)
    n = s.size
    return s, sp.csr_matrix((s * factor, np.zeros(n, dtype=np.int32), np.arange(n + 1)), shape=(n, 1))


# ----------------------------------------------------------------------------- cases
def main(n: int = 1_000_000) -> None:
    rng = np.random.default_rng(1)
    z = rng.uniform(0.0, 360.0, n)  # image number of a 360° sweep at 1°/image
    d = rng.uniform(1.2, 30.0, n)
    cases = []

    c = SingleScaleFactor([1.3])
    c.data = {"id": np.zeros(n, dtype=np.int32)}
    cases.append(("SingleScaleFactor", c, lambda: (np.full(n, 1.3), sp.csr_matrix(
        (np.ones(n), np.zeros(n, dtype=np.int32), np.arange(n + 1)), shape=(n, 1)))))

    c = SingleBScaleFactor([2.5])
    c.data = {"d": d}
    cases.append(("SingleBScaleFactor", c, lambda: _np_exp(1.0 / (2.0 * d * d), 2.5)))

    c = QuadraticDoseDecay([1e-3])
    c.data = {"d": d, "x": z}
    cases.append(("QuadraticDoseDecay", c, lambda: _np_exp(z / (d * d), 1e-3)))

    xs = z / 15.0  # 360° at a 15° interval: 24 intervals, 26 parameters
    p_scale = rng.uniform(0.8, 1.2, 26)
    c = SmoothScaleComponent1D(p_scale)
    c.fix_initial_parameter()
    c.data = {"x": xs}

    def np_scale():
        v, w = _np_smooth([xs - xs.min()], (26,), p_scale)
        return v, w[:, 1:]  # p0 fixed: its column is not a derivative

    cases.append(("SmoothScaleComponent1D (fixed p0)", c, np_scale))

    xd = z / 20.0
    p_b = rng.uniform(-1.0, 1.0, 20)
    c = SmoothBScaleComponent1D(p_b)
    c.data = {"x": xd, "d": d}

    def np_b():
        v, w = _np_smooth([xd - xd.min()], (20,), p_b)
        f = 1.0 / (2.0 * d * d)
        s = np.exp(v * f)
        return s, sp.csr_matrix(w.multiply((s * f)[:, None]))

    cases.append(("SmoothBScaleComponent1D", c, np_b))

    x2, y2 = rng.uniform(0, 10, n), z / 30.0
    p2 = rng.uniform(0.8, 1.2, 12 * 14)
    c = SmoothScaleComponent2D(p2, shape=(12, 14))
    c.data = {"x": x2, "y": y2}
    cases.append(("SmoothScaleComponent2D (12x14)", c,
                  lambda: _np_smooth([x2 - x2.min(), y2 - y2.min()], (12, 14), p2)))

    x3, y3 = rng.uniform(0, 3, n), rng.uniform(0, 3, n)
    p3 = rng.uniform(0.8, 1.2, 5 * 5 * 14)
    c = SmoothScaleComponent3D(p3, shape=(5, 5, 14))
    c.data = {"x": x3, "y": y3, "z": y2}
    cases.append(("SmoothScaleComponent3D (5x5x14)", c,
                  lambda: _np_smooth([x3 - x3.min(), y3 - y3.min(), y2 - y2.min()], (5, 5, 14), p3)))

    s0c = rng.normal(size=(n, 3))
    s1c = rng.normal(size=(n, 3))
    p_sh = rng.uniform(-0.05, 0.05, 24)
    t0 = time.perf_counter()
    table = sph_harm_table({"s0c": s0c, "s1c": s1c}, 4)
    t_table = time.perf_counter() - t0
    c = SHScaleComponent(p_sh)
    c.data = {"sph_harm_table": table}
    h_dense = table.data.reshape(n, 24)
    h_csr = sp.csr_matrix(h_dense)
    cases.append(("SHScaleComponent lmax 4 (exact)", c, lambda: (1.0 + h_dense @ p_sh, h_csr)))

    t0 = time.perf_counter()
    lookup = sh_lookup_data(s0c, s1c, 4)
    t_lookup = time.perf_counter() - t0
    c = SHScaleComponent(p_sh)
    c.data = lookup
    cases.append(("SHScaleComponent lmax 4 (lookup)", c, lambda: (1.0 + h_dense @ p_sh, h_csr)))
    c = SHScaleComponent(p_sh)
    c.cache_harmonics = False  # hold only the grid indices; derivatives rebuilt per call
    c.data = lookup
    cases.append(("SHScaleComponent lmax 4 (lookup, lean)", c, lambda: (1.0 + h_dense @ p_sh, h_csr)))

    print(f"n_refl = {n:,}; times are medians of 7 calls after a warm-up; ns per reflection")
    table_mb = SHScaleComponent._lookup_table(24).nbytes / 1e6
    print(f"SH exact table build (lmax 4): {1e9 * t_table / n:.0f} ns/refl; "
          f"lookup indices + table: {1e9 * t_lookup / n:.0f} ns/refl; "
          f"shared lookup table {table_mb:.0f} MB (not in B/refl)")
    print("columns: update = update_reflection_data; s+deriv / scales = per call; ratio = numpy "
          "s+d / ours; B/refl = held between calls after a derivative call")
    header = (f"{'component':40s} {'update':>8s} {'s+deriv':>8s} {'scales':>8s} "
              f"{'numpy s+d':>10s} {'ratio':>6s} {'B/refl':>7s}")
    print(header)
    print("-" * len(header))
    by_name = {}
    for name, comp, np_fn in cases:
        t0 = time.perf_counter()
        comp.update_reflection_data()
        t_update = time.perf_counter() - t0
        t_sd = _median_time(lambda c=comp: c.calculate_scales_and_derivatives(0))
        t_s = _median_time(lambda c=comp: c.calculate_scales(0))
        t_np = _median_time(np_fn, repeats=3)
        s_ours, d_ours = comp.calculate_scales_and_derivatives(0)
        s_np, d_np = np_fn()
        if "lookup" not in name:  # the numpy reference is the exact path
            assert np.allclose(s_ours, s_np, rtol=1e-12, atol=0), name
            assert abs(d_ours - d_np).max() < 1e-12, name
        held = _held_bytes(comp) / n
        by_name[name] = comp
        print(f"{name:40s} {1e9 * t_update / n:8.1f} {1e9 * t_sd / n:8.2f} {1e9 * t_s / n:8.2f} "
              f"{1e9 * t_np / n:10.1f} {t_np / t_sd:6.1f} {held:7.0f}")
    _bench_assembly(n, [by_name["SmoothScaleComponent1D (fixed p0)"],
                        by_name["SmoothBScaleComponent1D"],
                        by_name["SHScaleComponent lmax 4 (lookup)"]])


def _bench_assembly(n: int, comps: list) -> None:
    """g and dg/dp of a physical-like model (scale, decay, SH lmax 4) by the product rule."""
    results = [c.calculate_scales_and_derivatives(0) for c in comps]

    def scipy_assembly():
        s = [r[0] for r in results]
        blocks = []
        for i, (_, d) in enumerate(results):
            others = np.prod([s[j] for j in range(len(s)) if j != i], axis=0)
            blocks.append(d.multiply(others[:, None]))
        return np.prod(s, axis=0), sp.hstack(blocks).tocsr()

    t_new = _median_time(lambda: product_rule(results), repeats=3)
    _, jac = product_rule(results)
    t_reuse = _median_time(lambda: product_rule(results, out=jac), repeats=5)
    t_scipy = _median_time(scipy_assembly, repeats=1)
    t_all = _median_time(lambda: product_rule([c.calculate_scales_and_derivatives(0)
                                               for c in comps], out=jac), repeats=5)
    print(f"\nmodel assembly, scale + decay + SH lmax 4 ({jac.nnz / n:.0f} non-zeros per row):")
    print(f"  product_rule (new matrix)        {1e9 * t_new / n:8.1f} ns/refl")
    print(f"  product_rule (reused pattern)    {1e9 * t_reuse / n:8.1f} ns/refl")
    print(f"  scipy multiply + hstack          {1e9 * t_scipy / n:8.1f} ns/refl "
          f"(ratio {t_scipy / t_reuse:.0f}x)")
    print(f"  components + reused assembly     {1e9 * t_all / n:8.1f} ns/refl")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
