"""Benchmark: unmerged MTZ write and read on >= 10^6 rows (derived from real data).

The table is the real AIMLESS-scaled gamma-adaptin file (tests/data/mtz_gamma_aimless,
44,990 rows) tiled N times as N separate sweeps (batch ranges offset by 1000 each), so
the rows are real measurements; the tiling is the only synthetic step.

Compared in the same run:

* xtalscale: ``write_unmerged_mtz`` (C++ ASU mapping + numpy + gemmi) and
  ``read_unmerged_mtz`` (gemmi + numpy, DIALS column names, experiments);
* plain Python: the usual script approach on the same data: a per-row loop calling
  gemmi's per-index ``ReciprocalAsu.to_asu`` to build M/ISYM for writing, and a per-row
  loop over ``mtz`` rows with ``Op.apply_to_hkl`` to recover original indices and build
  Python column lists for reading.

Prints wall times (best of ``--repeat``) and MB/s of MTZ file size. No assertions.
Run: ``PYTHONPATH=python python bench/bench_mtz_io.py [--copies 23] [--repeat 3]``.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import gemmi
import numpy as np
from timing import best_time

from xtalscale.array_family import flex
from xtalscale.experiments import Experiment, ExperimentList, Scan
from xtalscale.io.mtz import read_unmerged_mtz, write_unmerged_mtz

SOURCE = Path(__file__).resolve().parents[1] / "tests" / "data" / "mtz_gamma_aimless" / \
    "HKLOUT_unmerged.mtz.gz"


def tiled_table(copies: int):
    """The real gamma table repeated `copies` times, each copy its own sweep."""
    src = read_unmerged_mtz(SOURCE)
    base, expt0 = src.table, src.experiments[0]
    n0 = len(base)
    table = flex.reflection_table()
    for name in base.keys():
        a = np.asarray(base[name])
        table[name] = np.concatenate([a] * copies)
    table["id"] = np.repeat(np.arange(copies, dtype=np.int32), n0)
    table["batch"] = np.asarray(table["batch"]) + 1000 * np.asarray(table["id"])
    el = ExperimentList()
    for k in range(copies):
        scan = Scan(dict(expt0.scan.to_dict(), batch_offset=1000 * k))
        el.append(Experiment(beam=expt0.beam, goniometer=expt0.goniometer, scan=scan,
                             crystal=expt0.crystal, identifier=str(k)))
        table.experiment_identifiers()[k] = str(k)
    # the batch column already holds the offset batches; let the writer keep them
    table["batch"] = np.asarray(table["batch"]) - 1000 * np.asarray(table["id"])
    return table, el, src.space_group


def plain_python_write(path, table, el, sg):
    """Per-row Python loop: gemmi per-index ASU mapping, list of rows, then write."""
    gsg = sg.gemmi
    asu, ops = gemmi.ReciprocalAsu(gsg), gsg.operations()
    hkl = np.asarray(table["miller_index"]).tolist()
    batch = (np.asarray(table["batch"]) + 1000 * np.asarray(table["id"])).tolist()
    I = np.asarray(table["intensity.scale.value"]).tolist()
    V = np.asarray(table["intensity.scale.variance"]).tolist()
    g = np.asarray(table["inverse_scale_factor"]).tolist()
    rows = []
    for h, b, i, v, s in zip(hkl, batch, I, V, g):
        a, isym = asu.to_asu(h, ops)
        rows.append([a[0], a[1], a[2], isym, b, i, v ** 0.5, s])
    mtz = gemmi.Mtz(with_base=True)
    mtz.spacegroup = gsg
    mtz.set_cell_for_all(el[0].crystal.get_unit_cell().gemmi)
    mtz.add_dataset("NATIVE")
    for label, t in (("M/ISYM", "Y"), ("BATCH", "B"), ("I", "J"), ("SIGI", "Q"),
                     ("SCALEUSED", "R")):
        mtz.add_column(label, t)
    mtz.set_data(np.array(rows, dtype=np.float32))
    for number in sorted(set(batch)):
        bh = gemmi.Mtz.Batch()
        bh.number = number
        mtz.batches.append(bh)
    mtz.write_to_file(str(path))


def plain_python_read(path):
    """Per-row Python loop: original index from ISYM with gemmi ops, Python lists."""
    mtz = gemmi.read_mtz_file(str(path))
    ops = mtz.spacegroup.operations().sym_ops
    labels = mtz.column_labels()
    iI, iS, iB, iM = (labels.index(x) for x in ("I", "SIGI", "BATCH", "M/ISYM"))
    hkl, inten, var, batch = [], [], [], []
    for row in mtz.array.tolist():
        isym = int(row[iM]) % 256
        op = ops[(isym - 1) // 2]
        h = [int(row[0]), int(row[1]), int(row[2])]
        if isym % 2 == 0:
            h = [-h[0], -h[1], -h[2]]
        hkl.append(op.inverse().apply_to_hkl(h))
        inten.append(row[iI])
        var.append(row[iS] ** 2)
        batch.append(int(row[iB]))
    return hkl, inten, var, batch



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=23, help="tiles of the 44,990-row file")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--plain-repeat", type=int, default=1)
    args = ap.parse_args()
    table, el, sg = tiled_table(args.copies)
    n = len(table)
    print(f"rows: {n:,} ({args.copies} sweeps x 44,990 real rows of {SOURCE.name})")
    with tempfile.TemporaryDirectory() as tmp:
        ours, plain = Path(tmp) / "ours.mtz", Path(tmp) / "plain.mtz"
        t_w = best_time(lambda: write_unmerged_mtz(ours, table, el), args.repeat)
        size = os.path.getsize(ours) / 1e6
        t_r = best_time(lambda: read_unmerged_mtz(ours), args.repeat)
        check = read_unmerged_mtz(ours)
        assert len(check.table) == n and len(check.experiments) == args.copies
        t_pw = best_time(lambda: plain_python_write(plain, table, el, sg), args.plain_repeat)
        psize = os.path.getsize(plain) / 1e6
        t_pr = best_time(lambda: plain_python_read(plain), args.plain_repeat)
        t_gr = best_time(lambda: gemmi.read_mtz_file(str(ours)), args.repeat)
    print(f"file sizes: xtalscale {size:.1f} MB (14 columns), plain {psize:.1f} MB (8 columns)")
    print(f"{'':28s}{'seconds':>10s}{'MB/s':>10s}{'Mrows/s':>10s}")
    for name, t, mb in (("xtalscale write", t_w, size), ("plain Python write", t_pw, psize),
                        ("xtalscale read", t_r, size), ("plain Python read", t_pr, psize),
                        ("gemmi.read_mtz_file only", t_gr, size)):
        print(f"{name:28s}{t:10.3f}{mb / t:10.1f}{n / t / 1e6:10.2f}")
    print(f"speed-up vs plain Python: write x{t_pw / t_w:.0f}, read x{t_pr / t_r:.0f}")


if __name__ == "__main__":
    main()
