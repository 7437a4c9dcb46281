"""Scaling models: DIALS's test_model.py numbers (spec sections 4 and 9.3), automatic
parameterisation, image-range limiting, serialisation, the registry, custom (seed-API)
models, bad input, and analytical derivatives of every model against finite differences."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest

from xtalscale import models
from xtalscale.algorithms.scaling.active_parameter_managers import (
    active_parameter_manager,
    multi_active_parameter_manager,
)
from xtalscale.algorithms.scaling.model import ScalingModelBase
from xtalscale.algorithms.scaling.model.components.scale_components import ScaleComponentBase
from xtalscale.algorithms.scaling.model.model import (
    ArrayScalingModel,
    DoseDecay,
    KBScalingModel,
    PhysicalScalingModel,
    calc_n_param_from_bins,
    initialise_smooth_input,
)
from xtalscale.array_family import flex
from xtalscale.models import (
    ScalingModelError,
    create_scaling_model,
    default_model_params,
    model_from_dict,
    register_scaling_model,
    registered_scaling_models,
    unregister_scaling_model,
)


# ----------------------------------------------------------------------------- fixtures
def mock_experiment(osc=(0.0, 90.0), width=1.0):
    first = 1
    last = int(round((osc[1] - osc[0]) / width))
    scan = SimpleNamespace(get_oscillation=lambda: (osc[0], width), get_oscillation_range=lambda: osc,
                           get_image_range=lambda: (first, last))
    return SimpleNamespace(scan=scan, beam=SimpleNamespace(get_s0=lambda: (0.0, 0.0, 1.01)),
                           goniometer=None)


def dials_test_reflections():
    """DIALS's generated_refl(): two reflections with crystal-frame columns."""
    return {"xyzobs.px.value": np.array([[0.1, 0.1, 0.1], [0.1, 0.1, 0.2]]),
            "s1": np.array([[0.1, 0.1, 0.1], [0.1, 0.1, 1.1]]),
            "s1c": np.array([[0.1, 0.1, 0.1], [0.1, 0.1, 1.1]]),
            "s0c": np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]),
            "d": np.array([1.0, 1.0]), "id": np.array([0, 0])}


