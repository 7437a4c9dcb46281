"""Input preparation, the basic error model and intensity combination (spec §8.2, §8.5, §8.6, §9.7, §9.9)."""
from __future__ import annotations

import numpy as np
import pytest

from xtalscale import flex_arrays as fa
from xtalscale.job.combine_intensities import (
    calculate_combined_raw_intensities,
    candidate_Imids,
    combine_intensities,
)
from xtalscale.job.error_model import (
    BasicErrorModel,
    ErrorModelRefinementError,
    run_error_model_refinement,
)
from xtalscale.job.grouped import GroupedObservations
from xtalscale.job.prepare import (
    Reasons,
    calculate_prescaling_correction,
    choose_initial_scaling_intensities,
    filter_bad_reflections,
    parse_exclude_images,
)
from xtalscale.reflection_table import Flags, reflection_table
from xtalscale.symmetry import SpaceGroup


def test_prescaling_correction_spec_numbers():
    for qe_name in ("qe", "dqe"):
        t = reflection_table(3)
        t["lp"] = fa.double(np.array([1.0, 0.9, 0.8]))
        t[qe_name] = fa.double(np.array([0.6, 0.5, 0.4]))
        calculate_prescaling_correction(t)
        np.testing.assert_allclose(np.asarray(t["prescaling_correction"]), [1 / 0.6, 0.9 / 0.5, 0.8 / 0.4])


def _integrated(n=6):
    t = reflection_table(n)
    t["intensity.prf.value"] = fa.double(np.array([100.0, 50, -30, 10, 20, 40])[:n])
    t["intensity.prf.variance"] = fa.double(np.array([100.0, 50, 4, 10, 0, 40])[:n])
    t["intensity.sum.value"] = fa.double(np.array([110.0, 55, 10, 12, 21, 44])[:n])
    t["intensity.sum.variance"] = fa.double(np.array([110.0, 55, 10, 12, 21, 44])[:n])
    t["partiality"] = fa.double(np.array([1.0, 0.3, 1, 1, 1, 0.5])[:n])
    t["lp"] = fa.double(np.full(n, 0.5))
    t["qe"] = fa.double(np.full(n, 1.0))
    t["id"] = fa.int(np.zeros(n, np.int32))
    t["miller_index"] = fa.miller_index(np.array([[1, 0, 0]] * n, np.int32))
    t["flags"] = fa.size_t(np.full(n, int(Flags.integrated), np.uint64))
    return t


def test_filter_and_intensity_choice():
    t = filter_bad_reflections(_integrated(), 0.4, -5.0, "profile", Reasons())
    bad = np.asarray(t.get_flags(Flags.excluded_for_scaling))
    # row 1: partiality 0.3; row 2: I/sigma = -15; row 4: profile variance 0
    assert list(bad) == [False, True, True, False, True, False]
    t = choose_initial_scaling_intensities(_integrated(), "sum")
    np.testing.assert_allclose(np.asarray(t["intensity"]), np.array([110, 55, 10, 12, 21, 44]) * 0.5
                               / np.array([1, 0.3, 1, 1, 1, 0.5]))
    t = choose_initial_scaling_intensities(_integrated(), "profile")
    assert np.asarray(t.get_flags(Flags.excluded_for_scaling))[4]   # variance 0
    t = _integrated()
    del t["intensity.sum.value"]
    with pytest.raises(KeyError, match="intensity.sum.value"):
        filter_bad_reflections(t, intensity_choice="sum")


def test_exclude_images_parsing():
    assert parse_exclude_images([["0:1:100"], ["1:5:10"]], 2) == [(0, 1, 100), (1, 5, 10)]
    assert parse_exclude_images(["1:100"], 1) == [(0, 1, 100)]
    with pytest.raises(ValueError, match="experiment index"):
        parse_exclude_images(["1:100"], 2)
    with pytest.raises(ValueError, match="does not exist"):
        parse_exclude_images(["3:1:100"], 2)
    with pytest.raises(ValueError, match="start:end"):
        parse_exclude_images(["a:b"], 1)


