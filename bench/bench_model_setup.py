"""Benchmark: model set-up and one model evaluation (scales + derivatives) at 10^6 reflections.

Prints, in ns/reflection (best of --repeats; one process, one core):

* array model set-up: configure_components + update_reflection_data + the first
  calculate_scales_and_derivatives of every component (2-D decay and modulation, 3-D
  absorption): the weight matrices are built here;
* physical model (lmax 4) set-up, the same three steps (the harmonic block is built here);
* physical model, one evaluation of g and dg/dp for all components:
  - "components (lean path)": every component's scales + derivatives, no product rule (the
    figure of bench_physical_model.py);
  - "RefinerCalculator": g + dg/dp as one scipy CSR (DIALS's per-iteration call);
  - "model block" (when the build has one): ComponentModelBlock.evaluate, all components and
    the product rule in one C++ call into buffers held by the block;
* the same for the array model.

Same run, before/after: ``--before /tmp/before/python`` (the python/ folder of another built
tree, e.g. a ``git worktree`` of an older commit) times the array model's set-up there too, in
a child process of this run, alternating with this tree's, and prints the ratio. The figure of
issue 10's baseline is the tree at commit ccba9df.
Data are bench_physical_model.make_data's (synthetic 360-degree sweep). Asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_physical_model import build_model, lean_call, make_data  # noqa: E402
from timing import best_time  # noqa: E402

import xtalscale  # noqa: E402
from xtalscale import components as xs_components  # noqa: E402
from xtalscale.models import ArrayScalingModel, default_model_params  # noqa: E402
from xtalscale.parameter_managers import RefinerCalculator, active_parameter_manager  # noqa: E402


def setup(model, table, expt, params) -> None:
    """configure + update_reflection_data + the first scales-and-derivatives call."""
    model.configure_components(table, expt, params)
    for comp in model.components.values():
        comp.update_reflection_data()
    for comp in model.components.values():
        comp.calculate_scales_and_derivatives(0)


def array_model(table, expt):
    params = default_model_params(array__modulation_correction=True)
    model = ArrayScalingModel.from_data(params, expt, table)
    rng = np.random.default_rng(3)
    for comp in model.components.values():
        comp.parameters = rng.uniform(0.9, 1.1, comp.n_params)
    return model, params


def evaluation_figures(label, model, n, repeats) -> None:
    comps = model.components
    buffers = {name: c.derivative_buffers(0) for name, c in comps.items()
               if hasattr(c, "derivative_buffers") and c._is_lean(0)}
    lean_call(comps, buffers)
    t_lean = best_time(lambda: lean_call(comps, buffers), repeats)
    apm = active_parameter_manager(comps, list(comps))
    RefinerCalculator.calculate_scales_and_derivatives(apm, 0)
    t_ref = best_time(lambda: RefinerCalculator.calculate_scales_and_derivatives(apm, 0), repeats)
    print(f"  {label}: components (lean path)  {1e9 * t_lean / n:8.1f} ns/refl")
    print(f"  {label}: RefinerCalculator       {1e9 * t_ref / n:8.1f} ns/refl  (g + dg/dp as scipy CSR)")
    if hasattr(xs_components, "ComponentModelBlock"):
        block = xs_components.ComponentModelBlock(list(comps.values()))
        t0 = time.perf_counter()
        block.evaluate()  # builds the pattern
        t_first = time.perf_counter() - t0
        t_block = best_time(block.evaluate, repeats)
        g_ref, j_ref = RefinerCalculator.calculate_scales_and_derivatives(apm, 0)
        g, j = block.evaluate()
        agree = float(np.max(np.abs(g / g_ref - 1.0)))
        print(f"  {label}: model block, evaluate   {1e9 * t_block / n:8.1f} ns/refl  "
              f"(first call with pattern build {1e9 * t_first / n:.1f}; "
              f"held by the block {block.core.nbytes / n:.0f} B/refl; |g/g_ref - 1| <= {agree:.0e})")


def compare_setup(args) -> None:
    """Array-model set-up of this tree and of ``args.before``, alternating, best of each."""
    import subprocess

    def child(path: str) -> np.ndarray:
        env = dict(os.environ, PYTHONPATH=path)
        out = subprocess.run([sys.executable, __file__, "--setup-only", "--n", str(args.n),
                              "--repeats", str(args.repeats)], env=env, check=True,
                             capture_output=True, text=True).stdout
        return np.array([float(v) for v in out.split()[-3:]])

    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")
    before, after = [], []
    for _ in range(2):
        before.append(child(args.before))
        after.append(child(here))
    b, a = np.min(before, axis=0), np.min(after, axis=0)
    print(f"same run, before = {args.before}, after = this tree (ns/refl, best of runs):")
    for k, label in enumerate(("array model set-up (configure + update + first call)",
                               "physical model (lmax 4) set-up",
                               "physical model g + dg/dp (RefinerCalculator, scipy CSR)")):
        print(f"  {label:58s} before {b[k]:7.1f}  after {a[k]:7.1f}  {b[k] / a[k]:5.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--before", help="python/ folder of another built tree to compare the "
                                     "array model's set-up with, in this run")
    ap.add_argument("--setup-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    n = args.n
    if args.setup_only:  # the child of --before: three figures, in ns/refl
        table, expt = make_data(n)
        model, params = array_model(table, expt)
        t_array = best_time(lambda: setup(model, table, expt, params), args.repeats)
        physical, pparams = build_model(table, expt), default_model_params()
        t_phys = best_time(lambda: setup(physical, table, expt, pparams), args.repeats)
        apm = active_parameter_manager(physical.components, list(physical.components))
        RefinerCalculator.calculate_scales_and_derivatives(apm, 0)
        t_eval = best_time(lambda: RefinerCalculator.calculate_scales_and_derivatives(apm, 0),
                           args.repeats)
        print(*(1e9 * t / n for t in (t_array, t_phys, t_eval)))
        return
    if args.before:
        compare_setup(args)
    table, expt = make_data(n)
    print(f"xtalscale {xtalscale.__file__}")
    print(f"n = {n:,} reflections")

    model, params = array_model(table, expt)
    shapes = {name: c.n_params for name, c in model.components.items()}
    t_array = best_time(lambda: setup(model, table, expt, params), args.repeats)
    print(f"  array model set-up (configure + update + first call), parameters {shapes}: "
          f"{1e9 * t_array / n:8.1f} ns/refl")
    for name, comp in model.components.items():
        def one(c=comp):
            c.update_reflection_data()
            c.calculate_scales_and_derivatives(0)
        print(f"    {name:10s} update + first call {1e9 * best_time(one, args.repeats) / n:8.1f} ns/refl")
    evaluation_figures("array   ", model, n, args.repeats)

    physical = build_model(table, expt)
    pparams = default_model_params()
    t_phys = best_time(lambda: setup(physical, table, expt, pparams), args.repeats)
    print(f"  physical model (lmax 4) set-up (configure + update + first call): "
          f"{1e9 * t_phys / n:8.1f} ns/refl")
    evaluation_figures("physical", physical, n, args.repeats)


if __name__ == "__main__":
    main()