def synthetic_reflections(n=240, n_images=90, seed=3):
    """Reflections spread over a 90-image scan, with random crystal-frame directions."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(0.0, n_images, n)
    xyz = np.column_stack([rng.uniform(5, 2400, n), rng.uniform(5, 2500, n), z])
    unit = lambda v: v / np.linalg.norm(v, axis=1)[:, None]  # noqa: E731
    return {"xyzobs.px.value": xyz, "d": rng.uniform(0.8, 4.0, n),
            "s1": unit(rng.normal(size=(n, 3))) + np.array([0.0, 0.0, 1.0]),
            "s0c": unit(rng.normal(size=(n, 3))), "s1c": unit(rng.normal(size=(n, 3))),
            "id": np.zeros(n, dtype=int), "analytical_correction": rng.uniform(0.9, 1.1, n)}


# ----------------------------------------------------------------------------- helpers (4.1)
def test_initialise_smooth_input_dials_cases():
    assert initialise_smooth_input([0, 10], 1.0, 1.0) == (12, 0.999, 1.0)
    assert initialise_smooth_input([0, 10], 1.0, 12) == (2, 0.0999, 10.0)
    assert initialise_smooth_input([0, 10], 1.0, 10) == (2, 0.0999, 10.0)
    assert initialise_smooth_input([0, 10], 1.0, 9.99) == (3, 0.1998, 5.0)
    assert initialise_smooth_input([0, 10], 1.0, 5.0) == (3, 0.1998, 5.0)
    assert initialise_smooth_input([0, 10], 1.0, 4.99) == (5, 0.999 * 3.0 / 10.0, 10.0 / 3.0)
    assert initialise_smooth_input([0, 10], 2.0, 4.99) == (5, 0.999 * 6.0 / 10.0, 10.0 / 3.0)
    # The +1e-5 fudge: 170 degrees in 15-degree steps gives 12 bins (data_and_formats.md 3.3).
    assert initialise_smooth_input([-145.0, 25.0], 0.1, 15.0)[0] == 14
    with pytest.raises(ValueError, match="osc_range"):
        initialise_smooth_input([10, 10], 1.0, 1.0)
    with pytest.raises(ValueError, match="one_osc_width"):
        initialise_smooth_input([0, 10], 0.0, 1.0)


def test_calc_n_param_from_bins_dials_cases():
    assert calc_n_param_from_bins(0.0, 1.0, 1) == (2, 1.0)
    assert calc_n_param_from_bins(0.0, 2.0, 2) == (3, 1.0)
    assert calc_n_param_from_bins(0.0, 3.0, 3) == (5, 1.0)
    assert calc_n_param_from_bins(0.0, 10.0, 10) == (12, 1.0)
    assert calc_n_param_from_bins(0.0, 10.0, 5) == (7, 2.0)
    for bad in (0, 0.5, -2):
        with pytest.raises(AssertionError):  # DIALS's exception type; ours is also a ValueError
            calc_n_param_from_bins(0.0, 1.0, bad)
        with pytest.raises(ValueError, match="n_bins"):
            calc_n_param_from_bins(0.0, 1.0, bad)


def test_calculate_new_offset():
    assert models.calculate_new_offset(1, 7, 0.1, 11, 6) == 1  # 0.6 rounds up
    assert models.calculate_new_offset(1, 5, 0.1, 11, 7) == 0  # 0.4 rounds down
    assert models.calculate_new_offset(1, 90, 0.1, 2, 2) == 0  # never below two parameters
    assert models.calculate_new_offset(1, 90, 1.0, 11, 7) == 4  # capped at n_old - n_new


# ----------------------------------------------------------------------------- base model
class _ErrorModel:
    parameters = [1.0, 0.1]


def test_scaling_model_base_dials():
    configdict = {"corrections": ["1"]}
    base = ScalingModelBase(configdict)
    assert not base.is_scaled
    base.set_scaling_model_as_scaled()
    assert base.is_scaled
    base.set_scaling_model_as_unscaled()
    assert not base.is_scaled
    assert base.configdict == configdict
    assert not base.components
    assert base.to_dict() == {"__id__": None, "configuration_parameters": configdict}
    em = _ErrorModel()
    base.set_error_model(em)
    assert base.configdict["error_model_parameters"] == [1.0, 0.1]
    assert base.configdict["error_model_type"] == "_ErrorModel"
    assert base.error_model is em
    base.record_intensity_combination_Imid(12.5)
    assert base.configdict["Imid"] == 12.5
    assert "Scaling model" in str(base)
    with pytest.raises(ValueError, match="corrections"):
        ScalingModelBase({"corrections": []})
    # A custom model's configdict need not have "corrections".
    assert ScalingModelBase({"model_type": "custom"}).configdict == {"model_type": "custom"}
    with pytest.raises(TypeError, match="configdict"):
        ScalingModelBase(["scale"])
    with pytest.raises(ValueError, match="needs a reflection_table"):
        base.get_scales()
    kb = KBScalingModel.from_dict(copy.deepcopy(KB_DICT_1))
    with pytest.raises(Exception, match="update_reflection_data|data"):
        kb.get_scales()  # components hold no data yet


# ----------------------------------------------------------------------------- KB
KB_DICT_1 = {"__id__": "KB",
             "scale": {"n_parameters": 1, "parameters": [0.5], "est_standard_devs": [0.05],
                       "null_parameter_value": 1},
             "configuration_parameters": {"corrections": ["scale"]}}
KB_DICT_2 = {"__id__": "KB",
             "scale": {"n_parameters": 1, "parameters": [0.5], "est_standard_devs": [0.05],
                       "null_parameter_value": 1},
             "decay": {"n_parameters": 1, "parameters": [0.2], "est_standard_devs": [0.02],
                       "null_parameter_value": 0},
             "configuration_parameters": {"corrections": ["scale", "decay"]}}


def test_kb_model_dials():
    params = {"scale": {"parameters": np.array([1.2]), "parameter_esds": np.array([0.1])},
              "decay": {"parameters": np.array([0.01]), "parameter_esds": np.array([0.02])}}
    kb = KBScalingModel(params, {"corrections": ["scale", "decay"]})
    assert kb.id_ == "KB" and list(kb.components) == ["scale", "decay"]
    assert list(kb.components["scale"].parameters) == [1.2]
    assert list(kb.components["decay"].parameter_esds) == [0.02]
    for stored in (KB_DICT_1, KB_DICT_2):
        model = KBScalingModel.from_dict(copy.deepcopy(stored))
        assert model.is_scaled is True
        assert model.to_dict() == stored
    assert model.consecutive_refinement_order == [["scale", "decay"]]
    assert "Decay component" in str(model)
    with pytest.raises(RuntimeError, match="expected __id__ KB"):
        KBScalingModel.from_dict(dict(KB_DICT_2, __id__="physical"))
    # from_data: DIALS's quirk, corrections listed decay first but parameters scale first.
    kb = KBScalingModel.from_data(default_model_params(), None, {})
    assert kb.configdict["corrections"] == ["decay", "scale"]
    assert list(kb.components) == ["scale", "decay"]


def test_kb_scales_and_naming():
    """get_scales is g = k exp(B/2d²) (DIALS's inverse scale); get_inverse_scales is 1/g."""
    params = {"scale": {"parameters": [2.0], "parameter_esds": None},
              "decay": {"parameters": [0.5], "parameter_esds": None}}
    kb = KBScalingModel(params, {"corrections": ["scale", "decay"]})
    table = {"id": np.zeros(3, dtype=int), "d": np.array([1.0, 2.0, 0.5])}
    g = kb.get_scales(table)
    np.testing.assert_allclose(g, 2.0 * np.exp(0.5 / (2 * table["d"] ** 2)), rtol=1e-15)
    np.testing.assert_allclose(kb.get_inverse_scales(table), 1.0 / g, rtol=1e-15)


# ----------------------------------------------------------------------------- physical
def physical_params(**kw):
    p = default_model_params()
    p.physical.scale_interval, p.physical.decay_interval = 10.0, 15.0
    p.physical.absorption_correction, p.physical.lmax = True, 4
    for k, v in kw.items():
        setattr(p.physical, k, v)
    return p


def test_physical_from_data_and_update_dials():
    params = physical_params()
    model = PhysicalScalingModel.from_data(params, mock_experiment(), dials_test_reflections())
    assert model.configdict["lmax"] == 4
    assert model.components["absorption"].n_params == 24
    assert list(model.components["absorption"].parameters) == [0.0] * 24
    params.physical.absorption_level = "high"
    model.update(params)
    assert len(model.components["absorption"].parameters) == 48
    assert model.configdict["abs_surface_weight"] == 5e3
    params.physical.absorption_level = "medium"
    model.update(params)
    assert len(model.components["absorption"].parameters) == 48
    assert model.configdict["abs_surface_weight"] == 5e4
    params.physical.absorption_level = None
    params.physical.lmax = 4
    model.update(params)
    assert len(model.components["absorption"].parameters) == 24
    assert model.configdict["abs_surface_weight"] == 5e4
    params.physical.surface_weight = 1e5
    model.update(params)
    assert model.configdict["abs_surface_weight"] == 1e5
    params.physical.correction.fix = ["decay"]
    model = PhysicalScalingModel.from_data(params, mock_experiment(), dials_test_reflections())
    assert model.fixed_components == ["decay"]


def test_physical_update_keeps_low_order_harmonics():
    model = PhysicalScalingModel.from_data(physical_params(), mock_experiment(), dials_test_reflections())
    values = np.arange(24) * 0.001
    model.components["absorption"].parameters = values
    model.update(physical_params(absorption_level="medium"))
    new = model.components["absorption"].parameters
    np.testing.assert_array_equal(new[:24], values)
    np.testing.assert_array_equal(new[24:], 0.0)


def test_physical_auto_parameterisation_90_degrees():
    """Spec 4.2: 90° at 1°/image gives scale 8 (15°), decay 7 (18°), absorption 24."""
    model = PhysicalScalingModel.from_data(default_model_params(), mock_experiment(), dials_test_reflections())
    conf = model.configdict
    assert conf["corrections"] == ["scale", "decay", "absorption"]
    assert [c.n_params for c in model.components.values()] == [8, 7, 24]
    assert conf["scale_rot_interval"] == 15.0 and conf["s_norm_fac"] == pytest.approx(0.0666)
    assert conf["decay_rot_interval"] == 18.0 and conf["d_norm_fac"] == pytest.approx(0.0555)
    assert (conf["lmax"], conf["abs_surface_weight"]) == (4, 5e5)
    assert list(conf) == ["corrections", "valid_osc_range", "s_norm_fac", "scale_rot_interval",
                          "d_norm_fac", "decay_rot_interval", "lmax", "abs_surface_weight"]
    # <= 60 degrees: no absorption; 4 degrees: 1 and 1.5 degree intervals.
    model = PhysicalScalingModel.from_data(default_model_params(), mock_experiment((0.0, 4.0), 0.1),
                                           dials_test_reflections())
    assert model.configdict["corrections"] == ["scale", "decay"]
    assert model.configdict["scale_rot_interval"] == pytest.approx(1.0)
    assert model.configdict["decay_rot_interval"] == pytest.approx(4.0 / 3.0)
    # All scattering within 2.56 degrees of the beam (electron data): no absorption surface.
    low = dials_test_reflections()
    low["s1"] = np.array([[0.0, 0.001, 1.01], [0.001, 0.0, 1.01]])
    model = PhysicalScalingModel.from_data(default_model_params(), mock_experiment(), low)
    assert "absorption" not in model.components
    # Sharing and fixing.
    p = default_model_params(physical__share__absorption=True)
    model = PhysicalScalingModel.from_data(p, mock_experiment(), dials_test_reflections())
    assert model.configdict["shared"] == ["absorption"] and model.get_shared_components() == "absorption"
    model.fixed_components = ["absorption"]
    assert model.get_shared_components() is None


def test_physical_model_dials_configure_and_dicts():
    configdict = {"corrections": ["scale", "decay", "absorption"], "s_norm_fac": 1.0,
                  "scale_rot_interval": 2.0, "d_norm_fac": 1.0, "decay_rot_interval": 2.0, "lmax": 1,
                  "abs_surface_weight": 1e6}
    params = {"scale": {"parameters": np.array([1.2, 1.1]), "parameter_esds": None},
              "decay": {"parameters": np.array([0.1, 0.2]), "parameter_esds": None},
              "absorption": {"parameters": np.array([0.01, 0.01, 0.01]), "parameter_esds": None}}
    model = PhysicalScalingModel(params, configdict)
    assert model.id_ == "physical" and "Absorption component" in str(model)
    model.configure_components(dials_test_reflections(), mock_experiment(),
                               default_model_params(physical__decay_restraint=0.0))
    np.testing.assert_array_equal(model.components["decay"].parameter_restraints, [0.0, 0.0])
    np.testing.assert_array_equal(model.components["absorption"].parameter_restraints, [1e6] * 3)
    d1 = {"__id__": "physical",
          "scale": {"n_parameters": 2, "parameters": [0.5, 1.0], "est_standard_devs": [0.05, 0.1],
                    "null_parameter_value": 1},
          "configuration_parameters": {"corrections": ["scale"], "s_norm_fac": 0.1, "scale_rot_interval": 10.0,
                                       "decay_restaint": 1e-1}}
    d2 = {"__id__": "physical",
          "scale": {"n_parameters": 2, "parameters": [0.5, 1.0], "est_standard_devs": [0.05, 0.1],
                    "null_parameter_value": 1},
          "decay": {"n_parameters": 2, "parameters": [0.1, 0.2], "est_standard_devs": [0.01, 0.01],
                    "null_parameter_value": 0},
          "absorption": {"n_parameters": 3, "parameters": [0.0, 0.1, 0.2], "est_standard_devs": [0.01, 0.02, 0.03],
                         "null_parameter_value": 0},
          "configuration_parameters": {"corrections": ["scale", "decay", "absorption"], "s_norm_fac": 0.1,
                                       "scale_rot_interval": 10.0, "d_norm_fac": 0.2, "decay_rot_interval": 20.0,
                                       "lmax": 1, "abs_surface_weight": 1e6}}
    for stored in (d1, d2):
        model = PhysicalScalingModel.from_dict(copy.deepcopy(stored))
        assert model.to_dict() == stored
        assert model.crystal_frame == "current"
    assert list(model.components["absorption"].parameter_esds) == [0.01, 0.02, 0.03]
    assert len(model.consecutive_refinement_order) == 2
    with pytest.raises(RuntimeError):
        PhysicalScalingModel.from_dict(dict(d2, __id__="array"))


def _limit_case():
    params = {"scale": {"parameters": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5], "parameter_esds": None},
              "decay": {"parameters": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1], "parameter_esds": None}}
    conf = {"corrections": ["scale", "decay"], "s_norm_fac": 0.1, "scale_rot_interval": 10.0, "d_norm_fac": 0.1,
            "decay_rot_interval": 10.0, "valid_image_range": (1, 90), "valid_osc_range": (0, 90)}
    return PhysicalScalingModel(copy.deepcopy(params), copy.deepcopy(conf))