def _simulated_groups(a_true, b_true, seed=0, n_groups=800, mult=100):
    """Groups of equivalent observations with a known error model (g = 1).

    Multiplicity 100 as in DIALS's test: δ carries sqrt((n-1)/n) on top of the (1 - 1/n)
    variance of I - Ĩ (DIALS's definition), which biases a low by ~1/n.
    """
    rng = np.random.default_rng(seed)
    I_true = 10.0 ** rng.uniform(1.5, 4.5, n_groups)  # weak to strong, as DIALS's I = 5d⁴ spread
    I = np.repeat(I_true, mult)
    var = I + 10.0                       # the integration program's variance
    sigma_true = a_true * np.sqrt(var + (b_true * I) ** 2)
    obs = I + rng.normal(size=I.size) * sigma_true
    hkl = np.column_stack([np.repeat(np.arange(1, n_groups + 1), mult), np.zeros(I.size), np.zeros(I.size)])
    cols = {"intensity": obs, "variance": var, "inverse_scale_factor": np.ones(I.size),
            "miller_index": hkl.astype(np.int32), "partiality": np.ones(I.size)}
    return GroupedObservations.from_tables([cols], SpaceGroup("P 1"), anomalous=True,
                                           selections=[np.ones(I.size, bool)], extra_columns=("partiality",))


@pytest.mark.parametrize("a_true, b_true", [(1.0, 0.0), (1.0, 0.02), (1.0, 0.04), (1.4, 0.0)])
def test_error_model_recovers_known_parameters(a_true, b_true):
    """DIALS's test: (a, b) within (±0.05, ±0.005) of the truth."""
    model = run_error_model_refinement(BasicErrorModel(), _simulated_groups(a_true, b_true))
    assert abs(model.a - a_true) < 0.05
    assert abs(model.b - b_true) < 0.005


def test_error_model_sample_is_whole_groups_of_about_the_cap_and_seeded():
    """Above ``max_observations`` the error model is refined on random whole groups holding
    about that many of the rows asked for (seeded); at or below it, on the rows as given.
    On 80,000 rows of a known model, a 20,000-row sample still recovers (a, b)."""
    from xtalscale.job.error_model import _capped_rows

    grouped = _simulated_groups(1.2, 0.03, n_groups=800, mult=100)
    rows = np.ones(grouped.size, bool)
    rows[::7] = False  # outliers or other models' rows: never taken into the sample
    group = grouped.group_of_row()

    def capped(cap, seed):
        return _capped_rows(group, grouped.n_groups, rows, cap, seed)

    assert capped(0, 1) is rows
    assert capped(int(rows.sum()), 1) is rows
    sample = capped(20000, 1)
    assert not np.any(sample & ~rows)
    assert abs(int(sample.sum()) - 20000) < 300  # whole groups of ~86 rows
    taken = np.unique(group[sample])
    np.testing.assert_array_equal(sample, rows & np.isin(group, taken))  # whole groups
    np.testing.assert_array_equal(sample, capped(20000, 1))
    assert np.any(sample != capped(20000, 2))
    model = run_error_model_refinement(BasicErrorModel(), grouped, rows=sample)
    assert abs(model.a - 1.2) < 0.05 and abs(model.b - 0.03) < 0.005


def test_error_model_regression_fixed_values_and_too_few_rows():
    model = run_error_model_refinement(BasicErrorModel(), _simulated_groups(1.2, 0.03, seed=1),
                                       minimisation="regression")
    assert abs(model.a - 1.2) < 0.1 and abs(model.b - 0.03) < 0.01
    from types import SimpleNamespace

    fixed = BasicErrorModel(basic_params=SimpleNamespace(a=1.1, b=None))
    run_error_model_refinement(fixed, _simulated_groups(1.1, 0.02, seed=2))
    assert fixed.a == 1.1 and abs(fixed.b - 0.02) < 0.005
    with pytest.raises(ErrorModelRefinementError, match="at least 250"):
        run_error_model_refinement(BasicErrorModel(), _simulated_groups(1.0, 0.0, n_groups=20, mult=5))
    em = BasicErrorModel(1.5, -0.1)
    assert em.parameters == [1.5, 0.1]
    np.testing.assert_allclose(em.update_variances(np.array([4.0]), np.array([10.0])), [1.5 ** 2 * (4 + 1)])


