"""The basic error model σ'² = a²(σ² + (bI)²) and its refinement as dials.scale does it (§8.6).

:class:`BasicErrorModel` holds (a, b) and applies them; :func:`run_error_model_refinement`
fits them to the normalised deviations of the scaled data:

* data: the valid, non-outlier rows, grouped with Bijvoet mates apart; Ĩ with 1/σ² weights,
  fixed for the whole fit (DIALS quirk §11.8); filtered as DIALS filters (group mean I/σ² >
  0.85, Ĩg > min_Ih, I > 0.001, multiplicity > 1, groups with an internal variance ratio below
  max(50, max Ĩ/40)); at least 250 rows or the model is left unchanged;
* δ = sqrt((n−1)/n)(I/g − Ĩ)/σ', σ' = a·sqrt(σ² + (bI)²)/g;
* ``individual`` minimisation: alternately a from the central part (±1.5) of the normal
  probability plot of δ (least-squares slope, solved exactly rather than by L-BFGS) and b
  from the binned variances of δ (Σ w [(0.5 − v)² + 1/v − 1.25], minimised by a bounded 1-D
  search), until a changes by < 1 %; ``regression``: a linear fit of the group variances
  against σ²/I².

Per-group sums run in C++ (:mod:`xtalscale._core.job`).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._core import job as _kern
from .._rows import take_rows
from ..error_model import BasicErrorModel as StoredBasicErrorModel
from .grouped import GroupedObservations, group_of_rows

__all__ = [
    "BasicErrorModel",
    "ErrorModelBinner",
    "ErrorModelData",
    "ErrorModelRefinementError",
    "calc_deltahl",
    "calc_sigmaprime",
    "extract_error_model_groups",
    "refine_error_models",
    "run_error_model_refinement",
]

logger = logging.getLogger("xtalscale.scale")


class ErrorModelRefinementError(ValueError):
    """Too few suitable reflections (or a failed fit) for the error model."""


class BasicErrorModel(StoredBasicErrorModel):
    """σ'² = a²(σ² + (bI)²) (DIALS ``BasicErrorModel``): the stored form of
    :class:`xtalscale.error_model.BasicErrorModel` plus what its refinement needs (which
    parameters ``basic.a``/``basic.b`` fix, the filtered data and the binner).
    ``parameters`` is ``[a, |b|]``."""

    min_reflections_required = 250

    def __init__(self, a: float | None = None, b: float | None = None, basic_params: Any = None) -> None:
        self._a, self._b = self.default_a, self.default_b
        super().__init__(a, b)
        self.params = basic_params
        self.fixed_a = basic_params is not None and getattr(basic_params, "a", None) is not None
        self.fixed_b = basic_params is not None and getattr(basic_params, "b", None) is not None
        if self.fixed_a:
            self._a = float(basic_params.a)
        if self.fixed_b:
            self._b = float(basic_params.b)
        self.filtered_Ih_table: ErrorModelData | None = None  # noqa: N815 (DIALS name)
        self.binner: ErrorModelBinner | None = None
        self.n_refl = 0

    @property  # type: ignore[override]
    def parameters(self) -> list[float]:
        return [self._a, abs(self._b)]

    @parameters.setter
    def parameters(self, values: Sequence[float]) -> None:
        a, b = (float(v) for v in values)
        if not (math.isfinite(a) and math.isfinite(b)):
            raise ValueError(f"error model parameters must be finite (got {a}, {b})")
        self._a, self._b = a, b

    def __repr__(self) -> str:
        return f"BasicErrorModel(a={self.a:.5f}, b={self.b:.5f})"


def calc_sigmaprime(x: Sequence[float], data: ErrorModelData) -> np.ndarray:
    """σ' in scaled units: a·sqrt(σ² + (bI)²)/g for parameters x = (a, b)."""
    a, b = float(x[0]), float(x[1])
    return a * np.sqrt(data.variance + (b * data.intensity) ** 2) / data.scale


def calc_deltahl(data: ErrorModelData, n_h: np.ndarray, sigmaprime: np.ndarray) -> np.ndarray:
    """δ = sqrt((n−1)/n)(I/g − Ĩ)/σ'."""
    return np.sqrt((n_h - 1.0) / n_h) * (data.intensity / data.scale - data.Ih) / sigmaprime


