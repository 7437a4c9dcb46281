"""Benchmark: multi-point Gaussian smoother values + weight matrix (1D, 2D, 3D).

Prints ns/point for

* ``kernel``  - the C++ kernel alone, writing into preallocated, reused arrays
  (``_core.smoothers.SmootherND.multi_value_weight_into``);
* ``api``     - the public call ``GaussianSmootherND.multi_value_weight`` (fresh output arrays,
  their page faults, and the scipy CSR wrapper);
* ``numpy``   - a vectorised numpy implementation of the same computation written below,
  evaluated in chunks of 2**18 points (its chunk outputs are discarded, which favours numpy),

and the ratio numpy / kernel. Times are per-thread CPU times (``time.thread_time``), the best of
``--repeat`` runs (the kernel: at least 3·10⁷/n runs), so other processes on the machine inflate
them less than wall time would.
Points are uniform over the smoother range; grids are 50 (1D), 20x20 (2D), 10x10x10 (3D) intervals.

Usage: python bench/bench_smoothers.py [--sizes 1e6 1e7] [--repeat 3] [--dims 1 2 3]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from numpy_windows import numpy_axis_window
from timing import best_time

from xtalscale.smoothing import (
    GaussianSmoother1D,
    GaussianSmoother2D,
    GaussianSmoother3D,
)

GRIDS = {1: [50], 2: [20, 20], 3: [10, 10, 10]}
CLASSES = {1: GaussianSmoother1D, 2: GaussianSmoother2D, 3: GaussianSmoother3D}


# ----------------------------------------------------------------- numpy reference implementation
def _axis_numpy(x, x0, spacing, nvalues, naverage, sigma):
    """Per-axis window start (n,), window mask (n, W) and raw weights (n, W) for W values."""
    z = (x - x0) / spacing
    first, count, width, pos0 = numpy_axis_window(z, nvalues, naverage)
    k = np.arange(width)
    mask = k[None, :] < count[:, None]
    d = (z[:, None] - (first[:, None] + k[None, :] + pos0)) / sigma
    return first, mask, np.where(mask, np.exp(-d * d), 0.0)


def numpy_multi_value_weight(coords, ranges, intervals, values, sigma):
    """Values, sumweights and CSR (data, indices, indptr) of raw weights, all in numpy."""
    n = coords[0].size
    axes = []
    for x, (x0, x1), ni in zip(coords, ranges, intervals):
        nv = 2 if ni == 1 else (3 if ni == 2 else ni + 2)
        axes.append((_axis_numpy(x, x0, (x1 - x0) / ni, nv, min(3, nv), sigma), nv))
    (first, mask, w), nv0 = axes[0]
    col, stride = first[:, None] + np.arange(w.shape[1])[None, :], nv0
    for (f, m, wa), nva in axes[1:]:  # tensor product, x fastest
        ca = (f[:, None] + np.arange(wa.shape[1])[None, :]) * stride
        col = (ca[:, :, None] + col[:, None, :]).reshape(n, -1)
        w = (wa[:, :, None] * w[:, None, :]).reshape(n, -1)
        mask = (m[:, :, None] & mask[:, None, :]).reshape(n, -1)
        stride *= nva
    sumw = w.sum(axis=1)
    value = np.where(sumw > 0, (w * values[np.where(mask, col, 0)]).sum(axis=1) / sumw, 0.0)
    indptr = np.concatenate([[0], np.cumsum(mask.sum(axis=1))])
    return value, sumw, w[mask], col[mask].astype(np.int32), indptr.astype(np.int32)


# ----------------------------------------------------------------- timing
def kernel_time(core, coords, values, repeat):
    """Best time of the C++ kernel writing into preallocated, already-faulted arrays."""
    n = coords[0].size
    cap = n * core.max_row_nnz
    index_dtype = np.int32 if cap < 2**31 - 1 else np.int64
    out = {"value": np.empty(n), "sumweight": np.empty(n),
           "indptr": np.empty(n + 1, index_dtype), "indices": np.empty(cap, index_dtype),
           "data": np.empty(cap)}
    for a in out.values():
        a.fill(0)  # fault the pages in once: the kernel figure excludes first-touch costs
    # out is freed on return, before the API call allocates its own (3D, 1e7 points: 3.3 GB)
    # Best of at least ~0.3 s of runs: on a shared machine a short burst of interference can
    # cover a handful of 10 ms runs.
    repeat = max(repeat, int(3e7 // n))
    return best_time(lambda: core.multi_value_weight_into(coords, values, **out), repeat, time.thread_time)


def run(dim, n, repeat, rng):
    intervals = GRIDS[dim]
    ranges = [(0.0, float(k)) for k in intervals]
    args = [a for r, k in zip(ranges, intervals) for a in (r, k)]
    smoother = CLASSES[dim](*args)
    core = smoother._core
    coords = [rng.uniform(r[0], r[1], n) for r in ranges]
    values = rng.uniform(0.5, 1.5, smoother.num_values())
    kernel = kernel_time(core, coords, values, repeat)
    api = best_time(lambda: smoother.multi_value_weight(*coords, values), repeat, time.thread_time)

    chunk = 2**18

    def numpy_all():
        for s in range(0, n, chunk):
            numpy_multi_value_weight([c[s:s + chunk] for c in coords], ranges, intervals, values,
                                     smoother.sigma())

    # check the reference against the kernel on a slice before timing it
    ref = numpy_multi_value_weight([c[:1000] for c in coords], ranges, intervals, values,
                                   smoother.sigma())
    mine = smoother.multi_value_weight(*[c[:1000] for c in coords], values)
    np.testing.assert_allclose(ref[0], mine[0], rtol=1e-13)
    np.testing.assert_array_equal(ref[4], mine[1].indptr)
    numpy_t = best_time(numpy_all, 1 if n > 2_000_000 else repeat, time.thread_time)
    per = 1e9 / n
    print(f"{dim}D n={n:>9,d}  kernel {kernel * per:7.1f} ns/pt   api {api * per:7.1f} ns/pt   "
          f"numpy {numpy_t * per:8.1f} ns/pt   numpy/kernel {numpy_t / kernel:6.1f}x", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7])
    parser.add_argument("--dims", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--repeat", type=int, default=3)
    opts = parser.parse_args()
    rng = np.random.default_rng(20261125)
    for n in opts.sizes:
        for dim in opts.dims:
            run(dim, int(n), opts.repeat, rng)


if __name__ == "__main__":
    main()