def test_combination_formula_and_candidates():
    Iprf, Isum = np.array([100.0, 1000.0, -5.0]), np.array([110.0, 900.0, -2.0])
    V = np.ones(3)
    I, _ = calculate_combined_raw_intensities(Iprf, Isum, V, V, 0)
    np.testing.assert_array_equal(I, Iprf)
    I, _ = calculate_combined_raw_intensities(Iprf, Isum, V, V, 1)
    np.testing.assert_array_equal(I, Isum)
    I, _ = calculate_combined_raw_intensities(Iprf, Isum, V, V, 500.0)
    w = 1 / (1 + (np.array([110.0, 900.0]) / 500.0) ** 3)
    np.testing.assert_allclose(I[:2], w * Iprf[:2] + (1 - w) * Isum[:2])
    assert I[2] == Iprf[2]                                   # I_sum <= 0: profile
    c = candidate_Imids(np.array([5.0, 20.0, 100000.0]))
    assert c[:2] == [0.0, 1.0] and c[3] == 10000.0 and c[-1] <= c[2]


def test_combination_prefers_the_less_noisy_estimate():
    rng = np.random.default_rng(4)
    n_groups, mult = 400, 6
    truth = np.repeat(rng.exponential(500.0, n_groups) + 20, mult)
    t = reflection_table(truth.size)
    t["intensity.prf.value"] = fa.double(truth + rng.normal(size=truth.size) * np.sqrt(truth))
    t["intensity.prf.variance"] = fa.double(truth)
    t["intensity.sum.value"] = fa.double(truth + rng.normal(size=truth.size) * 3 * np.sqrt(truth))
    t["intensity.sum.variance"] = fa.double(9 * truth)
    t["inverse_scale_factor"] = fa.double(np.ones(truth.size))
    t["miller_index"] = fa.miller_index(np.column_stack([np.repeat(np.arange(1, n_groups + 1), mult),
                                                         np.zeros((truth.size, 2))]).astype(np.int32))
    best, results = combine_intensities([t], SpaceGroup("P 1"), [np.ones(truth.size, bool)])
    assert best == 0.0 and results[0.0] < results[1.0]


def test_error_model_b_objective_kernel_matches_the_definition():
    """The C++ per-bin pass gives the objective's definition (δ from calc_deltahl, numpy bins)."""
    from xtalscale.job.error_model import (
        ErrorModelBinner,
        ErrorModelData,
        _b_objective,
        _b_objective_at_fixed_a,
    )

    data = ErrorModelData(_simulated_groups(1.2, 0.03, seed=3, n_groups=200, mult=20))
    binner = ErrorModelBinner(data)
    model = BasicErrorModel(1.3, 0.02)
    fast = _b_objective_at_fixed_a(model, data, binner)
    for b in (0.0, 0.01, 0.03, 0.2):
        assert fast(b) == pytest.approx(_b_objective(b, model, data, binner), rel=1e-10)


def test_error_model_kernel_rejects_bad_input():
    from xtalscale._core import job as kernels

    one = np.ones(3)
    with pytest.raises(ValueError, match="bin index"):
        kernels.error_model_bin_moments(one, one, one, np.array([0, 1, 5]), 2, 0.0)
    with pytest.raises(ValueError, match="variance"):
        kernels.error_model_bin_moments(one, np.ones(2), one, np.array([0, 1, 1]), 2, 0.0)
    with pytest.raises(ValueError, match="b_squared"):
        kernels.error_model_bin_moments(one, one, one, np.array([0, 1, 1]), 2, float("nan"))


def test_error_model_stills_filtering():
    """Stills (DIALS): I/σ ≥ min_Isigma and n_h ≥ min_multiplicity; groups of 3 are dropped."""
    from types import SimpleNamespace

    from xtalscale.job.error_model import ErrorModelData

    stills = SimpleNamespace(min_Isigma=2.0, min_multiplicity=4)
    grouped = _simulated_groups(1.0, 0.02, seed=4, n_groups=300, mult=5)
    data = ErrorModelData(grouped, stills=stills)
    assert np.all(data.intensity >= 2.0 * np.sqrt(data.variance)) and np.all(data.n_h >= 4)
    with pytest.raises(ErrorModelRefinementError):
        ErrorModelData(_simulated_groups(1.0, 0.02, seed=4, n_groups=300, mult=3), stills=stills)


