"""Benchmark: ASU mapping + grouping of >= 10^6 observations (derived from real data).

Indices are the real hypf (R3) and gamma (P2(1)2(1)2(1)) measured indices from tests/data,
tiled to >= 10^6 rows. Compared in the same run with the plain-Python approach: a per-row
loop over gemmi's ``ReciprocalAsu.to_asu`` and a dict for grouping. Prints times; no
assertions. Run: ``PYTHONPATH=python python bench/bench_symmetry.py``.
"""
from __future__ import annotations

import time
from pathlib import Path

import gemmi
import numpy as np

from xtalscale.io.mtz import read_unmerged_mtz
from xtalscale.symmetry import group_reflections, map_to_asu

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
SETS = {"hypf R3": DATA / "mtz_hypf_mosflm" / "hypf_unmerged.mtz.gz",
        "gamma P212121": DATA / "mtz_gamma_aimless" / "HKLOUT_unmerged.mtz.gz"}


def plain(hkl: np.ndarray, gsg) -> int:
    asu, ops = gemmi.ReciprocalAsu(gsg), gsg.operations()
    groups: dict = {}
    for i, h in enumerate(hkl.tolist()):
        groups.setdefault(tuple(asu.to_asu(h, ops)[0]), []).append(i)
    return len(groups)


def main() -> None:
    for name, path in SETS.items():
        r = read_unmerged_mtz(path, sum_partials=False)
        base = np.asarray(r.table["miller_index"])
        hkl = np.tile(base, (int(np.ceil(1e6 / len(base))), 1))
        t0 = time.perf_counter()
        m = map_to_asu(hkl, r.space_group)
        t1 = time.perf_counter()
        g = group_reflections(m.asu_hkl)
        t2 = time.perf_counter()
        n_plain = plain(hkl, r.space_group.gemmi)
        t3 = time.perf_counter()
        assert n_plain == g.n_groups
        print(f"{name}: {len(hkl):,} rows, {g.n_groups:,} groups | map_to_asu {t1 - t0:.3f} s, "
              f"group {t2 - t1:.3f} s | plain Python {t3 - t2:.2f} s "
              f"(x{(t3 - t2) / (t2 - t0):.0f})")


if __name__ == "__main__":
    main()
