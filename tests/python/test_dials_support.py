"""DIALS's supporting names for the refinement layer, measured by what DIALS's own unit tests
(tests/algorithms/scaling/test_weighting.py, test_basis_function.py, test_scaler.py,
test_scaling_library.py) and scitbx's flex tests call, with the import lines changed; plus the
gaps a DIALS-based stills pipeline hit (read-only ``parameters``, flex.mean_and_variance with
weights, dxtbx-style Crystal)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from xtalscale.algorithms.scaling.basis_functions import RefinerCalculator
from xtalscale.algorithms.scaling.Ih_table import get_sorted_asu_indices, map_indices_to_asu
from xtalscale.algorithms.scaling.model.components.scale_components import (
    ScaleComponentBase,
    SingleBScaleFactor,
    SingleScaleFactor,
)
from xtalscale.algorithms.scaling.parameter_handler import scaling_active_parameter_manager
from xtalscale.algorithms.scaling.weighting import (
    CauchyWeights,
    GemanMcClureWeights,
    HuberWeights,
    UnityWeights,
    WeightingBase,
    get_weighting_scheme,
)
from xtalscale.array_family import flex
from xtalscale.cctbx import uctbx
from xtalscale.dxtbx.model import (
    Beam,
    BeamFactory,
    Crystal,
    Detector,
    DetectorFactory,
    Experiment,
    Goniometer,
    GoniometerFactory,
    Scan,
    ScanFactory,
)
from xtalscale.dxtbx.model.experiment_list import ExperimentList
from xtalscale.scitbx import matrix
from xtalscale.sparse import SparseMatrix, SparseVector
from xtalscale.symmetry import SpaceGroup, group_reflections, map_to_asu

DATA = Path(__file__).resolve().parents[1] / "data"


# ----------------------------------------------------------------------------- weighting
class SmallIhTable:
    """The four observations of DIALS's weighting test, as plain columns."""

    def __init__(self):
        self.variances = flex.double([1.0, 1.0, 2.0, 2.0])
        self.intensities = flex.double([1.0, 1.0, 2.0, 4.5])
        self.inverse_scale_factors = flex.double(4, 1.0)
        self.Ih_values = flex.double(4, 1.5)
        self.size = 4
        self.weights = None


def test_weighting_schemes_give_dials_numbers():
    table = SmallIhTable()
    weights = get_weighting_scheme(table, "invvar")
    assert type(weights) is WeightingBase and weights.weighting_scheme == "invvar"
    weights.calculate_initial_weights()
    assert list(table.weights) == [1.0, 1.0, 0.5, 0.5]
    weights.apply_iterative_weights()
    assert list(table.weights) == [1.0, 1.0, 0.5, 0.5]
    assert type(get_weighting_scheme(table, None)) is WeightingBase

    weights = get_weighting_scheme(table, "unity")
    assert isinstance(weights, UnityWeights) and weights.weighting_scheme == "unity"
    weights.calculate_initial_weights()
    assert list(table.weights) == [1.0] * 4

    # e = (I - g Ih) / (g Ih) = -1/3, -1/3, 1/3, 2
    weights = get_weighting_scheme(table, "GM")
    assert isinstance(weights, GemanMcClureWeights) and weights.weighting_scheme == "GM"
    weights.calculate_initial_weights()
    assert list(table.weights) == [1.0, 1.0, 0.5, 0.5]
    weights.apply_iterative_weights()
    assert list(table.weights) == pytest.approx([81.0 / 100.0] * 3 + [1.0 / 25.0])

    weights = get_weighting_scheme(table, "huber")
    assert isinstance(weights, HuberWeights) and weights.c == 1.345
    weights.apply_iterative_weights()
    assert list(table.weights) == pytest.approx([1.0] * 3 + [weights.c / 2.0])

    weights = get_weighting_scheme(table, "cauchy")
    assert isinstance(weights, CauchyWeights) and weights.c == 2.385
    weights.apply_iterative_weights()
    assert list(table.weights) == pytest.approx(
        [1.0 / (1.0 + (1.0 / (3.0 * weights.c)) ** 2)] * 3
        + [1.0 / (1.0 + (2.0 / weights.c) ** 2)])

    with pytest.raises(ValueError, match="badchoice"):
        get_weighting_scheme(table, "badchoice")