def test_error_model_b_search_kernel_is_the_python_search():
    """The one-call C++ search gives the bits of _bounded_brent_minimum on the numpy-form
    objective, in fewer evaluations than a golden-section search (28 at 1e-6), and its b is
    the minimum of a dense scan of the objective to within the tolerance."""
    from xtalscale._core import job as kernels
    from xtalscale.job.error_model import (
        ErrorModelBinner,
        ErrorModelData,
        _b_objective_at_fixed_a,
        _bounded_brent_minimum,
        _fixed_a_arrays,
    )

    for seed, (a, n_bins) in enumerate([(1.3, 10), (0.9, 20), (1.1, 7)]):
        data = ErrorModelData(_simulated_groups(a, 0.03, seed=seed))
        binner = ErrorModelBinner(data, n_bins=n_bins)
        model = BasicErrorModel(a, 0.02)
        objective = _b_objective_at_fixed_a(model, data, binner)
        calls = []

        def counted(b, objective=objective, calls=calls):
            calls.append(b)
            return objective(b)

        expected = _bounded_brent_minimum(counted, 0.0, 0.5, tol=1e-6)
        assert len(calls) < 20
        scan = np.linspace(max(0.0, expected - 2e-4), expected + 2e-4, 401)
        best = scan[int(np.argmin([objective(b) for b in scan]))]
        assert abs(best - expected) <= 2e-6
        K, variance, I_sq, bins, counts, weights = _fixed_a_arrays(model, data, binner)
        assert kernels.error_model_search_b(K, variance, I_sq, bins, counts, weights, 0.0, 0.5, 1e-6) == expected
    with pytest.raises(ValueError, match="counts"):
        kernels.error_model_search_b(K, variance, I_sq, bins, np.zeros(counts.size), weights, 0.0, 0.5, 1e-6)
    with pytest.raises(ValueError, match="n_bins"):
        kernels.error_model_search_b(K, variance, I_sq, bins, counts[:1], weights[:1], 0.0, 0.5, 1e-6)


def test_error_model_kernels_give_the_same_bits_for_any_thread_count():
    """The filter (ranges of 4096 groups) and the b search (parts of 2^16 rows) on threads:
    the same rows, Ĩ, n and b for 1, 2 and 3 threads, on data of several parts."""
    from xtalscale._core import job as kernels
    from xtalscale.job.error_model import ErrorModelBinner, ErrorModelData, _fixed_a_arrays

    grouped = _simulated_groups(1.2, 0.03, seed=11, n_groups=12000, mult=20)  # 240k rows, 3 group ranges
    considered = np.ones(grouped.size, bool)
    considered[::7] = False
    filtered = [kernels.error_model_filter(grouped.order, grouped.offsets, grouped.intensity, grouped.variance,
                                           grouped.scale, considered, 25.0, n_threads=t) for t in (1, 2, 3)]
    for other in filtered[1:]:
        for x, y in zip(filtered[0], other):
            np.testing.assert_array_equal(x, y)
    assert 0 < filtered[0][0].sum() < considered.sum()
    data = ErrorModelData(grouped, n_threads=2)
    binner = ErrorModelBinner(data, n_bins=10)
    K, variance, I_sq, bins, counts, weights = _fixed_a_arrays(BasicErrorModel(1.2, 0.02), data, binner)
    assert K.size > 3 * 2**16
    b = [kernels.error_model_search_b(K, variance, I_sq, bins, counts, weights, 0.0, 0.5, 1e-6, n_threads=t)
         for t in (1, 2, 3)]
    assert b[0] == b[1] == b[2] and abs(b[0] - 0.03) < 0.005
    moments = [kernels.error_model_bin_moments(K, variance, I_sq, bins, counts.size, 0.03**2, n_threads=t)
               for t in (1, 3)]
    np.testing.assert_array_equal(moments[0][0], moments[1][0])
    np.testing.assert_array_equal(moments[0][1], moments[1][1])
    assert run_error_model_refinement(BasicErrorModel(), grouped, n_threads=1).parameters == \
        run_error_model_refinement(BasicErrorModel(), grouped, n_threads=2).parameters


