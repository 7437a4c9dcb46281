"""Resolution estimates as ``dials.estimate_resolution`` makes them by default.

:func:`estimate_resolution` recomputes merging statistics in shells of about equal numbers of
observations (``counting_sorted``, at most ``n_bins=50`` shells of at least
``reflections_per_bin=10`` observations; CC½ significance at ``0.1``), after removing Wilson
outliers with E² >= ``emax``² (E² from a quasi-normalisation: intensities divided by the mean
I/ε of their shell, in 10-20 shells of equal width in d*²), then fits each requested metric
against d*² = 1/d_min² of the shells and reports where the fit crosses the limit:

* ``cc_half`` (default 0.3): the tanh model ``½(1 − tanh((d*² − s0)/r))`` fitted by weighted
  least squares (σ = 1/sqrt(n − 3) for shells with n > 4 reflections in CC½, else 100;
  start r = 0.2, s0 = 0.4), as DIALS;
* ``cc_half_significance_level`` (0.1): a logistic fit of where CC½ stops being significant;
* ``isigma`` (unmerged ⟨I/σ⟩), ``misigma`` (merged ⟨I/σ⟩) and ``i_mean_over_sigma_mean``:
  exp of a degree-6 polynomial fitted to log(y) over the shells with y > 0;
* ``rmerge``: the inverse of exp of a polynomial fitted to log(1/Rmerge);
* ``completeness``: a degree-6 polynomial.

As in DIALS the crossing is searched from the high-resolution end (the first crossing of the
fitted curve there); if every shell is better than the limit the result is the highest
resolution observed, and if the fitted curve never reaches the limit it is ``None``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .merging import MergingStatistics, MergingStatisticsError

__all__ = [
    "ResolutionEstimate",
    "ResolutionResult",
    "estimate_resolution",
    "interpolate_crossing",
    "quasi_normalised_e_squared",
    "tanh_cc_half",
]

_METRIC_ATTRIBUTES = {
    "cc_half": "cc_one_half",
    "isigma": "unmerged_i_over_sigma_mean",
    "misigma": "i_over_sigma_mean",
    "i_mean_over_sigma_mean": "i_mean_over_sigi_mean",
    "rmerge": "r_merge",
    "completeness": "completeness",
}


@dataclass
class ResolutionResult:
    """One metric's fit: shells from high to low resolution (DIALS order)."""

    metric: str
    limit: float | None
    d_star_sq: np.ndarray
    y_obs: np.ndarray
    y_fit: np.ndarray | None
    d_min: float | None
    critical_values: np.ndarray | None = None
    error: str | None = None

    def as_dict(self) -> dict:
        return {"metric": self.metric, "limit": self.limit, "d_min": self.d_min,
                "error": self.error,
                "d_star_sq": self.d_star_sq.tolist(), "y_obs": self.y_obs.tolist(),
                "y_fit": None if self.y_fit is None else self.y_fit.tolist(),
                "critical_values": (None if self.critical_values is None
                                    else self.critical_values.tolist())}


@dataclass
class ResolutionEstimate:
    """Results of :func:`estimate_resolution` by metric name, plus the statistics used."""

    results: dict = field(default_factory=dict)
    statistics: MergingStatistics | None = None
    n_wilson_outliers: int = 0

    @property
    def d_min(self) -> float | None:
        """The CC½ estimate (DIALS's headline number), or None."""
        r = self.results.get("cc_half")
        return None if r is None else r.d_min

    def as_dict(self) -> dict:
        return {name: r.as_dict() for name, r in self.results.items()}

    def summary(self) -> str:
        """Lines like DIALS's ``Resolution cc_half:       1.61``."""
        names = {"isigma": "I/sig", "misigma": "Mn(I/sig)",
                 "i_mean_over_sigma_mean": "Mn(I)/Mn(sig)"}
        lines = []
        for name, r in self.results.items():
            label = names.get(name, name)
            if r.error:
                lines.append(f"Resolution fit against {name} failed: {r.error}")
                continue
            width = max(6, 18 - len(label))
            value = f"{'none':>{width}}" if r.d_min is None else f"{r.d_min:{width}.2f}"
            lines.append(f"Resolution {label}:{value}")
        return "\n".join(lines)