def test_weights_are_zero_not_inf_or_nan_where_dials_would_divide_by_zero():
    table = SmallIhTable()
    table.variances = flex.double([1.0, 0.0, -1.0, np.nan])
    WeightingBase(table).calculate_initial_weights()
    assert list(table.weights) == [1.0, 0.0, 0.0, 0.0]
    table.Ih_values = flex.double([1.5, 0.0, 1.5, 1.5])
    for scheme in (GemanMcClureWeights, CauchyWeights, HuberWeights):
        scheme(table).apply_iterative_weights()
        w = np.asarray(table.weights)
        assert np.all(np.isfinite(w)) and w[1] == 0.0 and w[0] > 0


# ----------------------------------------------------------------------------- basis functions
def _kb_components():
    d = flex.double([2.0, 0.8, 2.0])
    ids = flex.int(3, 0)
    components = {"scale": SingleScaleFactor(flex.double([1.0])),
                  "decay": SingleBScaleFactor(flex.double([0.0])),
                  "abs": SingleScaleFactor(flex.double([1.0]))}
    components["scale"].data = {"id": ids}
    components["decay"].data = {"d": d}
    components["abs"].data = {"id": ids}
    for component in components.values():
        component.update_reflection_data()
    return components


def test_refiner_calculator_as_dials_test_basis_function():
    components = _kb_components()
    apm = scaling_active_parameter_manager(components, ["decay", "scale"])
    apm.set_param_vals(flex.double([2.0, 1.0]))  # S = 2, B = 1
    s, d = RefinerCalculator.calculate_scales_and_derivatives(apm, 0)
    slist, dlist = RefinerCalculator._calc_component_scales_derivatives(apm, 0)
    d_values = np.asarray(components["decay"].d_values[0])
    assert list(s) == pytest.approx(list(2.0 * np.exp(1.0 / (2.0 * d_values ** 2))))
    for i in range(3):
        assert d[i, 0] == dlist[0][i, 0] * slist[1][i]
        assert d[i, 1] == dlist[1][i, 0] * slist[0][i]
    assert isinstance(d, SparseMatrix) and (d.n_rows, d.n_cols) == (3, 2)
    np.testing.assert_array_equal(d.col(1).as_dense_vector(), d.toarray()[:, 1])

    apm = scaling_active_parameter_manager(components, ["scale"])
    apm.set_param_vals(flex.double(components["scale"].n_params, 2.0))
    s, d = RefinerCalculator.calculate_scales_and_derivatives(apm, 0)
    slist, dlist = RefinerCalculator._calc_component_scales_derivatives(apm, 0)
    for i in range(3):
        assert d[i, 0] == dlist[0][i, 0]  # DIALS: a single active component is not chained

    apm = scaling_active_parameter_manager(components, [])
    _, d = RefinerCalculator.calculate_scales_and_derivatives(apm, 0)
    assert d.n_cols == 0 and d.n_rows == 0


def test_component_derivatives_answer_scitbx_sparse_calls():
    components = _kb_components()
    components["decay"].parameters = flex.double([0.5])
    _, d = components["decay"].calculate_scales_and_derivatives()
    assert isinstance(d, SparseMatrix)
    assert (d.n_rows, d.n_cols, d.non_zeroes) == (3, 1, 3)
    column = d.col(0)
    assert isinstance(column, SparseVector) and column.size == 3 and column.non_zeroes == 3
    np.testing.assert_array_equal(column.as_dense_vector(), d.as_dense_matrix()[:, 0])
    assert [c.non_zeroes for c in d.cols()] == [3]
    with pytest.raises(IndexError):
        d.col(1)


