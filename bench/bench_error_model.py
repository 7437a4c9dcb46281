"""Benchmark of the basic error model refinement (job/error_model.py) on simulated groups.

Prints: the wall time of the whole refinement (filtering, binning, the a/b cycles), the time
per observation of one evaluation of the b objective with the C++ per-bin pass
(``_b_objective_at_fixed_a``) and with the plain numpy definition (``_b_objective``: σ', δ and
the per-bin moments as numpy array passes) in the same run, and their ratio; then one whole
b search as the Python golden section over the C++ per-bin pass and as the one C++ call
``_refine_b`` makes (``error_model_search_b``), which must give the same b. Asserts nothing.

Run: ``PYTHONPATH=python python bench/bench_error_model.py [n_obs]``
"""
from __future__ import annotations

import sys
import time

import numpy as np

from xtalscale._core import job as kernels
from xtalscale.job.error_model import (
    BasicErrorModel,
    ErrorModelBinner,
    ErrorModelData,
    _b_objective,
    _b_objective_at_fixed_a,
    _fixed_a_arrays,
    _golden_section,
    run_error_model_refinement,
)
from xtalscale.job.grouped import GroupedObservations
from xtalscale.symmetry import SpaceGroup


def simulated_groups(n_obs: int, a_true: float = 1.3, b_true: float = 0.03, seed: int = 1) -> GroupedObservations:
    """Groups of ~5 equivalents, scales 0.5-2, exponential intensities, a known (a, b)."""
    rng = np.random.default_rng(seed)
    n_groups = n_obs // 5
    hkl = np.unique(rng.integers(1, 200, size=(n_groups, 3)), axis=0)
    group = rng.integers(0, len(hkl), n_obs)
    i_true = rng.exponential(2000.0, len(hkl))[group] + 5.0
    g = rng.uniform(0.5, 2.0, n_obs)
    variance = i_true * g + 50.0
    sigma = a_true * np.sqrt(variance + (b_true * i_true * g) ** 2)
    intensity = i_true * g + rng.normal(size=n_obs) * sigma
    cols = {"intensity": intensity, "variance": variance, "inverse_scale_factor": g,
            "miller_index": hkl[group].astype(np.int32), "partiality": np.ones(n_obs)}
    return GroupedObservations.from_tables([cols], SpaceGroup("P 1"), anomalous=True,
                                           selections=[np.ones(n_obs, bool)], extra_columns=("partiality",))


def median_time(f, repeats: int = 15) -> float:
    f()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    n_obs = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    grouped = simulated_groups(n_obs)
    t0 = time.perf_counter()
    model = run_error_model_refinement(BasicErrorModel(), grouped)
    wall = time.perf_counter() - t0
    print(f"error model refinement, {n_obs} observations: {wall:.2f} s wall "
          f"({wall / n_obs * 1e9:.0f} ns/obs), a = {model.a:.4f}, b = {model.b:.4f}")
    data = ErrorModelData(grouped)
    binner = ErrorModelBinner(data)
    fast = _b_objective_at_fixed_a(model, data, binner)
    t_fast = median_time(lambda: fast(0.03))
    t_numpy = median_time(lambda: _b_objective(0.03, model, data, binner))
    n = data.intensity.size
    print(f"b objective, one evaluation on {n} filtered rows: C++ pass {t_fast / n * 1e9:.1f} ns/obs, "
          f"numpy {t_numpy / n * 1e9:.1f} ns/obs, ratio {t_numpy / t_fast:.1f}x")
    arrays = _fixed_a_arrays(model, data, binner)
    b_python = _golden_section(fast, 0.0, 0.5, tol=1e-6)
    b_cpp = kernels.error_model_search_b(*arrays, 0.0, 0.5, 1e-6)
    t_python = median_time(lambda: _golden_section(fast, 0.0, 0.5, tol=1e-6), repeats=5)
    t_cpp = median_time(lambda: kernels.error_model_search_b(*arrays, 0.0, 0.5, 1e-6), repeats=5)
    print(f"b search (golden section to 1e-6): Python loop {t_python * 1e3:.1f} ms, one C++ call "
          f"{t_cpp * 1e3:.1f} ms, same b: {b_python == b_cpp}")


if __name__ == "__main__":
    main()
