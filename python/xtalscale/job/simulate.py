"""Known-truth simulator: DIALS-format integrated data with a known scale for every observation.

The simulator predicts the reflections of one or more rotation sweeps from a real geometry
(beam, goniometer and scan of a DIALS ``.expt``; the crystal's cell may be enlarged to reach
10⁶ observations), gives every unique reflection a Wilson-distributed true intensity, multiplies
each observation by a true inverse scale ``g`` that a DIALS physical model evaluates (a smooth
scale and B against rotation and a spherical-harmonic absorption surface, so the physical model
can represent the truth exactly), adds Poisson-like counting noise plus a fractional error, and
injects a small fraction of gross outliers. It writes what ``dials.integrate`` writes
(``integrated.refl`` msgpack + ``integrated.expt``) and the truth beside them
(``truth.npz``: per-row ``g_true``, ``outlier_true``, ``intensity_true``; ``truth_models.json``:
each sweep's true physical model as an ``.expt`` scaling-model dict).

Everything per observation is numpy array arithmetic (no Python loop over reflections).

Example
-------
>>> from xtalscale.job.simulate import simulate, write_simulation
>>> sim = simulate(n_sweeps=2, cell_scale=1.0, d_min=0.8, seed=1)      # doctest: +SKIP
>>> write_simulation(sim, "sim_out")                                       # doctest: +SKIP
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DEFAULT_GEOMETRY", "Simulation", "SimulationOptions", "simulate", "write_simulation"]

#: Real geometry the simulator starts from (l-cysteine, DIALS test data, sweep 30), shipped in
#: the package (job/data/README.txt says where it comes from).
DEFAULT_GEOMETRY = Path(__file__).resolve().parent / "data" / "l_cysteine_geometry.expt"


@dataclass
class SimulationOptions:
    """What to simulate.

    Attributes
    ----------
    n_sweeps : int
        Number of rotation sweeps (experiments); each gets its own crystal orientation and
        true scaling model, all share the true intensities.
    cell_scale : float
        Factor applied to the real-space cell vectors (the number of reflections grows as its
        cube): 1 keeps the real l-cysteine cell; about 3.2 with ``d_min=0.75`` and one 170° sweep
        gives 10⁶ observations.
    d_min : float
        Resolution limit in Å.
    n_images : int or None
        Images per sweep (0.1° each in the default geometry); ``None`` keeps the file's scan.
    outlier_fraction : float
        Fraction of observations turned into gross outliers (chosen among observations of
        groups with multiplicity ≥ 3, where an outlier is identifiable at all), each raised by
        20–60 standard deviations of its true noise (counting and fractional error).
    fractional_error : float
        The true error model's ``b``: each observation gets extra Gaussian noise of
        ``fractional_error · signal``.
    background : float
        Background variance (counts) added to every observation's variance.
    mean_intensity : float
        Mean true intensity at low resolution (counts, before scale and Lorentz factors).
    seed : int
        Seed of every random draw (the result is identical for equal options).
    geometry : path
        The ``.expt`` whose beam, goniometer, scan and crystal are used.
    """

    n_sweeps: int = 1
    cell_scale: float = 1.0
    d_min: float = 0.8
    n_images: int | None = None
    outlier_fraction: float = 0.003
    fractional_error: float = 0.02
    background: float = 30.0
    mean_intensity: float = 2000.0
    seed: int = 0
    geometry: Path = field(default_factory=lambda: DEFAULT_GEOMETRY)

    def validate(self) -> None:
        if int(self.n_sweeps) < 1:
            raise ValueError(f"n_sweeps must be >= 1 (got {self.n_sweeps})")
        for name in ("cell_scale", "d_min", "mean_intensity"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be positive and finite (got {value})")
        if not 0.0 <= float(self.outlier_fraction) < 0.5:
            raise ValueError(f"outlier_fraction must be in [0, 0.5) (got {self.outlier_fraction})")
        if float(self.fractional_error) < 0 or float(self.background) < 0:
            raise ValueError("fractional_error and background must be >= 0")
        if self.n_images is not None and int(self.n_images) < 10:
            raise ValueError(f"n_images must be >= 10 (got {self.n_images})")


@dataclass
class Simulation:
    """A simulated data set: DIALS-format experiments and reflections, and the truth."""

    experiments: Any
    reflections: Any
    g_true: np.ndarray
    intensity_true: np.ndarray
    outlier_true: np.ndarray
    truth_models: list[dict]
    options: SimulationOptions


# --------------------------------------------------------------------------- geometry


def _rotation_matrices(axis: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Right-handed rotations by ``angles`` (rad) about the unit ``axis``: (n, 3, 3)."""
    x, y, z = axis
    c, s = np.cos(angles), np.sin(angles)
    t = 1.0 - c
    R = np.empty(angles.shape + (3, 3))
    R[..., 0, 0] = t * x * x + c
    R[..., 0, 1] = t * x * y - s * z
    R[..., 0, 2] = t * x * z + s * y
    R[..., 1, 0] = t * x * y + s * z
    R[..., 1, 1] = t * y * y + c
    R[..., 1, 2] = t * y * z - s * x
    R[..., 2, 0] = t * x * z - s * y
    R[..., 2, 1] = t * y * z + s * x
    R[..., 2, 2] = t * z * z + c
    return R


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random rotation matrix (from a random unit quaternion)."""
    q = rng.normal(size=4)
    a, b, c, d = q / np.linalg.norm(q)
    return np.array([
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d]])


def _all_indices(A: np.ndarray, d_min: float) -> np.ndarray:
    """Every non-zero Miller index with d ≥ d_min for the reciprocal matrix ``A`` (= UB)."""
    inv_d = 1.0 / d_min
    # |h_i| <= |a_i| / d_min, a_i the real-space axis lengths (columns of A⁻ᵀ).
    real = np.linalg.inv(A).T
    hmax = np.floor(np.linalg.norm(real, axis=0) * inv_d).astype(int) + 1
    ranges = [np.arange(-m, m + 1, dtype=np.int32) for m in hmax]
    hkl = np.stack(np.meshgrid(*ranges, indexing="ij"), axis=-1).reshape(-1, 3)
    rlen2 = np.einsum("ij,nj->ni", A, hkl.astype(float))
    keep = (np.einsum("ni,ni->n", rlen2, rlen2) <= inv_d * inv_d) & np.any(hkl != 0, axis=1)
    return hkl[keep]


def _predict(hkl: np.ndarray, A: np.ndarray, axis: np.ndarray, F: np.ndarray, S: np.ndarray,
             s0: np.ndarray, phi_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray,
                                                                       np.ndarray]:
    """Rotation angles (rad) where each index meets the Ewald sphere inside ``phi_range``.

    Returns (row into hkl, phi, s1) for every crossing; r(φ) = S R(axis, φ) F A h.
    """
    r0 = np.einsum("ij,nj->ni", F @ A, hkl.astype(float))
    s0p = S.T @ s0                                   # s0 in the frame before S
    r_par = np.outer(r0 @ axis, axis)
    r_perp = r0 - r_par
    r_cross = np.cross(axis, r0)
    # s0'·R(φ)r0 = P + B cos φ + C sin φ must equal −|r|²/2 (Laue condition |s0 + r| = |s0|)
    P, B, C = r_par @ s0p, r_perp @ s0p, r_cross @ s0p
    D = -0.5 * np.einsum("ni,ni->n", r0, r0) - P
    amp = np.hypot(B, C)
    ok = (amp > 0) & (np.abs(D) < amp)
    base, half = np.arctan2(C, B), np.arccos(np.clip(D / np.where(amp > 0, amp, 1.0), -1, 1))
    rows, phis = [], []
    lo, hi = phi_range
    for sign in (1.0, -1.0):
        phi = base + sign * half
        phi = lo + np.mod(phi - lo, 2 * np.pi)      # first turn at or after the start
        inside = ok & (phi < hi)
        rows.append(np.flatnonzero(inside))
        phis.append(phi[inside])
    row = np.concatenate(rows)
    phi = np.concatenate(phis)
    R = _rotation_matrices(axis, phi)
    r = np.einsum("ij,njk,nk->ni", S, R, r0[row])
    return row, phi, s0 + r


def _lorentz_polarisation(s0: np.ndarray, s1: np.ndarray, axis_lab: np.ndarray) -> np.ndarray:
    """DIALS-style ``lp`` (the multiplier that corrects raw counts): |e·(ŝ1×ŝ0)| / P."""
    u0 = s0 / np.linalg.norm(s0)
    u1 = s1 / np.linalg.norm(s1, axis=1)[:, None]
    lorentz_inv = np.abs(np.cross(u1, u0) @ axis_lab)
    cos2t = u1 @ u0
    polarisation = 0.5 * (1.0 + cos2t * cos2t)
    return lorentz_inv / polarisation


# --------------------------------------------------------------------------- the truth


def _true_model(experiment: Any, table: Any, rng: np.random.Generator) -> dict:
    """A physical model with smooth scale and B drifts and a mild absorption surface."""
    from ..models import PhysicalScalingModel, default_model_params

    params = default_model_params(physical__absorption_level="medium")
    model = PhysicalScalingModel.from_data(params, experiment, table)
    d = model.to_dict()
    scale = np.asarray(d["scale"]["parameters"], dtype=float)
    t = np.linspace(0.0, 1.0, scale.size)
    phase = rng.uniform(0, 2 * np.pi)
    d["scale"]["parameters"] = list(1.0 + 0.25 * np.sin(2 * np.pi * 1.3 * t + phase) - 0.2 * t)
    decay = np.asarray(d["decay"]["parameters"], dtype=float)
    t = np.linspace(0.0, 1.0, decay.size)
    d["decay"]["parameters"] = list(-0.6 * t + 0.15 * np.cos(2 * np.pi * t + phase))
    absorption = np.asarray(d["absorption"]["parameters"], dtype=float)
    # Coefficients fall off with l so the surface stays smooth (a few % peak to peak).
    n = absorption.size
    l_of = np.concatenate([[l] * (2 * l + 1) for l in range(1, 10)])[:n]
    d["absorption"]["parameters"] = list(rng.normal(scale=0.03, size=n) / l_of ** 1.5)
    for name in ("scale", "decay", "absorption"):
        d[name]["est_standard_devs"] = [0.0] * len(d[name]["parameters"])
    return d


def _geometry_dict(path: Path, options: SimulationOptions, rng: np.random.Generator) -> dict:
    """The template ``.expt`` dict with the crystal enlarged and scan-static."""
    data = json.loads(Path(path).read_text())
    crystal = data["crystal"][0]
    for key in ("A_at_scan_points", "B_covariance"):
        crystal.pop(key, None)
    for key in ("real_space_a", "real_space_b", "real_space_c"):
        crystal[key] = list(np.asarray(crystal[key], dtype=float) * float(options.cell_scale))
    scan = data["scan"][0]
    if options.n_images is not None:
        n = int(options.n_images)
        first = int(scan["image_range"][0])
        scan["image_range"] = [first, first + n - 1]
        for key in ("exposure_time", "epochs"):
            if key in scan and isinstance(scan[key], list) and scan[key]:
                scan[key] = [scan[key][0]] * n
        scan.pop("valid_image_ranges", None)
    data.pop("scaling_model", None)
    return data


def _sweep_experiments(template: dict, n_sweeps: int, rng: np.random.Generator) -> Any:
    from ..experiments import ExperimentList

    data = copy.deepcopy(template)
    crystal0 = data["crystal"][0]
    data["crystal"] = []
    data["experiment"] = []
    for k in range(n_sweeps):
        crystal = copy.deepcopy(crystal0)
        U = np.eye(3) if k == 0 else _random_rotation(rng)
        for key in ("real_space_a", "real_space_b", "real_space_c"):
            crystal[key] = list(U @ np.asarray(crystal[key], dtype=float))
        data["crystal"].append(crystal)
        data["experiment"].append({
            "__id__": "Experiment", "identifier": f"simulated-sweep-{k}", "beam": 0,
            "detector": 0, "goniometer": 0, "scan": 0, "crystal": k})
    for key in ("imageset", "profile"):
        data.pop(key, None)
    return ExperimentList.from_dict(data)


# --------------------------------------------------------------------------- the data


def _sweep_reflections(expt: Any, d_min: float) -> dict[str, np.ndarray]:
    """Predicted observations of one sweep as numpy columns."""
    A = np.asarray(expt.crystal.get_A(), dtype=float).reshape(3, 3)
    gonio = expt.goniometer
    axis = np.asarray(gonio.get_rotation_axis_datum(), dtype=float)
    F = np.asarray(gonio.get_fixed_rotation(), dtype=float).reshape(3, 3)
    S = np.asarray(gonio.get_setting_rotation(), dtype=float).reshape(3, 3)
    s0 = np.asarray(expt.beam.get_s0(), dtype=float)
    scan = expt.scan
    phi0, phi1 = (math.radians(v) for v in scan.get_oscillation_range(deg=True))
    hkl = _all_indices(A, d_min)
    row, phi, s1 = _predict(hkl, A, axis, F, S, s0, (min(phi0, phi1), max(phi0, phi1)))
    lp = _lorentz_polarisation(s0, s1, S @ axis)
    keep = lp > 0.05                      # the blind region near the axis is not integrated
    row, phi, s1, lp = row[keep], phi[keep], s1[keep], lp[keep]
    z = np.asarray(scan.get_array_index_from_angle(np.degrees(phi), deg=True), dtype=float)
    order = np.argsort(z, kind="stable")  # integration writes rows roughly in image order
    return {"miller_index": hkl[row][order], "phi": phi[order], "s1": s1[order],
            "lp": lp[order], "z": z[order]}


def _to_table(cols: dict[str, np.ndarray], sweep: int, identifier: str, unit_cell: Any) -> Any:
    from .. import flex_arrays as fa
    from ..reflection_table import Flags, reflection_table

    n = cols["miller_index"].shape[0]
    t = reflection_table(n)
    t["miller_index"] = fa.miller_index(cols["miller_index"].astype(np.int32))
    t["id"] = fa.int(np.full(n, sweep, dtype=np.int32))
    t["panel"] = fa.size_t(np.zeros(n, dtype=np.uint64))
    t["flags"] = fa.size_t(np.full(n, int(Flags.predicted | Flags.observed | Flags.integrated
                                        | Flags.indexed), dtype=np.uint64))
    t["s1"] = fa.vec3_double(cols["s1"])
    xyz = np.column_stack([np.full(n, 1000.0), np.full(n, 1000.0), cols["z"]])
    t["xyzobs.px.value"] = fa.vec3_double(xyz)
    t["xyzcal.px"] = fa.vec3_double(xyz)
    t["xyzobs.mm.value"] = fa.vec3_double(np.column_stack([xyz[:, 0] * 0.172, xyz[:, 1] * 0.172,
                                                           cols["phi"]]))
    t["d"] = fa.double(np.asarray(unit_cell.d(cols["miller_index"]), dtype=np.float64))
    t["partiality"] = fa.double(np.ones(n))
    t["lp"] = fa.double(cols["lp"])
    t["qe"] = fa.double(np.ones(n))
    t.experiment_identifiers()[sweep] = identifier
    return t


def _true_intensities(asu_group: np.ndarray, n_groups: int, d: np.ndarray, centric: np.ndarray,
                      mean_intensity: float, rng: np.random.Generator) -> np.ndarray:
    """Wilson intensities per unique reflection, broadcast to the observations."""
    # one draw per group: exponential (acentric) or chi²₁ (centric), mean falling with B = 2 Å²
    unit = rng.exponential(size=n_groups)
    chi1 = rng.normal(size=n_groups) ** 2
    group_d = np.zeros(n_groups)
    group_d[asu_group] = d
    group_centric = np.zeros(n_groups, dtype=bool)
    group_centric[asu_group] = centric
    mean = mean_intensity * np.exp(-2.0 * 2.0 / (4.0 * group_d ** 2))
    per_group = mean * np.where(group_centric, chi1, unit)
    return per_group[asu_group]


def simulate(options: SimulationOptions | None = None, **overrides: Any) -> Simulation:
    """Simulate integrated rotation data with a known per-observation scale.

    Parameters
    ----------
    options : SimulationOptions, optional
        What to simulate; keyword ``overrides`` replace its fields
        (``simulate(n_sweeps=3, d_min=0.7)``).

    Returns
    -------
    Simulation
        ``experiments`` (no scaling models, as ``dials.integrate`` writes them),
        ``reflections`` (one table, ``id`` = sweep), and per-row ``g_true``,
        ``intensity_true`` (unscaled, before Lorentz/polarisation), ``outlier_true``, and
        ``truth_models`` (one physical-model dict per sweep).
    """
    from ..models import inverse_scale_factors
    from ..reflection_table import reflection_table
    from ..symmetry import group_reflections, map_to_asu

    opts = dataclasses.replace(options, **overrides) if options is not None else SimulationOptions(**overrides)
    opts.validate()
    rng = np.random.default_rng(int(opts.seed))
    template = _geometry_dict(opts.geometry, opts, rng)
    experiments = _sweep_experiments(template, int(opts.n_sweeps), rng)
    tables = []
    for k, expt in enumerate(experiments):
        cols = _sweep_reflections(expt, float(opts.d_min))
        tables.append(_to_table(cols, k, expt.identifier, expt.crystal.get_unit_cell()))
    table = reflection_table.concat(tables)
    n = len(table)
    from .. import flex_arrays as fa

    # a unique id per row (DIALS's partial_id): the truth arrays are indexed by it
    table["partial_id"] = fa.size_t(np.arange(n, dtype=np.uint64))
    if n == 0:
        raise ValueError("the simulated geometry records no reflections (check d_min and the scan)")

    # True scales: each sweep's physical model evaluated exactly as dials.scale applies it.
    truth_models = [_true_model(expt, table.select(np.asarray(table["id"]) == k), rng)
                    for k, expt in enumerate(experiments)]
    for expt, model in zip(experiments, truth_models):
        expt.scaling_model = model
    g = np.asarray(inverse_scale_factors(experiments, table), dtype=float)
    for expt in experiments:
        expt.scaling_model = None

    space_group = experiments[0].crystal.get_space_group()
    hkl = np.asarray(table["miller_index"])
    mapping = map_to_asu(hkl, space_group)
    grouping = group_reflections(mapping.asu_hkl)
    d = np.asarray(table["d"])
    centric = mapping.centric
    intensity = _true_intensities(grouping.group_index, grouping.n_groups, d, centric,
                                  float(opts.mean_intensity), rng)

    lp = np.asarray(table["lp"])
    signal = g * intensity / lp                          # raw counts the detector recorded
    bg = float(opts.background)
    counting = rng.normal(size=n) * np.sqrt(signal + bg)
    extra = rng.normal(size=n) * float(opts.fractional_error) * signal
    raw_sum = signal + counting + extra + rng.normal(size=n) * np.sqrt(bg)
    raw_prf = signal + counting + extra + rng.normal(size=n) * np.sqrt(0.25 * bg)
    var_sum = np.maximum(raw_sum, 0.0) + 2.0 * bg
    var_prf = np.maximum(raw_prf, 0.0) + 1.25 * bg

    outliers = _inject_outliers(grouping, signal, var_sum, float(opts.outlier_fraction), rng)
    # a gross outlier lies 20-60 standard deviations of the observation's *true* noise away:
    # the counting variance with the fractional error's (unrecorded, as an integration program
    # does not know it). Scaled by the counting σ alone, a strong reflection's "outlier" was
    # only ~4-6 true σ away (2 % of 10⁵ counts is 6x their counting σ): indistinguishable from
    # a clean observation by any rule that keeps clean data (z_max 6), and not gross at all.
    true_sigma = np.sqrt(var_sum + (float(opts.fractional_error) * signal) ** 2)
    boost = np.where(outliers, rng.uniform(20.0, 60.0, size=n) * true_sigma, 0.0)
    raw_sum = raw_sum + boost
    raw_prf = raw_prf + boost
    var_sum = np.where(outliers, np.maximum(raw_sum, 0) + 2 * bg, var_sum)
    var_prf = np.where(outliers, np.maximum(raw_prf, 0) + 1.25 * bg, var_prf)

    table["intensity.sum.value"] = fa.double(raw_sum)
    table["intensity.sum.variance"] = fa.double(var_sum)
    table["intensity.prf.value"] = fa.double(raw_prf)
    table["intensity.prf.variance"] = fa.double(var_prf)
    return Simulation(experiments, table, g, intensity, outliers, truth_models, opts)


def _inject_outliers(grouping: Any, signal: np.ndarray, variance: np.ndarray, fraction: float,
                     rng: np.random.Generator) -> np.ndarray:
    """Choose the outlier rows: at most one per group, only in groups of ≥ 3 observations."""
    n = signal.size
    mask = np.zeros(n, dtype=bool)
    if fraction <= 0:
        return mask
    sizes = grouping.group_sizes()
    eligible_groups = np.flatnonzero(sizes >= 3)
    n_out = min(int(round(fraction * n)), eligible_groups.size)
    if n_out == 0:
        return mask
    groups = rng.choice(eligible_groups, size=n_out, replace=False)
    offsets = np.asarray(grouping.offsets)
    pick = offsets[groups] + (rng.random(n_out) * sizes[groups]).astype(np.int64)
    mask[np.asarray(grouping.order)[pick]] = True
    return mask


def write_simulation(sim: Simulation, directory: str | Path, stem: str = "integrated") -> dict[str, Path]:
    """Write ``<stem>.refl``, ``<stem>.expt``, ``truth.npz`` and ``truth_models.json``.

    Returns
    -------
    dict
        The written paths by kind (``"refl"``, ``"expt"``, ``"truth"``, ``"models"``).
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"refl": out / f"{stem}.refl", "expt": out / f"{stem}.expt",
             "truth": out / "truth.npz", "models": out / "truth_models.json"}
    sim.reflections.as_file(str(paths["refl"]))
    sim.experiments.as_file(str(paths["expt"]))
    np.savez_compressed(paths["truth"], g_true=sim.g_true, intensity_true=sim.intensity_true,
                        outlier_true=sim.outlier_true)
    paths["models"].write_text(json.dumps(sim.truth_models, indent=1))
    return paths
