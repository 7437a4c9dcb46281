"""DIALS-path names of the scaling job, DIALS-style scripting of a scaler, and the
scaling_utilities additions (spec §1.11-1.15, §9.9)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from xtalscale import flex_arrays as fa
from xtalscale.reflection_table import Flags, reflection_table
from xtalscale.symmetry import SpaceGroup

DATA = Path(__file__).resolve().parents[1] / "data" / "dials_l_cysteine_integrated"


def test_facades_reexport_the_core_objects():
    from xtalscale.algorithms.scaling import (
        algorithm,
        outlier_rejection,
        scaler,
        scaler_factory,
        scaling_library,
    )
    from xtalscale.algorithms.scaling.error_model import engine, error_model
    from xtalscale.job import algorithm as core_algorithm
    from xtalscale.job import error_model as core_em
    from xtalscale.job import outlier_rejection as core_out
    from xtalscale.job import scaler as core_scaler

    assert scaler.SingleScaler is core_scaler.SingleScaler
    assert scaler.MultiScaler is core_scaler.MultiScaler and scaler.TargetScaler is core_scaler.TargetScaler
    assert algorithm.ScalingAlgorithm is core_algorithm.ScalingAlgorithm
    assert outlier_rejection.reject_outliers is core_out.reject_outliers
    assert error_model.BasicErrorModel is core_em.BasicErrorModel
    assert engine.run_error_model_refinement is core_em.run_error_model_refinement
    assert error_model.phil_scope.extract().basic.min_Ih == 25.0
    assert callable(scaler_factory.create_scaler) and callable(scaling_library.scale_single_dataset)


def test_dials_style_scaler_script():
    """Build a scaler and drive its rounds the way DIALS scripts do."""
    from xtalscale.algorithms.scaling.scaler_factory import SingleScalerFactory
    from xtalscale.job.inputs import load_inputs
    from xtalscale.job.phil import parse_phil_arguments

    inputs = load_inputs([DATA / "20_integrated.pickle", DATA / "20_integrated_experiments.json"])
    params, _ = parse_phil_arguments(["intensity_choice=profile", "error_model=None"])
    table = inputs.tables[0].select(np.asarray(inputs.tables[0]["id"]) >= 0)
    scaler = SingleScalerFactory.create(params, inputs.experiments[0], table)
    assert scaler.n_suitable_refl > 2000
    scaler.make_ready_for_scaling()
    scaler.perform_scaling()
    scaler.expand_scales_to_all_reflections()
    scaler.round_of_outlier_rejection()
    g = np.asarray(scaler.reflection_table["inverse_scale_factor"])[scaler.suitable_refl_for_scaling_sel]
    assert np.all(np.isfinite(g)) and g.std() > 0.01
    assert scaler.outliers.sum() > 0
    scaler.prepare_reflection_tables_for_output()
    assert "intensity.scale.value" in scaler.reflection_table


def test_scaling_utilities_additions():
    from xtalscale.algorithms.scaling.scaling_utilities import (
        Reasons,
        calculate_prescaling_correction,
        quasi_normalisation,
        set_wilson_outliers,
    )

    reasons = Reasons()
    reasons.add_reason("test", 3)
    reasons.add_reason("test", 2)
    assert "criterion: test, reflections: 5" in repr(reasons)
    t = reflection_table(3)
    t["lp"] = fa.double(np.array([1.0, 0.9, 0.8]))
    t["qe"] = fa.double(np.array([0.6, 0.5, 0.4]))
    np.testing.assert_allclose(np.asarray(calculate_prescaling_correction(t)["prescaling_correction"]),
                               [1 / 0.6, 0.9 / 0.5, 0.8 / 0.4])
    # spec §9.9: 11000 reflections in 10 shells, I linearly 90..110 in each shell -> Esq 0.9..1.1
    exp = SimpleNamespace(crystal=SimpleNamespace(get_space_group=lambda: SpaceGroup("P 1")))
    n_shell, n = 10, 11000
    dss = np.repeat(np.linspace(0.05, 0.95, n_shell), n // n_shell) * 0.1 + 0.01
    t = reflection_table(n)
    t["d"] = fa.double(1.0 / np.sqrt(dss))
    t["intensity"] = fa.double(np.tile(np.linspace(90, 110, n // n_shell), n_shell))
    t["miller_index"] = fa.miller_index(np.tile(np.array([[1, 2, 3]], np.int32), (n, 1)))
    t["flags"] = fa.size_t(np.zeros(n, np.uint64))
    quasi_normalisation(t, exp)
    esq = np.asarray(t["Esq"])
    np.testing.assert_allclose(esq[: 9 * (n // n_shell)], np.tile(np.linspace(0.9, 1.1, n // n_shell), 9),
                               rtol=1e-9)
    small = t.select(np.arange(n) < 10000)
    assert np.all(np.asarray(quasi_normalisation(small, exp)["Esq"]) == 1.0)
    t["Esq"] = fa.double(np.array([30.0, 20.0] + [1.0] * (n - 2)))
    t["centric_flag"] = fa.bool(np.array([True, False] + [False] * (n - 2)))
    set_wilson_outliers(t)
    assert list(np.asarray(t.get_flags(Flags.outlier_in_scaling))[:3]) == [True, True, False]


def test_scaling_library_scale_single_dataset():
    from xtalscale.algorithms.scaling.scaling_library import (
        create_Ih_table,
        scale_single_dataset,
    )
    from xtalscale.job.inputs import load_inputs

    inputs = load_inputs([DATA / "20_integrated.pickle", DATA / "20_integrated_experiments.json"])
    out = scale_single_dataset(inputs.tables[0], inputs.experiments[0])
    assert np.count_nonzero(out.get_flags(Flags.scaled)) > 2300
    table = out.select(np.asarray(out.get_flags(Flags.scaled)))
    table["intensity"] = table["intensity.scale.value"]
    table["variance"] = table["intensity.scale.variance"]
    Ih = create_Ih_table([inputs.experiments[0]], [table])
    assert Ih.size == len(table)