@pytest.mark.parametrize("new_range, kept, osc", [((1, 50), slice(0, 7), (0, 50)),
                                                  ((7, 45), slice(1, 7), (6, 45)),
                                                  ((5, 45), slice(0, 7), (4, 45))])
def test_physical_limit_image_range_dials(new_range, kept, osc):
    model = _limit_case()
    scale = list(model.components["scale"].parameters)
    decay = list(model.components["decay"].parameters)
    model.limit_image_range(new_range)
    assert list(model.components["scale"].parameters) == scale[kept]
    assert list(model.components["decay"].parameters) == decay[kept]
    assert model.configdict["valid_osc_range"] == osc
    assert model.configdict["valid_image_range"] == new_range


# ----------------------------------------------------------------------------- array
ARRAY_CONF = {"corrections": ["decay", "absorption", "modulation"], "n_res_param": 2, "n_time_param": 2,
              "resmin": 1.0, "res_bin_width": 1.0, "time_norm_fac": 1.0, "time_rot_interval": 1.0,
              "n_x_param": 2, "n_y_param": 2, "xmin": 0.0, "ymin": 0.0, "x_bin_width": 1.0, "y_bin_width": 2.0,
              "n_x_mod_param": 2, "n_y_mod_param": 2, "x_det_bin_width": 2.0, "y_det_bin_width": 2.0}


