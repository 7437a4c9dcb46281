"""Benchmark: the README's main job, ``xtalscale scale`` on the four shipped l-cysteine sweeps,
from the command line (interpreter start, imports, the job, every output written).

Prints the wall time of each run (best and median of ``--repeats``), the peak memory of the
process and the overall merging statistics from the log. The issue-13 target is <= 1 s wall;
dials.scale 3.25 takes 10-15 s on such a machine (Rpim 0.0107, CC1/2 0.9997, Rmerge 0.0327 on
11,914 observations). Run it with the package installed (``pip install .``; bytecode is then
precompiled) or from the source tree (``PYTHONPATH=python``). Asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "dials_l_cysteine_integrated"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("phil", nargs="*", help="extra key=value parameters for the job")
    args = ap.parse_args()
    files = sorted(str(p) for p in DATA.glob("*_integrated.pickle")) + \
        sorted(str(p) for p in DATA.glob("*_integrated_experiments.json"))
    walls = []
    with tempfile.TemporaryDirectory() as work:
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "xtalscale", "scale", *files, *args.phil],
                           cwd=work, check=True, stdout=subprocess.DEVNULL)
            walls.append(time.perf_counter() - t0)
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        log = (Path(work) / "xtalscale.scale.log").read_text()
    overall = [line for line in log.splitlines() if re.match(r"\s+\d+\.\d+\s+\d+\.\d+\s+\d+\s", line)]
    print(f"xtalscale scale, four l-cysteine sweeps ({len(files) // 2} .refl/.expt pairs), "
          f"{args.repeats} runs: best {min(walls):.2f} s, median {statistics.median(walls):.2f} s wall; "
          f"peak memory {peak_mb:.0f} MB")
    if overall:
        print("overall statistics (d_max d_min #obs #uniq mult %comp <I> <I/sI> r_mrg r_meas r_pim cc1/2 cc_ano):")
        print(overall[-1])
    print(f"(PYTHONPATH={os.environ.get('PYTHONPATH', '')!r}; this machine: {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
