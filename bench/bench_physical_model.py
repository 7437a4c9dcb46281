"""Benchmark: scales + derivatives of the physical model (lmax 4) on 10^6 reflections.

Prints, for xtalscale and for a vectorised numpy implementation of the same model in
the same run:

* ns/reflection for one evaluation of every component's scales and derivatives
  ("components": the kernel figure the targets refer to; best and median of the repeats).
  The lean path: the smoothers recompute their weights into caller-owned output buffers
  (``calculate_scales_and_derivatives(0, out=bufs)``), the SH component returns its held
  harmonic block as the dense derivative (``calculate_scales_and_dense_derivatives``).
  The DIALS-API figure (every component returning a scipy CSR matrix) is printed too;
* the same for the full
  model ``g`` plus ``dg/dp`` assembled by the product rule into one scipy CSR matrix
  ("model", xtalscale's RefinerCalculator, as DIALS does each iteration; the assembly is scipy in
  both columns, and at 30 non-zeros per row it moves >= 360 B/refl by itself);
* bytes/reflection held by the model between calls: the sum of the components'
  ``held_bytes()`` (actual buffer sizes of their state), and as a cross-check the RSS growth
  (after malloc_trim) or tracemalloc over configure + first call, whichever is larger (that
  one also sees the input columns configure builds); the class-wide 0.5° SH lookup table
  is printed separately (shared by all models in the process);
* bytes/reflection of the caller-owned output buffers of the lean path (not model state);
* one-off set-up time (configure + update_reflection_data + first call), and the time to
  re-apply a stored model to all reflections (``model_from_dict(d).get_scales``, what
  DIALS does when it expands scales), in ns/reflection.

Data are synthetic: a 360° sweep of 3600 images, uniform z, d in [0.8, 4] Å, random
crystal-frame directions; parameters random around their defaults. Above 100k
reflections the absorption harmonics come from DIALS's 0.5° lookup table (DIALS's
"memory" mode); ``--exact`` uses exact harmonics instead.

Usage: ``python bench/bench_physical_model.py [--n 1000000] [--repeats 5] [--exact]``.
This prints figures; it asserts nothing.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import time
import tracemalloc
from types import SimpleNamespace

import numpy as np
import scipy.sparse as sp

from xtalscale import components as xs_components
from xtalscale import models
from xtalscale.models import PhysicalScalingModel, default_model_params
from xtalscale.parameter_managers import RefinerCalculator, active_parameter_manager


def make_data(n: int, seed: int = 1) -> tuple[dict, SimpleNamespace]:
    rng = np.random.default_rng(seed)
    n_images = 3600
    z = rng.uniform(0.0, n_images, n)
    unit = lambda v: v / np.linalg.norm(v, axis=1)[:, None]  # noqa: E731
    table = {"xyzobs.px.value": np.column_stack([rng.uniform(0, 2000, n), rng.uniform(0, 2000, n), z]),
             "d": rng.uniform(0.8, 4.0, n), "s0c": unit(rng.normal(size=(n, 3))),
             "s1c": unit(rng.normal(size=(n, 3))), "s1": unit(rng.normal(size=(n, 3))) + [0.0, 0.0, 1.0]}
    scan = SimpleNamespace(get_oscillation=lambda: (0.0, 0.1), get_oscillation_range=lambda: (0.0, 360.0),
                           get_image_range=lambda: (1, n_images))
    expt = SimpleNamespace(scan=scan, beam=SimpleNamespace(get_s0=lambda: (0.0, 0.0, 1.0)), goniometer=None)
    return table, expt


def build_model(table: dict, expt: SimpleNamespace, seed: int = 2) -> PhysicalScalingModel:
    model = PhysicalScalingModel.from_data(default_model_params(), expt, table)
    rng = np.random.default_rng(seed)
    comps = model.components
    comps["scale"].parameters = rng.uniform(0.8, 1.2, comps["scale"].n_params)
    comps["decay"].parameters = rng.uniform(-0.5, 0.5, comps["decay"].n_params)
    comps["absorption"].parameters = rng.uniform(-0.01, 0.01, comps["absorption"].n_params)
    return model


def configure(model: PhysicalScalingModel, table: dict, expt: SimpleNamespace) -> None:
    model.configure_components(table, expt, default_model_params())
    for comp in model.components.values():
        comp.update_reflection_data()


def model_scales_and_derivatives(apm: active_parameter_manager) -> tuple[np.ndarray, sp.csr_matrix]:
    """g and dg/dp (n x n_free) by the product rule (xtalscale's RefinerCalculator)."""
    return RefinerCalculator.calculate_scales_and_derivatives(apm, 0)


class NumpyPhysical:
    """The same physical model in vectorised numpy/scipy, with the same caching strategy:
    smoother weights (CSR, rows normalised) and the harmonic matrix are built once."""

    def __init__(self, model: PhysicalScalingModel, table: dict, expt: SimpleNamespace) -> None:
        conf = model.configdict
        z = table["xyzobs.px.value"][:, 2]
        self.p_s = np.asarray(model.components["scale"].parameters)
        self.p_d = np.asarray(model.components["decay"].parameters)
        self.p_a = np.asarray(model.components["absorption"].parameters)
        self.W_s = self._weights(z * conf["s_norm_fac"], self.p_s.size)
        self.W_d = self._weights(z * conf["d_norm_fac"], self.p_d.size)
        self.inv_2d2 = 1.0 / (2.0 * table["d"] ** 2)
        comp = model.components["absorption"]
        self.H = np.array(comp.dense_harmonic_values(0))  # same harmonics (lookup or exact)

    @staticmethod
    def _weights(x: np.ndarray, n_param: int) -> sp.csr_matrix:
        """DIALS smoother weights w_ij / sum_j w_ij (naverage 3, sigma 0.7, positions i - 0.5)."""
        x = x - x.min()
        n_int = n_param - 2
        spacing = max(np.ceil(round(x.max(), 10)), 1.0) / n_int
        zz = x / spacing
        i1 = np.floor(np.abs(zz - 1.5) + 0.5) * np.sign(zz - 1.5) + 1  # round half away from zero
        i1 = i1.astype(np.int64)
        i2 = i1 + 3
        low = i1 < 0
        i1[low], i2[low] = 0, np.maximum(2, i2[low])
        high = i2 > n_param
        i2[high], i1[high] = n_param, np.minimum(i1[high], n_param - 2)
        rows, cols, vals = [], [], []
        for k in range(3):
            idx = i1 + k
            ok = idx < i2
            w = np.exp(-(((zz - (idx - 0.5)) / 0.7) ** 2))
            rows.append(np.flatnonzero(ok))
            cols.append(idx[ok])
            vals.append(w[ok])
        W = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(x.size, n_param))
        return sp.diags(1.0 / np.asarray(W.sum(axis=1)).ravel()) @ W

    def components(self) -> list:
        """Per component: scales and the derivative block (as the components return them)."""
        s = self.W_s @ self.p_s
        sd = np.exp((self.W_d @ self.p_d) * self.inv_2d2)
        sa = 1.0 + self.H @ self.p_a
        J_d = sp.diags(sd * self.inv_2d2) @ self.W_d
        return [(s, self.W_s), (sd, J_d), (sa, self.H)]

    def scales_and_derivatives(self) -> tuple[np.ndarray, sp.csr_matrix]:
        (s, W_s), (sd, J_d), (sa, H) = self.components()
        g = s * sd * sa
        J_s = sp.diags(sd * sa) @ W_s
        J_d = sp.diags(s * sa) @ J_d
        J_a = sp.csr_matrix(H * (s * sd)[:, None])
        return g, sp.hstack([J_s, J_d, J_a], format="csr")