def test_array_model_dials():
    params = {"decay": {"parameters": np.array([1.2, 1.1, 1.0, 0.9]), "parameter_esds": None},
              "absorption": {"parameters": np.array([0.1, 0.2] * 4), "parameter_esds": None},
              "modulation": {"parameters": np.full(4, 0.9), "parameter_esds": None}}
    model = ArrayScalingModel(params, copy.deepcopy(ARRAY_CONF))
    assert list(model.components) == ["decay", "absorption", "modulation"]
    model.configure_components(dials_test_reflections(), mock_experiment(), None)
    again = ArrayScalingModel.from_dict(model.to_dict())
    assert list(again.components["absorption"].parameters) == [0.1, 0.2] * 4
    stored = {"__id__": "array",
              "decay": {"n_parameters": 4, "parameters": [0.5, 1.0, 0.4, 1.0], "null_parameter_value": 1.0,
                        "est_standard_devs": [0.05, 0.1, 0.05, 0.1]},
              "configuration_parameters": {"corrections": ["decay"], "n_res_param": 2, "n_time_param": 2,
                                           "resmin": 1.0, "res_bin_width": 1.0, "time_norm_fac": 1.0,
                                           "time_rot_interval": 1.0}}
    model = ArrayScalingModel.from_dict(copy.deepcopy(stored))
    assert model.to_dict() == stored
    assert len(model.consecutive_refinement_order) == 3
    assert "Decay component" in str(model)
    with pytest.raises(ValueError, match="at least one of decay or absorption"):
        ArrayScalingModel({"modulation": params["modulation"]},
                          dict(ARRAY_CONF, corrections=["modulation"]))


def test_array_limit_image_range_dials():
    conf = dict(ARRAY_CONF, corrections=["decay", "absorption"], n_time_param=3, time_norm_fac=0.1,
                time_rot_interval=10.0, valid_image_range=(1, 20), valid_osc_range=(0, 20))
    params = {"decay": {"parameters": [1.2, 1.1, 1.0, 0.9, 0.8, 0.7], "parameter_esds": None},
              "absorption": {"parameters": [0.1, 0.2, 0.1, 0.2, 0.1, 0.2, 0.1, 0.2, 0.3, 0.4, 0.3, 0.4],
                             "parameter_esds": None}}
    model = ArrayScalingModel(params, conf)
    model.limit_image_range((1, 10))
    assert list(model.components["decay"].parameters) == [1.2, 1.1, 1.0, 0.9]
    assert list(model.components["absorption"].parameters) == [0.1, 0.2] * 4
    assert model.configdict["n_time_param"] == 2
    assert model.configdict["valid_image_range"] == (1, 10)
    assert model.configdict["valid_osc_range"] == (0, 10)


def test_array_auto_parameterisation_90_degrees():
    """Spec 4.4: a 90° scan gives decay 12 x 7 = 84 and absorption 5 x 5 x 7 = 175 parameters."""
    model = ArrayScalingModel.from_data(default_model_params(), mock_experiment(), synthetic_reflections())
    assert model.components["decay"].n_params == 84
    assert model.components["absorption"].n_params == 175
    assert (model.configdict["n_res_param"], model.configdict["n_time_param"]) == (12, 7)
    model = ArrayScalingModel.from_data(default_model_params(array__modulation_correction=True),
                                        mock_experiment(), synthetic_reflections())
    assert model.components["modulation"].n_params == 22 * 22


# ----------------------------------------------------------------------------- dose decay
def test_dose_decay_model_dials():
    configdict = {"corrections": ["scale", "decay", "relative_B"], "s_norm_fac": 1.0, "scale_rot_interval": 2.0,
                  "resolution_dependence": "quadratic"}
    params = {"scale": {"parameters": [1.2, 1.1], "parameter_esds": None},
              "decay": {"parameters": [0.1], "parameter_esds": None},
              "relative_B": {"parameters": [-0.1], "parameter_esds": None}}
    model = DoseDecay(params, configdict)
    assert set(model.components) == {"scale", "decay", "relative_B"}
    model.configure_components(dials_test_reflections(), mock_experiment(), None)
    assert list(model.components["decay"].data["d"]) == [1.0, 1.0]
    again = DoseDecay.from_dict(model.to_dict())
    assert list(again.components["relative_B"].parameters) == [-0.1]
    assert type(again.components["decay"]).__name__ == "QuadraticDoseDecay"
    assert model.consecutive_refinement_order == [["scale", "relative_B", "decay"], ["absorption"]]


