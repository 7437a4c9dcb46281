"""Golden tests: re-evaluate the scaling models DIALS stored in real ``.expt`` files and
reproduce the ``inverse_scale_factor`` column DIALS wrote to the matching ``.refl`` files.

Data (tests/data, see the README files there):

* ``dials_l_cysteine_4_sweeps_scaled``: four L-cysteine sweeps scaled by DIALS in 2019
  (legacy pickle tables; physical model with 14 scale, 11 decay and 24 absorption
  parameters per sweep; 0.1° images; the 30 and 35 sweeps have a non-identity fixed
  rotation).
* ``dials_quartz_3ded``: electron-diffraction quartz scaled by DIALS in 2022 (msgpack;
  9/7/24 parameters; 1° images).

Both reproduce to ~1e-15 relative. The 2019 files need DIALS 1.x/2.x's crystal-frame
convention for the absorption surface (rotation angle z·osc_width from the scan start,
rotation about the goniometer axis without the fixed rotation, s0 from source to sample,
rotation axis turned onto z); the 2022 file needs the current one. ``crystal_frame="auto"``
picks the legacy frame for model dicts carrying the pre-2020 ``is_scaled`` key.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from xtalscale import models
from xtalscale.array_family import flex
from xtalscale.experiments import ExperimentList
from xtalscale.models import PhysicalScalingModel, inverse_scale_factors, model_from_dict

DATA = Path(__file__).resolve().parents[1] / "data"
LCYS = DATA / "dials_l_cysteine_4_sweeps_scaled"
QUARTZ = DATA / "dials_quartz_3ded"

#: (refl, expt, per-experiment counts of reflections DIALS gave a scale, frame)
CASES = [
    (LCYS / "scaled_30.refl", LCYS / "scaled_30.expt", [3170], "legacy"),
    (LCYS / "scaled_35.refl", LCYS / "scaled_35.expt", [3205], "legacy"),
    (LCYS / "scaled_20_25.refl", LCYS / "scaled_20_25.expt", [2338, 3232], "legacy"),
    (QUARTZ / "scaled.refl", QUARTZ / "scaled.expt", [1512], "current"),
]
IDS = ["lcys_30", "lcys_35", "lcys_20_25", "quartz"]

# The model is evaluated with the same formulas and the same double-precision operations
# as DIALS, up to summation order and libm: observed agreement is <= 1e-15. 1e-12 leaves
# room for a different libm while still failing on any convention error (the smallest
# convention error below is 1.7e-4).
RTOL = 1e-12


def _load(refl: Path, expt: Path):
    return flex.reflection_table.from_file(str(refl)), ExperimentList.from_file(str(expt))


def _scaled_rows(table) -> np.ndarray:
    """Rows DIALS scaled: neither user_excluded_in_scaling (bit 22) nor excluded_for_scaling (bit 24)."""
    flags = np.asarray(table["flags"]).astype(np.uint64)
    return (flags & np.uint64((1 << 22) | (1 << 24))) == 0


def _rel(g: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return g / ref - 1.0


@pytest.fixture(scope="module", params=range(len(CASES)), ids=IDS)
def case(request):
    refl, expt, counts, frame = CASES[request.param]
    table, experiments = _load(refl, expt)
    return table, experiments, counts, frame


def test_reproduces_dials_inverse_scale_factors(case):
    table, experiments, counts, _ = case
    g = inverse_scale_factors(experiments, table)
    ref = np.asarray(table["inverse_scale_factor"], dtype=np.float64)
    rows = _scaled_rows(table)
    assert rows.sum() == sum(counts)
    r = _rel(g[rows], ref[rows])
    assert np.max(np.abs(r)) <= RTOL
    lo, hi = np.percentile(r, [1, 99])
    assert max(abs(lo), abs(hi)) <= RTOL
    # Rows DIALS did not scale keep 1.0, in DIALS's table and in ours.
    assert np.all(ref[~rows] == 1.0) and np.all(g[~rows] == 1.0)
    # The stored values carry a real signal, so agreement is not trivial.
    assert np.std(ref[rows]) > 0.05


def test_per_experiment_counts_and_ranges(case):
    table, experiments, counts, _ = case
    rows = _scaled_rows(table)
    ids = np.asarray(table["id"])
    per_expt = [int(np.sum(rows & (ids == k))) for k in range(len(experiments))]
    assert per_expt == counts


def test_crystal_frame_convention_matters(case):
    """Evaluating with the other frame convention must fail the golden tolerance."""
    table, experiments, _, frame = case
    other = "current" if frame == "legacy" else "legacy"
    g_right = inverse_scale_factors(experiments, table, crystal_frame=frame)
    g_wrong = inverse_scale_factors(experiments, table, crystal_frame=other)
    ref = np.asarray(table["inverse_scale_factor"], dtype=np.float64)
    rows = _scaled_rows(table)
    assert np.max(np.abs(_rel(g_right[rows], ref[rows]))) <= RTOL
    # Quartz's absorption coefficients are ~3e-5, so its convention error is small but
    # still 1e11 times the tolerance; the L-cysteine ones are 1e-3 to 2e-2.
    assert np.max(np.abs(_rel(g_wrong[rows], ref[rows]))) > 1e-4


def test_absorption_term_is_needed_for_lcysteine():
    table, experiments = _load(LCYS / "scaled_30.refl", LCYS / "scaled_30.expt")
    raw = copy.deepcopy(experiments[0].scaling_model)
    raw["configuration_parameters"]["corrections"] = ["scale", "decay"]
    del raw["absorption"]
    experiments[0].scaling_model = raw
    g = inverse_scale_factors(experiments, table)
    rows = _scaled_rows(table)
    ref = np.asarray(table["inverse_scale_factor"], dtype=np.float64)
    # Scale x decay alone is off by up to ~5e-3 (the data doc reports 0.4-1.7 % per sweep).
    assert np.max(np.abs(_rel(g[rows], ref[rows]))) > 1e-3


def test_lookup_mode_builds_no_class_table(case, monkeypatch):
    """Large data form their absorption rows from the lookup grid's factors: configuring and
    evaluating the model leaves the class table (50 MB) unbuilt, and gives the table path's
    scales (the float64 harmonic block: the same harmonics bit for bit, the scale sums in
    another order, so within a few ulp)."""
    from xtalscale.components import SHScaleComponent

    table, experiments, _, _ = case
    monkeypatch.setattr(models, "SH_LOOKUP_THRESHOLD", 0)
    monkeypatch.setattr(SHScaleComponent, "coefficients_list", None)
    monkeypatch.setattr(SHScaleComponent, "float32_min_reflections", 0)  # the large-data forms
    factored = inverse_scale_factors(experiments, table)
    assert SHScaleComponent.coefficients_list is None
    monkeypatch.setattr(SHScaleComponent, "float32_min_reflections", 10**9)  # the float64 table path
    from_table = inverse_scale_factors(experiments, table)
    assert SHScaleComponent.coefficients_list is not None  # built on its first need
    np.testing.assert_allclose(factored, from_table, rtol=1e-14, atol=0)


def test_lookup_table_mode_is_close(case, monkeypatch):
    """Above 100k reflections DIALS reads harmonics from a 0.5° grid; force that path here."""
    from xtalscale.components import SHScaleComponent

    table, experiments, _, _ = case
    exact = inverse_scale_factors(experiments, table)
    # The lookup table is class-wide (as in DIALS): restore it for other tests afterwards.
    monkeypatch.setattr(SHScaleComponent, "coefficients_list", SHScaleComponent.coefficients_list)
    monkeypatch.setattr(models, "SH_LOOKUP_THRESHOLD", 0)
    looked_up = inverse_scale_factors(experiments, table)
    rows = _scaled_rows(table)
    diff = np.abs(_rel(looked_up[rows], exact[rows]))
    # Nearest-grid harmonics move by < ~1.5e-2 (0.5° steps); times coefficients <= 1e-2
    # the scale moves by well under 1e-3. It must move at all for the L-cysteine sweeps.
    assert np.max(diff) < 1e-3
    if np.max(np.abs(experiments[0].scaling_model["absorption"]["parameters"])) > 1e-3:
        assert np.max(diff) > 1e-7


def test_model_get_scales_matches_helper(case):
    """``model.get_scales(table, experiment)`` on the scaled rows gives the same g."""
    table, experiments, _, frame = case
    rows = _scaled_rows(table) & (np.asarray(table["id"]) == 0)
    sub = table.select(flex.bool(rows))
    model = model_from_dict(experiments[0].scaling_model)
    assert model.crystal_frame == frame
    g = model.get_scales(sub, experiments[0])
    ref = np.asarray(sub["inverse_scale_factor"], dtype=np.float64)
    assert np.max(np.abs(_rel(g, ref))) <= RTOL
    np.testing.assert_allclose(model.get_inverse_scales(), 1.0 / g, rtol=0, atol=0)


def test_round_trip_equals_stored_dicts(case):
    _, experiments, _, _ = case
    for expt in experiments:
        stored = expt.scaling_model
        model = model_from_dict(copy.deepcopy(stored))
        assert isinstance(model, PhysicalScalingModel)
        assert model.is_scaled
        out = model.to_dict()
        assert out == stored
        # Key order too, so a written .expt is textually identical.
        assert json.dumps(out) == json.dumps(stored)
        again = model_from_dict(json.loads(json.dumps(out))).to_dict()
        assert again == stored


def test_stored_parameter_layout(case):
    _, experiments, _, frame = case
    model = model_from_dict(experiments[0].scaling_model)
    counts = {name: comp.n_params for name, comp in model.components.items()}
    if frame == "legacy":
        assert counts == {"scale": 14, "decay": 11, "absorption": 24}
    else:
        assert counts == {"scale": 9, "decay": 7, "absorption": 24}
    assert model.n_params == sum(counts.values())
    # The stored layout is what from_data would choose for the scan (spec section 4.2).
    conf = model.configdict
    osc = conf["valid_osc_range"]
    width = experiments[0].scan.get_oscillation()[1]
    # Rotation ranges of 100-180 degrees: DIALS's automatic intervals are 15 (scale) and 20 (decay).
    n, norm, rot = models.initialise_smooth_input(osc, width, 15.0)
    assert (n, norm, rot) == (counts["scale"], pytest.approx(conf["s_norm_fac"], rel=1e-15),
                              pytest.approx(conf["scale_rot_interval"], rel=1e-15))
    n, norm, rot = models.initialise_smooth_input(osc, width, 20.0)
    assert (n, norm, rot) == (counts["decay"], pytest.approx(conf["d_norm_fac"], rel=1e-15),
                              pytest.approx(conf["decay_rot_interval"], rel=1e-15))


def test_from_data_reproduces_dials_parameterisation_quartz():
    """DIALS 2022 created quartz's model from the same scan: from_data gives the same config.

    The data just keep absorption on: the widest scattering angle is 2.588°, above the
    acos(0.999) = 2.563° cut-off that turns absorption off for electron data.
    """
    table, experiments = _load(QUARTZ / "scaled.refl", QUARTZ / "scaled.expt")
    model = PhysicalScalingModel.from_data(models.default_model_params(), experiments[0], table)
    stored = experiments[0].scaling_model["configuration_parameters"]
    created = json.loads(json.dumps(model.configdict))
    # dials.scale adds valid_image_range, the error model and Imid after creation.
    assert created == {k: stored[k] for k in list(stored)[:8]}
    assert list(created) == list(stored)[:8]
    assert {k: c.n_params for k, c in model.components.items()} == {"scale": 9, "decay": 7, "absorption": 24}


def test_from_data_reproduces_dials_parameterisation_lcysteine():
    """Sweep 20 before scaling (integrated pickle) -> the layout DIALS 2019 chose for it.

    Only the absorption surface weight differs: DIALS's default was 1e6 in 2019, 5e5 now.
    """
    integrated = DATA / "dials_l_cysteine_integrated"
    table = flex.reflection_table.from_file(str(integrated / "20_integrated.pickle"))
    expt = ExperimentList.from_file(str(integrated / "20_integrated_experiments.json"))[0]
    model = PhysicalScalingModel.from_data(models.default_model_params(), expt, table)
    stored = ExperimentList.from_file(str(LCYS / "scaled_20_25.expt"))[0].scaling_model["configuration_parameters"]
    created = json.loads(json.dumps(model.configdict))
    assert created.pop("abs_surface_weight") == 5e5 and stored["abs_surface_weight"] == 1e6
    assert created == {k: stored[k] for k in created}
    assert {k: c.n_params for k, c in model.components.items()} == {"scale": 14, "decay": 11, "absorption": 24}


def test_models_written_back_through_an_experiment_list(tmp_path):
    """Model objects assigned to experiments serialise into .expt exactly as DIALS wrote them."""
    for expt_path in (QUARTZ / "scaled.expt", LCYS / "scaled_20_25.expt"):
        experiments = ExperimentList.from_file(str(expt_path))
        stored = [copy.deepcopy(e.scaling_model) for e in experiments]
        for e in experiments:
            e.scaling_model = model_from_dict(copy.deepcopy(e.scaling_model))
        out = tmp_path / expt_path.name
        experiments.as_file(str(out))
        again = ExperimentList.from_file(str(out))
        assert [e.scaling_model for e in again] == stored
        assert json.loads(out.read_text())["scaling_model"] == json.loads(expt_path.read_text())["scaling_model"]