def _reference_bins(E, n_bins, min_per_bin):
    """The binner's definition: runs of a stable descending argsort of E."""
    import math

    n = E.size
    order = np.argsort(-E, kind="stable")
    E_sorted = E[order]
    bounds = np.exp(np.linspace(math.log(max(E_sorted[0], 1.0 + 1e-12)), math.log(max(1.0, E_sorted[-1])),
                                n_bins + 1))
    bounds[0], bounds[-1] = E_sorted[0] + 0.01, E_sorted[-1] - 0.01
    members, start = [], 0
    for k in range(n_bins):
        end = int(np.searchsorted(-E_sorted, -bounds[k + 1], side="left"))
        if end - start < min_per_bin:
            end = min(n, start + min_per_bin)
        if k == n_bins - 1:
            end = n
        if end > start:
            members.append(order[start:end])
        start = end
        if start >= n:
            break
    members = [m for m in members if m.size >= min_per_bin - 5]
    index = np.full(n, -1)
    for k, m in enumerate(members):
        index[m] = k
    return index, np.array([E[m].mean() for m in members])


@pytest.mark.parametrize("n_distinct", [3, 40, 5000])
def test_error_model_binner_matches_a_stable_sort_with_ties(n_distinct):
    """Bins from sorted values alone equal the stable-argsort definition, ties across bin edges
    included (few distinct E values force runs of equal values over the count-based edges)."""
    from types import SimpleNamespace

    from xtalscale.job.error_model import ErrorModelBinner

    rng = np.random.default_rng(n_distinct)
    E = rng.choice(10.0 ** rng.uniform(1.5, 5, n_distinct), size=3000)
    binner = ErrorModelBinner(SimpleNamespace(expected=E), n_bins=10)
    index, weights = _reference_bins(E, 10, binner.min_per_bin)
    np.testing.assert_array_equal(binner.bin_index, index)
    np.testing.assert_array_equal(binner.weights, weights)
    assert [b.size for b in binner.bins] == list(np.bincount(index[index >= 0]))


def _reference_error_model_filter(g, min_Ih):
    """The filter as successive subsets (its numpy definition, DIALS's order of steps)."""
    group = g.group_of_row()
    sizes = g.group_sizes().astype(np.float64)
    mean_isigsq = g.sum_in_groups(g.intensity / g.variance) / np.maximum(sizes, 1)
    g = g.subset(mean_isigsq[group] > 0.85)
    Ih = g.group_means(1.0 / g.variance)[g.group_of_row()]
    g = g.subset((Ih * g.scale > min_Ih) & (g.intensity > 0.001) & (g.group_sizes()[g.group_of_row()] > 1))
    g = g.subset(g.group_sizes()[g.group_of_row()] > 1)
    group = g.group_of_row()
    Ih_group = g.group_means(1.0 / g.variance)
    n = g.group_sizes().astype(np.float64)
    dev2 = g.sum_in_groups((g.intensity / g.scale - Ih_group[group]) ** 2) / (n - 1.0)
    mean_var = g.sum_in_groups(g.variance / g.scale ** 2) / n
    ratio = np.divide(dev2, mean_var, out=np.full_like(dev2, np.inf), where=mean_var > 0)
    return g.subset((ratio < max(50.0, float(Ih_group.max()) / 40.0))[group])


def test_error_model_filter_kernel_is_the_subset_chain():
    """One C++ pass keeps the rows of the step-by-step filter, with their Ĩ and n_h."""
    from xtalscale.job.error_model import ErrorModelData

    g = _simulated_groups(1.2, 0.05, seed=3, n_groups=600, mult=6)
    rng = np.random.default_rng(3)
    g.intensity[rng.integers(0, g.size, 400)] *= rng.uniform(-1, 30, 400)  # fail each step somewhere
    g.scale[:] = rng.uniform(0.5, 2.0, g.size)
    expected = _reference_error_model_filter(g, 25.0)
    keep, Ih, n_h = ErrorModelData._filter_rows(g, 25.0)
    assert 0 < expected.size < g.size
    np.testing.assert_array_equal(g.row[keep], expected.row)
    np.testing.assert_array_equal(Ih[keep], expected.group_means(1.0 / expected.variance)[expected.group_of_row()])
    np.testing.assert_array_equal(n_h[keep], expected.group_sizes()[expected.group_of_row()])


