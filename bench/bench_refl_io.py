"""Benchmark: DIALS .refl read/write (msgpack and legacy pickle) on a >= 1e6-row table.

The table is DERIVED from real data: the l-cysteine scaled sweeps (tests/data, 20,743 rows,
39 columns) tiled until it has at least ``--rows`` rows. Figures printed:

* xtalscale msgpack read / write and legacy-pickle read / write: seconds and MB/s (file
  bytes per second), best of ``--repeat`` runs;
* the plain-Python approach in the same run: ``msgpack.unpackb`` + per-element Python decode
  of the column blobs (struct.iter_unpack), ``msgpack.packb`` of bytes, and the pure-Python
  base-256 decode of the legacy payloads after ``pickle.load`` (on a subsample, scaled);
* table memory against the raw column bytes.

Run: ``PYTHONPATH=python python bench/bench_refl_io.py [--rows 1000000] [--repeat 3]``.
No timed assertions anywhere: this only prints.
"""

from __future__ import annotations

import argparse
import math
import os
import struct
import tempfile
import time
import tracemalloc
from pathlib import Path

import msgpack
import numpy as np
from timing import best_time

from xtalscale.array_family import flex
from xtalscale.io.refl import read_refl, write_legacy_pickle, write_msgpack

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "dials_l_cysteine_4_sweeps_scaled"


def tiled_table(min_rows: int) -> flex.reflection_table:
    parts = [flex.reflection_table.from_file(DATA / f"scaled_{s}.refl") for s in ("30", "35")]
    base = parts[0]
    parts[1].experiment_identifiers()[0] = "2"  # both are id 0; relabel so extend agrees
    base.extend(parts[1])
    reps = math.ceil(min_rows / len(base))
    big = flex.reflection_table()
    for name, col in base.cols():
        a = col.as_numpy_array()
        big[name] = type(col)._wrap(np.concatenate([a] * reps))
    big["id"] = flex.int(np.zeros(len(big), dtype=np.int32))
    big.experiment_identifiers()[0] = "derived-l-cysteine-tiled"
    return big



def plain_python_msgpack_read(path: str) -> dict:
    """The obvious pure-Python reader: unpackb, then decode every element in Python."""
    with open(path, "rb") as f:
        obj = msgpack.unpackb(f.read(), strict_map_key=False)
    fmt = {
        "double": "<d",
        "int": "<i",
        "std::size_t": "<Q",
        "bool": "<?",
        "vec3<double>": "<3d",
        "cctbx::miller::index<>": "<3i",
        "int6": "<6i",
    }
    out = {}
    for name, (typ, (_, blob)) in obj[2]["data"].items():
        out[name] = [v if len(v) > 1 else v[0] for v in struct.iter_unpack(fmt[typ], blob)]
    return out


def plain_python_msgpack_write(table: flex.reflection_table, path: str) -> None:
    data = {k: ["double", [len(c), c.as_numpy_array().tobytes()]] for k, c in table.cols()}
    with open(path, "wb") as f:
        f.write(
            msgpack.packb(
                [
                    "dials::af::reflection_table",
                    1,
                    {"identifiers": {}, "nrows": len(table), "data": data},
                ]
            )
        )


