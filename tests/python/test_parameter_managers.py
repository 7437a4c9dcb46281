"""Parameter managers: DIALS's test_param_manager.py numbers (spec section 9.4), the seed
(commissioning API) form, shared components, consecutive mode, esd/var-cov propagation and
the inverse-scale variance of spec section 7.4."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from xtalscale.algorithms.scaling.active_parameter_managers import (
    ParameterManagerGenerator,
    active_parameter_manager,
    multi_active_parameter_manager,
    shared_active_parameter_manager,
)
from xtalscale.algorithms.scaling.parameter_handler import (
    ScalingParameterManagerGenerator,
    scaling_active_parameter_manager,
)
from xtalscale.components import SingleBScaleFactor, SingleScaleFactor, SmoothScaleComponent1D
from xtalscale.parameter_managers import ParameterManagerError, calc_sf_variances


class FakeComponent:
    """The attributes a parameter manager touches (as DIALS's mock_component)."""

    def __init__(self, values=(1.0,), n_refl=None, scale=1.0):
        self.free_parameters = np.asarray(values, dtype=float)
        self.free_parameter_esds = None
        self.var_cov_matrix = None
        self.n_params = len(values)
        self.n_refl = [] if n_refl is None else [n_refl]
        self._scale = scale

    def calculate_scales(self, block_id=0):
        return np.full(self.n_refl[block_id], self._scale)


class FakeDataManager:
    def __init__(self, components, order=None):
        self.components = components
        self.fixed_components = []
        self.consecutive_refinement_order = order


def three():
    return {"scale": FakeComponent(), "decay": FakeComponent(), "absorption": FakeComponent()}


# ----------------------------------------------------------------------------- single apm
def test_general_apm_dials_numbers():
    comps = three()
    apm = active_parameter_manager(comps, ["scale", "decay"])
    assert apm.components_list == ["scale", "decay"]
    assert apm.n_active_params == 2
    assert [(c["start_idx"], c["end_idx"]) for c in apm.components.values()] == [(0, 1), (1, 2)]
    apm.set_param_vals([2.0, 1.5])
    np.testing.assert_array_equal(apm.get_param_vals(), [2.0, 1.5])
    np.testing.assert_array_equal(comps["scale"].free_parameters, [2.0])
    np.testing.assert_array_equal(comps["decay"].free_parameters, [1.5])
    np.testing.assert_array_equal(comps["absorption"].free_parameters, [1.0])  # not selected
    assert list(apm.select_parameters("decay")) == [1.5]
    apm.calculate_model_state_uncertainties(np.array([[1.0, 0.5], [0.5, 2.0]]))
    assert comps["scale"].var_cov_matrix[0, 0] == 1.0
    assert comps["decay"].var_cov_matrix[0, 0] == 2.0
    apm.set_param_esds([0.1, 0.2])
    np.testing.assert_array_equal(comps["scale"].free_parameter_esds, [0.1])
    np.testing.assert_array_equal(comps["decay"].free_parameter_esds, [0.2])
    assert apm.get_param_names() == ["scale_param0", "decay_param0"]


def test_apm_follows_component_dict_order_not_selection_order():
    comps = three()
    apm = active_parameter_manager(comps, ["absorption", "scale"])
    assert apm.components_list == ["scale", "absorption"]


def test_apm_accepts_sparse_and_flex_style_var_cov():
    comps = three()
    apm = active_parameter_manager(comps, ["scale", "decay"])
    apm.calculate_model_state_uncertainties(sp.csr_matrix(np.array([[4.0, 0.0], [0.0, 9.0]])))
    assert comps["decay"].var_cov_matrix[0, 0] == 9.0


def test_apm_bad_input_is_named():
    comps = three()
    with pytest.raises(KeyError, match="bogus"):
        active_parameter_manager(comps, ["scale", "bogus"])
    apm = active_parameter_manager(comps, ["scale", "decay"])
    with pytest.raises(ValueError, match="x must have 2 values"):
        apm.set_param_vals([1.0])
    with pytest.raises(ValueError, match="finite"):
        apm.set_param_vals([1.0, np.nan])
    with pytest.raises(ValueError, match="shape \\(2, 2\\)"):
        apm.calculate_model_state_uncertainties(np.eye(3))
    with pytest.raises(ValueError, match="esds must have 2"):
        apm.set_param_esds([0.1])
    with pytest.raises(TypeError, match="free_parameters"):
        active_parameter_manager({"a": object()}, ["a"])
    with pytest.raises(KeyError):
        apm.select_parameters("absorption")


def test_apm_with_real_components_fixed_first_parameter():
    """A fixed first smoother parameter is not refined: x has n-1 values, p0 is kept."""
    scale = SmoothScaleComponent1D(np.array([1.0, 1.1, 1.2, 1.3]))
    scale.fix_initial_parameter()
    decay = SingleBScaleFactor(np.array([0.5]))
    apm = active_parameter_manager({"scale": scale, "decay": decay}, ["scale", "decay"])
    np.testing.assert_array_equal(apm.get_param_vals(), [1.1, 1.2, 1.3, 0.5])
    apm.set_param_vals([2.0, 3.0, 4.0, -1.0])
    np.testing.assert_array_equal(scale.parameters, [1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(decay.parameters, [-1.0])
    apm.set_param_esds([0.1, 0.2, 0.3, 0.4])
    np.testing.assert_array_equal(scale.parameter_esds, [0.0, 0.1, 0.2, 0.3])  # esd[0] = 0, as DIALS


# ----------------------------------------------------------------------------- seed form
def test_seed_form_single_and_multi():
    """The commissioning API: apm(), add_parameters, get/set_parameters, add_parameter_manager."""
    apm1 = active_parameter_manager()
    block = apm1.add_parameters([1.0])
    assert block == slice(0, 1)
    apm1.add_parameters(np.array([2.0, 3.0]))
    np.testing.assert_array_equal(apm1.get_parameters(), [1.0, 2.0, 3.0])
    apm2 = active_parameter_manager()
    apm2.add_parameters([4.0])
    multi = multi_active_parameter_manager()
    multi.add_parameter_manager(apm1)
    multi.add_parameter_manager(apm2)
    np.testing.assert_array_equal(multi.get_parameters(), [1.0, 2.0, 3.0, 4.0])
    multi.set_parameters(multi.get_parameters() + np.array([0.5, 0.5, 0.5, -1.0]))
    np.testing.assert_array_equal(apm1.get_parameters(), [1.5, 2.5, 3.5])
    np.testing.assert_array_equal(apm2.get_parameters(), [3.0])
    # A sub-manager that grows after it was added is seen by the multi manager.
    apm2.add_parameters([9.0])
    assert multi.n_active_params == 5
    assert multi.apm_data == {0: {"start_idx": 0, "end_idx": 3}, 1: {"start_idx": 3, "end_idx": 5}}
    with pytest.raises(ValueError, match="x must have 5 values"):
        multi.set_parameters([1.0])
    with pytest.raises(TypeError):
        multi.add_parameter_manager(object())
    with pytest.raises(RuntimeError, match="target"):
        multi.compute_residuals(None)


def test_seed_component_reads_parameters_through_the_manager():
    """Seed components keep a reference to the manager and read get_parameters()."""
    apm = active_parameter_manager()
    apm.add_parameters([1.25])
    read = lambda: apm.get_parameters()[:1]  # noqa: E731  (the seed's parameters property)
    apm.set_parameters([2.5])
    assert read()[0] == 2.5


# ----------------------------------------------------------------------------- multi / shared
def test_multi_apm_dials_numbers():
    c1, c2 = three(), {"scale": FakeComponent(), "decay": FakeComponent()}
    multi = multi_active_parameter_manager(None, [c1, c2], [["scale", "decay"], ["scale"]],
                                           active_parameter_manager)
    assert len(multi.apm_list) == 2
    assert multi.components_list == ["scale", "decay", "scale"]
    assert multi.n_active_params == 3
    assert multi.apm_data[0] == {"start_idx": 0, "end_idx": 2}
    assert multi.apm_data[1] == {"start_idx": 2, "end_idx": 3}
    multi.x = [1.0, 1.0, 1.0]  # assigning x writes through, as set_param_vals
    assert c2["scale"].free_parameters[0] == 1.0
    multi.set_param_vals([3.0, 2.5, 2.0])
    np.testing.assert_array_equal(multi.get_param_vals(), [3.0, 2.5, 2.0])
    np.testing.assert_array_equal(multi.select_parameters(0), [3.0, 2.5])
    np.testing.assert_array_equal(multi.select_parameters(1), [2.0])
    multi.set_param_esds([0.1, 0.2, 0.3])
    assert c1["scale"].free_parameter_esds[0] == 0.1
    assert c1["decay"].free_parameter_esds[0] == 0.2
    assert c2["scale"].free_parameter_esds[0] == 0.3
    var_cov = np.array([[1.0, 0.5, 0.5], [0.5, 2.0, 0.5], [0.5, 0.5, 3.0]])
    multi.calculate_model_state_uncertainties(var_cov)
    assert c1["scale"].var_cov_matrix[0, 0] == 1.0
    assert c1["decay"].var_cov_matrix[0, 0] == 2.0
    assert c2["scale"].var_cov_matrix[0, 0] == 3.0
    assert multi.get_param_names() == ["scale_expt0_param0", "decay_expt0_param0", "scale_expt1_param0"]
    with pytest.raises(ValueError, match="same length"):
        multi_active_parameter_manager(None, [c1, c2], [["scale"]])


def test_shared_apm_dials_numbers():
    c1, c2 = three(), {"scale": FakeComponent(), "decay": FakeComponent()}
    multi = shared_active_parameter_manager(None, [c1, c2], [["scale", "decay"], ["scale", "decay"]],
                                            active_parameter_manager, shared="decay")
    assert multi.components_list == ["scale", "decay", "scale", "decay"]
    assert multi.n_active_params == 4
    assert list(multi.reducing_matrix.toarray().ravel()) == [1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 1, 0]
    assert (multi.apm_data[0]["start_idx"], multi.apm_data[0]["end_idx"]) == (0, 2)
    assert (multi.apm_data[1]["start_idx"], multi.apm_data[1]["end_idx"]) == (2, 4)
    assert list(multi.apm_data[0]["apm_sel"]) == [0, 1]
    assert list(multi.apm_data[1]["apm_sel"]) == [2, 1]
    # Writing the 3 unique parameters puts the shared decay into both datasets.
    multi.set_param_vals([1.5, -0.3, 0.8])
    assert c1["decay"].free_parameters[0] == -0.3 and c2["decay"].free_parameters[0] == -0.3
    assert c1["scale"].free_parameters[0] == 1.5 and c2["scale"].free_parameters[0] == 0.8


class _Target:
    def compute_functional_gradients(self, block):
        return 7.0, np.array([1.0, 2.0, 3.0, 4.0])

    def compute_residuals_and_gradients(self, block):
        jac = sp.csr_matrix(np.arange(8.0).reshape(2, 4))
        return np.zeros(2), jac, np.ones(2)

    def compute_restraints_functional_gradients(self, block):
        return None


def test_shared_apm_reduces_gradients_and_jacobians():
    c1, c2 = three(), {"scale": FakeComponent(), "decay": FakeComponent()}
    multi = shared_active_parameter_manager(_Target(), [c1, c2], [["scale", "decay"], ["scale", "decay"]],
                                            active_parameter_manager, shared="decay")
    f, g = multi.compute_functional_gradients(None)
    # The shared decay's gradient is the sum of both datasets' decay gradients (2 + 4).
    assert f == 7.0 and list(g) == [1.0, 6.0, 3.0]
    _, jac, _ = multi.compute_residuals_and_gradients(None)
    np.testing.assert_array_equal(jac.toarray(), [[0, 1 + 3, 2], [4, 5 + 7, 6]])
    assert multi.compute_restraints_functional_gradients(None) is None
    # var-cov: per-component diagonal blocks of the reduced (3 x 3) matrix.
    V = np.array([[1.0, 0.1, 0.2], [0.1, 2.0, 0.3], [0.2, 0.3, 3.0]])
    multi.calculate_model_state_uncertainties(V)
    assert c2["scale"].var_cov_matrix[0, 0] == 3.0
    assert c2["decay"].var_cov_matrix[0, 0] == 2.0
    np.testing.assert_array_equal(multi.apm_list[1].var_cov_matrix, [[3.0, 0.0], [0.0, 2.0]])


def test_shared_component_with_different_sizes_is_rejected():
    c1 = {"scale": FakeComponent(), "decay": FakeComponent((0.0, 0.0))}
    c2 = {"scale": FakeComponent(), "decay": FakeComponent()}
    with pytest.raises(ValueError, match="shared component 'decay'"):
        shared_active_parameter_manager(None, [c1, c2], [["scale", "decay"]] * 2, active_parameter_manager,
                                        shared="decay")


# ----------------------------------------------------------------------------- generators
def test_generator_concurrent_and_fixed():
    dm = FakeDataManager(three())
    apms = ParameterManagerGenerator([dm], active_parameter_manager, None, mode="concurrent").parameter_managers()
    assert len(apms) == 1 and isinstance(apms[0], multi_active_parameter_manager)
    assert apms[0].components_list == ["scale", "decay", "absorption"]
    dm2 = FakeDataManager({"1": FakeComponent(), "2": FakeComponent()})
    multi = ParameterManagerGenerator([dm, dm2], active_parameter_manager, None).parameter_managers()[0]
    assert multi.apm_list[1].components_list == ["1", "2"]
    dm.fixed_components = ["absorption"]
    apm = ParameterManagerGenerator([dm], active_parameter_manager, None).parameter_managers()[0]
    assert apm.components_list == ["scale", "decay"]
    with pytest.raises(ValueError, match="refinement order mode"):
        ParameterManagerGenerator([dm], active_parameter_manager, None, mode="sideways")


def test_generator_consecutive_dials_numbers():
    dm = FakeDataManager(three(), [["scale", "decay"], ["absorption"]])
    apms = list(ParameterManagerGenerator([dm], active_parameter_manager, None, mode="consecutive")
                .parameter_managers())
    assert [a.components_list for a in apms] == [["scale", "decay"], ["absorption"]]
    dm2 = FakeDataManager({"1": FakeComponent(), "2": FakeComponent()}, [["1"], ["2"]])
    apms = list(ParameterManagerGenerator([dm, dm2], active_parameter_manager, None, mode="consecutive")
                .parameter_managers())
    assert [[a.components_list for a in m.apm_list] for m in apms] == [[["scale", "decay"], ["1"]],
                                                                          [["absorption"], ["2"]]]
    # Unequal cycle counts: the second cycle gives dataset 2 an empty selection.
    dm3 = FakeDataManager({"1": FakeComponent()}, [["1"], ["2"]])
    pmg = ParameterManagerGenerator([dm, dm3], active_parameter_manager, None, mode="consecutive")
    assert pmg.param_lists == [[["scale", "decay"], ["absorption"]], [["1"]]]
    apms = list(pmg.parameter_managers())
    assert [a.components_list for a in apms[1].apm_list] == [["absorption"], []]
    dm.fixed_components = ["decay"]
    apms = list(ParameterManagerGenerator([dm], active_parameter_manager, None, mode="consecutive")
                .parameter_managers())
    assert [a.components_list for a in apms] == [["scale"], ["absorption"]]


def test_scaling_apm_constant_g_values():
    comps = {"1": FakeComponent(n_refl=2, scale=1.0), "2": FakeComponent(n_refl=2, scale=3.0)}
    apm = scaling_active_parameter_manager(comps, ["1"])
    assert len(apm.constant_g_values) == 1
    np.testing.assert_array_equal(apm.constant_g_values[0], [3.0, 3.0])
    assert apm.n_obs == [2]
    assert scaling_active_parameter_manager(comps, ["1", "2"]).constant_g_values is None
    bad = {"1": FakeComponent(n_refl=2), "2": FakeComponent(n_refl=1)}
    for selection in (["1", "2"], ["1"]):
        with pytest.raises(ParameterManagerError, match="different reflection counts"):
            scaling_active_parameter_manager(bad, selection)
    with pytest.raises(AssertionError):  # DIALS raises AssertionError here; ours is both
        scaling_active_parameter_manager(bad, ["1"])
    pmg = ScalingParameterManagerGenerator([FakeDataManager(comps)], target=None, mode="concurrent")
    assert pmg.apm_type is scaling_active_parameter_manager


# ----------------------------------------------------------------------------- variances
def _kb(scale, B, d):
    s = SingleScaleFactor(np.array([scale]))
    s.data = {"id": np.zeros(len(d))}
    b = SingleBScaleFactor(np.array([B]))
    b.data = {"d": np.asarray(d, dtype=float)}
    for c in (s, b):
        c.update_reflection_data()
    return {"scale": s, "decay": b}


def test_calc_sf_variances_kb_closed_form():
    """Spec 7.4: KB with scale 2, B 0, V = [[1, .1], [.1, .5]] gives 1 + 0.2/d² + 0.5/d⁴."""
    d = np.array([1.0, 2.0, 0.8])
    var = calc_sf_variances(_kb(2.0, 0.0, d), np.array([[1.0, 0.1], [0.1, 0.5]]))
    np.testing.assert_allclose(var, 1.0 + 0.2 / d**2 + 0.5 / d**4, rtol=1e-14)


def test_calc_sf_variances_matches_dense_formula_with_fixed_first_parameter():
    """Fixed-first smoother: its n-1 derivative columns sit at the start of its n-wide block."""
    rng = np.random.default_rng(7)
    x = np.linspace(0.0, 3.0, 11)
    scale = SmoothScaleComponent1D(np.array([1.0, 1.2, 0.9, 1.1, 1.05]))
    scale.data = {"x": x}
    scale.fix_initial_parameter()
    scale.update_reflection_data()
    decay = SingleBScaleFactor(np.array([0.3]))
    decay.data = {"d": np.linspace(1.0, 3.0, 11)}
    decay.update_reflection_data()
    comps = {"scale": scale, "decay": decay}
    A = rng.normal(size=(6, 6))
    V = A @ A.T
    s1, d1 = scale.calculate_scales_and_derivatives()
    s2, d2 = decay.calculate_scales_and_derivatives()
    J = np.zeros((11, 6))
    J[:, :4] = d1.toarray() * s2[:, None]
    J[:, 5:6] = d2.toarray() * s1[:, None]
    np.testing.assert_allclose(calc_sf_variances(comps, V), np.einsum("ij,jk,ik->i", J, V, J), rtol=1e-12)
    with pytest.raises(ValueError, match="shape \\(6, 6\\)"):
        calc_sf_variances(comps, np.eye(5))
    # with_scales: the same variances and g = s_scale · s_decay from the same evaluation, bit
    # for bit the product in component order (the job's expansion relies on it)
    var, g = calc_sf_variances(comps, V, with_scales=True)
    np.testing.assert_array_equal(var, calc_sf_variances(comps, V))
    np.testing.assert_array_equal(g, (np.ones(11) * s1) * s2)



class _PythonDecay(SingleBScaleFactor):
    """A decay without a C++ term: its model block takes the evaluated-matrix path."""

    def model_term(self, block_id=0):
        return None


@pytest.mark.parametrize("python_term", [False, True])
def test_calc_sf_variances_into_equals_it_block_by_block(python_term):
    """Several data blocks in one call, each written at its own output rows: calc_sf_variances
    with_scales of each block bit for bit (an empty block skipped, other rows untouched), for
    one and two threads, with C++ terms (one call) and with a Python-defined one."""
    from xtalscale.parameter_managers import calc_sf_variances_into

    rng = np.random.default_rng(11)
    n = 40
    scale = SmoothScaleComponent1D(np.array([1.0, 1.2, 0.9, 1.1, 1.05]))
    scale.data = {"x": rng.uniform(0.0, 3.0, n)}
    scale.fix_initial_parameter()
    decay = (_PythonDecay if python_term else SingleBScaleFactor)(np.array([0.3]))
    decay.data = {"d": rng.uniform(1.0, 3.0, n)}
    comps = {"scale": scale, "decay": decay}
    selections = [np.arange(0, n, 3), np.zeros(0, np.int64), np.setdiff1d(np.arange(n), np.arange(0, n, 3))]
    for c in comps.values():
        c.update_reflection_data(block_selections=selections)
    A = rng.normal(size=(6, 6))
    V = A @ A.T
    where = np.split(rng.permutation(n + 3)[:n], [selections[0].size, selections[0].size])
    for threads in (1, 2):
        var, g = np.full(n + 3, -1.0), np.full(n + 3, -1.0)
        calc_sf_variances_into(comps, V, where, var, g, n_threads=threads)
        for b, rows in enumerate(where):
            if rows.size:
                want_var, want_g = calc_sf_variances(comps, V, block_id=b, with_scales=True)
                assert np.array_equal(var[rows], want_var) and np.array_equal(g[rows], want_g)
        assert np.sum(var == -1.0) == 3 and np.sum(g == -1.0) == 3
    with pytest.raises(ValueError, match="shape \\(6, 6\\)"):
        calc_sf_variances_into(comps, np.eye(5), where, var, g)


def test_full_model_var_cov_places_blocks_at_model_offsets():
    """Fixed-first scale (4 params, 3 free) + decay (1): the 4x4 apm matrix goes to a 5x5 model one."""
    from xtalscale.parameter_managers import full_model_var_cov

    scale = SmoothScaleComponent1D(np.array([1.0, 1.1, 1.2, 1.3]))
    scale.fix_initial_parameter()
    decay = SingleBScaleFactor(np.array([0.5]))
    comps = {"scale": scale, "decay": decay}
    apm = active_parameter_manager(comps, ["scale", "decay"])
    V = np.arange(16.0).reshape(4, 4)
    V = V + V.T
    apm.calculate_model_state_uncertainties(V)
    full = full_model_var_cov(comps, apm)
    assert full.shape == (5, 5)
    np.testing.assert_array_equal(full[:3, :3], V[:3, :3])   # free scale params at offsets 0..2
    np.testing.assert_array_equal(full[3, :], 0.0)           # the fixed parameter's slot stays empty
    np.testing.assert_array_equal(full[4, 4], V[3, 3])       # decay at model offset 4
    np.testing.assert_array_equal(full[:3, 4], V[:3, 3])     # cross terms kept within a dataset
    apm_decay_only = active_parameter_manager(comps, ["decay"])
    with pytest.raises(ValueError, match="no var_cov_matrix"):
        full_model_var_cov(comps, apm_decay_only)


def test_refinement_flow_with_a_physical_model():
    """apm + model + components together: Gauss-Newton fit of g, esds back into the model dict,
    and scale variances from the var-cov matrix (the path dials.scale takes after full-matrix)."""
    from types import SimpleNamespace

    from xtalscale.models import PhysicalScalingModel, default_model_params

    rng = np.random.default_rng(5)
    n = 400
    z = rng.uniform(0.0, 30.0, n)
    table = {"xyzobs.px.value": np.column_stack([np.zeros(n), np.zeros(n), z]), "d": rng.uniform(1.0, 3.0, n)}
    scan = SimpleNamespace(get_oscillation=lambda: (0.0, 1.0), get_oscillation_range=lambda: (0.0, 30.0),
                           get_image_range=lambda: (1, 30))
    expt = SimpleNamespace(scan=scan, beam=SimpleNamespace(get_s0=lambda: (0.0, 0.0, 1.0)))
    model = PhysicalScalingModel.from_data(default_model_params(), expt, table)  # 30 deg: scale + decay only
    assert list(model.components) == ["scale", "decay"]
    truth = {"scale": 1.0 + 0.2 * np.sin(np.arange(model.components["scale"].n_params)),
             "decay": 0.4 * np.cos(np.arange(model.components["decay"].n_params))}
    for name, values in truth.items():
        model.components[name].parameters = values
    g_obs = model.get_scales(table, expt)
    model.fix_initial_parameter(default_model_params())  # scale p0 stays at its true value
    for name in ("scale", "decay"):
        comp = model.components[name]
        comp.free_parameters = np.asarray(comp.free_parameters) * 0.0 + (1.0 if name == "scale" else 0.0)
    apm = active_parameter_manager(model.components, ["scale", "decay"])

    def residuals_and_jacobian():
        (s1, d1), (s2, d2) = (c.calculate_scales_and_derivatives(0) for c in model.components.values())
        J = np.hstack([d1.toarray() * s2[:, None], d2.toarray() * s1[:, None]])
        return s1 * s2 - g_obs, J

    for _ in range(8):
        r, J = residuals_and_jacobian()
        apm.set_param_vals(apm.get_param_vals() - np.linalg.lstsq(J, r, rcond=None)[0])
    r, J = residuals_and_jacobian()
    assert np.max(np.abs(r)) < 1e-12  # noise-free data: exact recovery
    np.testing.assert_allclose(model.components["decay"].parameters, truth["decay"], atol=1e-10)
    np.testing.assert_allclose(model.components["scale"].parameters, truth["scale"], atol=1e-10)
    # Unit-weight var-cov of the free parameters, esds back into the components and the dict.
    V = np.linalg.inv(J.T @ J) * 1e-6
    apm.calculate_model_state_uncertainties(V)
    apm.set_param_esds(np.sqrt(np.diag(V)))
    out = model.to_dict()
    n_s = model.components["scale"].n_params
    assert out["scale"]["est_standard_devs"][0] == 0.0  # the fixed parameter
    np.testing.assert_allclose(out["scale"]["est_standard_devs"][1:], np.sqrt(np.diag(V))[: n_s - 1], rtol=1e-15)
    np.testing.assert_allclose(out["decay"]["est_standard_devs"], np.sqrt(np.diag(V))[n_s - 1:], rtol=1e-15)
    # Scale variances: J V J^T per reflection, via the full-model layout.
    from xtalscale.parameter_managers import full_model_var_cov

    var = calc_sf_variances(model.components, full_model_var_cov(model.components, apm))
    np.testing.assert_allclose(var, np.einsum("ij,jk,ik->i", J, V, J), rtol=1e-10)
    assert np.all(var > 0)


def test_refiner_calculator_product_rule_and_dials_quirk():
    """Spec 5.4: KB with scale fixed at 2 and only B active: dg/dB = 1/(2d²), not 2/(2d²)."""
    from xtalscale.parameter_managers import RefinerCalculator, row_multiply

    d = np.array([1.0, 2.0, 0.5])
    comps = _kb(2.0, 0.3, d)
    only_b = scaling_active_parameter_manager(comps, ["decay"])
    g, J = RefinerCalculator.calculate_scales_and_derivatives(only_b, 0)
    sB = np.exp(0.3 / (2 * d**2))
    np.testing.assert_allclose(g, 2.0 * sB, rtol=1e-15)
    np.testing.assert_allclose(J.toarray()[:, 0], sB / (2 * d**2), rtol=1e-15)  # no factor 2: the quirk
    both = scaling_active_parameter_manager(comps, ["scale", "decay"])
    g, J = RefinerCalculator.calculate_scales_and_derivatives(both, 0)
    np.testing.assert_allclose(g, 2.0 * sB, rtol=1e-15)
    np.testing.assert_allclose(J.toarray(), np.column_stack([sB, 2.0 * sB / (2 * d**2)]), rtol=1e-15)
    none = scaling_active_parameter_manager(comps, [])
    g, J = RefinerCalculator.calculate_scales_and_derivatives(none, 0)
    np.testing.assert_allclose(g, 2.0 * sB, rtol=1e-15)
    assert J.shape == (0, 0)
    # calculate_scales (g alone, for trial steps) is the same product, bit for bit
    for apm in (only_b, both, none):
        np.testing.assert_array_equal(RefinerCalculator.calculate_scales(apm, 0),
                                      RefinerCalculator.calculate_scales_and_derivatives(apm, 0)[0])
    m = row_multiply(sp.csr_matrix(np.array([[1.0, 0.0], [2.0, 3.0]])), [10.0, -1.0])
    np.testing.assert_array_equal(m.toarray(), [[10.0, 0.0], [-2.0, -3.0]])
    with pytest.raises(ValueError, match="one value per matrix row"):
        row_multiply(sp.csr_matrix(np.eye(2)), [1.0])


def test_checked_parameters_are_stored_as_the_setters_store_them():
    """set_checked_free_parameters (a manager's checked vector) stores what each of the
    module's free_parameters setters stores (a fixed first parameter kept), refuses a wrong
    length with the setter's error, and calls the setter of a subclass that has its own."""
    from xtalscale.components import SHScaleComponent, set_checked_free_parameters

    fixed = SmoothScaleComponent1D(np.array([1.0, 1.1, 1.2, 1.3]))
    fixed.fix_initial_parameter()
    for comp, values in ((SingleScaleFactor([2.0]), np.array([3.0])),
                         (SmoothScaleComponent1D(np.array([1.0, 1.1, 1.2])), np.array([0.9, 1.0, 1.1])),
                         (fixed, np.array([2.1, 2.2, 2.3])),
                         (SHScaleComponent(np.zeros(3)), np.array([0.1, -0.1, 0.2]))):
        twin = type(comp).__new__(type(comp))
        twin.__dict__.update({k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in comp.__dict__.items()})
        twin.free_parameters = values.copy()
        set_checked_free_parameters(comp, values.copy())
        np.testing.assert_array_equal(comp.parameters, twin.parameters)
        np.testing.assert_array_equal(comp.free_parameters, values)
        with pytest.raises(ValueError):
            set_checked_free_parameters(comp, np.ones(values.size + 1))

    class OwnSetter(SingleScaleFactor):
        seen: list = []

        @property
        def free_parameters(self):
            return self.parameters

        @free_parameters.setter
        def free_parameters(self, values):
            OwnSetter.seen.append(np.array(values))
            self.parameters = values

    own = OwnSetter([1.0])
    set_checked_free_parameters(own, np.array([4.0]))
    assert len(OwnSetter.seen) == 1 and own.parameters[0] == 4.0


def test_multi_manager_sets_checked_slices_and_calls_overridden_managers():
    """multi_active_parameter_manager.set_param_vals checks the whole vector once and gives each
    plain manager a copy of its slice; a manager with its own set_param_vals gets it called;
    a non-finite value or a wrong length is refused as before."""
    from xtalscale.parameter_managers import active_parameter_manager, multi_active_parameter_manager

    calls = []

    class Own(active_parameter_manager):
        def set_param_vals(self, x):
            calls.append(np.array(x))
            super().set_param_vals(x)

    comps = [{"scale": SingleScaleFactor([1.0]), "decay": SingleBScaleFactor([0.0])},
             {"scale": SingleScaleFactor([2.0])}]
    multi = multi_active_parameter_manager(None, comps, [["scale", "decay"], ["scale"]])
    multi.apm_list[1] = Own(comps[1], ["scale"])
    x = np.array([1.5, 0.25, 2.5])
    multi.set_param_vals(x)
    x[:] = 0.0  # the caller's array is not held
    np.testing.assert_array_equal(multi.get_param_vals(), [1.5, 0.25, 2.5])
    assert comps[0]["scale"].parameters[0] == 1.5 and comps[0]["decay"].parameters[0] == 0.25
    assert len(calls) == 1 and calls[0][0] == 2.5 and comps[1]["scale"].parameters[0] == 2.5
    assert not np.shares_memory(multi.apm_list[0].x, comps[0]["scale"].parameters)
    with pytest.raises(ValueError, match="finite"):
        multi.set_param_vals([1.0, np.nan, 2.0])
    with pytest.raises(ValueError, match="3 values"):
        multi.set_param_vals([1.0, 2.0])