def test_random_groups_among_eligible_groups_equal_the_draw_from_their_subset():
    """select_random_groups(eligible=...) draws the same groups as from the subset of the
    eligible groups' rows (what the job did before: the subset of 10⁶ rows is not made)."""
    from xtalscale.job.reflection_selection import select_random_groups

    grouped = _simulated_groups(1.0, 0.02, seed=5, n_groups=500, mult=3)
    rng = np.random.default_rng(2)
    drop = rng.random(grouped.size) < 0.4  # leaves groups of 0-3 rows
    grouped = grouped.subset(~drop)
    sizes = grouped.group_sizes()
    multi = np.flatnonzero(sizes > 1)
    assert 0 < multi.size < grouped.n_groups
    rows_multi = sizes[grouped.group_of_row()] > 1
    subset = grouped.subset(rows_multi)
    for seed in (0, 7):
        old = np.zeros(grouped.size, bool)
        old[np.flatnonzero(rows_multi)[select_random_groups(subset, 60, seed)]] = True
        new = select_random_groups(grouped, 60, seed, eligible=multi)
        np.testing.assert_array_equal(new, old)


# ----------------------------------------------------------------------------------------
# The former numpy formulation of the input filter and the intensity choice: the one-pass
# C++ kernels must give its flags, reason counts and intensities bit for bit.
def _numpy_has_flag(flags, flag):
    return (flags & np.uint64(int(flag))) != 0


def _column(table, name):
    return np.asarray(table[name], dtype=np.float64)


from xtalscale.job.prepare import _intensity_kinds, flags_of  # noqa: E402 (the oracle's helpers)


def _numpy_filter(reflection_table, partiality_cutoff=0.4, min_isigi=-5.0,
                  intensity_choice="combine", reasons=None):
    """Flag rows unfit for scaling ``excluded_for_scaling`` (DIALS's filter, spec §8.2 step 1).

    A row is unfit when: its ``id`` < 0; it was integrated by none of the chosen methods; a
    chosen method's variance is ≤ 0 where that method's flag is set; ``qe``/``dqe`` ≤ 0;
    partiality < ``partiality_cutoff`` (rows counted as user-excluded in DIALS's cut, flagged
    here as excluded_for_scaling too as its filter does); or I/σ < ``min_isigi`` for a chosen
    method. Existing flags are kept (only added to).
    """
    n = len(reflection_table)
    kinds = _intensity_kinds(reflection_table, intensity_choice)
    flags = flags_of(reflection_table)
    bad = np.zeros(n, dtype=bool)
    reasons = reasons if reasons is not None else Reasons()
    if "id" in reflection_table:
        neg = np.asarray(reflection_table["id"]) < 0
        reasons.add_reason("negative experiment id", int(neg.sum()))
        bad |= neg
    if "miller_index" in reflection_table:
        hkl = np.asarray(reflection_table["miller_index"]).reshape(-1, 3)
        unindexed = (hkl[:, 0] | hkl[:, 1] | hkl[:, 2]) == 0  # (0, 0, 0); 4x faster than ~any(!= 0)
        reasons.add_reason("miller index (0, 0, 0)", int(unindexed.sum()))
        bad |= unindexed
    integrated = np.zeros(n, dtype=bool)
    for k in kinds:
        flag = Flags.integrated_prf if k == "prf" else Flags.integrated_sum
        integrated |= _numpy_has_flag(flags, flag) if "flags" in reflection_table else True
    reasons.add_reason("not integrated by the chosen method(s)", int((~integrated).sum()))
    bad |= ~integrated
    for k in kinds:
        flag = Flags.integrated_prf if k == "prf" else Flags.integrated_sum
        on = _numpy_has_flag(flags, flag) if "flags" in reflection_table else np.ones(n, bool)
        var = _column(reflection_table, f"intensity.{k}.variance")
        I = _column(reflection_table, f"intensity.{k}.value")
        bad_var = on & ~(var > 0)
        reasons.add_reason(f"{k} variance <= 0", int(bad_var.sum()))
        bad |= bad_var
        with np.errstate(divide="ignore", invalid="ignore"):
            low = on & (var > 0) & (I / np.sqrt(np.where(var > 0, var, 1.0)) < float(min_isigi))
        reasons.add_reason(f"{k} I/sigma < {min_isigi}", int(low.sum()))
        bad |= low
        bad |= on & ~np.isfinite(I)
    for name in ("qe", "dqe"):
        if name in reflection_table:
            bad_qe = ~(_column(reflection_table, name) > 0)
            reasons.add_reason(f"{name} <= 0", int(bad_qe.sum()))
            bad |= bad_qe
            break
    if "partiality" in reflection_table:
        low_p = _column(reflection_table, "partiality") < float(partiality_cutoff)
        reasons.add_reason(f"partiality < {partiality_cutoff}", int(low_p.sum()))
        bad |= low_p
    reflection_table.set_flags(bad, Flags.excluded_for_scaling)
    return reflection_table