def test_dose_decay_auto_parameterisation_90_degrees():
    """Spec 4.5: 47 scale parameters over 90°; decay shared by default."""
    model = DoseDecay.from_data(default_model_params(), mock_experiment(), synthetic_reflections())
    assert model.components["scale"].n_params == 47
    assert model.configdict["shared"] == ["decay"] and model.get_shared_components() == "decay"
    # Components follow the constructor's order (scale, decay, relative_B), not corrections'.
    assert model.configdict["corrections"] == ["scale", "relative_B", "decay"]
    assert list(model.components) == ["scale", "decay", "relative_B"]
    p = default_model_params(dose_decay__resolution_dependence="linear", dose_decay__absorption_correction=True)
    model = DoseDecay.from_data(p, mock_experiment(), synthetic_reflections())
    assert type(model.components["decay"]).__name__ == "LinearDoseDecay"
    assert model.components["absorption"].n_params == 24
    assert model.configdict["abs_surface_weight"] == 1e6


# ----------------------------------------------------------------------------- bad input
def test_unknown_corrections_are_named():
    with pytest.raises(ScalingModelError, match=r"unknown correction\(s\) \['absorbtion'\].*physical"):
        PhysicalScalingModel({}, {"corrections": ["scale", "absorbtion"]})
    with pytest.raises(ScalingModelError, match="'modulation'"):
        KBScalingModel({}, {"corrections": ["modulation"]})
    model = KBScalingModel.from_dict(copy.deepcopy(KB_DICT_2))
    with pytest.raises(ScalingModelError, match="'absorption'"):
        model.fixed_components = ["absorption"]


def test_wrong_parameter_counts_are_named():
    conf = {"corrections": ["absorption"], "lmax": 4}
    with pytest.raises(ScalingModelError, match="absorption: expected 24 parameters.*got 23"):
        PhysicalScalingModel({"absorption": {"parameters": np.zeros(23)}}, conf)
    with pytest.raises(ScalingModelError, match="scale: a smoothed component needs at least 2"):
        PhysicalScalingModel({"scale": {"parameters": [1.0]}}, {"corrections": ["scale"]})
    with pytest.raises(ScalingModelError, match="scale: expected 1 parameters"):
        KBScalingModel({"scale": {"parameters": [1.0, 2.0]}}, {"corrections": ["scale"]})
    with pytest.raises(ScalingModelError, match=r"decay: expected 4 parameters \(grid shape \(2, 2\)\), got 3"):
        ArrayScalingModel({"decay": {"parameters": [1.0] * 3}}, dict(ARRAY_CONF, corrections=["decay"]))
    with pytest.raises(ScalingModelError, match="decay: expected 1 parameters"):
        DoseDecay({"decay": {"parameters": [0.0, 0.0]}}, {"corrections": ["decay"]})
    with pytest.raises(ScalingModelError, match="scale: 3 parameter esds for 2 parameters"):
        PhysicalScalingModel({"scale": {"parameters": [1.0, 1.0], "parameter_esds": [0.1] * 3}},
                             {"corrections": ["scale"]})
    with pytest.raises(KeyError, match="'decay'"):
        PhysicalScalingModel({"scale": {"parameters": [1.0, 1.0]}}, {"corrections": ["scale", "decay"]})
    bad = copy.deepcopy(KB_DICT_2)
    bad["decay"]["n_parameters"] = 2
    with pytest.raises(ScalingModelError, match="decay: n_parameters is 2 but 1 parameters are stored"):
        model_from_dict(bad)
    with pytest.raises(ScalingModelError, match="finite"):
        KBScalingModel({"scale": {"parameters": [np.nan]}}, {"corrections": ["scale"]})
    with pytest.raises(ScalingModelError, match="resolution_dependence"):
        DoseDecay({"decay": {"parameters": [0.0]}}, {"corrections": ["decay"], "resolution_dependence": "cubic"})


def test_missing_columns_and_experiment_are_named():
    model = PhysicalScalingModel.from_data(default_model_params(), mock_experiment(), dials_test_reflections())
    table = dials_test_reflections()
    del table["d"]
    with pytest.raises(KeyError, match="'d'"):
        model.configure_components(table, mock_experiment(), None)
    table = dials_test_reflections()
    del table["s0c"], table["s1c"]
    with pytest.raises(ValueError, match="experiment is needed"):
        model.configure_components(table, None, None)
    params = default_model_params(physical__analytical_correction=True)
    with pytest.raises(ValueError, match="analytical_correction"):
        PhysicalScalingModel.from_data(params, mock_experiment(), dials_test_reflections())


# ----------------------------------------------------------------------------- registry
def test_registry_builtins_and_custom_model():
    assert registered_scaling_models()[:4] == ["physical", "KB", "array", "dose_decay"]
    with pytest.raises(KeyError, match="unknown scaling model 'nope'.*physical"):
        model_from_dict({"__id__": "nope", "configuration_parameters": {}})
    with pytest.raises(ValueError, match="__id__"):
        model_from_dict({"configuration_parameters": {}})

    @register_scaling_model
    class OverallScale(ScalingModelBase):
        id_ = "overall_scale_test"
        allowed_corrections = ("scale",)

        def __init__(self, parameters_dict, configdict, is_scaled=False):
            super().__init__(configdict, is_scaled)
            from xtalscale.components import SingleScaleFactor

            self._components["scale"] = SingleScaleFactor(parameters_dict["scale"]["parameters"])

        def configure_components(self, reflection_table, experiment, params):
            self.components["scale"].data = {"id": np.zeros(len(reflection_table["d"]))}

        @classmethod
        def from_data(cls, params, experiment, reflection_table):
            return cls({"scale": {"parameters": [3.0]}}, {"corrections": ["scale"]})

    try:
        assert "overall_scale_test" in registered_scaling_models()
        model = create_scaling_model("overall_scale_test", None, None, None)
        np.testing.assert_array_equal(model.get_scales({"d": np.ones(4)}), [3.0] * 4)
        round_trip = model_from_dict(model.to_dict())
        assert isinstance(round_trip, OverallScale) and round_trip.is_scaled
        with pytest.raises(ValueError, match="already registered"):
            register_scaling_model(OverallScale, name="physical")
        with pytest.raises(TypeError):
            register_scaling_model(dict)
    finally:
        unregister_scaling_model("overall_scale_test")
    assert "overall_scale_test" not in registered_scaling_models()