def times(fn, repeats: int) -> list:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = fn()
        out.append(time.perf_counter() - t0)
        del res
    return out


def best_time(fn, repeats: int) -> float:
    return min(times(fn, repeats))


def lean_call(comps: dict, buffers: dict):
    """Scales + derivatives of every component by the lean path (see the module notes)."""
    res = []
    for name, comp in comps.items():
        if hasattr(comp, "calculate_scales_and_dense_derivatives"):
            res.append(comp.calculate_scales_and_dense_derivatives(0))
        elif name in buffers:
            res.append(comp.calculate_scales_and_derivatives(0, out=buffers[name]))
        else:
            res.append(comp.calculate_scales_and_derivatives(0))
    return res


def _rss() -> int:
    """Resident set size after returning freed heap pages to the OS (Linux; 0 elsewhere)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def held_bytes(build) -> tuple[float, object]:
    """Bytes still allocated after ``build()`` ran and its temporaries were freed.

    The larger of the RSS growth (sees C++-owned buffers) and tracemalloc's count
    (sees numpy buffers even when they reuse freed heap pages).
    """
    rss0 = _rss()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    obj = build()
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return max(traced, _rss() - rss0), obj


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--exact", action="store_true", help="exact harmonics instead of the lookup table")
    args = ap.parse_args()
    if args.exact:
        models.SH_LOOKUP_THRESHOLD = args.n + 1
    n = args.n
    table, expt = make_data(n)
    model = build_model(table, expt)
    mode = "exact" if args.exact or n <= 100000 else "lookup (0.5 deg)"

    comps = list(model.components.values())

    def setup_and_first_call() -> None:
        configure(model, table, expt)
        for comp in comps:  # first calls build the components' caches
            comp.calculate_scales_and_derivatives(0)

    t0 = time.perf_counter()
    held, _ = held_bytes(setup_and_first_call)
    setup = time.perf_counter() - t0

    comp_map = model.components
    buffers = {}
    for name, comp in comp_map.items():
        if hasattr(comp, "derivative_buffers") and comp._is_lean(0):
            buffers[name] = comp.derivative_buffers(0)
    out_bytes = sum(b.nbytes for bufs in buffers.values() for b in bufs)
    out_bytes += 8 * n * sum(1 for name in comp_map if name not in buffers)  # fresh scales arrays
    model_held = sum(c.held_bytes() for c in comps)
    lean_call(comp_map, buffers)  # warm
    t_lean = times(lambda: lean_call(comp_map, buffers), args.repeats)
    t_comp = best_time(lambda: [c.calculate_scales_and_derivatives(0) for c in comps], args.repeats)
    apm = active_parameter_manager(model.components, list(model.components))
    t_model = best_time(lambda: model_scales_and_derivatives(apm), args.repeats)

    # Re-applying a stored model to all reflections (DIALS: expand_scales_to_all_reflections).
    stored = model.to_dict()
    t_apply = best_time(lambda: models.model_from_dict(stored).get_scales(table, expt), 2)

    ref_held, ref = held_bytes(lambda: NumpyPhysical(model, table, expt))
    t_ref_comp = best_time(ref.components, args.repeats)
    t_ref = best_time(ref.scales_and_derivatives, args.repeats)

    g, J = model_scales_and_derivatives(apm)
    g_ref, J_ref = ref.scales_and_derivatives()
    max_rel = float(np.max(np.abs(g / g_ref - 1.0)))
    max_jac = float(abs(J - J_ref).max() / abs(J_ref).max())

    n_params = [c.n_params for c in comps]
    print(f"physical model, lmax 4: n = {n:,} reflections, parameters scale/decay/absorption = {n_params}, "
          f"harmonics: {mode}")
    print(f"  xtalscale components, lean path (scales + derivatives): best {1e9 * min(t_lean) / n:6.1f} "
          f"ns/refl, median {1e9 * float(np.median(t_lean)) / n:6.1f} ns/refl  [target <= 30]")
    print(f"  xtalscale components, DIALS API (scipy CSR blocks):     best {1e9 * t_comp / n:6.1f} ns/refl")
    print(f"  xtalscale model (g + dg/dp CSR, product rule):      {1e9 * t_model / n:8.1f} ns/refl")
    print(f"  numpy components (same caching):                    {1e9 * t_ref_comp / n:8.1f} ns/refl")
    print(f"  numpy model (g + dg/dp CSR, product rule):          {1e9 * t_ref / n:8.1f} ns/refl")
    print(f"  speed-up vs numpy: components lean {t_ref_comp / min(t_lean):5.1f}x "
          f"(DIALS API {t_ref_comp / t_comp:5.1f}x), model {t_ref / t_model:5.1f}x")
    print(f"  held by the model between calls (sum of held_bytes()): {model_held / n:6.1f} B/refl  "
          f"[target <= 150]")
    for name, comp in comp_map.items():
        print(f"    {name:10s}: {comp.held_bytes() / n:6.1f} B/refl")
    print(f"  caller-owned output buffers of the lean path (not model state): {out_bytes / n:6.1f} B/refl")
    print(f"  shared SH lookup table(s), class-wide, not per model: "
          f"{xs_components.SHScaleComponent.shared_table_bytes() / 1e6:6.1f} MB")
    print(f"  RSS/tracemalloc growth over configure + first call (includes input columns built by "
          f"configure): xtalscale {held / n:6.1f} B/refl, numpy reference {ref_held / n:6.1f} B/refl")
    for name, comp in comp_map.items():
        one = {name: comp}
        t_c = times(lambda o=one: lean_call(o, buffers), args.repeats)
        print(f"    {name:10s}: lean best {1e9 * min(t_c) / n:6.1f}, median "
              f"{1e9 * float(np.median(t_c)) / n:6.1f} ns/refl per scales + derivatives call")
    print(f"  one-off setup (configure + update_reflection_data + first call): {1e9 * setup / n:8.1f} ns/refl")
    print(f"  re-applying the stored model (from_dict + get_scales on all reflections): "
          f"{1e9 * t_apply / n:8.1f} ns/refl")
    print(f"  agreement with numpy: max |g/g_np - 1| = {max_rel:.1e}, max |J - J_np|/max|J_np| = {max_jac:.1e}")
    print("  targets: <= 30 ns/refl, <= 150 B/refl; DIALS ~650 ns/refl (minimisation), ~2.5 us/refl (expansion)")


if __name__ == "__main__":
    main()