def _numpy_choose(reflection_table, intensity_choice="profile"):
    """Set ``intensity``/``variance`` (with the prescaling correction) as DIALS does (§8.2 step 4).

    profile: I_prf·c, V_prf·c²; sum and combine: I_sum·c/p, V_sum·(c/p)² (1/p only where p > 0,
    plus (I_sum·c)²·``partiality.inv.variance`` if present), and for combine the profile values
    overwrite where ``integrated_prf`` is set. Rows with variance ≤ 0 are flagged
    ``excluded_for_scaling``.
    """
    kinds = _intensity_kinds(reflection_table, intensity_choice)
    if "prescaling_correction" not in reflection_table:
        calculate_prescaling_correction(reflection_table)
    conv = _column(reflection_table, "prescaling_correction")
    n = len(reflection_table)
    if kinds == ["prf"]:
        I = _column(reflection_table, "intensity.prf.value") * conv
        V = _column(reflection_table, "intensity.prf.variance") * conv ** 2
    else:
        p = _column(reflection_table, "partiality") if "partiality" in reflection_table else np.ones(n)
        inv_p = np.divide(1.0, p, out=np.ones(n), where=p > 0)
        I_sum = _column(reflection_table, "intensity.sum.value") * conv
        I = I_sum * inv_p
        V = _column(reflection_table, "intensity.sum.variance") * (conv * inv_p) ** 2
        if "partiality.inv.variance" in reflection_table:
            V = V + I_sum ** 2 * _column(reflection_table, "partiality.inv.variance")
        if intensity_choice == "combine" and "intensity.prf.value" in reflection_table:
            use_prf = _numpy_has_flag(flags_of(reflection_table), Flags.integrated_prf)
            I = np.where(use_prf, _column(reflection_table, "intensity.prf.value") * conv, I)
            V = np.where(use_prf, _column(reflection_table, "intensity.prf.variance") * conv ** 2, V)
    reflection_table["intensity"] = fa.double(np.where(np.isfinite(I), I, 0.0))
    reflection_table["variance"] = fa.double(np.where(np.isfinite(V), V, 0.0))
    reflection_table.set_flags(~(V > 0), Flags.excluded_for_scaling)
    return reflection_table


def _random_integrated(n, seed, with_columns):
    """A table of awkward rows: NaN and infinite intensities, zero/negative/NaN variances,
    partialities around the cutoff and 0, qe <= 0, negative ids, (0, 0, 0) indices, rows
    integrated by one method, both or neither."""
    rng = np.random.default_rng(seed)
    t = reflection_table(n)

    def awkward(scale, bad_fraction=0.05):
        v = rng.normal(0.0, scale, n)
        pick = rng.random(n)
        v[pick < bad_fraction] = np.nan
        v[(pick >= bad_fraction) & (pick < 2 * bad_fraction)] = np.inf
        v[(pick >= 2 * bad_fraction) & (pick < 3 * bad_fraction)] = 0.0
        return v

    t["intensity.prf.value"] = fa.double(awkward(100.0))
    t["intensity.prf.variance"] = fa.double(np.abs(awkward(50.0)) * rng.choice([1, -1], n, p=[0.9, 0.1]))
    t["intensity.sum.value"] = fa.double(awkward(110.0))
    t["intensity.sum.variance"] = fa.double(np.abs(awkward(60.0)) * rng.choice([1, -1], n, p=[0.9, 0.1]))
    bits = rng.choice([0, int(Flags.integrated_sum), int(Flags.integrated_prf), int(Flags.integrated)], n,
                      p=[0.05, 0.15, 0.15, 0.65]).astype(np.uint64)
    if "flags" in with_columns:
        t["flags"] = fa.size_t(bits | np.uint64(int(Flags.indexed)))
    if "partiality" in with_columns:
        t["partiality"] = fa.double(np.where(rng.random(n) < 0.05, 0.0, rng.uniform(0.2, 1.0, n)))
    if "partiality.inv.variance" in with_columns:
        t["partiality.inv.variance"] = fa.double(rng.uniform(0.0, 0.01, n))
    if "lp" in with_columns:
        t["lp"] = fa.double(rng.uniform(0.3, 1.0, n))
    if "qe" in with_columns:
        t["qe"] = fa.double(np.where(rng.random(n) < 0.03, -1.0, rng.uniform(0.5, 1.0, n)))
    if "id" in with_columns:
        t["id"] = fa.int(np.where(rng.random(n) < 0.02, -1, 0).astype(np.int32))
    if "miller_index" in with_columns:
        t["miller_index"] = fa.miller_index(rng.integers(-3, 4, (n, 3)).astype(np.int32))
    return t