# ----------------------------------------------------------------------------- seed custom model
class SimpleMultiplicativeComponent(ScaleComponentBase):
    """The commissioning API's example component (a user's script)."""

    def __init__(self, active_parameter_manager, initial_scale=1.0):
        super().__init__(active_parameter_manager)
        self.active_parameter_manager.add_parameters(flex.double([initial_scale]))

    @property
    def n_params(self):
        return 1

    @property
    def parameters(self):
        return self.active_parameter_manager.get_parameters()[: self.n_params]

    def calculate_scales_and_derivatives(self, reflection_table, block_id=None):
        n_refl = len(reflection_table)
        scales = flex.double(n_refl, self.parameters[0])
        derivatives = flex.double(flex.grid(n_refl, 1), 1.0)
        return scales, derivatives

    def update_reflection_data(self, reflection_table):
        pass


class CustomRelativeScalingModel(ScalingModelBase):
    """The commissioning API's example model: components is a list, get_scales overridden."""

    def __init__(self, configdict, is_scaled=False):
        super().__init__(configdict, is_scaled)
        self._components = {}

    def configure_components(self, reflection_table, experiment, params):
        self.active_parameter_manager = active_parameter_manager()
        self._components["multiplicative"] = SimpleMultiplicativeComponent(
            self.active_parameter_manager, initial_scale=1.0)

    @property
    def components(self):
        return list(self._components.values())

    def get_scales(self, reflection_table):
        if not self._components:
            return flex.double(len(reflection_table), 1.0)
        total_scales = flex.double(len(reflection_table), 1.0)
        for component in self.components:
            component_scales, _ = component.calculate_scales_and_derivatives(reflection_table)
            total_scales *= component_scales
        return total_scales

    def get_inverse_scales(self, reflection_table):
        return 1.0 / self.get_scales(reflection_table)


def test_seed_custom_model_runs():
    table = flex.reflection_table()
    table["d"] = flex.double([1.0, 2.0, 3.0])
    configdict = {"model_type": "custom_relative", "resolution_dependent": True, "n_resolution_bins": 10,
                  "d_min": 1.5, "d_max": 50.0}
    models_ = []
    multi = multi_active_parameter_manager()
    for _ in range(2):
        model = CustomRelativeScalingModel(configdict, is_scaled=False)
        model.configure_components(table, None, SimpleNamespace(resolution_dependent=False))
        assert len(model.components) == 1 and sum(c.n_params for c in model.components) == 1
        multi.add_parameter_manager(model.active_parameter_manager)
        models_.append(model)
    np.testing.assert_array_equal(multi.get_parameters(), [1.0, 1.0])
    multi.set_parameters(multi.get_parameters() + np.array([0.25, -0.5]))
    np.testing.assert_allclose(np.asarray(models_[0].get_scales(table)), [1.25] * 3)
    np.testing.assert_allclose(np.asarray(models_[1].get_inverse_scales(table)), [2.0] * 3)
    assert models_[0].n_params == 1  # the base's n_params works through the component dict


# ----------------------------------------------------------------------------- derivatives
def _set_random_parameters(model, rng):
    for name, comp in model.components.items():
        n = comp.n_params
        if name == "scale" and n == 1:
            comp.parameters = np.array([1.3])
        elif name in ("scale", "absorption") and model.id_ == "array" or name == "modulation":
            comp.parameters = rng.uniform(0.8, 1.2, n)
        elif name == "scale":
            comp.parameters = rng.uniform(0.8, 1.2, n)
        elif name == "absorption":
            comp.parameters = rng.uniform(-0.02, 0.02, n)
        elif name == "decay" and model.id_ == "array":
            comp.parameters = rng.uniform(0.8, 1.2, n)
        elif name == "decay" and model.id_ == "dose_decay":
            comp.parameters = np.array([-0.002])
        elif name != "analytical":
            comp.parameters = rng.uniform(-0.5, 0.5, n)


def _analytic_jacobian(model):
    """dg/dp over all free parameters, by the product rule over the components."""
    comps = list(model.components.values())
    sd = [c.calculate_scales_and_derivatives(0) for c in comps]
    scales = [np.asarray(s) for s, _ in sd]
    blocks = []
    for i, (_, d) in enumerate(sd):
        other = np.prod([s for j, s in enumerate(scales) if j != i], axis=0) if len(comps) > 1 else 1.0
        blocks.append(d.toarray() * np.reshape(other, (-1, 1)))
    return np.hstack(blocks), np.prod(scales, axis=0)


def _numeric_jacobian(model, h=1e-6):
    cols = []
    for comp in model.components.values():
        base = np.asarray(comp.free_parameters, dtype=float).copy()
        for j in range(base.size):
            values = []
            for sign in (1.0, -1.0):
                p = base.copy()
                p[j] += sign * h
                comp.free_parameters = p
                values.append(np.prod([np.asarray(c.calculate_scales(0)) for c in model.components.values()],
                                      axis=0))
            comp.free_parameters = base
            cols.append((values[0] - values[1]) / (2 * h))
    return np.column_stack(cols)


