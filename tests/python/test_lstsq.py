"""Dense normal equations with scitbx lstbx semantics (xtalscale.fit.lstsq and the
``xtalscale.lstbx`` facades): scitbx's own reference numbers, a classic non-linear test problem
with a known minimum, and the commissioning API's one-shot Levenberg-Marquardt form."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from xtalscale.array_family import flex
from xtalscale.fit.lstsq import NormalEquationsError
from xtalscale.lstbx import normal_eqns, normal_eqns_solving

# scitbx's linear test system (b, design row, weight), weights of either sign
_EQUATIONS = [(1, (-1, 0, 0), 1), (2, (2, -1, 0), 3), (-1, (0, 2, 1), 2), (-2, (0, 1, 0), -2)]


def _packed_u(full):
    return full[np.triu_indices(full.shape[0])]


def test_linear_ls_matches_scitbx_reference_numbers_one_by_one_and_at_once():
    one = normal_eqns.linear_ls(3)
    for b, a, w in _EQUATIONS:
        one.add_equation(right_hand_side=b, design_matrix_row=flex.double(a), weight=w)
    # scitbx's tst_normal_equations reference values
    assert list(one.normal_matrix_packed_u()) == pytest.approx([13, -6, 0, 9, 4, 2], abs=1e-15)
    assert list(one.right_hand_side()) == pytest.approx([11, -6, -2], abs=1e-15)
    b = flex.double([e[0] for e in _EQUATIONS])
    w = flex.double([e[2] for e in _EQUATIONS])
    a = sp.csr_matrix(np.array([e[1] for e in _EQUATIONS], dtype=float))
    at_once = normal_eqns.linear_ls(3)
    at_once.add_equations(right_hand_side=b, design_matrix=a, weights=w)
    np.testing.assert_allclose(at_once.normal_matrix_packed_u(), one.normal_matrix_packed_u())
    np.testing.assert_allclose(at_once.right_hand_side(), one.right_hand_side())
    negated = normal_eqns.linear_ls(3)
    negated.add_equations(b, a.toarray(), w, negate_right_hand_side=True)
    np.testing.assert_allclose(negated.right_hand_side(), -np.asarray(one.right_hand_side()))


def test_linear_ls_solve_gives_the_least_squares_solution_and_cholesky_factor():
    rng = np.random.default_rng(3)
    a, b, w = rng.normal(size=(40, 4)), rng.normal(size=40), rng.uniform(0.5, 2.0, 40)
    eqs = normal_eqns.linear_ls(4)
    eqs.add_equations(b, a, w)
    assert not eqs.solved
    eqs.solve()
    assert eqs.solved
    sw = np.sqrt(w)
    expected = np.linalg.lstsq(a * sw[:, None], b * sw, rcond=None)[0]
    np.testing.assert_allclose(eqs.solution(), expected, rtol=1e-12)
    u = np.zeros((4, 4))
    u[np.triu_indices(4)] = np.asarray(eqs.cholesky_factor_packed_u())
    np.testing.assert_allclose(u.T @ u, (a * w[:, None]).T @ a, rtol=1e-12)
    with pytest.raises(RuntimeError, match="already solved"):  # scitbx raises RuntimeError
        eqs.normal_matrix_packed_u()
    with pytest.raises(RuntimeError, match="already solved"):
        eqs.right_hand_side()
    eqs.reset()
    with pytest.raises(RuntimeError, match="solve"):
        eqs.solution()


def test_linear_ls_from_packed_matrix_and_iteration_protocol():
    full = np.array([[4.0, 1.0], [1.0, 3.0]])
    eqs = normal_eqns.linear_ls(flex.double(_packed_u(full)), flex.double([1.0, 2.0]))
    matrix, rhs = eqs
    np.testing.assert_array_equal(matrix, _packed_u(full))
    eqs.solve()
    np.testing.assert_allclose(eqs.solution(), np.linalg.solve(full, [1.0, 2.0]))


def test_singular_normal_matrix_names_the_undetermined_parameter():
    eqs = normal_eqns.linear_ls(3)
    # parameter 2 never appears in any equation
    eqs.add_equations([1.0, 2.0, 3.0], np.array([[1.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 0]]))
    with pytest.raises(NormalEquationsError, match="parameter 2") as info:
        eqs.solve()
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)


def test_bad_input_is_refused_with_the_argument_named():
    eqs = normal_eqns.non_linear_ls(2)
    with pytest.raises(ValueError, match=r"residuals\[1\] is not finite"):
        eqs.add_equations([1.0, np.nan], np.ones((2, 2)))
    with pytest.raises(ValueError, match="jacobian has shape"):
        eqs.add_equations([1.0, 2.0], np.ones((2, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        eqs.add_equations([1.0, 2.0], np.array([[1.0, np.inf], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="weights"):
        eqs.add_equations([1.0, 2.0], np.ones((2, 2)), weights=[1.0])
    with pytest.raises(TypeError, match="unknown option"):
        normal_eqns_solving.levenberg_marquardt_iterations(residuals=[1.0],
                                                           jacobian=np.ones((1, 1)), tua=1.0)


class ExponentialFit(normal_eqns.non_linear_ls, normal_eqns.non_linear_ls_mixin):
    """M(x, t) = x3 exp(x1 t) + x4 exp(x2 t) fitted to 45 points; minimum near (-4, -5, 4, -4).

    Problem 18 of H. B. Nielsen, "UCTP - test problems for unconstrained optimization",
    IMM-REP-2000-17 (DTU, 2000): the data below are that report's, used by scitbx's own tests.
    Written here in the way a scitbx user writes a problem (flex arrays, grid Jacobian).
    """

    y = flex.double((
        0.090542, 0.124569, 0.179367, 0.195654, 0.269707, 0.286027, 0.289892, 0.317475,
        0.308191, 0.336995, 0.348371, 0.321337, 0.299423, 0.338972, 0.304763, 0.288903,
        0.300820, 0.303974, 0.283987, 0.262078, 0.281593, 0.267531, 0.218926, 0.225572,
        0.200594, 0.197375, 0.182440, 0.183892, 0.152285, 0.174028, 0.150874, 0.126220,
        0.126266, 0.106384, 0.118923, 0.091868, 0.128926, 0.119273, 0.115997, 0.105831,
        0.075261, 0.068387, 0.090823, 0.085205, 0.067203))
    arg_min = (-4.0, -5.0, 4.0, -4.0)

    def __init__(self, x0=(-1.0, -2.0, 1.0, -1.0)):
        super().__init__(n_parameters=4)
        self.t = 0.02 * flex.double_range(1, 46)
        self.x = flex.double(x0)
        self.old_x = None

    def parameter_vector_norm(self):
        return self.x.norm()

    def build_up(self, objective_only=False):
        x1, x2, x3, x4 = self.x
        e1, e2 = flex.exp(x1 * self.t), flex.exp(x2 * self.t)
        residuals = x3 * e1 + x4 * e2 - self.y
        self.reset()
        if objective_only:
            self.add_residuals(residuals, weights=None)
            return
        jacobian = flex.double(flex.grid(45, 4))
        for j, column in enumerate((self.t * x3 * e1, self.t * x4 * e2, e1, e2)):
            jacobian.matrix_paste_column_in_place(column, j)
        self.add_equations(residuals, jacobian, weights=None)

    def step_forward(self):
        self.old_x = self.x.deep_copy()
        self.x += self.step()

    def step_backward(self):
        self.x, self.old_x = self.old_x, None


def test_levenberg_marquardt_reaches_the_known_minimum_of_the_exponential_fit():
    problem = ExponentialFit()
    it = normal_eqns_solving.levenberg_marquardt_iterations(
        problem, track_all=True, gradient_threshold=1e-8, step_threshold=1e-8, tau=1e-4,
        n_max_iterations=200)
    np.testing.assert_allclose(problem.x, ExponentialFit.arg_min, atol=5e-4)  # scitbx's bound
    assert 0 < it.n_iterations < 200
    assert len(it.mu_history) >= it.n_iterations
    history = np.asarray(it.objective_history)
    # every accepted build lowers the objective (rejected steps are undone)
    assert history[-1] < history[0] and np.all(np.diff(history) <= 1e-15)
    assert len(it.gradient_history) == len(history) and len(it.step_history) > 0
    assert str(it) == "Levenberg-Marquardt"


def test_gauss_newton_iterations_from_close_to_the_minimum():
    problem = ExponentialFit(x0=(-3.9, -5.1, 3.9, -3.9))
    it = normal_eqns_solving.naive_iterations(problem, gradient_threshold=1e-10,
                                              step_threshold=1e-12)
    np.testing.assert_allclose(problem.x, ExponentialFit.arg_min, atol=5e-4)
    assert it.n_iterations < 20
    # damping (diagonal × 1.0007) shortens every step: slower, but still downhill throughout
    damped = ExponentialFit(x0=(-3.9, -5.1, 3.9, -3.9))
    it = normal_eqns_solving.naive_iterations_with_damping(damped, n_max_iterations=30)
    history = np.asarray(it.objective_history)
    assert it.n_iterations == 30 and np.all(np.diff(history) < 0)
    assert np.abs(np.asarray(damped.x) - ExponentialFit.arg_min).max() < 0.15


def test_one_shot_form_is_one_damped_gauss_newton_step():
    rng = np.random.default_rng(11)
    jacobian = rng.normal(size=(30, 3))
    residuals = rng.normal(size=30)
    lm = normal_eqns_solving.levenberg_marquardt_iterations(
        residuals=flex.double(residuals), jacobian=flex.double(jacobian), step_threshold=1e-6,
        gradient_threshold=1e-6)
    with pytest.raises(RuntimeError, match="build_and_solve"):
        lm.solution()
    lm.build_and_solve()
    normal = jacobian.T @ jacobian
    mu = 1e-3 * normal.diagonal().max()  # scitbx's initial damping, tau = 1e-3
    expected = np.linalg.solve(normal + mu * np.eye(3), -jacobian.T @ residuals)
    np.testing.assert_allclose(lm.solution(), expected, rtol=1e-12)
    assert isinstance(lm.solution(), flex.double)
    assert lm.mu == pytest.approx(mu) and lm.n_iterations == 1 and not lm.step_too_small


def test_one_shot_form_damping_makes_an_undetermined_direction_harmless():
    # two columns always equal: the sum is determined, the difference is not
    jacobian = np.tile(np.arange(1.0, 6.0)[:, None], (1, 2))
    lm = normal_eqns_solving.levenberg_marquardt_iterations(
        residuals=np.arange(5.0), jacobian=sp.csr_matrix(jacobian))
    lm.build_and_solve()
    step = np.asarray(lm.solution())
    assert np.all(np.isfinite(step)) and step[0] == pytest.approx(step[1])
    plain = normal_eqns.linear_ls(2)
    plain.add_equations(-np.arange(5.0), jacobian)
    with pytest.raises(NormalEquationsError, match="parameter 1"):
        plain.solve()


def test_one_shot_form_returns_a_zero_step_once_the_gradient_has_converged():
    lm = normal_eqns_solving.levenberg_marquardt_iterations(
        residuals=[0.0, 0.0], jacobian=np.eye(2), gradient_threshold=1e-6,
        step_threshold=1e-6)
    lm.build_and_solve()
    np.testing.assert_array_equal(lm.solution(), [0.0, 0.0])
    assert lm.step_too_small
