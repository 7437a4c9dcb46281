"""Run the commissioning API's scripts (custom_model.py, refinement.py, smooth_component.py)
on real reflections and report what the refinement did.

The three scripts are the API description's §5-7, unchanged but for their import lines. This
driver is not part of them: it reads integrated reflections (default: the shipped l-cysteine
sweep 20, DIALS's own test data), takes a seeded random subset (the scripts loop over
reflections in Python and recompute every component's derivatives for each reflection, so
their cost grows with the square of the number of reflections), and then

1. runs ``create_and_refine_scaling_model`` (multiplicative + 10 resolution-bin components,
   ``levenberg_marquardt_iterations(residuals=..., jacobian=...)`` steps) and
2. refines the same model with the script's slip fixed (the resolution component reading its
   own slice of the shared parameter manager) with ``run_scaling_refinement``, and
3. refines a model made of the multiplicative component and the §7 ``SmoothScaleComponent``
   along the image number with ``run_scaling_refinement``,

printing the RMS of the scripts' residual ``(I - g Ī) / σ`` before and after each.

Usage::

    python examples/seed_framework/run_seed_scripts.py [--n-reflections 150] [--seed 7]
        [--reflections FILE.refl|.pickle --experiments FILE.expt|.json]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the scripts import each other by module name
    sys.path.insert(0, str(HERE))

from custom_model import (  # noqa: E402
    CustomRelativeScalingModel,
    ResolutionDependentComponent,
    ScaleComponentBase,
    SimpleMultiplicativeComponent,
)
from smooth_component import SmoothScaleComponent  # noqa: E402

from xtalscale.algorithms.scaling.active_parameter_managers import (  # noqa: E402
    active_parameter_manager,
)
from xtalscale.array_family import flex  # noqa: E402
from xtalscale.dxtbx.model.experiment_list import ExperimentListFactory  # noqa: E402

# refinement.py (§6) is imported inside the functions that run it, so that the data helpers
# here can be used on their own.

DATA = HERE.parents[1] / "tests" / "data" / "dials_l_cysteine_integrated"


def load_subset(reflections: Path, experiments: Path, n_reflections: int, seed: int):
    """The experiments and a seeded random subset of the integrated reflections with a
    positive summation variance and a d-spacing; the ``d`` column is renamed ``d_dials`` so
    that the custom model computes ``d`` from the unit cell (the script's ``cctbx.uctbx``
    path)."""
    table = flex.reflection_table.from_file(str(reflections))
    expts = ExperimentListFactory.from_json_file(str(experiments))
    usable = ((np.asarray(table["intensity.sum.variance"]) > 0)
              & (np.asarray(table["d"]) > 0)
              & np.asarray(table.get_flags(table.flags.integrated_sum)))
    candidates = np.flatnonzero(usable)
    if candidates.size < n_reflections:
        raise ValueError(f"{reflections}: only {candidates.size} usable reflections "
                         f"(asked for {n_reflections})")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(candidates, size=n_reflections, replace=False))
    subset = table.select(flex.size_t(chosen))
    subset["d_dials"] = subset["d"]  # DIALS's value (scan-varying cell), kept for comparison
    del subset["d"]
    return expts, subset


def rms_residual(models, tables) -> float:
    """RMS of the scripts' residual (I - g Ī) / σ for the models' current parameters."""
    from refinement import CustomScalingTargetFunction

    residuals, _ = CustomScalingTargetFunction(models, tables).compute_residuals_and_gradients()
    return math.sqrt(flex.mean(residuals * residuals))


def unscaled_rms(table) -> float:
    """The same RMS with every scale 1 (the models' starting point)."""
    intensities = np.asarray(table["intensity.sum.value"])
    sigmas = np.sqrt(np.asarray(table["intensity.sum.variance"]))
    r = (intensities - intensities.mean()) / sigmas
    return float(np.sqrt(np.mean(r * r)))


def refine_resolution_model(experiments, table) -> tuple:
    """§6's ``create_and_refine_scaling_model``: (rms before, rms after, refined models)."""
    from refinement import create_and_refine_scaling_model

    before = unscaled_rms(table)
    models, tables = create_and_refine_scaling_model(experiments, [table])
    return before, rms_residual(models, tables), models


class ResolutionBinsOwnSlice(ResolutionDependentComponent):
    """§5's resolution component with the slip fixed: it reads its own slice of the shared
    parameter manager (the base class's seed-form ``parameters``) instead of the manager's
    first ``n_params`` values, which belong partly to the multiplicative component."""

    @property
    def parameters(self):
        return ScaleComponentBase.parameters.fget(self)


def refine_resolution_model_own_slices(experiments, table) -> tuple:
    """The §5 model with :class:`ResolutionBinsOwnSlice`, refined by §6's
    ``run_scaling_refinement``: (rms before, rms after, model)."""
    from refinement import run_scaling_refinement

    model = CustomRelativeScalingModel({"model_type": "custom_relative"}, is_scaled=False)
    apm = model.active_parameter_manager = active_parameter_manager()
    model._components["multiplicative"] = SimpleMultiplicativeComponent(apm)
    model._components["resolution"] = ResolutionBinsOwnSlice(apm, n_resolution_bins=10,
                                                             d_min=1.5, d_max=50.0)
    cell = experiments[0].crystal.get_unit_cell()
    table["d"] = flex.double(cell.d(np.asarray(table["miller_index"])))
    before = rms_residual([model], [table])
    run_scaling_refinement([model], [table])
    return before, rms_residual([model], [table]), model


def refine_smooth_model(table, n_control_points: int = 5) -> tuple:
    """A multiplicative + §7 smooth-in-image-number model refined by ``run_scaling_refinement``:
    (rms before, rms after, model)."""
    from refinement import run_scaling_refinement

    model = CustomRelativeScalingModel({"model_type": "custom_relative"}, is_scaled=False)
    model.active_parameter_manager = active_parameter_manager()
    model._components["multiplicative"] = SimpleMultiplicativeComponent(
        model.active_parameter_manager)
    image_number = flex.double(np.asarray(table["xyzobs.px.value"])[:, 2])
    model._components["smooth"] = SmoothScaleComponent(
        model.active_parameter_manager, image_number, n_control_points=n_control_points)
    before = rms_residual([model], [table])
    run_scaling_refinement([model], [table])
    return before, rms_residual([model], [table]), model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reflections", type=Path, default=DATA / "20_integrated.pickle")
    parser.add_argument("--experiments", type=Path,
                        default=DATA / "20_integrated_experiments.json")
    parser.add_argument("--n-reflections", type=int, default=150)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    experiments, table = load_subset(args.reflections, args.experiments, args.n_reflections,
                                     args.seed)
    before, after, _ = refine_resolution_model(experiments, table)
    print(f"\ncustom resolution model: RMS residual {before:.4f} -> {after:.4f}\n")
    experiments, table = load_subset(args.reflections, args.experiments, args.n_reflections,
                                     args.seed)
    before, after, _ = refine_resolution_model_own_slices(experiments, table)
    print(f"\ncustom resolution model, own parameter slices: RMS residual {before:.4f} -> "
          f"{after:.4f}\n")
    experiments, table = load_subset(args.reflections, args.experiments, args.n_reflections,
                                     args.seed)
    before, after, _ = refine_smooth_model(table)
    print(f"\nmultiplicative x smooth(image) model: RMS residual {before:.4f} -> {after:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