def _models_for_derivatives():
    expt, table = mock_experiment(), synthetic_reflections()
    physical = PhysicalScalingModel.from_data(default_model_params(physical__analytical_correction=True), expt, table)
    physical_fixed = PhysicalScalingModel.from_data(default_model_params(), expt, table)
    physical_fixed.fix_initial_parameter(default_model_params())
    kb = KBScalingModel.from_data(default_model_params(), expt, table)
    array = ArrayScalingModel.from_data(default_model_params(array__modulation_correction=True,
                                                             array__n_modulation_bins=3), expt, table)
    dose = DoseDecay.from_data(default_model_params(dose_decay__absorption_correction=True), expt, table)
    dose_linear = DoseDecay.from_data(default_model_params(dose_decay__resolution_dependence="linear"), expt, table)
    return [("physical+analytical", physical), ("physical fixed-first", physical_fixed), ("KB", kb),
            ("array+modulation", array), ("dose_decay+absorption", dose), ("dose_decay linear", dose_linear)], table


@pytest.mark.parametrize("index", range(6))
def test_model_derivatives_match_finite_differences(index):
    cases, table = _models_for_derivatives()
    label, model = cases[index]
    rng = np.random.default_rng(11 + index)
    _set_random_parameters(model, rng)
    model.configure_components(table, mock_experiment(), default_model_params())
    for comp in model.components.values():
        comp.update_reflection_data()
    J, g = _analytic_jacobian(model)
    np.testing.assert_allclose(g, model.get_scales(), rtol=1e-15)
    n_free = sum(np.asarray(c.free_parameters).size for c in model.components.values())
    assert J.shape == (table["d"].size, n_free), label
    J_fd = _numeric_jacobian(model)
    # Central differences with h = 1e-6: truncation ~h² |g'''| and rounding ~1e-16/h, both
    # far below the 1e-6 relative tolerance.
    scale = np.max(np.abs(J))
    np.testing.assert_allclose(J, J_fd, rtol=1e-6, atol=1e-6 * scale, err_msg=label)
    assert scale > 0.01, label  # the derivatives are not trivially zero


def test_fixed_first_parameter_drops_one_column():
    cases, table = _models_for_derivatives()
    model = cases[1][1]
    model.configure_components(table, mock_experiment(), None)
    for comp in model.components.values():
        comp.update_reflection_data()
    _, d = model.components["scale"].calculate_scales_and_derivatives(0)
    assert d.shape == (table["d"].size, model.components["scale"].n_params - 1)


def test_serialisation_of_esds_and_analytical():
    cases, _ = _models_for_derivatives()
    model = cases[0][1]
    out = model.to_dict()
    assert out["analytical"] == {"n_parameters": 0, "parameters": [], "null_parameter_value": 1.0}
    assert "est_standard_devs" not in out["scale"]
    model.components["scale"].parameter_esds = np.full(model.components["scale"].n_params, 0.01)
    out = model.to_dict()
    assert out["scale"]["est_standard_devs"] == [0.01] * model.components["scale"].n_params
    again = model_from_dict(out)
    assert list(again.components) == ["scale", "decay", "absorption", "analytical"]
    assert again.to_dict() == out


def test_dose_decay_limit_image_range():
    model = DoseDecay.from_data(default_model_params(), mock_experiment(), synthetic_reflections())
    model.set_valid_image_range((1, 90))
    scale = np.asarray(model.components["scale"].parameters).copy()
    model.limit_image_range((1, 45))
    # 45 images at 2-degree intervals: 23 bins -> 25 parameters, the first 25 kept.
    assert model.components["scale"].n_params == 25
    np.testing.assert_array_equal(model.components["scale"].parameters, scale[:25])
    assert model.configdict["valid_osc_range"] == (0.0, 45.0)
    assert model.configdict["valid_image_range"] == (1, 45)
    with pytest.raises(ValueError, match="start <= end"):
        model.limit_image_range((40, 10))


def test_inverse_scale_factors_api_on_kb_models():
    """Two KB experiments in one table: rows matched by id, unsuitable rows keep fill_value."""
    from xtalscale.models import inverse_scale_factors

    def kb(scale, B):
        return {"__id__": "KB", "scale": {"n_parameters": 1, "parameters": [scale], "null_parameter_value": 1.0},
                "decay": {"n_parameters": 1, "parameters": [B], "null_parameter_value": 0.0},
                "configuration_parameters": {"corrections": ["decay", "scale"]}}

    experiments = [SimpleNamespace(scaling_model=kb(2.0, 0.0), identifier="a"),
                   SimpleNamespace(scaling_model=kb(0.5, 1.0), identifier="b")]
    d = np.array([1.0, 2.0, 1.0, 2.0, 0.0])
    flags = np.zeros(5, dtype=np.uint64)
    flags[2] = 1 << 24  # excluded_for_scaling
    table = {"id": np.array([0, 0, 1, 1, 1]), "d": d, "flags": flags}
    g = inverse_scale_factors(experiments, table)
    np.testing.assert_allclose(g, [2.0, 2.0, 1.0, 0.5 * np.exp(1.0 / 8.0), 1.0], rtol=1e-15)
    g = inverse_scale_factors(experiments, table, fill_value=np.nan)
    assert np.isnan(g[2]) and np.isnan(g[4])  # excluded, and d = 0
    sel = np.array([True, False, True, True, False])
    g = inverse_scale_factors(experiments, table, selection=sel, fill_value=0.0)
    np.testing.assert_allclose(g, [2.0, 0.0, 0.5 * np.exp(0.5), 0.5 * np.exp(1.0 / 8.0), 0.0], rtol=1e-15)
    # One table per experiment.
    parts = [{"id": np.zeros(2, int), "d": d[:2]}, {"id": np.ones(2, int), "d": d[2:4]}]
    g0, g1 = inverse_scale_factors(experiments, parts)
    np.testing.assert_allclose(g1, [0.5 * np.exp(0.5), 0.5 * np.exp(1.0 / 8.0)], rtol=1e-15)
    with pytest.raises(ValueError, match="crystal_frame"):
        inverse_scale_factors(experiments, table, crystal_frame="sideways")
    with pytest.raises(ValueError, match="selection must be a bool array of length 5"):
        inverse_scale_factors(experiments, table, selection=[True])
    with pytest.raises(ValueError, match="2 reflection tables"):
        inverse_scale_factors(experiments[:1], parts)
    with pytest.raises(ValueError, match="no scaling_model"):
        inverse_scale_factors([SimpleNamespace(scaling_model=None)], {"d": d[:1]})


