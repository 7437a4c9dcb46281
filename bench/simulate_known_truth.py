"""Write the known-truth simulated data set used by bench_scale_job.py and the acceptance runs.

Usage::

    python bench/simulate_known_truth.py OUT_DIR [--sweeps 3] [--cell-scale 4] [--d-min 0.7]

The defaults give about 1.1 × 10⁶ observations in three 170° sweeps of the real l-cysteine
geometry with the cell enlarged 4× (see xtalscale.job.simulate). Prints rows, time and size.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from xtalscale.job.simulate import simulate, write_simulation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--sweeps", type=int, default=3)
    parser.add_argument("--cell-scale", type=float, default=4.0)
    parser.add_argument("--d-min", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    t0 = time.perf_counter()
    sim = simulate(n_sweeps=args.sweeps, cell_scale=args.cell_scale, d_min=args.d_min, seed=args.seed)
    t_sim = time.perf_counter() - t0
    paths = write_simulation(sim, args.out)
    t_all = time.perf_counter() - t0
    n = len(sim.reflections)
    size = sum(p.stat().st_size for p in paths.values())
    print(f"simulated {n} observations in {args.sweeps} sweep(s): {t_sim:.2f} s "
          f"({t_sim / n * 1e9:.0f} ns/obs); written in {t_all - t_sim:.2f} s, "
          f"{size / n:.0f} bytes/obs on disk")
    print(f"true g: min {sim.g_true.min():.3f} max {sim.g_true.max():.3f}; "
          f"outliers injected: {int(np.count_nonzero(sim.outlier_true))}")
    for kind, path in paths.items():
        print(f"  {kind:7s} {path}")


if __name__ == "__main__":
    main()
