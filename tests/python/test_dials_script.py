"""The README's "scaling from a script, the DIALS way" example: dials.scale's own Python flow
(PHIL master, ArgumentParser, ScalingAlgorithm) with only the import lines changed."""
from __future__ import annotations

from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1] / "data" / "dials_l_cysteine_integrated"


def test_dials_scale_python_flow_runs_with_changed_imports(monkeypatch):
    from xtalscale.algorithms.scaling.algorithm import ScalingAlgorithm
    from xtalscale.command_line.scale import phil_scope
    from xtalscale.util.options import ArgumentParser, reflections_and_experiments_from_files

    parser = ArgumentParser(phil=phil_scope, read_reflections=True, read_experiments=True)
    params, _ = parser.parse_args(args=[
        str(DATA / "20_integrated.pickle"), str(DATA / "20_integrated_experiments.json"),
        "error_model=None", "outlier_rejection=simple"], show_diff_phil=False)
    reflections, experiments = reflections_and_experiments_from_files(
        params.input.reflections, params.input.experiments)
    n_in = sum(len(t) for t in reflections)
    algorithm = ScalingAlgorithm(params, experiments, reflections)
    algorithm.run()
    scaled_experiments, scaled_reflections = algorithm.finish()

    assert type(scaled_experiments[0].scaling_model).__name__ == "PhysicalScalingModel"
    assert len(scaled_reflections) == n_in  # every input row is kept
    g = np.asarray(scaled_reflections["inverse_scale_factor"])
    assert np.all(np.isfinite(g))
    scaled = g > 0  # rows unfit for scaling stay in the table, flagged, with g = 0
    assert scaled.sum() > 2300  # DIALS scales 2334 of these rows with these options
    assert np.ptp(g[scaled]) > 0.01  # the model was refined: the scales are not all one value