def test_scitbx_sparse_matrix_filled_entry_by_entry_as_dials_tests_do():
    """DIALS's test_scaler builds ``sparse.matrix(2, 2)`` and sets entries."""
    import warnings

    from xtalscale.scitbx import sparse

    m = sparse.matrix(2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no SparseEfficiencyWarning for scitbx-style filling
        m[0, 0] = 0.5
        m[1, 0] = 0.4
    assert (m.n_rows, m.n_cols, m.non_zeroes) == (2, 2, 2)
    np.testing.assert_array_equal(m.col(0).as_dense_vector(), [0.5, 0.4])
    assert m.col(1).non_zeroes == 0
    with pytest.raises(ValueError):
        sparse.matrix(-1, 2)


# ----------------------------------------------------------------------------- free_parameters
class ReadOnlyParametersComponent(ScaleComponentBase):
    """A component whose public ``parameters`` is read-only, as a stills pipeline's are."""

    @property
    def parameters(self):
        return self._parameters

    def update_reflection_data(self, selection=None, block_selections=None):
        self._n_refl = [len(self.data["x"])]

    def calculate_scales_and_derivatives(self, block_id=0):
        x = np.asarray(self.data["x"])
        p = self._parameters
        return p[0] + p[1] * x, np.column_stack([np.ones_like(x), x])


def test_free_parameters_setter_stores_the_values_itself():
    comp = ReadOnlyParametersComponent(flex.double([1.0, 0.0]))
    with pytest.raises(AttributeError):
        comp.parameters = [2.0, 3.0]
    comp.free_parameters = flex.double([2.0, 0.5])
    np.testing.assert_array_equal(comp.parameters, [2.0, 0.5])
    np.testing.assert_array_equal(comp.free_parameters, [2.0, 0.5])
    with pytest.raises(ValueError, match="different length"):
        comp.free_parameters = [1.0]


def test_parameter_manager_updates_a_read_only_parameters_component():
    comp = ReadOnlyParametersComponent(flex.double([1.0, 0.0]))
    comp.data = {"x": flex.double([0.0, 1.0, 2.0])}
    comp.update_reflection_data()
    apm = scaling_active_parameter_manager({"linear": comp}, ["linear"])
    apm.set_param_vals(flex.double([3.0, 0.25]))  # what a refinement step does
    np.testing.assert_array_equal(comp.parameters, [3.0, 0.25])
    s, _ = RefinerCalculator.calculate_scales_and_derivatives(apm, 0)
    np.testing.assert_allclose(s, [3.0, 3.25, 3.5])


# ----------------------------------------------------------------------------- mean_and_variance
def test_mean_and_variance_matches_scitbx():
    x = flex.double((1, 2, 3))
    for mv in (flex.mean_and_variance(x), flex.mean_and_variance(x, flex.double((1, 1, 1)))):
        assert mv.mean() == pytest.approx(2)
        assert (mv.sum_weights(), mv.sum_weights_sq()) == (3, 3)
        assert mv.sum_weights_values() == pytest.approx(6)
        assert mv.sum_weights_delta_sq() == pytest.approx(2)
        assert mv.gsl_stats_wvariance() == pytest.approx(1)
        assert mv.gsl_stats_wsd() == pytest.approx(1)
        assert mv.standard_error_of_mean_calculated_from_sample_weights() == pytest.approx(
            1 / math.sqrt(3))
        assert mv.conservative_standard_deviation() == pytest.approx(1)
    unweighted = flex.mean_and_variance(x)
    assert unweighted.unweighted_sample_variance() == pytest.approx(1)
    assert unweighted.unweighted_sample_standard_deviation() == pytest.approx(1)
    assert unweighted.unweighted_standard_error_of_mean() == pytest.approx(1 / math.sqrt(3))
    mv = flex.mean_and_variance(x, flex.double((1, 3, 2)))
    assert mv.mean() == pytest.approx(13 / 6)
    assert (mv.sum_weights(), mv.sum_weights_sq()) == (6, 14)
    assert mv.sum_weights_delta_sq() == pytest.approx(17 / 6)
    assert mv.gsl_stats_wvariance() == pytest.approx(17 / 22)
    assert mv.gsl_stats_wsd() == pytest.approx(math.sqrt(17 / 22))
    assert mv.conservative_standard_deviation() == pytest.approx(math.sqrt(17 / 22))
    assert mv.have_weights() and not unweighted.have_weights()
    with pytest.raises(ValueError, match="unweighted"):
        mv.unweighted_sample_variance()
    same = flex.mean_and_variance(flex.double((1, 1, 1)))
    assert same.gsl_stats_wvariance() == 0
    assert same.conservative_standard_deviation() == pytest.approx(1 / math.sqrt(3))
    with pytest.raises(ValueError):
        flex.mean_and_variance(flex.double())
    with pytest.raises(ValueError, match="2 weights for 3 values"):
        flex.mean_and_variance(x, flex.double((1, 2)))


def test_mean_and_variance_on_real_intensities_matches_numpy():
    table = flex.reflection_table.from_file(
        str(DATA / "dials_l_cysteine_integrated" / "20_integrated.pickle"))
    variance = np.asarray(table["intensity.sum.variance"])
    ok = variance > 0
    values = np.asarray(table["intensity.sum.value"])[ok]
    weights = 1.0 / variance[ok]
    mv = flex.mean_and_variance(flex.double(values), flex.double(weights))
    assert mv.mean() == pytest.approx(np.average(values, weights=weights), rel=1e-12)
    v1, v2 = weights.sum(), (weights ** 2).sum()
    gsl = v1 / (v1 * v1 - v2) * np.sum(weights * (values - mv.mean()) ** 2)
    assert mv.gsl_stats_wvariance() == pytest.approx(gsl, rel=1e-12)
    plain = flex.mean_and_variance(flex.double(values))
    assert plain.unweighted_sample_variance() == pytest.approx(np.var(values, ddof=1), rel=1e-12)


# ----------------------------------------------------------------------------- ASU mapping
def test_map_indices_to_asu_and_sorting_on_real_indices():
    table = flex.reflection_table.from_file(
        str(DATA / "dials_l_cysteine_integrated" / "20_integrated.pickle"))
    hkl = np.asarray(table["miller_index"])
    hkl = hkl[np.any(hkl != 0, axis=1)]
    sg = SpaceGroup("P 21 21 21")
    asu = map_indices_to_asu(flex.miller_index(hkl), sg)
    assert isinstance(asu, flex.miller_index) and len(asu) == len(hkl)
    np.testing.assert_array_equal(np.asarray(asu), map_to_asu(hkl, sg).asu_hkl)
    sorted_hkl, permutation = get_sorted_asu_indices(asu, sg)
    np.testing.assert_array_equal(np.asarray(sorted_hkl), np.asarray(asu)[np.asarray(permutation)])
    np.testing.assert_array_equal(permutation, group_reflections(np.asarray(asu)).order)
    keys = [tuple(r) for r in np.asarray(sorted_hkl)]
    assert keys == sorted(keys)  # cctbx packed_indices order: lexicographic signed (h, k, l)


def test_map_indices_to_asu_as_dials_create_Ih_table_expects():
    indices = flex.miller_index([(1, 0, 0), (0, 0, 1), (1, 0, 0), (0, 0, 1), (0, 0, 2)])
    asu = map_indices_to_asu(indices, SpaceGroup(" C 2y"))
    sorted_hkl, _ = get_sorted_asu_indices(asu, SpaceGroup(" C 2y"))
    assert list(sorted_hkl) == [(0, 0, 1), (0, 0, 1), (0, 0, 2), (1, 0, 0), (1, 0, 0)]
    anomalous = map_indices_to_asu(flex.miller_index([(1, 2, 3), (-1, -2, -3)]), "P 1",
                                   anomalous=True)
    assert list(anomalous) == [(1, 2, 3), (-1, -2, -3)]


# ----------------------------------------------------------------------------- scitbx / cctbx
def test_matrix_subset():
    a, b = matrix.col((1, 0, 0)), matrix.col((0, 1, 0))
    assert a.cross(b) == matrix.col((0, 0, 1)) and a.dot(b) == 0
    assert a.angle(b, deg=True) == pytest.approx(90)
    assert a.rotate_around_origin(matrix.col((0, 0, 1)), 90, deg=True).elems == pytest.approx(
        (0, 1, 0), abs=1e-15)
    m = matrix.sqr((2, 1, 0, 0, 3, 0, 0, 0, 4))
    assert (m * m.inverse()).elems == pytest.approx(matrix.identity(3).elems, abs=1e-15)
    assert m.determinant() == pytest.approx(24) and m.trace() == 9
    assert (m * a).elems == (2.0, 0.0, 0.0) and m.transpose()[0, 1] == 0.0
    assert (matrix.col((3, 4, 0)).length(), matrix.col((3, 4, 0)).normalize().length()) == (
        5.0, pytest.approx(1.0))
    assert (2 * a + b / 2).elems == (2.0, 0.5, 0.0)
    r = matrix.col((1, 1, 1)).axis_and_angle_as_r3_rotation_matrix(120, deg=True)
    assert (r * a).elems == pytest.approx((0, 1, 0), abs=1e-12)
    assert matrix.diag((1, 2)).as_list_of_lists() == [[1, 0], [0, 2]]
    assert matrix.rec(range(6), (2, 3)).transpose().n == (3, 2)
    with pytest.raises(ValueError, match="shapes"):
        m * matrix.col((1, 2))


def test_uctbx_unit_cell():
    uc = uctbx.unit_cell((10.0, 20.0, 30.0, 90.0, 90.0, 90.0))
    assert uctbx.unit_cell("10 20 30 90 90 90") == uc
    assert uc.d((1, 0, 0)) == pytest.approx(10.0)
    np.testing.assert_allclose(uc.d(flex.miller_index([(0, 1, 0), (0, 0, 2)])), [20.0, 15.0])
    assert uc.volume() == pytest.approx(6000.0)
    assert uc.reciprocal().parameters()[:3] == pytest.approx((0.1, 0.05, 1 / 30))
    assert uc.metrical_matrix()[:3] == pytest.approx((100.0, 400.0, 900.0))
    with pytest.raises(ValueError, match="6 numbers"):
        uctbx.unit_cell("10 20 x")


# ----------------------------------------------------------------------------- dxtbx models
def test_dials_generated_experiments_build_and_round_trip(tmp_path):
    """The experiment set-up of DIALS's test_scaler.py / test_scaling_library.py."""
    crystal = Crystal.from_dict({"__id__": "crystal", "real_space_a": [1.0, 0.0, 0.0],
                                 "real_space_b": [0.0, 1.0, 0.0],
                                 "real_space_c": [0.0, 0.0, 2.0],
                                 "space_group_hall_symbol": " C 2y"})
    scan = Scan(image_range=[0, 90], oscillation=[0.0, 1.0])
    beam = Beam(s0=(0.0, 0.0, 1.01))
    experiments = ExperimentList()
    for i, axis in enumerate([(1.0, 0.0, 0.0), (1.0, 1.0, 0.0)]):
        experiments.append(Experiment(beam=beam, scan=scan, goniometer=Goniometer(axis),
                                      detector=Detector(), crystal=crystal))
        experiments[i].identifier = str(i)
    assert beam.get_wavelength() == pytest.approx(1 / 1.01)
    assert experiments[1].goniometer.get_rotation_axis() == pytest.approx(
        (math.sqrt(0.5), math.sqrt(0.5), 0.0))
    assert scan.get_num_images() == 91 and scan.get_oscillation_range() == (0.0, 91.0)
    experiments.as_file(tmp_path / "generated.expt")
    back = ExperimentList.from_file(tmp_path / "generated.expt")
    assert back[0].beam == beam and back[0].scan == scan and back[1].crystal == crystal
    assert back.identifiers() == ["0", "1"]


def test_crystal_the_dxtbx_way_and_its_setters():
    c = Crystal((10.0, 0, 0), (0, 11.0, 0), (0, 0, 12.0), space_group_symbol="P 21 21 21")
    same = Crystal(matrix.col((10.0, 0, 0)), matrix.col((0, 11.0, 0)), matrix.col((0, 0, 12.0)),
                   space_group=c.get_space_group())
    assert c == same and c.get_space_group().number() == 19
    assert Crystal((10.0, 0, 0), (0, 11.0, 0), (0, 0, 12.0), c.get_space_group()) == c
    B = np.asarray(c.get_B()).reshape(3, 3)
    np.testing.assert_allclose(B, np.diag([0.1, 1 / 11, 1 / 12]), atol=1e-15)
    U = matrix.col((1, 2, 3)).axis_and_angle_as_r3_rotation_matrix(35, deg=True)
    c.set_U(U)
    np.testing.assert_allclose(c.get_U(), U.elems, atol=1e-12)
    np.testing.assert_allclose(np.asarray(c.get_B()).reshape(3, 3), B, atol=1e-12)
    np.testing.assert_allclose(np.asarray(c.get_A()).reshape(3, 3),
                               U.as_numpy_array() @ B, atol=1e-12)
    assert c.get_unit_cell().parameters() == pytest.approx((10, 11, 12, 90, 90, 90))
    with pytest.raises(ValueError, match="rotation"):
        c.set_U((1, 0, 0, 0, 2, 0, 0, 0, 1))
    from_a = Crystal(c.get_A(), c.get_space_group())
    assert from_a.is_similar_to(c)
    real = Crystal(np.asarray(c.get_real_space_vectors()).ravel(), "P 21 21 21",
                   reciprocal=False)
    assert real.is_similar_to(c)
    c.set_unit_cell(uctbx.unit_cell((20, 22, 24, 90, 90, 90)))
    assert c.get_unit_cell().parameters() == pytest.approx((20, 22, 24, 90, 90, 90))
    np.testing.assert_allclose(c.get_U(), U.elems, atol=1e-12)
    c.set_B(B)
    assert c.get_unit_cell().parameters() == pytest.approx((10, 11, 12, 90, 90, 90))
    before = np.asarray(c.get_U()).reshape(3, 3)
    c.rotate_around_origin((0, 0, 1), 90)
    rz = matrix.col((0, 0, 1)).axis_and_angle_as_r3_rotation_matrix(90, deg=True)
    np.testing.assert_allclose(np.asarray(c.get_U()).reshape(3, 3), rz.as_numpy_array() @ before,
                               atol=1e-12)
    c.set_A_at_scan_points([c.get_A()] * 3)
    assert c.get_num_scan_points() == 3 and c.num_scan_points == 3
    c.reset_scan_points()
    assert c.get_num_scan_points() == 0
    c.set_mosaicity(0.1)
    assert c.get_mosaicity() == pytest.approx(0.1)
    c.set_recalculated_unit_cell(uctbx.unit_cell((10.1, 11, 12, 90, 90, 90)))
    assert c.get_recalculated_unit_cell().parameters()[0] == pytest.approx(10.1)
    assert Crystal.from_dict(c.to_dict()) == c
    with pytest.raises(TypeError, match="exactly one"):
        Crystal((1, 0, 0), (0, 1, 0), (0, 0, 1))
    with pytest.raises(ValueError, match="linearly dependent"):
        Crystal((1, 0, 0), (2, 0, 0), (0, 0, 1), space_group_symbol="P 1")


def test_beam_goniometer_scan_detector_constructors_and_factories():
    b = Beam(direction=(0, 0, 2), wavelength=0.9)
    assert b.get_s0() == pytest.approx((0, 0, -1 / 0.9)) and b.get_direction() == (0, 0, 1)
    assert Beam((0, 0, 1), 0.9) == b
    b.set_polarization_fraction(0.5)
    b.set_direction((0, 0, -1))
    assert b.get_polarization_fraction() == 0.5 and b.get_s0()[2] > 0
    with pytest.raises(TypeError):
        Beam(s0=(0, 0, 1), wavelength=1.0)
    assert BeamFactory.simple(1.0).get_s0() == pytest.approx((0, 0, -1.0))
    assert BeamFactory.simple_directional((0, 0, 1), 0.02).get_polarization_fraction() == 0.5
    assert BeamFactory.make_beam(s0=(0, 0, -2)).get_wavelength() == 0.5

    assert Goniometer().get_rotation_axis() == (1.0, 0.0, 0.0)
    g = GoniometerFactory.known_axis((0, 2, 0))
    assert g.get_rotation_axis() == (0.0, 1.0, 0.0)
    g.set_setting_rotation(matrix.col((0, 0, 1)).axis_and_angle_as_r3_rotation_matrix(
        90, deg=True).elems)
    g.set_rotation_axis((1, 0, 0))
    assert g.get_rotation_axis() == pytest.approx((1, 0, 0), abs=1e-15)
    assert GoniometerFactory.single_axis_reverse().get_rotation_axis() == (-1.0, 0.0, 0.0)

    s = ScanFactory.make_scan((1, 10), 0.1, (5.0, 0.5), {i: float(i) for i in range(1, 11)})
    assert s.get_image_range() == (1, 10) and s.get_oscillation() == (5.0, 0.5)
    np.testing.assert_array_equal(s.get_exposure_times(), [0.1] * 10)
    np.testing.assert_array_equal(s.get_epochs(), np.arange(1.0, 11.0))
    s.set_image_range((1, 5))
    assert s.get_num_images() == 5 and len(s.get_epochs()) == 5
    s.set_oscillation((0.0, 0.25))
    assert s.get_oscillation_range() == (0.0, 1.25)
    radians = Scan((1, 4), (0.0, math.radians(0.5)), deg=False)
    assert radians.get_oscillation() == pytest.approx((0.0, 0.5))
    with pytest.raises(ValueError, match="last >= first"):
        Scan(image_range=(5, 1), oscillation=(0, 1))
    with pytest.raises(ValueError, match="4 finite values"):
        Scan((1, 4), (0, 1), [1.0, 2.0], None)

    d = DetectorFactory.simple("PAD", 200.0, (100.0, 110.0), "+x", "-y", (0.172, 0.172),
                               (1000, 1200))
    assert len(d) == 1 and d[0].get_distance() == pytest.approx(200.0)
    assert d[0].get_beam_centre(BeamFactory.simple(1.0).get_s0()) == pytest.approx((100, 110))
    assert d[0].get_type() == "SENSOR_PAD" and d[0].get_image_size() == (1000, 1200)