def test_get_scales_on_tiny_tables():
    """One reflection uses the single-point smoother path; an empty table gives an empty g."""
    model = PhysicalScalingModel.from_data(default_model_params(), mock_experiment(), synthetic_reflections())
    model.components["scale"].parameters = np.linspace(0.9, 1.1, model.components["scale"].n_params)
    table = synthetic_reflections(n=3)
    g3 = model.get_scales(table)
    one = {k: v[:1] for k, v in table.items()}
    g1 = model.get_scales(one)
    assert g1.shape == (1,) and np.isfinite(g1[0]) and g1[0] > 0
    assert model.get_scales({k: v[:0] for k, v in table.items()}).shape == (0,)
    assert g3.shape == (3,)


class SlicedMultiplicativeComponent(ScaleComponentBase):
    """Seed-form component without the seed example's ``[:n_params]`` slip: the base class
    serves each component its own slice of the shared manager."""

    def __init__(self, active_parameter_manager, initial_scale=1.0):
        super().__init__(active_parameter_manager)
        self.active_parameter_manager.add_parameters(flex.double([initial_scale]))

    def calculate_scales_and_derivatives(self, reflection_table, block_id=None):
        n_refl = len(reflection_table)
        return flex.double(n_refl, self.parameters[0]), flex.double(flex.grid(n_refl, 1), 1.0)


class PlainCustomModel(ScalingModelBase):
    """A custom model that relies on the base class's components/get_scales."""

    def configure_components(self, reflection_table, experiment, params):
        self.active_parameter_manager = active_parameter_manager()
        self._components["a"] = SlicedMultiplicativeComponent(self.active_parameter_manager, initial_scale=2.0)
        self._components["b"] = SlicedMultiplicativeComponent(self.active_parameter_manager, initial_scale=0.5)


def test_base_get_scales_with_seed_components():
    table = flex.reflection_table()
    table["d"] = flex.double([1.0, 2.0])
    model = PlainCustomModel({"anything": 1})
    np.testing.assert_allclose(model.get_scales(table), [1.0, 1.0])  # 2.0 * 0.5
    model.active_parameter_manager.set_parameters([3.0, 0.5])
    np.testing.assert_allclose(model.get_scales(), [1.5, 1.5])  # same table, new parameters
    np.testing.assert_allclose(model.get_inverse_scales(), [1 / 1.5, 1 / 1.5])
    assert list(model.components) == ["a", "b"] and model.n_params == 2


def test_load_error_model_uses_stored_parameters_unless_overridden():
    """DIALS 4.7 rules: stored parameters, unless basic.a/basic.b override or reset_error_model."""
    stored = copy.deepcopy(KB_DICT_2)
    stored["configuration_parameters"].update(error_model_type="BasicErrorModel",
                                              error_model_parameters=[2.5, 0.05])

    def params(a=None, b=None, reset=False):
        return SimpleNamespace(reset_error_model=reset, basic=SimpleNamespace(a=a, b=b))

    model = model_from_dict(copy.deepcopy(stored))
    model.load_error_model(params())
    assert model.error_model.parameters == [2.5, 0.05]
    model = model_from_dict(copy.deepcopy(stored))
    model.load_error_model(params(a=1.5))
    assert model.error_model.parameters == [1.5, 0.05]
    model = model_from_dict(copy.deepcopy(stored))
    model.load_error_model(params(reset=True))
    assert model.error_model.parameters == [1.0, 0.02]
    assert model.configdict["error_model_parameters"] == [1.0, 0.02]


def test_low_angle_only_decides_on_every_row():
    """No absorption surface when every s1 is within acos(0.999) of s0 (electron data). A wide
    reflection anywhere (in the first rows or far beyond them) says otherwise; rows with
    |s1| = 0 are ignored."""
    from types import SimpleNamespace

    from xtalscale.models import _low_angle_only

    expt = SimpleNamespace(beam=SimpleNamespace(get_s0=lambda: (0.0, 0.0, -40.0)))
    rng = np.random.default_rng(4)
    n = 5000
    tilt = rng.uniform(0.0, 0.04, n)  # radians, below acos(0.999) = 0.0447
    phi = rng.uniform(0.0, 2 * np.pi, n)
    s1 = 40.0 * np.column_stack([np.sin(tilt) * np.cos(phi), np.sin(tilt) * np.sin(phi), -np.cos(tilt)])
    s1[:3] = 0.0
    assert _low_angle_only(expt, {"s1": s1})
    for row in (10, n - 1):  # inside and beyond the first rows checked
        wide = s1.copy()
        wide[row] = 40.0 * np.array([np.sin(0.05), 0.0, -np.cos(0.05)])
        assert not _low_angle_only(expt, {"s1": wide})
    assert not _low_angle_only(expt, {"s1": np.zeros((4, 3))})