def py_base256_column(buf: bytes, is_double: bool) -> list:
    """Pure-Python scitbx base-256 decode (what a reader without C++ does)."""

    def read_int(pos):
        h = buf[pos]
        n = h & 0x7F
        if n == 0:
            return 0, pos + 1
        v = int.from_bytes(buf[pos + 1 : pos + n], "little")
        return (-v if h > 128 else v), pos + n

    count, pos = read_int(0)
    out = []
    while pos < len(buf):
        if is_double:
            h = buf[pos]
            n = h & 0x7F
            if n == 0:
                out.append(0.0)
                pos += 1
                continue
            frac = 0.0
            for b in reversed(buf[pos + 1 : pos + n]):
                frac = (frac + b) / 256.0
            e, pos = read_int(pos + n)
            v = math.ldexp(frac, e)
            out.append(-v if h > 128 else v)
        else:
            v, pos = read_int(pos)
            out.append(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    t = tiled_table(args.rows)
    raw_bytes = sum(c.as_numpy_array().nbytes for _, c in t.cols())
    print(
        f"table: {len(t):,} rows x {t.ncols()} columns, raw column bytes {raw_bytes / 1e6:.1f} MB "
        "(derived: l-cysteine sweeps 30+35 tiled)"
    )

    with tempfile.TemporaryDirectory() as tmp:
        mp = os.path.join(tmp, "big.refl")
        lp = os.path.join(tmp, "big.pickle")
        blob = np.concatenate([c.as_numpy_array().reshape(-1).view(np.uint8) for _, c in t.cols()])

        def raw_write():
            with open(os.path.join(tmp, "raw.bin"), "wb") as f:
                f.write(memoryview(blob))

        t_raw = best_time(raw_write, args.repeat)
        print(
            f"baseline: one write() of the same {blob.nbytes / 1e6:.0f} MB: {t_raw:.3f} s = "
            f"{blob.nbytes / t_raw / 1e9:.2f} GB/s (the file-system ceiling for writing)"
        )
        blob = None  # free the copy before timing the real writers
        os.remove(os.path.join(tmp, "raw.bin"))
        tw = best_time(lambda: write_msgpack(t, mp), args.repeat)
        size_mp = os.path.getsize(mp)
        tr = best_time(lambda: read_refl(mp), args.repeat)
        print(
            f"msgpack  file {size_mp / 1e6:8.1f} MB | read {tr:7.3f} s = {size_mp / tr / 1e9:6.2f} GB/s"
            f" | write {tw:7.3f} s = {size_mp / tw / 1e9:6.2f} GB/s   [targets: read >= 1, write >= 0.5]"
        )

        tlw = best_time(lambda: write_legacy_pickle(t, lp), 1)
        size_lp = os.path.getsize(lp)
        tlr = best_time(lambda: read_refl(lp), args.repeat)
        print(
            f"legacy   file {size_lp / 1e6:8.1f} MB | read {tlr:7.3f} s = {size_lp / tlr / 1e6:6.0f} MB/s"
            f" | write {tlw:7.3f} s = {size_lp / tlw / 1e6:6.0f} MB/s   [target: read >= 35 MB/s]"
        )

        # ---- plain Python, same run
        tpr = best_time(lambda: plain_python_msgpack_read(mp), 1)
        tpw = best_time(lambda: plain_python_msgpack_write(t, os.path.join(tmp, "plain.refl")), 1)
        print(
            f"plain-Python msgpack (unpackb + per-element decode) read {tpr:7.3f} s = "
            f"{size_mp / tpr / 1e6:6.0f} MB/s | packb write {tpw:7.3f} s = {size_mp / tpw / 1e6:6.0f} MB/s"
        )
        import pickle

        from xtalscale.io.refl import _RestrictedUnpickler

        t0 = time.perf_counter()
        with open(lp, "rb") as f:
            root = _RestrictedUnpickler(f, lp).load()
        t_unpickle = time.perf_counter() - t0
        # pure-Python base-256 decode measured on one double and one vec3 column, scaled by bytes
        cols = root.state[4]
        sample = [cols[b"intensity.sum.value"].state[1], cols[b"xyzobs.px.value"].state[1]]
        t0 = time.perf_counter()
        for s in sample:
            py_base256_column(s, True)
        t_dec = time.perf_counter() - t0
        total_payload = sum(len(c.state[1]) for c in cols.values())
        t_py_legacy = t_unpickle + t_dec * total_payload / sum(len(s) for s in sample)
        print(
            f"plain-Python legacy (pickle.load + Python base-256 decode, extrapolated from 2 columns) "
            f"read ~{t_py_legacy:7.1f} s = {size_lp / t_py_legacy / 1e6:6.1f} MB/s"
        )
        del pickle

        # ---- memory
        tracemalloc.start()
        t2 = read_refl(mp)
        cur, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(
            f"memory: table after msgpack read {cur / 1e6:.1f} MB for {raw_bytes / 1e6:.1f} MB of columns "
            f"= {cur / raw_bytes:.3f}x (peak during read {peak / raw_bytes:.3f}x) [target <= 1.2x]"
        )
        del t2


if __name__ == "__main__":
    main()
