"""Benchmark: merging statistics of >= 10^6 observations against a plain numpy implementation.

Simulated P2(1)2(1)2(1) data (cell 50 x 60 x 70 Å, d_min 1.4 Å: ~40,000 unique reflections
at multiplicity ~25; every observation gets a random symmetry-equivalent original index, so
half are Bijvoet-minus mates), intensities from a Wilson-like falloff with Poisson-like noise.

Timed on one core, best of several runs, all in the same run:

* ``xtalscale full``: ``MergingStatistics.from_arrays`` from raw indices (ASU mapping,
  grouping, the C++ pass, 20 volume shells, completeness against the complete set);
* ``grouping + kernel``: grouping of the ASU indices and the C++ pass with shells;
* ``kernel``: the C++ pass alone on grouped observations;
* ``numpy``: the same statistics (n, <I>, <I/σ>, Rmerge/Rmeas/Rpim, CC½ half split, σ-τ
  CC½, CC_ano) in plain vectorised numpy from the ASU indices (np.unique grouping, bincount
  reductions, a lexsort-based random half split) -- compared with ``grouping + kernel``.

Prints ns/observation, wall times, the speed-up and the kernel's peak extra bytes/observation
estimate; no assertions. Run: ``PYTHONPATH=python python bench/bench_merging_stats.py [n]``.
"""
from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import gemmi
import numpy as np
from timing import best_time

from xtalscale._core import stats as core_stats
from xtalscale.stats import MergingStatistics, shell_limits
from xtalscale.symmetry import SpaceGroup, UnitCell, group_reflections, map_to_asu


