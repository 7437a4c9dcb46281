"""CsrView (CSR arrays without scipy) answers as the scipy matrix it stands for; the lazy
scipy helpers import nothing until used."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp

from xtalscale.csr_view import CsrView
from xtalscale.sparse import SparseMatrix


def _pair(rng: np.random.Generator):
    dense = rng.standard_normal((7, 5)) * (rng.random((7, 5)) < 0.4)
    m = sp.csr_matrix(dense)
    return CsrView(m.data, m.indices, m.indptr, m.shape), m, dense


def test_csr_view_answers_as_the_scipy_matrix():
    rng = np.random.default_rng(3)
    view, m, dense = _pair(rng)
    x = rng.standard_normal(5)
    y = rng.standard_normal(7)
    assert view.shape == (7, 5) and view.nnz == m.nnz and view.format == "csr"
    np.testing.assert_array_equal(view @ x, m @ x)
    np.testing.assert_array_equal(y @ view, y @ m)
    np.testing.assert_array_equal(view.toarray(), dense)
    np.testing.assert_array_equal((view.T @ y), m.T @ y)
    np.testing.assert_array_equal((-view).toarray(), -dense)
    np.testing.assert_array_equal((view * 2.0).toarray(), 2.0 * dense)
    scipy_view = view.as_scipy()
    assert isinstance(scipy_view, SparseMatrix) and scipy_view is view.as_scipy()  # built once
    assert np.shares_memory(scipy_view.data, view.data)  # no copy
    assert scipy_view.n_rows == 7  # scitbx's accessors of SparseMatrix
    with pytest.raises(AttributeError):
        view.__array_interface__  # noqa: B018  (dunder lookups are not forwarded)


def test_restraint_identity_is_a_csr_view_used_as_scipy():
    from xtalscale.components import SHScaleComponent

    comp = SHScaleComponent(np.array([0.1, -0.2, 0.3]))
    comp.parameter_restraints = np.array([1.0, 2.0, 3.0])
    r, jac, w = comp.calculate_jacobian_restraints()
    assert isinstance(jac, CsrView)
    np.testing.assert_array_equal(jac.toarray(), np.eye(3))
    np.testing.assert_array_equal(r, [0.1, -0.2, 0.3])


def test_lazy_scipy_helpers_import_nothing_until_used():
    code = ("import sys\n"
            "from xtalscale._lazy import LazyModule, is_scipy_sparse\n"
            "sp = LazyModule('scipy.sparse')\n"
            "assert not is_scipy_sparse([[1.0]]) and 'scipy.sparse' not in sys.modules\n"
            "m = sp.identity(2, format='csr')\n"
            "assert 'scipy.sparse' in sys.modules and is_scipy_sparse(m)\n"
            "assert sp.csr_matrix is sys.modules['scipy.sparse'].csr_matrix\n")
    subprocess.run([sys.executable, "-c", code], check=True)