class ErrorModelData:
    """The filtered rows the error model is fitted to (Ĩ fixed, per-row n_h).

    ``rows`` (a per-row bool array, default all) restricts ``grouped`` without a subset being
    made first: the filter runs on the whole grouping (one C++ pass that also gives each kept
    row's Ĩ and n_h), and only the columns the fit reads are copied; :attr:`grouped`, the
    filtered rows as a :class:`GroupedObservations`, is made when first asked for."""

    def __init__(self, grouped: GroupedObservations, min_Ih: float = 25.0,
                 min_partiality: float = 0.25, stills: Any = None, rows: np.ndarray | None = None,
                 n_threads: int = 1) -> None:
        #: threads of the filter and of the b search's passes (the same results for any count)
        self.n_threads = max(1, int(n_threads))
        considered = np.ones(grouped.size, dtype=bool) if rows is None else np.asarray(rows, dtype=bool)
        if considered.shape != (grouped.size,):
            raise ValueError(f"rows must be a bool array of length {grouped.size}")
        if "partiality" in grouped.extra:
            considered = considered & (grouped.extra["partiality"] > min_partiality)
        self._grouped: GroupedObservations | None = None
        if stills is None:
            keep, Ih, n_h = self._filter_rows(grouped, min_Ih, considered, self.n_threads)
            self._source, self._keep = grouped, keep
            kept = np.flatnonzero(keep)  # one scan of the mask, then a gather per column
            self.intensity, self.variance, self.scale = (grouped.intensity.take(kept), grouped.variance.take(kept),
                                                         grouped.scale.take(kept))
            self.Ih, self.n_h = Ih.take(kept), n_h.take(kept)
            partiality = grouped.extra["partiality"].take(kept) if "partiality" in grouped.extra else None
        else:
            g = self._filter_stills(grouped.subset(considered), min_Ih, float(stills.min_Isigma),
                                    int(stills.min_multiplicity))
            self._grouped = g
            group = g.group_of_row()
            self.intensity, self.variance, self.scale = g.intensity, g.variance, g.scale
            self.Ih = g.group_means(1.0 / g.variance)[group]
            self.n_h = g.group_sizes()[group].astype(np.float64)
            partiality = g.extra.get("partiality")
        if self.intensity.size < BasicErrorModel.min_reflections_required:
            raise ErrorModelRefinementError(
                f"only {self.intensity.size} reflections are suitable for the error model "
                f"(at least {BasicErrorModel.min_reflections_required} are needed)")
        self.expected = self.Ih * self.scale * (partiality if partiality is not None else 1.0)
        self.central_quantiles: np.ndarray | None = None  # cached by the a refinement
        self._scaled_deviation: np.ndarray | None = None

    @property
    def grouped(self) -> GroupedObservations:
        """The filtered rows as grouped observations."""
        if self._grouped is None:
            self._grouped = self._source.subset(self._keep)
        return self._grouped

    @property
    def scaled_deviation(self) -> np.ndarray:
        """sqrt((n−1)/n)(I/g − Ĩ): δ without the σ' it is divided by (made once, a and b vary)."""
        if self._scaled_deviation is None:
            self._scaled_deviation = np.sqrt((self.n_h - 1.0) / self.n_h) * (self.intensity / self.scale - self.Ih)
        return self._scaled_deviation

    @staticmethod
    def _filter_stills(g: GroupedObservations, min_Ih: float, min_Isigma: float,
                       min_multiplicity: int) -> GroupedObservations:
        """Stills (DIALS's stills filtering): I/σ ≥ min_Isigma, Ĩ·g·p > min_Ih, |δ| < 6 with
        a = 1, b = 0, and at least ``min_multiplicity`` observations per group."""
        if g.size == 0:
            return g
        g = g.subset(g.intensity >= min_Isigma * np.sqrt(g.variance))
        if g.size == 0:
            return g
        p = g.extra["partiality"] if "partiality" in g.extra else 1.0
        Ih = g.group_means(1.0 / g.variance)[g.group_of_row()]
        g = g.subset(Ih * g.scale * p > min_Ih)
        if g.size == 0:
            return g
        Ih = g.group_means(1.0 / g.variance)[g.group_of_row()]
        z = (g.intensity / g.scale - Ih) / (np.sqrt(g.variance) / g.scale)
        g = g.subset(np.abs(z) < 6.0)
        if g.size == 0:
            return g
        return g.subset(g.group_sizes()[g.group_of_row()] >= min_multiplicity)

    @staticmethod
    def _filter_rows(g: GroupedObservations, min_Ih: float, rows: np.ndarray | None = None,
                     n_threads: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """DIALS's filter (module docstring) of the ``rows`` of ``g`` (default all) in one C++
        pass over the groups (:func:`xtalscale._core.job.error_model_filter`): the rows kept and,
        for them, Ĩ (weights 1/σ²) and n_h of their group after the filter."""
        from .._core import job as kernels

        considered = np.ones(g.size, dtype=bool) if rows is None else rows
        return kernels.error_model_filter(g.order, g.offsets, g.intensity, g.variance, g.scale,
                                          considered, float(min_Ih), n_threads=n_threads)

    @staticmethod
    def _filter(g: GroupedObservations, min_Ih: float, rows: np.ndarray | None = None) -> GroupedObservations:
        """The rows of ``g`` that :meth:`_filter_rows` keeps."""
        return g.subset(ErrorModelData._filter_rows(g, min_Ih, rows)[0])


class ErrorModelBinner:
    """Bins of the expected intensity E = Ĩg(p), equal in log E, at least ``min_per_bin`` each."""

    def __init__(self, data: ErrorModelData, min_reflections_required: int = 250, n_bins: int = 10) -> None:
        E = data.expected
        n = E.size
        min_refl = int(n / 100) if n > 25000 else min_reflections_required
        self.min_per_bin = max(1, min(min_refl, int(n / (3 * n_bins))))
        # Bins are runs of E in descending order (ties in row order); their bounds need only the
        # sorted values, and the rows of each bin follow from the values (no argsort).
        neg_sorted = np.sort(-E)
        E_sorted = -neg_sorted
        top = math.log(max(E_sorted[0], 1.0 + 1e-12))
        bottom = math.log(max(1.0, E_sorted[-1]))
        bounds = np.exp(np.linspace(top, bottom, n_bins + 1))
        bounds[0] = E_sorted[0] + 0.01
        bounds[-1] = E_sorted[-1] - 0.01
        # walk down from the top: a bin short of min_per_bin takes rows from the next one
        runs, start = [], 0
        for k in range(n_bins):
            lower = bounds[k + 1]
            end = int(np.searchsorted(neg_sorted, -lower, side="left"))
            if end - start < self.min_per_bin:
                end = min(n, start + self.min_per_bin)
            if k == n_bins - 1:
                end = n
            if end > start:
                runs.append((start, end))
            start = end
            if start >= n:
                break
        kept = [(a, b) for a, b in runs if b - a >= self.min_per_bin - 5]
        self.bin_index = self._bin_of_rows(E, neg_sorted, runs, kept)
        self._in_bin = self.bin_index >= 0
        self._counts = np.array([b - a for a, b in kept], dtype=np.float64)
        self.weights = np.array([E_sorted[a:b].mean() for a, b in kept])
        self.bin_variances = np.zeros(len(kept))
        self._fixed_a_rows: tuple | None = None

    @staticmethod
    def _bin_of_rows(E: np.ndarray, neg_sorted: np.ndarray, runs: list, kept: list) -> np.ndarray:
        """Per row, the index among ``kept`` of the run of ranks holding the row (−1: none).

        A row's rank in the stable descending order is the number of larger values plus the
        number of equal values in earlier rows; only values repeated across a run boundary need
        the second part."""
        starts = np.array([a for a, _ in runs[1:]], dtype=np.int64)
        run_of_kept = {run: k for k, run in enumerate(kept)}
        remap = np.array([run_of_kept.get(run, -1) for run in runs], dtype=np.int64)
        # runs whose first value is also the value of the rank before (a tie across a boundary)
        straddling = [b for b in starts if neg_sorted[b - 1] == neg_sorted[b]]
        run = np.searchsorted(neg_sorted[starts], -E, side="right")
        for value in {float(neg_sorted[b]) for b in straddling}:
            rows = np.flatnonzero(-E == value)
            ranks = int(np.searchsorted(neg_sorted, value, side="left")) + np.arange(rows.size)
            run[rows] = np.searchsorted(starts, ranks, side="right")
        return remap[run]

    @property
    def bins(self) -> list[np.ndarray]:
        """Rows of each bin (in row order)."""
        return [np.flatnonzero(self.bin_index == k) for k in range(self._counts.size)]

    @property
    def summation_matrix(self) -> list[np.ndarray]:
        return self.bins

    def calculate_bin_variances(self, delta: np.ndarray) -> np.ndarray:
        """mean(δ²) − mean(δ)² per bin."""
        idx, d = self.bin_index[self._in_bin], delta[self._in_bin]
        n_bins = self._counts.size
        mean = np.bincount(idx, weights=d, minlength=n_bins) / self._counts
        mean_sq = np.bincount(idx, weights=d * d, minlength=n_bins) / self._counts
        self.bin_variances = mean_sq - mean ** 2
        return self.bin_variances


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _refine_a(model: BasicErrorModel, data: ErrorModelData) -> None:
    """a ← a·slope of the central normal probability plot of δ."""
    from .._core import job as kernels
    from .._core.stats import normal_quantile  # scipy's ndtri to a few ulp, no scipy import

    # calc_deltahl (σ' as calc_sigmaprime) in one C++ pass, its σ-independent factor made once
    a, b = model.parameters
    delta = np.sort(kernels.error_model_normalised_deviations(data.scaled_deviation, data.variance,
                                                              data.intensity, data.scale, a, b,
                                                              n_threads=data.n_threads))
    n = delta.size
    lo = int(math.ceil(_normal_cdf(-1.5) * n - 0.5))
    hi = int(math.ceil(_normal_cdf(1.5) * n - 0.5))
    if data.central_quantiles is None:  # depends on n only: once per fit
        x = normal_quantile((np.arange(lo, hi) + 0.5) / n)
        data.central_quantiles = x - x.mean()
    x_centred = data.central_quantiles
    # least-squares slope of y = c0 + c1 x (closed form; what DIALS's LBFGS converges to)
    slope = float(np.dot(x_centred, delta[lo:hi]) / np.dot(x_centred, x_centred))
    model.parameters = [model.a * slope, model.b]


def _b_objective(b: float, model: BasicErrorModel, data: ErrorModelData, binner: ErrorModelBinner) -> float:
    delta = calc_deltahl(data, data.n_h, calc_sigmaprime([model.a, b], data))
    v = binner.calculate_bin_variances(delta)
    v = np.maximum(v, 1e-12)
    w = binner.weights / binner.weights.sum()
    return float(np.sum(w * ((0.5 - v) ** 2 + 1.0 / v - 1.25)))


def _bounded_brent_minimum(f: Any, lo: float, hi: float, tol: float = 1e-7) -> float:
    """Minimiser of a unimodal f on [lo, hi]: Brent's bounded search (golden-section steps,
    parabolic interpolation when it falls inside the bracket) to an absolute tolerance of
    about ``tol``. Smooth objectives take 10-15 evaluations, a golden-section search 28 at 1e-6."""
    golden = 0.5 * (3.0 - math.sqrt(5.0))
    sqrt_eps = math.sqrt(2.220446049250313e-16)
    a, b = lo, hi
    x = w = v = a + golden * (b - a)
    fx = fw = fv = f(x)
    d = e = 0.0
    while True:
        xm = 0.5 * (a + b)
        tol1 = sqrt_eps * abs(x) + tol / 3.0
        tol2 = 2.0 * tol1
        if abs(x - xm) <= tol2 - 0.5 * (b - a):
            return x
        golden_step = True
        if abs(e) > tol1:  # a parabola through x, w, v
            r = (x - w) * (fx - fv)
            q = (x - v) * (fx - fw)
            p = (x - v) * q - (x - w) * r
            q = 2.0 * (q - r)
            if q > 0.0:
                p = -p
            q = abs(q)
            e_before, e = e, d
            if abs(p) < abs(0.5 * q * e_before) and q * (a - x) < p < q * (b - x):
                d = p / q
                if (x + d) - a < tol2 or b - (x + d) < tol2:
                    d = tol1 if xm >= x else -tol1
                golden_step = False
        if golden_step:
            e = a - x if x >= xm else b - x
            d = golden * e
        u = x + (d if abs(d) >= tol1 else (tol1 if d >= 0.0 else -tol1))
        fu = f(u)
        if fu <= fx:
            if u >= x:
                a = x
            else:
                b = x
            v, fv, w, fw, x, fx = w, fw, x, fx, u, fu
        else:
            if u < x:
                a = u
            else:
                b = u
            if fu <= fw or w == x:
                v, fv, w, fw = w, fw, u, fu
            elif fu <= fv or v == x or v == w:
                v, fv = u, fu


def _fixed_a_arrays(model: BasicErrorModel, data: ErrorModelData, binner: ErrorModelBinner) -> tuple:
    """(K, σ², I², bin, counts, normalised weights) of the binned rows at the current a.

    With a fixed, δ = K/sqrt(σ² + b²I²) with K = sqrt((n−1)/n)(I/g − Ĩ)·g/a; everything but
    the final division by a is made once per binner."""
    if binner._fixed_a_rows is None:
        rows = slice(None) if binner._in_bin.all() else binner._in_bin  # usually every row is binned
        n_h, scale, intensity = data.n_h[rows], data.scale[rows], data.intensity[rows]
        binner._fixed_a_rows = (
            np.sqrt((n_h - 1.0) / n_h) * (intensity - data.Ih[rows] * scale),
            np.ascontiguousarray(data.variance[rows]), intensity ** 2,
            np.ascontiguousarray(binner.bin_index[rows]))
    K_times_a, variance, I_sq, bin_of_row = binner._fixed_a_rows
    return K_times_a / model.a, variance, I_sq, bin_of_row, binner._counts, binner.weights / binner.weights.sum()


def _b_objective_at_fixed_a(model: BasicErrorModel, data: ErrorModelData, binner: ErrorModelBinner) -> Any:
    """The b objective as a function of b alone (the same value as :func:`_b_objective`):
    each evaluation is one C++ pass (:func:`xtalscale._core.job.error_model_bin_moments`)
    over the arrays of :func:`_fixed_a_arrays`."""
    from .._core import job as kernels

    K, variance, I_sq, bin_of_row, counts, weights = _fixed_a_arrays(model, data, binner)

    def objective(b: float) -> float:
        sum_delta, sum_delta_sq = kernels.error_model_bin_moments(K, variance, I_sq, bin_of_row, counts.size, b * b)
        mean = sum_delta / counts
        v = np.maximum(sum_delta_sq / counts - mean ** 2, 1e-12)
        return float(np.sum(weights * ((0.5 - v) ** 2 + 1.0 / v - 1.25)))

    return objective


def _refine_b(model: BasicErrorModel, data: ErrorModelData, binner: ErrorModelBinner) -> None:
    """b minimising the binned-variance objective, searched on [0, 0.5] (Brent's bounded
    search to about 1e-6 in b: far below b's uncertainty, 10-15 evaluations). The whole
    search is one C++ call (:func:`xtalscale._core.job.error_model_search_b`), step for step
    :func:`_bounded_brent_minimum` on :func:`_b_objective_at_fixed_a`."""
    from .._core import job as kernels

    K, variance, I_sq, bin_of_row, counts, weights = _fixed_a_arrays(model, data, binner)
    b = kernels.error_model_search_b(K, variance, I_sq, bin_of_row, counts, weights, 0.0, 0.5, 1e-6,
                                     n_threads=data.n_threads)
    model.parameters = [model.a, b]


def _regression(model: BasicErrorModel, data: ErrorModelData) -> None:
    """Fit y = P0 x + P1 with x = σ²/I², y = group sample variance / I²; a = √P0, b = √P1/a."""
    g = data.grouped
    group = g.group_of_row()
    n = g.group_sizes().astype(np.float64)
    scaled = g.intensity / g.scale
    svar = g.sum_in_groups((scaled - data.Ih) ** 2)[group] / (n[group] - 1.0)
    I2 = scaled ** 2
    x = (g.variance / g.scale ** 2) / I2
    y = svar / I2
    if model.fixed_a:
        P0 = model.a ** 2
        P1 = float(np.mean(y - P0 * x))
    elif model.fixed_b:
        P1 = (model.b * model.a) ** 2
        P0 = float(np.dot(x, y - P1) / np.dot(x, x))
    else:
        P0, P1 = np.polyfit(x, y, 1)
    if P0 <= 0 or P1 < 0:
        raise ErrorModelRefinementError(f"the regression gave a non-positive term (P0={P0:.4g}, P1={P1:.4g})")
    a = math.sqrt(P0)
    model.parameters = [a, math.sqrt(P1) / a]


def run_error_model_refinement(model: BasicErrorModel, grouped: GroupedObservations,
                               minimisation: str = "individual", min_Ih: float = 25.0,
                               n_bins: int = 10, min_partiality: float = 0.25,
                               max_cycles: int = 50, stills: Any = None,
                               rows: np.ndarray | None = None, n_threads: int = 1) -> BasicErrorModel:
    """Refine ``model`` on grouped scaled observations (rows as for outlier rejection, but with
    Bijvoet mates apart), or on the ``rows`` of them (a per-row bool array). ``stills`` (the
    ``basic.stills`` scope) selects the stills filtering. ``n_threads``: threads of the filter
    and of the b search (the same (a, b) for any count).
    Raises :class:`ErrorModelRefinementError` when too few rows suit."""
    data = ErrorModelData(grouped, min_Ih=min_Ih, min_partiality=min_partiality, stills=stills, rows=rows,
                          n_threads=n_threads)
    model.filtered_Ih_table = data
    model.n_refl = data.intensity.size
    if minimisation == "regression":
        _regression(model, data)
        return model
    if minimisation in (None, "None"):
        return model
    binner = ErrorModelBinner(data, n_bins=n_bins)
    model.binner = binner
    if model.fixed_a and model.fixed_b:
        return model
    if model.fixed_a:
        _refine_b(model, data, binner)
        return model
    if model.fixed_b:
        _refine_a(model, data)
        return model
    converged = False
    for _ in range(max_cycles):
        a_before = model.a
        _refine_a(model, data)
        _refine_b(model, data, binner)
        if abs(model.a - a_before) / abs(a_before) < 0.01:
            converged = True
            break
    if converged and model.a > 0.4:
        _refine_a(model, data)
    else:
        logger.info("error model: a did not converge to a sensible value; refining b only")
        model.parameters = [BasicErrorModel.default_a, BasicErrorModel.default_b]
        _refine_b(model, data, binner)
    return model


def extract_error_model_groups(params: Any, n_tables: int) -> list[list[int]]:
    """Datasets (0-based) of each error model for ``grouping`` combined/individual/grouped."""
    em = params.weighting.error_model
    if em.grouping == "combined":
        return [list(range(n_tables))]
    if em.grouping == "individual":
        return [[k] for k in range(n_tables)]
    groups, used = [], set()
    for entry in em.error_model_group or []:
        members = [int(k) - 1 for k in entry]
        bad = [k + 1 for k in members if not 0 <= k < n_tables]
        if bad:
            raise ValueError(f"error_model_group names sweeps {bad}; there are {n_tables}")
        groups.append(members)
        used.update(members)
    rest = [k for k in range(n_tables) if k not in used]
    if rest:
        groups.append(rest)
    return groups


#: An error model refined on at least this fraction of the suitable rows reads every row's
#: arrays with its rows as a mask (:func:`_every_suitable_row`); fewer rows (the rounds'
#: subset, a capped sample) are gathered (:func:`_grouped_rows`): the filter then runs on a
#: compact copy instead of visiting every group. Either way gives the same (a, b).
EVERY_ROW_FRACTION = 0.8


def _grouped_rows(scaler: Any, grouping: Any, rows: np.ndarray) -> GroupedObservations:
    """The ``rows`` (a bool array over every dataset's suitable rows, in dataset order) with
    their current I, σ² (no error model), g and partiality, grouped by ``grouping`` (the
    scaler's :meth:`~xtalscale.job.scaler.ScalerBase.suitable_asu_grouping`, made once per
    job). Only those rows are gathered (an error model's: one sweep's, or a sample), and
    their grouping is the cached one without the other rows: no grouping per refinement."""
    datasets = scaler.datasets
    order, offsets = _kern.subset_grouping(grouping.order, grouping.offsets, rows,
                                           n_threads=max(1, int(getattr(scaler, "n_threads", 1))))
    if hasattr(scaler, "suitable_values"):  # from the arrays the scaler keeps: a gather per column
        idx = np.flatnonzero(rows)
        # each row's dataset and its row among that dataset's suitable rows, from the datasets'
        # first positions (no per-row layout of every suitable row)
        starts = scaler._suitable_starts()
        dataset = np.repeat(np.arange(len(datasets), dtype=np.int64), np.diff(np.searchsorted(idx, starts)))
        row = idx - starts.take(dataset)
        V = scaler._gather(scaler.suitable_values("variance"), idx)
        with np.errstate(divide="ignore", invalid="ignore"):
            weight = 1.0 / V
        return GroupedObservations(
            scaler._gather(scaler.suitable_values("intensity"), idx), V, weight,
            scaler.suitable_values_at("inverse_scale_factor", idx), take_rows(grouping.asu_hkl, idx),
            dataset, row, order, offsets, len(datasets), scaler.space_group,
            {"partiality": scaler.suitable_values_at("partiality", idx, 1.0)})
    starts = np.concatenate([[0], np.cumsum([int(ds.suitable.sum()) for ds in datasets])])
    kept = [np.flatnonzero(rows[starts[k]:starts[k + 1]]) for k in range(len(datasets))]

    def gathered(name: str, default: float | None = None) -> np.ndarray:
        return np.concatenate([ds.column(name, r) if default is None or name in ds.table
                               else np.full(r.size, default) for ds, r in zip(datasets, kept)])

    V = gathered("variance")
    with np.errstate(divide="ignore", invalid="ignore"):
        weight = 1.0 / V
    return GroupedObservations(
        gathered("intensity"), V, weight, gathered("inverse_scale_factor"), take_rows(grouping.asu_hkl, rows),
        np.repeat(np.arange(len(datasets), dtype=np.int64), [r.size for r in kept]), np.concatenate(kept),
        order, offsets, len(datasets), scaler.space_group, {"partiality": gathered("partiality", 1.0)})


def _every_suitable_row(scaler: Any, grouping: Any) -> GroupedObservations:
    """Every suitable row of every dataset (dataset order) with its current I, σ² (no error
    model), g and partiality, grouped by ``grouping`` (the scaler's
    :meth:`~xtalscale.job.scaler.ScalerBase.suitable_asu_grouping`): the arrays the scaler keeps
    (:meth:`~xtalscale.job.scaler.ScalerBase.suitable_values`, gathered once per column) and
    the grouping itself, no copy. An error model's rows are then a mask over it (the filter
    reads only those: the same (a, b) as on the rows gathered by :func:`_grouped_rows`)."""
    starts, dataset, row = scaler._suitable_layout()
    I = scaler.suitable_values("intensity")
    return GroupedObservations(
        I, scaler.suitable_values("variance"), scaler.suitable_weights(),
        scaler.suitable_values("inverse_scale_factor"), grouping.asu_hkl, dataset, row,
        grouping.order, grouping.offsets, len(scaler.datasets), scaler.space_group,
        {"partiality": scaler.suitable_values("partiality", 1.0)})


def _check_rows(grouped: GroupedObservations, rows: np.ndarray | None = None) -> None:
    """The checks :meth:`GroupedObservations.from_tables` makes, on every row of ``grouped``
    (or on its ``rows``, a bool mask: the rows named by their position among those)."""
    if rows is not None:
        ok = bool(np.all(np.isfinite(grouped.intensity)) and np.all(np.isfinite(grouped.scale))
                  and np.all(grouped.variance > 0) and np.all(np.isfinite(grouped.variance)))
        if not ok:  # name the first bad selected row as a check of the gathered rows would
            idx = np.flatnonzero(rows)
            _check_rows(GroupedObservations(grouped.intensity[idx], grouped.variance[idx], grouped.weight[idx],
                                            grouped.scale[idx], grouped.asu_hkl, grouped.dataset, grouped.row,
                                            grouped.order, grouped.offsets, grouped.n_datasets,
                                            grouped.space_group, {}))
        return
    for name, values in (("intensity", grouped.intensity), ("variance", grouped.variance),
                         ("inverse_scale_factor", grouped.scale)):
        bad = ~np.isfinite(values)
        if bad.any():
            raise ValueError(f"column '{name}' is not finite at selected row {int(np.flatnonzero(bad)[0])}")
    bad = ~(grouped.variance > 0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"column 'variance' must be positive for the selected rows "
                         f"(row {row} has {grouped.variance[row]})")


def _capped_rows(group_of_row: np.ndarray, n_groups: int, rows: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """``rows`` (bool per row of a grouping whose rows' groups are ``group_of_row``), or, when
    they are more than ``cap`` (> 0), those of random whole groups (seeded) holding about
    ``cap`` of them.

    The error model has two parameters: their statistical error from 2.5·10⁵ observations is
    already far below the spread of (a, b) between runs on different data, so a larger job fits
    them on a sample of whole groups (each group's mean and deviations stay whole)."""
    from .reflection_selection import draw_groups

    n_rows = int(np.count_nonzero(rows))
    if cap <= 0 or n_rows <= cap:
        return rows
    eligible = np.flatnonzero(np.bincount(group_of_row[rows], minlength=n_groups))
    take = np.zeros(n_groups, dtype=bool)
    take[eligible[draw_groups(eligible.size, int(math.ceil(cap * eligible.size / n_rows)), seed)]] = True
    return rows & take[group_of_row]


def refine_error_models(scaler: Any) -> None:
    """Refine the scaler's error model(s) on its current scales and set them (§8.6)."""
    params = scaler.params
    em_params = params.weighting.error_model
    if em_params.error_model is None:
        return
    # a reference's intensities are not fitted (DIALS: the targeted scaler's error model is
    # refined on the datasets being scaled); its variances are used as given
    reference = {k for k, ds in enumerate(scaler.datasets) if getattr(ds, "is_reference", False)}
    groups = [[k for k in members if k not in reference]
              for members in extract_error_model_groups(params, len(scaler.datasets))]
    groups = [members for members in groups if members]
    all_stills = all(ds.experiment.is_still() for ds in scaler.datasets)
    grouping = scaler.suitable_asu_grouping(anomalous=True)
    group_of_row: np.ndarray | None = None
    for members in groups:
        # the members' non-outlier rows, as a mask over the suitable rows of every dataset
        # Before the last round of a large job (main_rounds_subset), the error model only sets
        # the last round's weights: it is refined on the rounds' subset of whole groups (two
        # parameters from >= 10^5 observations), the final one after the last round on all rows.
        subset = bool(getattr(scaler, "subset_for_main_rounds", False))
        keep = []
        for k, ds in enumerate(scaler.datasets):
            rows = np.zeros(int(ds.suitable.sum()), bool)
            if k in members:
                rows[:] = True
                if ds.outliers.size:
                    rows &= ~ds.outliers
                if subset and ds.minimisation is not None:
                    rows &= ds.minimisation
            keep.append(rows)
        rows = np.concatenate(keep)
        cap = int(em_params.basic.max_observations or 0)
        if not subset and 0 < cap < np.count_nonzero(rows):
            if group_of_row is None:
                group_of_row = group_of_rows(grouping.order, grouping.offsets)
            rows = _capped_rows(group_of_row, grouping.offsets.size - 1, rows, cap,
                                int(params.reflection_selection.seed))
        if hasattr(scaler, "suitable_values") and np.count_nonzero(rows) >= EVERY_ROW_FRACTION * rows.size:
            # most rows: every row as the scaler keeps them, the model's rows a mask (no gather)
            data, selected = _every_suitable_row(scaler, grouping), rows
        else:
            data, selected = _grouped_rows(scaler, grouping, rows), None
        _check_rows(data, selected)
        model = BasicErrorModel(basic_params=em_params.basic)
        try:
            run_error_model_refinement(model, data, em_params.basic.minimisation or "None",
                                       em_params.basic.min_Ih, em_params.basic.n_bins,
                                       float(params.reflection_selection.min_partiality),
                                       stills=em_params.basic.stills if all_stills else None,
                                       rows=selected, n_threads=scaler.n_threads)
        except ErrorModelRefinementError as exc:
            logger.info("error model not refined for sweeps %s: %s", [m + 1 for m in members], exc)
            continue
        logger.info("error model for sweeps %s: a = %.5f, b = %.5f", [m + 1 for m in members], model.a, model.b)
        # the job reads only (a, b) from here on: the filtered data (~80 B per suitable row,
        # with the grouping they came from) would stay alive into the next, all-data round
        model.filtered_Ih_table = None
        model.binner = None
        for k in members:
            scaler.datasets[k].error_model = model
            scaler.datasets[k].model.set_error_model(model)