def tanh_cc_half(x, r, s0):
    """DIALS's CC½ model ``½(1 − tanh((x − s0)/r))``."""
    return 0.5 * (1.0 - np.tanh((np.asarray(x) - s0) / r))


def interpolate_crossing(x, y, t) -> float:
    """First x (scanning from the start) where the piecewise-linear y(x) crosses t.

    Raises
    ------
    RuntimeError
        If t lies outside [min y, max y] or y never strictly crosses it.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if t > y.max() or t < y.min():
        raise RuntimeError(f"t outside of [{y.min():f}, {y.max():f}]")
    for j in range(1, len(x)):  # short (<= a few hundred shells): not a reflection loop
        if (y[j - 1] - t) * (y[j] - t) < 0:
            return float(x[j - 1] + (t - y[j - 1]) * (x[j] - x[j - 1]) / (y[j] - y[j - 1]))
    raise RuntimeError("no crossing")


def _tanh_fit(x, y, n_obs):
    if int((n_obs > 3).sum()) < 3:
        raise RuntimeError("Not enough reflections for fitting")
    sigma = np.where(n_obs > 4, 1.0 / np.sqrt(np.maximum(n_obs - 3.0, 1.0)), 100.0)
    r, s0 = fit_tanh_cc_half(x, y, sigma)
    return tanh_cc_half(x, r, s0)


def fit_tanh_cc_half(x, y, sigma, start=(0.2, 0.4), max_evaluations: int = 10000) -> tuple:
    """(r, s0) of :func:`tanh_cc_half` fitted to y(x) with errors ``sigma``, as DIALS fits it.

    DIALS calls scipy's ``curve_fit(tanh, x, y, p0=(0.2, 0.4), sigma=σ, maxfev=10000)``,
    i.e. MINPACK's ``lmdif``; :func:`_lmdif_two_parameters` follows that algorithm (residuals
    σ⁻¹·(f − y) formed as curve_fit forms them), which saves importing scipy.optimize
    (~110 ms, an eighth of a small scaling job). On well-conditioned curves the minima agree
    to rounding (tests/python/test_resolution_estimate.py compares them with curve_fit's); on
    ill-conditioned ones (a step between two shells, a crossing outside the data) neither
    result is stable: curve_fit itself moves when its residuals change by an ulp.

    Raises
    ------
    RuntimeError
        Where curve_fit would (no convergence within ``max_evaluations``).
    """
    return curve_fit_two_parameters(tanh_cc_half, x, y, start, sigma, max_evaluations)


def curve_fit_two_parameters(model, x, y, start, sigma=None, max_evaluations: int = 10000) -> tuple:
    """scipy's ``curve_fit(model, x, y, p0=start, sigma=sigma, maxfev=max_evaluations)`` for
    a two-parameter model, by :func:`_lmdif_two_parameters`: residuals σ⁻¹·(model − y) (or
    model − y without σ), formed as curve_fit forms them.

    Raises
    ------
    RuntimeError
        Where curve_fit would (no convergence within ``max_evaluations``).
    ValueError
        For non-finite data, as curve_fit (``check_finite``).
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    for name, values in (("x", x), ("y", y), ("sigma", sigma)):
        if values is not None and not np.all(np.isfinite(values)):
            raise ValueError(f"{name} must be finite (as curve_fit's check_finite)")
    if sigma is None:
        def residuals(p):
            return model(x, p[0], p[1]) - y
    else:
        transform = 1.0 / np.asarray(sigma, dtype=float)

        def residuals(p):
            return transform * (model(x, p[0], p[1]) - y)

    with np.errstate(all="ignore"):
        p, info = _lmdif_two_parameters(residuals, start, max_evaluations)
    if info not in (1, 2, 3, 4):
        raise RuntimeError(f"Optimal parameters not found (MINPACK info {info})")
    return float(p[0]), float(p[1])


_MACHINE_EPS = float(np.finfo(float).eps)
_DWARF = float(np.finfo(float).tiny)


def _solve_2x2(a, v) -> np.ndarray:
    """a⁻¹v for a symmetric 2×2 ``a``; a singular one (to rounding) gets the minimum-norm
    least-squares solution, as MINPACK's rank-deficient QR solve does."""
    det = a[0][0] * a[1][1] - a[0][1] * a[0][1]
    if det != 0.0 and abs(det) > 1e-14 * abs(a[0][0] * a[1][1]):
        return np.array([(a[1][1] * v[0] - a[0][1] * v[1]) / det,
                         (a[0][0] * v[1] - a[0][1] * v[0]) / det])
    return np.linalg.lstsq(np.array(a, dtype=float), np.asarray(v, dtype=float), rcond=1e-12)[0]


def _levenberg_marquardt_parameter(jtj, jtf, diag, delta, par):
    """MINPACK ``lmpar`` for two parameters: the damping ``par`` and step with
    ‖D·step‖ within 10 % of the trust radius ``delta`` (or the Gauss–Newton step inside it).

    MINPACK works on the QR factors of J; with two parameters the same quantities come from
    the 2×2 normal matrices (qᵀA⁻¹q is what its triangular solves compute)."""
    d2 = diag * diag
    step = -_solve_2x2(jtj, jtf)
    scaled = diag * step
    dxnorm = math.hypot(scaled[0], scaled[1])
    fp = dxnorm - delta
    if fp <= 0.1 * delta:
        return 0.0, step
    q = diag * scaled / dxnorm
    curvature = float(q @ _solve_2x2(jtj, q))
    parl = (fp / delta) / curvature if curvature > 0.0 and math.isfinite(curvature) else 0.0
    gnorm = math.hypot(*(jtf / diag))
    paru = gnorm / delta if gnorm > 0.0 else _DWARF / min(delta, 0.1)
    par = min(max(par, parl), paru)
    if par == 0.0:
        par = gnorm / dxnorm
    for iteration in range(1, 11):
        if par == 0.0:
            par = max(_DWARF, 0.001 * paru)
        a = [[jtj[0][0] + par * d2[0], jtj[0][1]], [jtj[0][1], jtj[1][1] + par * d2[1]]]
        step = -_solve_2x2(a, jtf)
        scaled = diag * step
        dxnorm = math.hypot(scaled[0], scaled[1])
        previous, fp = fp, dxnorm - delta
        if abs(fp) <= 0.1 * delta or (parl == 0.0 and fp <= previous < 0.0) or iteration == 10:
            break
        q = diag * scaled / dxnorm
        correction = (fp / delta) / float(q @ _solve_2x2(a, q))
        if not math.isfinite(correction):
            break
        if fp > 0.0:
            parl = max(parl, par)
        if fp < 0.0:
            paru = min(paru, par)
        par = max(parl, par + correction)
    return par, step


def _lmdif_two_parameters(residuals, start, max_evaluations, tolerance=1.49012e-08,
                          factor=100.0) -> tuple:
    """MINPACK's ``lmdif`` (Moré 1977) as scipy's ``leastsq`` runs it (forward-difference
    Jacobian with step √ε·|p|, column-norm scaling, initial trust radius 100·‖D·p‖,
    ftol = xtol = 1.49012e-8, gtol = 0) for two parameters. Returns (p, MINPACK info)."""
    p = np.array(start, dtype=float)
    fvec = residuals(p)
    fnorm = float(np.linalg.norm(fvec))
    evaluations, iteration, par = 1, 1, 0.0
    h_rel = math.sqrt(_MACHINE_EPS)
    diag = delta = xnorm = None
    while True:
        jac = np.empty((fvec.size, 2))
        for j in range(2):
            h = h_rel * abs(p[j]) or h_rel
            shifted = p.copy()
            shifted[j] += h
            jac[:, j] = (residuals(shifted) - fvec) / h
        evaluations += 2
        column_norms = np.linalg.norm(jac, axis=0)
        jtj_array = jac.T @ jac
        jtj = [[jtj_array[0, 0], jtj_array[0, 1]], [jtj_array[1, 0], jtj_array[1, 1]]]
        jtf = jac.T @ fvec
        if iteration == 1:
            diag = np.where(column_norms == 0.0, 1.0, column_norms)
            xnorm = float(np.linalg.norm(diag * p))
            delta = factor * xnorm or factor
        gnorm = 0.0
        if fnorm != 0.0:
            for j in range(2):
                if column_norms[j] != 0.0:
                    gnorm = max(gnorm, abs(jtf[j] / fnorm) / column_norms[j])
        if gnorm <= 0.0:
            return p, 4
        diag = np.maximum(diag, column_norms)
        while True:
            par, step = _levenberg_marquardt_parameter(jtj, jtf, diag, delta, par)
            trial = p + step
            pnorm = float(np.linalg.norm(diag * step))
            if iteration == 1:
                delta = min(delta, pnorm)
            ftrial = residuals(trial)
            evaluations += 1
            fnorm1 = float(np.linalg.norm(ftrial))
            actual = 1.0 - (fnorm1 / fnorm) ** 2 if 0.1 * fnorm1 < fnorm else -1.0
            linear = float(np.linalg.norm(jac @ step)) / fnorm
            damped = math.sqrt(par) * pnorm / fnorm
            predicted = linear * linear + damped * damped / 0.5
            directional = -(linear * linear + damped * damped)
            ratio = actual / predicted if predicted != 0.0 else 0.0
            if ratio <= 0.25:
                shrink = 0.5 if actual >= 0.0 else 0.5 * directional / (directional + 0.5 * actual)
                if 0.1 * fnorm1 >= fnorm or shrink < 0.1:
                    shrink = 0.1
                delta = shrink * min(delta, pnorm / 0.1)
                par /= shrink
            elif par == 0.0 or ratio >= 0.75:
                delta = pnorm / 0.5
                par *= 0.5
            if ratio >= 1e-4:
                p, fvec, fnorm = trial, ftrial, fnorm1
                xnorm = float(np.linalg.norm(diag * p))
                iteration += 1
            converged_f = abs(actual) <= tolerance and predicted <= tolerance and ratio <= 2.0
            converged_x = delta <= tolerance * xnorm
            if converged_f or converged_x:
                return p, (3 if converged_f and converged_x else 1 if converged_f else 2)
            if evaluations >= max_evaluations:
                return p, 5
            if abs(actual) <= _MACHINE_EPS and predicted <= _MACHINE_EPS and ratio <= 2.0:
                return p, 6
            if delta <= _MACHINE_EPS * xnorm:
                return p, 7
            if gnorm <= _MACHINE_EPS:
                return p, 8
            if ratio >= 1e-4:
                break


def _poly_fit(x, y, degree=6):
    deg = min(degree, len(x) - 1)
    if deg < 0:
        raise RuntimeError("no shells to fit")
    coef = np.polynomial.polynomial.polyfit(x, y, deg)
    return coef


def _log_fit(x, y, n_obs=None):
    sel = y > 0
    if sel.sum() < 2:
        raise RuntimeError("not enough positive values for a log fit")
    coef = _poly_fit(x[sel], np.log(y[sel]))
    return np.exp(np.polynomial.polynomial.polyval(x, coef))


def _log_inv_fit(x, y, n_obs=None):
    sel = y > 0
    if sel.sum() < 2:
        raise RuntimeError("not enough positive values for a log fit")
    coef = _poly_fit(x[sel], np.log(1.0 / y[sel]))
    return 1.0 / np.exp(np.polynomial.polynomial.polyval(x, coef))


def _polynomial_fit(x, y, n_obs=None):
    return np.polynomial.polynomial.polyval(x, _poly_fit(x, y))


def _fit_metric(stats: MergingStatistics, metric: str, limit: float) -> ResolutionResult:
    attr = _METRIC_ATTRIBUTES[metric]
    bins = stats.bins[::-1]  # high resolution first, as DIALS
    y = np.array([getattr(b, attr) if getattr(b, attr) is not None else 0.0 for b in bins],
                 dtype=float)
    n = np.array([b.cc_one_half_n_refl for b in bins], dtype=float)
    x = np.array([1.0 / b.d_min ** 2 for b in bins])
    model = {"cc_half": lambda: _tanh_fit(x, y, n), "isigma": lambda: _log_fit(x, y),
             "misigma": lambda: _log_fit(x, y), "i_mean_over_sigma_mean": lambda: _log_fit(x, y),
             "rmerge": lambda: _log_inv_fit(x, y), "completeness": lambda: _polynomial_fit(x, y)}
    y_fit = model[metric]()
    critical = None
    if metric == "cc_half" and bins and bins[0].cc_one_half_critical_value is not None:
        critical = np.array([b.cc_one_half_critical_value or 0.0 for b in bins])
    if y.min() > limit:
        d_min: float | None = 1.0 / math.sqrt(x.max())
    else:
        try:
            d_min = 1.0 / math.sqrt(interpolate_crossing(x, y_fit, limit))
        except (RuntimeError, ValueError):
            d_min = None
    return ResolutionResult(metric, limit, x, y, np.asarray(y_fit), d_min, critical)


def _significance_fit(stats: MergingStatistics) -> ResolutionResult:
    bins = stats.bins[::-1]
    x = np.array([1.0 / b.d_min ** 2 for b in bins])
    y_obs = np.array([b.cc_one_half for b in bins])
    critical = np.array([b.cc_one_half_critical_value or 0.0 for b in bins])
    data = np.where(critical > y_obs, 0.0, 1.0)
    y_fit = None
    d_min: float | None
    if data.all():
        d_min = 1.0 / math.sqrt(x.max())
    elif not data.any():
        d_min = None
    else:
        start = x[data == 0][-1]  # the lowest-resolution shell that is not significant

        def f(v, r, res):
            with np.errstate(over="ignore"):
                return 1.0 - 1.0 / (1.0 + np.exp(-(r * (v - res))))  # 1 − expit

        try:
            r, res = curve_fit_two_parameters(f, x, data, (100.0, start))
        except (RuntimeError, ValueError):
            d_min = None
        else:
            d_min = 1.0 / math.sqrt(res) if (r >= 0 and res > 0) else None
            if d_min is not None:
                y_fit = f(x, r, res)
    return ResolutionResult("cc_half_significance_level", None, x, data, y_fit, d_min, critical)


def quasi_normalised_e_squared(miller_index, intensity, space_group, unit_cell,
                               d_star_sq=None, epsilon=None, d_star_sq_range=None) -> np.ndarray:
    """E² of every observation by quasi-normalisation (as DIALS's ``quasi_normalisation``).

    Negative intensities count as 0 in the shell means; shells are of equal width in d*²
    (10, 15 or 20 for <= 15000, <= 20000 or more observations); E² = I/(ε ⟨I/ε⟩_shell).
    ``d_star_sq`` and ``epsilon`` (per observation) may be given when already known, and
    with ``d_star_sq`` its (min, max) ``d_star_sq_range``.

    One C++ pass sums the shells and a second divides
    (``xtalscale._core.stats.quasi_normalised_e_squared``); :func:`_e_squared_by_arrays`
    is the same arithmetic by array operations (the same bits), used for non-finite d*².
    """
    from ..symmetry import SpaceGroup, UnitCell, miller_array

    I = np.asarray(intensity, dtype=float)
    n = len(I)
    for name, given in (("d_star_sq", d_star_sq), ("epsilon", epsilon)):
        if given is not None and np.shape(given) != (n,):
            raise ValueError(f"{name} must have one value per observation ({n}), "
                             f"got shape {np.shape(given)}")
    hkl = None
    if d_star_sq is None or epsilon is None:  # (the indices are needed for these only)
        hkl = miller_array(miller_index)
        if len(hkl) != n:
            raise ValueError(f"{len(hkl)} indices for {n} intensities")
    n_shells = 20 if n > 20000 else (15 if n > 15000 else 10)
    if d_star_sq is None:
        cell = unit_cell if isinstance(unit_cell, UnitCell) else UnitCell(unit_cell)
        dss = cell.d_star_sq(hkl)
    else:
        dss = np.asarray(d_star_sq, dtype=float)
    if epsilon is None:
        sg = space_group if isinstance(space_group, SpaceGroup) else SpaceGroup(space_group)
        epsilon = sg.epsilon(hkl)
    eps = np.asarray(epsilon)
    if eps.dtype.kind not in "iuf":
        eps = eps.astype(float)
    lo, hi = (dss.min(), dss.max()) if d_star_sq_range is None or d_star_sq is None \
        else d_star_sq_range
    span = hi - lo
    lo, hi = lo - span * 1e-6, hi + span * 1e-6
    step = (hi - lo) / n_shells if hi > lo else 1.0
    if n == 0 or not (math.isfinite(lo) and math.isfinite(step) and step > 0):
        return _e_squared_by_arrays(dss, I, eps, lo, step, n_shells)
    from .._core.stats import quasi_normalised_e_squared as kernel

    # (ε as int8 when it fits, else as float64: each converted exactly where it is used)
    if eps.dtype != np.int8:
        eps = eps.astype(np.float64, copy=False)
    return kernel(dss, I, eps, float(lo), float(step), n_shells)


def _e_squared_by_arrays(dss, I, eps, lo, step, n_shells: int) -> np.ndarray:
    """The E² of :func:`quasi_normalised_e_squared` by array operations."""
    n = len(I)
    # (one scratch array worked on in place: fewer fresh arrays of n values)
    scratch = np.subtract(dss, lo)
    # (the quotient cast to int64 as it is written: astype's truncation, one pass fewer)
    shell = np.divide(scratch, step, out=np.empty(n, dtype=np.int64), casting="unsafe")
    np.clip(shell, 0, n_shells - 1, out=shell)
    # (integer ε stays as it is: the float64 arithmetic below converts each value exactly)
    work = np.divide(np.maximum(I, 0.0, out=scratch), eps, out=scratch)
    sums = np.bincount(shell, weights=work, minlength=n_shells)
    counts = np.bincount(shell, minlength=n_shells)
    mean = np.where(counts > 0, sums / np.maximum(counts, 1), 1.0)
    norm = np.multiply(np.take(mean, shell, out=scratch), eps, out=scratch)
    positive = norm > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        if positive.all():  # (the usual case: one plain division, into the scratch array)
            return np.divide(I, norm, out=scratch)
        e_squared = np.zeros(n)
        np.divide(I, norm, out=e_squared, where=positive)
    return e_squared


def estimate_resolution(statistics: MergingStatistics, cc_half: float | None = 0.3,
                        isigma: float | None = None, misigma: float | None = None,
                        i_mean_over_sigma_mean: float | None = None,
                        rmerge: float | None = None, completeness: float | None = None,
                        cc_half_significance_level: float | None = 0.1,
                        n_bins: int = 50, reflections_per_bin: int = 10,
                        binning_method: str = "counting_sorted", emax: float | None = 4.0
                        ) -> ResolutionEstimate:
    """Resolution limits from merging statistics, as ``dials.estimate_resolution`` by default.

    Parameters
    ----------
    statistics : MergingStatistics
        Statistics of the data (any shells; they are recomputed with the binning below
        from the same observations, with the same anomalous and seed settings).
    cc_half, isigma, misigma, i_mean_over_sigma_mean, rmerge, completeness : float or None
        Limits of the metrics to fit (None skips a metric). DIALS's defaults: CC½ 0.3 only.
        ``completeness`` is a fraction (0-1).
    cc_half_significance_level : float or None
        Significance level of CC½ (also gives the ``cc_half_significance_level`` estimate).
    n_bins, reflections_per_bin, binning_method :
        Shells of the fit (DIALS: at most 50 shells of >= 10 observations, counting_sorted).
    emax : float or None
        Observations with quasi-normalised E² >= emax² are left out first (DIALS: 4).

    Returns
    -------
    ResolutionEstimate
        ``results[metric]`` (a :class:`ResolutionResult`), ``d_min`` the CC½ estimate.

    Raises
    ------
    MergingStatisticsError
        If no observations remain or the statistics cannot be computed.
    """
    return _estimate_resolution(statistics._prepared, statistics.anomalous, statistics.seed,
                                cc_half, isigma, misigma, i_mean_over_sigma_mean, rmerge,
                                completeness, cc_half_significance_level, n_bins,
                                reflections_per_bin, binning_method, emax)


def _estimate_resolution(prepared, anomalous: bool, seed: int, cc_half=0.3, isigma=None,
                         misigma=None, i_mean_over_sigma_mean=None, rmerge=None,
                         completeness=None, cc_half_significance_level=0.1, n_bins=50,
                         reflections_per_bin=10, binning_method="counting_sorted",
                         emax=4.0) -> ResolutionEstimate:
    """:func:`estimate_resolution` of statistics of the prepared rows ``prepared`` (a
    ``merging._Prepared``) with ``anomalous`` and ``seed``: all it reads of the statistics,
    so that it can start before they are computed."""
    n_outliers = 0
    if emax:
        # ε is the same for symmetry mates: once per unique reflection of the grouping
        grouping = prepared.grouped[0]
        # (one byte a row: ε <= 48, converted exactly where it is used)
        epsilon = np.take(prepared.space_group.epsilon(grouping.unique_hkl).astype(np.int8),
                          grouping.group_index)
        e2 = quasi_normalised_e_squared(prepared.hkl, prepared.intensity, prepared.space_group,
                                        prepared.unit_cell, prepared.d_star_sq, epsilon,
                                        prepared.d_star_sq_range)
        keep = e2 < emax ** 2
        n_outliers = int((~keep).sum())
        if not keep.any():
            raise MergingStatisticsError("every observation is a Wilson outlier (E² >= emax²)")
        # the statistics of the kept rows alone (as from_arrays of them), regrouped by
        # selection from the grouping already made
        stats = MergingStatistics(
            prepared.subset(keep), n_bins=n_bins, anomalous=anomalous,
            use_internal_variance=False, binning_method=binning_method,
            reflections_per_bin=reflections_per_bin, seed=seed,
            cc_one_half_significance_level=cc_half_significance_level)
    else:  # (MergingStatistics.rebinned of the statistics)
        stats = MergingStatistics(
            prepared, n_bins, anomalous=anomalous, use_internal_variance=False,
            binning_method=binning_method, reflections_per_bin=reflections_per_bin, seed=seed,
            cc_one_half_significance_level=cc_half_significance_level)
    out = ResolutionEstimate(statistics=stats, n_wilson_outliers=n_outliers)
    limits = {"cc_half": cc_half, "isigma": isigma, "misigma": misigma,
              "i_mean_over_sigma_mean": i_mean_over_sigma_mean, "rmerge": rmerge,
              "completeness": completeness}
    for metric, limit in limits.items():
        if limit is None:
            continue
        try:
            out.results[metric] = _fit_metric(stats, metric, float(limit))
        except RuntimeError as exc:  # DIALS logs "Resolution fit ... failed" and goes on
            empty = np.zeros(0)
            out.results[metric] = ResolutionResult(metric, float(limit), empty, empty, None,
                                                   None, error=str(exc))
    if cc_half_significance_level is not None:
        out.results["cc_half_significance_level"] = _significance_fit(stats)
    return out
