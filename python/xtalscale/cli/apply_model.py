"""``xtalscale apply-model``: re-apply a stored scaling model.

It does the model half of a ``dials.scale`` job on real files: it re-applies the
scaling model stored in an ``.expt`` file to the reflections of a ``.refl`` file (exactly as
``dials.scale`` re-applies a model), reports how closely the result matches the inverse scale
factors DIALS stored, and writes the scaled reflection table, an unmerged MTZ (with SCALEUSED)
and a merged MTZ.

Usage::

    xtalscale apply-model scaled.expt scaled.refl --output-dir out/
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["run", "SUMMARY"]

SUMMARY = "re-apply the scaling model stored in an .expt file; write scaled .refl and MTZ"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xtalscale apply-model",
        description=("Evaluate each experiment's stored scaling model on its reflections, "
                     "compare with DIALS's stored inverse_scale_factor when present, and write "
                     "scaled.refl, scaled_unmerged.mtz and scaled_merged.mtz."))
    parser.add_argument("experiments", type=Path, help=".expt (or *_experiments.json) file")
    parser.add_argument("reflections", type=Path, help=".refl file (msgpack or legacy pickle)")
    parser.add_argument("--output-dir", "-o", type=Path, default=Path("."),
                        help="directory for the output files (default: current directory)")
    parser.add_argument("--anomalous", action="store_true",
                        help="keep Friedel mates apart in the merged MTZ (adds I(+)/I(-))")
    return parser


def _agreement_summary(g_new: np.ndarray, g_dials: np.ndarray) -> str:
    """One line: relative difference between our g and DIALS's stored g."""
    rel = np.abs(g_new / g_dials - 1.0)
    p1, p99 = np.percentile(g_new / g_dials - 1.0, [1, 99])
    return (f"agreement with DIALS's stored inverse_scale_factor on {rel.size} observations: "
            f"max |rel| = {rel.max():.2e}, 1st-99th percentile [{p1:+.2e}, {p99:+.2e}]")


def _apply_model(args: argparse.Namespace) -> int:
    from ..experiments import ExperimentList
    from ..io.mtz import merge_intensities, write_merged_mtz, write_unmerged_mtz
    from ..models import inverse_scale_factors, suitable_for_scaling
    from ..reflection_table import reflection_table

    t0 = time.perf_counter()
    experiments = ExperimentList.from_file(str(args.experiments))
    table = reflection_table.from_file(str(args.reflections))
    t_read = time.perf_counter() - t0
    print(f"read {len(experiments)} experiment(s) and {len(table)} reflections in {t_read:.2f} s")

    if len(table) == 0:
        raise ValueError(f"{args.reflections}: the reflection table is empty; nothing to scale")
    evaluated = suitable_for_scaling(table)
    if not evaluated.any():
        raise ValueError(f"{args.reflections}: none of the {len(table)} reflections is suitable "
                         "for scaling (all are excluded_for_scaling/user_excluded_in_scaling or "
                         "have d <= 0); nothing to scale")
    stored = np.asarray(table["inverse_scale_factor"]) if "inverse_scale_factor" in table else None
    t0 = time.perf_counter()
    g = inverse_scale_factors(experiments, table, selection=evaluated)
    t_model = time.perf_counter() - t0
    print(f"evaluated the stored scaling model on {int(evaluated.sum())} reflections "
          f"in {t_model * 1e3:.1f} ms")
    if stored is not None:
        print(_agreement_summary(g[evaluated], stored[evaluated]))

    table["inverse_scale_factor"] = g
    args.output_dir.mkdir(parents=True, exist_ok=True)
    refl_out = args.output_dir / "scaled.refl"
    table.as_file(str(refl_out))
    scaled = table.select(evaluated)
    unmerged_out = args.output_dir / "scaled_unmerged.mtz"
    write_unmerged_mtz(str(unmerged_out), scaled, experiments)

    kind = next(k for k in ("scale", "prf", "sum") if f"intensity.{k}.value" in scaled)
    intensity = np.asarray(scaled[f"intensity.{kind}.value"]) / np.asarray(g[evaluated])
    variance = np.asarray(scaled[f"intensity.{kind}.variance"]) / np.asarray(g[evaluated]) ** 2
    crystal = experiments[0].crystal
    hkl, mean, sigma, multiplicity = merge_intensities(
        np.asarray(scaled["miller_index"]), intensity, variance, crystal.get_space_group(),
        anomalous=args.anomalous)
    merged_out = args.output_dir / "scaled_merged.mtz"
    write_merged_mtz(str(merged_out), hkl, mean, sigma, crystal.get_space_group(),
                     crystal.get_unit_cell(), experiments[0].beam.get_wavelength())
    print(f"merged {intensity.size} observations (intensity.{kind}) into {hkl.shape[0]} unique "
          f"reflections, mean multiplicity {np.mean(multiplicity):.2f}")
    for path in (refl_out, unmerged_out, merged_out):
        print(f"wrote {path}")
    return 0


def run(argv: Sequence[str]) -> int:
    """Run ``xtalscale apply-model`` with the arguments after the command name."""
    return _apply_model(_build_parser().parse_args(list(argv)))