def simulate(n_obs: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    sg, cell = SpaceGroup("P 21 21 21"), UnitCell((50, 60, 70, 90, 90, 90))
    unique = np.asarray(gemmi.make_miller_array(cell.gemmi, sg.gemmi, 1.4, 0, True))
    pick = rng.integers(0, len(unique), n_obs)
    rots = sg.point_group_rotations()
    op = rng.integers(0, len(rots), n_obs)
    sign = np.where(rng.random(n_obs) < 0.5, -1, 1)
    hkl = np.einsum("ni,nij->nj", unique[pick], rots[op]) * sign[:, None]
    dss = cell.d_star_sq(unique)
    truth = rng.exponential(1.0, len(unique)) * 1e4 * np.exp(-20.0 * dss / 4)
    i_true = truth[pick]
    sigma = np.sqrt(i_true + 25.0)
    intensity = i_true + rng.normal(0.0, 1.0, n_obs) * sigma
    return hkl.astype(np.int32), intensity, sigma, sg, cell


def _pearson_by_shell(shell, x, y, n_shells):
    n = np.bincount(shell, minlength=n_shells).astype(float)
    mx = np.bincount(shell, x, n_shells) / np.maximum(n, 1)
    my = np.bincount(shell, y, n_shells) / np.maximum(n, 1)
    dx, dy = x - mx[shell], y - my[shell]
    sxy = np.bincount(shell, dx * dy, n_shells)
    sxx = np.bincount(shell, dx * dx, n_shells)
    syy = np.bincount(shell, dy * dy, n_shells)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((sxx > 0) & (syy > 0), sxy / np.sqrt(sxx * syy), 0.0)


def _half_means(key, I, w, rng):
    """Per key: weighted means of a random floor(n/2) and of the rest (numpy lexsort split)."""
    order = np.lexsort((rng.random(len(key)), key))
    k = key[order]
    start = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    size = np.diff(np.r_[start, len(k)])
    rank = np.arange(len(k)) - np.repeat(start, size)
    first = rank < np.repeat(size // 2, size)
    grp = np.repeat(np.arange(len(start)), size)
    sw1 = np.bincount(grp, w[order] * first, len(start))
    sw2 = np.bincount(grp, w[order] * ~first, len(start))
    h1 = np.bincount(grp, (w * I)[order] * first, len(start)) / np.where(sw1 > 0, sw1, 1)
    h2 = np.bincount(grp, (w * I)[order] * ~first, len(start)) / np.where(sw2 > 0, sw2, 1)
    return k[start], size, h1, h2


def numpy_statistics(asu, minus, centric, I, s, dss, limits, seed=0):
    """Plain numpy merging statistics per shell (+ overall as the last entry)."""
    rng = np.random.default_rng(seed)
    n_shells = len(limits) - 1
    lo = asu.min(axis=0)
    span = asu.max(axis=0) - lo + 1
    key = ((asu[:, 0] - lo[0]) * span[1] + (asu[:, 1] - lo[1])) * span[2] + (asu[:, 2] - lo[2])
    uniq, grp, n = np.unique(key, return_inverse=True, return_counts=True)
    grp = grp.ravel()
    g = len(uniq)
    w = 1.0 / s ** 2
    sw = np.bincount(grp, w, g)
    mean = np.bincount(grp, w * I, g) / sw
    sig = np.sqrt(1.0 / sw)
    dev = np.abs(I - mean[grp])
    sum_dev = np.bincount(grp, dev, g)
    sum_i = np.bincount(grp, I, g)
    first = np.zeros(g, dtype=np.int64)
    first[grp[::-1]] = np.arange(len(grp))[::-1]
    shell = np.clip(np.searchsorted(limits, dss[first], side="right") - 1, 0, n_shells - 1)
    multi = n > 1
    nm = np.where(multi, n, 2).astype(float)
    out = {}
    for name, sel in (("shells", None), ("overall", 0)):
        sh = shell if sel is None else np.zeros(g, dtype=np.int64)
        ns = n_shells if sel is None else 1
        den = np.bincount(sh, sum_i * multi, ns)
        out[name] = {
            "n_obs": np.bincount(sh, n, ns), "n_uniq": np.bincount(sh, minlength=ns),
            "i_over_sigma": np.bincount(sh, mean / sig, ns) / np.bincount(sh, minlength=ns),
            "r_merge": np.bincount(sh, sum_dev * multi, ns) / den,
            "r_meas": np.bincount(sh, sum_dev * multi * np.sqrt(nm / (nm - 1)), ns) / den,
            "r_pim": np.bincount(sh, sum_dev * multi * np.sqrt(1 / (nm - 1)), ns) / den}
    # CC1/2 by a random half split
    k2, size2, h1, h2 = _half_means(grp, I, w, rng)
    ok = size2 >= 2
    out["cc_half"] = _pearson_by_shell(shell[k2[ok]], h1[ok], h2[ok], n_shells)
    # sigma-tau with internal-variance sigmas
    wvar_num = np.bincount(grp, w * (I - mean[grp]) ** 2, g)
    sww = np.bincount(grp, w * w, g)
    with np.errstate(invalid="ignore", divide="ignore"):
        wvar = np.where(sw * sw - sww > 0, sw / (sw * sw - sww) * wvar_num, 0.0)
    s_int2 = np.maximum(wvar / n, 1.0 / sw)
    sm = shell[multi]
    cnt = np.bincount(sm, minlength=n_shells).astype(float)
    my = np.bincount(sm, mean[multi], n_shells) / np.maximum(cnt, 1)
    var_y = np.bincount(sm, (mean[multi] - my[sm]) ** 2, n_shells) / np.maximum(cnt - 1, 1)
    var_e = np.bincount(sm, s_int2[multi], n_shells) / np.maximum(cnt, 1)
    out["cc_half_sigma_tau"] = (var_y - var_e) / (var_y + var_e)
    # CC_ano: half splits of I(+) and I(-) of acentric reflections
    ac = ~centric[first][grp]
    akey = grp[ac] * 2 + minus[ac]
    k3, size3, a1, a2 = _half_means(akey, I[ac], w[ac], rng)
    good = size3 >= 2
    kk, a1, a2 = k3[good], a1[good], a2[good]
    plus_pos = np.flatnonzero(kk % 2 == 0)
    nxt = plus_pos + 1
    paired = nxt < len(kk)
    plus_pos, nxt = plus_pos[paired], nxt[paired]
    match = kk[nxt] == kk[plus_pos] + 1
    p, m = plus_pos[match], nxt[match]
    out["cc_anom"] = _pearson_by_shell(shell[kk[p] // 2], a1[p] - a1[m], a2[p] - a2[m], n_shells)
    return out


def main() -> None:
    n_obs = int(float(sys.argv[1])) if len(sys.argv) > 1 else 1_000_000
    hkl, I, s, sg, cell = simulate(n_obs)
    print(f"{n_obs:,} observations, P 21 21 21, one core")

    full = None

    def run_full():
        nonlocal full
        full = MergingStatistics.from_arrays(hkl, I, s, sg, cell, n_bins=20)

    t_full = best_time(run_full, 5)
    m = map_to_asu(hkl, sg)
    dss = cell.d_star_sq(hkl)
    limits = shell_limits(dss, 20)
    minus = m.friedel_minus.astype(np.uint8)

    def grouped():
        g = group_reflections(m.asu_hkl)
        first = g.order[g.offsets[:-1]]
        shell = (np.searchsorted(limits, dss[first], side="right") - 1).astype(np.int32)
        return g, shell, m.centric[first].astype(np.uint8)

    g, shell, centric = grouped()

    def kernel():
        return core_stats.merging_statistics(I, s, minus, g.order, g.offsets, shell, centric,
                                              len(limits) - 1)

    def grouping_and_kernel():
        g2, sh2, c2 = grouped()
        return core_stats.merging_statistics(I, s, minus, g2.order, g2.offsets, sh2, c2,
                                              len(limits) - 1)

    t_kernel = best_time(kernel, 7)
    t_gk = best_time(grouping_and_kernel, 7)
    cpu = {"full": best_time(run_full, 5, time.thread_time),
           "gk": best_time(grouping_and_kernel, 7, time.thread_time),
           "kernel": best_time(kernel, 7, time.thread_time)}
    ref = None

    def run_numpy():
        nonlocal ref
        ref = numpy_statistics(m.asu_hkl, m.friedel_minus.astype(np.int64), m.centric, I, s,
                               dss, limits)

    t_np = best_time(run_numpy, 3)
    cpu["numpy"] = best_time(run_numpy, 3, time.thread_time)
    o = full.overall
    print(f"  overall: n_uniq {o.n_uniq:,}, mult {o.mean_redundancy:.2f}, Rmerge {o.r_merge:.4f}"
          f" (numpy {ref['overall']['r_merge'][0]:.4f}), Rpim {o.r_pim:.4f} "
          f"(numpy {ref['overall']['r_pim'][0]:.4f}), <I/sigma> {o.i_over_sigma_mean:.2f} "
          f"(numpy {ref['overall']['i_over_sigma'][0]:.2f})")
    print(f"  last shell CC1/2 {full.bins[-1].cc_one_half:.4f} (numpy split "
          f"{ref['cc_half'][-1]:.4f}), CC_ano overall {o.cc_anom:.3f}")
    print(f"  {'':<56s} {'wall':>8s}     {'':7s}         {'CPU':>8s}")
    for label, t, c in (("xtalscale full (map+group+kernel+shells+completeness)", t_full,
                         cpu["full"]), ("grouping + kernel", t_gk, cpu["gk"]),
                        ("kernel only", t_kernel, cpu["kernel"]),
                        ("numpy reference (grouping + statistics)", t_np, cpu["numpy"])):
        print(f"  {label:<56s} {t * 1e3:8.1f} ms  {t / n_obs * 1e9:7.1f} ns/obs  "
              f"{c * 1e3:8.1f} ms CPU")
    print(f"  speed-up grouping+kernel vs numpy: x{t_np / t_gk:.1f} (CPU x"
          f"{cpu['numpy'] / cpu['gk']:.1f}); full pipeline vs numpy: x{t_np / t_full:.1f}")
    # Kernel working memory: the group-ordered copies (I, sigma, weight, Friedel flag) per
    # observation plus the per-unique outputs (8 arrays) and the shell index.
    per_obs, per_uniq = 3 * 8 + 1, 6 * 8 + 4 + 1 + 8 + 4
    extra = per_obs * n_obs + per_uniq * g.n_groups
    print(f"  kernel extra memory ~{extra / n_obs:.1f} bytes/observation ({g.n_groups:,} unique)")


if __name__ == "__main__":
    main()