@pytest.mark.parametrize("choice", ["profile", "sum", "combine"])
@pytest.mark.parametrize("columns", [
    ("flags", "partiality", "partiality.inv.variance", "lp", "qe", "id", "miller_index"),
    ("partiality", "lp", "qe"),
    ("flags", "id", "miller_index"),
])
def test_prepare_kernels_equal_the_numpy_formulation(choice, columns):
    """The one-pass filter and intensity choice give the numpy formulation's flags, reason
    counts, intensities and variances bit for bit, on rows built to hit every rule."""
    from xtalscale.job.prepare import calculate_prescaling_correction

    n = 20_000
    for cutoff, min_isigi in ((0.4, -5.0), (0.0, 1.0)):
        ours, ref = _random_integrated(n, 1, columns), _random_integrated(n, 1, columns)
        r_ours, r_ref = Reasons(), Reasons()
        filter_bad_reflections(ours, cutoff, min_isigi, choice, r_ours)
        with np.errstate(all="ignore"):  # (the array formulation warns on inf - inf)
            _numpy_filter(ref, cutoff, min_isigi, choice, r_ref)
        assert r_ours.reasons == r_ref.reasons
        assert sum(r_ours.reasons.values()) > 0
        np.testing.assert_array_equal(np.asarray(ours.get_flags(Flags.excluded_for_scaling)),
                                      np.asarray(ref.get_flags(Flags.excluded_for_scaling)))
        for t in (ours, ref):
            calculate_prescaling_correction(t)
        choose_initial_scaling_intensities(ours, choice)
        with np.errstate(all="ignore"):
            _numpy_choose(ref, choice)
        for name in ("intensity", "variance"):
            np.testing.assert_array_equal(np.asarray(ours[name]), np.asarray(ref[name]), err_msg=name)
        np.testing.assert_array_equal(np.asarray(ours.get_flags(Flags.excluded_for_scaling)),
                                      np.asarray(ref.get_flags(Flags.excluded_for_scaling)))


def test_prepare_kernels_validate_their_columns():
    from xtalscale._core import job as kern

    v = np.ones(5)
    with pytest.raises(ValueError, match="one or two"):
        kern.filter_unfit_rows([], None, None, None, None, None, 0.4, -5.0)
    with pytest.raises(ValueError, match="id must"):
        kern.filter_unfit_rows([(1, v, v)], None, np.zeros(4, np.int32), None, None, None, 0.4, -5.0)
    with pytest.raises(ValueError, match="hkl must"):
        kern.filter_unfit_rows([(1, v, v)], None, None, np.zeros((5, 2), np.int32), None, None, 0.4, -5.0)
    with pytest.raises(ValueError, match="partiality must have 5"):
        kern.filter_unfit_rows([(1, v, v)], None, None, None, None, np.ones(3), 0.4, -5.0)
    with pytest.raises(ValueError, match="kind must"):
        kern.choose_initial_intensities("both", v, v, v, v, v, None, None, None, 0)
    with pytest.raises(ValueError, match="profile needs"):
        kern.choose_initial_intensities("profile", v, None, None, v, v, None, None, None, 0)
    with pytest.raises(ValueError, match="flags must"):
        kern.choose_initial_intensities("sum", v, None, None, v, v, None, None, np.zeros(4, np.uint64), 0)
