"""The basic error model's stored form: DIALS's dicts in, the same numbers out."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from xtalscale.error_model import BasicErrorModel, ErrorModelError
from xtalscale.experiments import ExperimentList
from xtalscale.models import model_from_dict

QUARTZ = Path(__file__).resolve().parents[1] / "data" / "dials_quartz_3ded" / "scaled.expt"


def test_load_error_model_from_the_shipped_quartz_experiment():
    """DIALS stored a refined basic error model in the quartz .expt; load_error_model reads it."""
    (expt,) = ExperimentList.from_file(QUARTZ)
    stored = expt.scaling_model["configuration_parameters"]["error_model_parameters"]
    model = model_from_dict(expt.scaling_model)
    model.load_error_model(SimpleNamespace(reset_error_model=False,
                                           basic=SimpleNamespace(a=None, b=None)))
    assert isinstance(model.error_model, BasicErrorModel)
    assert model.error_model.parameters == stored
    assert model.error_model.a == pytest.approx(2.6806589628976236, rel=1e-15)
    again = BasicErrorModel.from_dict(model.configdict)
    assert again.parameters == stored
    assert BasicErrorModel.from_dict(again.to_dict()).parameters == stored


def test_error_model_rules_and_bad_input():
    em = BasicErrorModel(2.0, 0.1)
    assert em.update_variances([1.0, 4.0], [10.0, 0.0]).tolist() == [4.0 * (1.0 + 1.0), 16.0]
    assert BasicErrorModel().parameters == [1.0, 0.02]
    assert BasicErrorModel(basic_params=SimpleNamespace(a=3.0, b=None)).parameters == [3.0, 0.02]
    with pytest.raises(ErrorModelError, match="a must be finite"):
        BasicErrorModel(float("nan"))
    with pytest.raises(ErrorModelError, match="error_model_type"):
        BasicErrorModel.from_dict({"error_model_type": "Other", "error_model_parameters": [1, 2]})
    with pytest.raises(ErrorModelError, match="2 parameters"):
        BasicErrorModel.from_dict({"__id__": "basic", "parameters": [1.0]})
    with pytest.raises(ErrorModelError, match="needs"):
        BasicErrorModel.from_dict({})
    with pytest.raises(ErrorModelError, match="same shape"):
        em.update_variances([1.0], [1.0, 2.0])


def test_normal_quantile_and_erf_kernels_match_scipy():
    """The error model's and report's normal quantile (C++, no scipy import) is scipy's ndtri
    to a few ulp across (0, 1), including far tails and the centre; erf is the C library's."""
    import math

    import numpy as np
    from scipy.special import ndtri

    from xtalscale._core.stats import erf, normal_cdf, normal_quantile

    p = np.concatenate([np.logspace(-300, -1, 600), np.linspace(0.01, 0.99, 2001),
                        1.0 - np.logspace(-16, -1, 200), [0.5, 0.5 + 1e-12, 0.5 - 1e-14]])
    expected = ndtri(p)
    got = normal_quantile(p)
    assert np.all(np.abs(got - expected) <= 8 * np.spacing(np.abs(expected)))
    assert list(normal_quantile(np.array([0.0, 1.0]))) == [-np.inf, np.inf]
    assert np.isnan(normal_quantile(np.array([-0.1, 1.1, np.nan]))).all()
    x = np.linspace(-8, 8, 1001)
    assert list(erf(x)) == [math.erf(v) for v in x]
    np.testing.assert_allclose(normal_cdf(normal_quantile(p[600:2600])), p[600:2600], rtol=1e-14)


def test_student_t_quantile_matches_scipy():
    """CC½ significance's t quantile (C++, no scipy import) against scipy's stdtrit, and the
    exact near-centre value where stdtrit itself loses digits."""
    import math

    from scipy.special import stdtrit

    from xtalscale._core.stats import student_t_quantile

    for df in [*range(1, 120), 150, 300, 1000, 5000, 100000, 2.5]:
        for p in (0.55, 0.75, 0.9, 0.95, 0.99, 0.999, 0.9999, 1 - 1e-8, 0.3, 0.01):
            assert student_t_quantile(float(df), p) == pytest.approx(stdtrit(df, p), rel=1e-11)
    # near p = ½: t ≈ (p − ½)/f(0), f(0) = Γ(5/2)/(√(4π)Γ(2)) = 0.375 for 4 degrees of freedom
    p = 0.5 + 1e-6
    assert student_t_quantile(4.0, p) == pytest.approx((p - 0.5) / 0.375, rel=1e-9)
    assert student_t_quantile(5.0, 0.5) == 0.0
    assert student_t_quantile(5.0, 1.0) == math.inf and student_t_quantile(5.0, 0.0) == -math.inf
    assert math.isnan(student_t_quantile(0.0, 0.9)) and math.isnan(student_t_quantile(3.0, 1.2))
