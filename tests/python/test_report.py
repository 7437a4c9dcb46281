"""The HTML report: statistics layouts, plot content, and the page in a real browser."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xtalscale.experiments import ExperimentList
from xtalscale.merge import merge_observations, observations_from_mtz
from xtalscale.report import (
    plots,
    render_html_report,
    statistics_as_dict,
    write_html_report,
)
from xtalscale.report.browser import find_chromium, render_in_browser, screenshot
from xtalscale.report.terminal import aligned_table

DATA = Path(__file__).resolve().parents[1] / "data"
INSULIN = DATA / "mtz_insulin_dials_aimless" / "insulin_dials_scaled_unmerged.mtz.gz"
CYS = DATA / "dials_l_cysteine_4_sweeps_scaled"

needs_chromium = pytest.mark.skipif(find_chromium() is None,
                                    reason="chromium is not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def insulin():
    from xtalscale import merging_statistics as ms

    obs = observations_from_mtz(INSULIN)
    sigma = np.sqrt(obs.variance)
    stats = ms.dataset_statistics.from_arrays(obs.miller_index, obs.intensity, sigma,
                                              obs.space_group, obs.unit_cell)
    batches = ms.batch_statistics(obs.miller_index, obs.intensity, sigma, obs.batch,
                                  obs.space_group, dataset=obs.dataset)
    deviations = ms.normalised_deviations(obs.miller_index, obs.intensity, sigma,
                                          obs.space_group)
    return {"statistics": stats, "merged": merge_observations(obs),
            "batch_statistics": {"insulin": {"batch": batches.batch, "r_merge": batches.r_merge,
                                             "i_over_sigma": batches.i_over_sigma_mean}},
            "normalised_deviations": deviations}


def test_statistics_layouts_agree(insulin):
    stats = insulin["statistics"]
    from_object = statistics_as_dict(stats)
    from_iotbx_dict = statistics_as_dict(stats.as_dict())
    assert len(from_object["bins"]) == len(from_iotbx_dict["bins"]) == 20
    for a, b in zip(from_object["bins"], from_iotbx_dict["bins"]):
        for key in ("d_min", "n_obs", "completeness", "cc_one_half", "mean_redundancy"):
            assert a[key] == pytest.approx(b[key])
    assert from_object["overall"]["completeness"] == pytest.approx(94.3, abs=0.05)
    assert statistics_as_dict(from_object) == from_object
    assert statistics_as_dict(None) is None
    with pytest.raises(TypeError, match="dataset_statistics"):
        statistics_as_dict(3.0)


def test_table_in_the_report_shows_the_statistics(insulin):
    page = render_html_report(statistics=insulin["statistics"])
    assert page.count("<tr>") >= 21 and "45595" in page and "9831" in page
    assert "0.9992" in page  # overall CC½ to 4 decimals
    assert page.count("function(") > 100  # plotly embedded
    assert page.count("plotly.js v") <= 2  # ... once (its banner)
    assert "http://" not in page.split("<script>")[0]  # no external resources in the head


def test_wilson_plot_recovers_a_known_b_factor():
    rng = np.random.default_rng(7)
    s = rng.uniform(0.01, 0.35, 20000)  # 1/d² up to d = 1.7 Å
    b_true = 24.0
    intensity = rng.exponential(1000.0 * np.exp(-b_true * s / 2.0))
    fig = plots.wilson_plot(s, intensity)
    slope_trace = fig["data"][1]
    b_fit = float(slope_trace["name"].split("B = ")[1].split(" ")[0])
    assert b_fit == pytest.approx(b_true, rel=0.05)


def test_cumulative_intensity_matches_wilson_statistics():
    rng = np.random.default_rng(8)
    n = 40000
    s = rng.uniform(0.01, 0.3, n)
    centric = rng.uniform(size=n) < 0.2
    mean = 500.0 * np.exp(-10 * s)
    acentric_i = rng.exponential(mean)
    centric_i = mean * rng.standard_normal(n) ** 2  # centric: ⟨I⟩ χ²₁
    intensity = np.where(centric, centric_i, acentric_i)
    fig = plots.cumulative_intensity_distribution(s, intensity, centric)
    names = [t["name"] for t in fig["data"]]
    acentric = fig["data"][names.index("acentric (observed)")]
    theory = fig["data"][names.index("acentric theory")]
    np.testing.assert_allclose(acentric["y"], theory["y"], atol=0.03)
    observed_c = fig["data"][names.index("centric (observed)")]
    theory_c = fig["data"][names.index("centric theory")]
    # shells normalise by the mean of all reflections (80 % acentric), hence the looser bound
    np.testing.assert_allclose(observed_c["y"], theory_c["y"], atol=0.06)


def test_normal_probability_plot_of_normal_deviates_is_the_identity():
    fig = plots.normal_probability_plot(np.random.default_rng(2).standard_normal(4000))
    x, y = np.array(fig["data"][0]["x"]), np.array(fig["data"][0]["y"])
    inner = np.abs(x) < 2
    np.testing.assert_allclose(y[inner], x[inner], atol=0.12)
    assert plots.normal_probability_plot([np.nan, 1.0]) is None
    assert len(plots.normal_probability_plot(np.arange(9000.0))["data"][0]["x"]) == 5000


def test_plots_say_nothing_when_there_is_nothing():
    assert plots.resolution_plots([]) == {}
    assert plots.batch_plots({}) == {}
    assert plots.wilson_plot([0.1] * 5, [1.0] * 5) is None
    assert plots.cumulative_intensity_distribution([0.1], [1.0], [False]) is None
    page = render_html_report()
    assert "No merging statistics were given." in page
    assert "No merged intensities were given." in page
    assert 'data-expected="0"' in page


def test_scaling_model_curves_are_the_model():
    from xtalscale.report.model_curves import model_component_curves

    experiments = ExperimentList.from_file(str(CYS / "scaled_30.expt"))
    curves = model_component_curves(experiments[0], n_points=50)
    phi, scale = curves["scale"]
    assert phi[0] == pytest.approx(-145.0) and phi[-1] == pytest.approx(25.0)
    assert 0.6 < scale.min() < scale.max() < 1.4
    _, b = curves["decay"]
    assert np.all(np.abs(b) < 1.0)  # the relative B of this sweep is small (Å²)
    theta, azimuth, surface = curves["absorption"]
    assert surface.shape == (len(theta), len(azimuth))
    assert np.all(np.abs(surface - 1.0) < 0.05)
    # An experiment without a model gives no curves
    bare = ExperimentList.from_file(str(DATA / "dials_l_cysteine_narrow_wedge" /
                                        "11_integrated.expt"))
    assert model_component_curves(bare[0]) is None


def test_aligned_table_aligns():
    text = aligned_table(["name", "n"], [("a", 1), ("long name", 12345)], [("total", 12346)])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert lines[-1].endswith("12346") and lines[2].startswith("a ")


@needs_chromium
def test_full_report_renders_every_plot_in_chromium(tmp_path, insulin):
    experiments = ExperimentList.from_file(str(CYS / "scaled_30.expt"))
    path = write_html_report(tmp_path / "report.html", experiments=experiments,
                             summary=[("Input", "insulin + l-cysteine model")], **insulin)
    result = render_in_browser(path)
    assert result.ok, result
    # 4 resolution + 2 batch + 3 model + 1 normal probability + 2 intensity plots
    assert result.expected == result.rendered == 12


@needs_chromium
def test_the_browser_check_catches_a_javascript_error(tmp_path, insulin):
    page = render_html_report(statistics=insulin["statistics"])
    broken = page.replace("Plotly.newPlot(id, fig.data", "Plotly.newPlot(id, fig.missing.data")
    path = tmp_path / "broken.html"
    path.write_text(broken, encoding="utf-8")
    result = render_in_browser(path)
    assert not result.ok
    assert result.status == "pending" or result.errors


@needs_chromium
def test_screenshot_is_written(tmp_path, insulin):
    path = write_html_report(tmp_path / "r.html", statistics=insulin["statistics"])
    png = screenshot(path, tmp_path / "r.png", height=1200)
    data = Path(png).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20000


def test_batch_groups_cap_the_points_per_dataset():
    from xtalscale.report.inputs import _batch_groups

    batch = np.concatenate([np.arange(1, 1701), np.arange(1, 51)])
    dataset = np.concatenate([np.zeros(1700, int), np.ones(50, int)])
    grouped = _batch_groups(batch, dataset, 100)
    assert len(np.unique(grouped[dataset == 0])) == 100  # groups of 17 images
    assert grouped[16] == 1 and grouped[17] == 18
    np.testing.assert_array_equal(grouped[dataset == 1], np.arange(1, 51))  # kept as they are


def test_plotly_js_read_without_importing_plotly_is_plotlys_own_text():
    import subprocess
    import sys

    code = ("import sys; from xtalscale.report.html import _plotly_js; text = _plotly_js(); "
            "print('plotly' in sys.modules); import plotly.offline; "
            "print(text == plotly.offline.get_plotlyjs())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]
