"""The known-truth simulator writes DIALS-format files whose truth is self-consistent."""
from __future__ import annotations

import json

import numpy as np
import pytest

from xtalscale.experiments import ExperimentList
from xtalscale.job.simulate import SimulationOptions, simulate, write_simulation
from xtalscale.models import inverse_scale_factors
from xtalscale.reflection_table import Flags, reflection_table


@pytest.fixture(scope="module")
def sim():
    return simulate(n_sweeps=2, seed=3, n_images=600)


def test_rows_columns_and_ids(sim):
    t = sim.reflections
    n = len(t)
    assert n > 2000
    ids = np.asarray(t["id"])
    assert set(np.unique(ids)) == {0, 1}
    for name in ("miller_index", "intensity.sum.value", "intensity.prf.variance", "d", "s1",
                 "xyzobs.px.value", "lp", "qe", "partiality", "flags"):
        assert name in t
    assert np.all(np.asarray(t["d"]) >= sim.options.d_min - 1e-9)
    assert np.all(t.get_flags(Flags.integrated_prf))
    z = np.asarray(t["xyzobs.px.value"])[:, 2]
    assert z.min() >= 0 and z.max() <= 600
    assert t.experiment_identifiers()[1] == "simulated-sweep-1"


def test_truth_is_the_stored_physical_model(sim, tmp_path):
    paths = write_simulation(sim, tmp_path)
    expts = ExperimentList.from_file(str(paths["expt"]))
    table = reflection_table.from_file(str(paths["refl"]))
    assert len(table) == len(sim.reflections)
    models = json.loads(paths["models"].read_text())
    for e, m in zip(expts, models):
        assert e.scaling_model is None
        e.scaling_model = m
    g = inverse_scale_factors(expts, table)
    np.testing.assert_allclose(g, np.load(paths["truth"])["g_true"], rtol=1e-12)
    # the truth varies (scale, B and absorption all contribute)
    assert 0.05 < np.std(np.log(g)) < 0.5


def test_noise_and_outliers(sim):
    t = sim.reflections
    lp = np.asarray(t["lp"])
    I = np.asarray(t["intensity.prf.value"]) * lp
    expected = sim.g_true * sim.intensity_true
    # the true error model: sigma'^2 = sigma^2 + (b I)^2 with b = fractional_error
    var = np.asarray(t["intensity.prf.variance"]) * lp**2 + (0.02 * expected) ** 2
    z = (I - expected) / np.sqrt(var)
    clean = ~sim.outlier_true
    assert 0.9 < np.std(z[clean]) < 1.1
    assert np.all(z[sim.outlier_true] > 15)
    frac = sim.outlier_true.mean()
    assert 0.002 < frac < 0.004


def test_outliers_are_gross_against_the_true_noise_of_strong_reflections():
    """An injected outlier lies 20-60 standard deviations of its true noise (counting and the
    fractional error) away, also for strong reflections, where the fractional error dominates:
    raised by 20-60 counting σ only, one of 10⁵ counts would sit ~5 true σ away, which no
    rule that keeps clean observations can flag."""
    sim = simulate(n_sweeps=1, seed=4, n_images=1800, mean_intensity=2.0e6)
    t = sim.reflections
    lp = np.asarray(t["lp"])
    counts = sim.g_true * sim.intensity_true / lp
    raw = np.asarray(t["intensity.prf.value"])
    true_sigma = np.sqrt(counts + 1.25 * 30.0 + (0.02 * counts) ** 2)
    out = sim.outlier_true
    assert np.count_nonzero(out & (0.02 * counts > 3 * np.sqrt(counts))) >= 8  # strong ones among them
    # 20 σ raised, less at most ~6 σ of the observation's own noise
    assert np.all((raw - counts)[out] > 14 * true_sigma[out])


def test_deterministic_and_validated():
    a = simulate(seed=5, n_images=200)
    b = simulate(SimulationOptions(seed=5, n_images=200))
    np.testing.assert_array_equal(np.asarray(a.reflections["intensity.sum.value"]),
                                  np.asarray(b.reflections["intensity.sum.value"]))
    with pytest.raises(ValueError, match="d_min"):
        simulate(d_min=-1)
    with pytest.raises(ValueError, match="n_sweeps"):
        simulate(n_sweeps=0)
