"""Seeded, time-bounded fuzzing of every reader on mutated real files (issue 9).

Truncated, bit-flipped and spliced versions of each shipped file type (msgpack and legacy
pickle ``.refl``, ``.expt``, MTZ plain and gzipped, merged MTZ, XDS) are read in a child
process whose address space is capped (``RLIMIT_AS``) at its size after warm-up plus 10x
the largest (uncompressed) input plus a small slack. Every input must give a clean
ValueError/OSError or a complete object; a hang (the wall-time limit), a crash, a
MemoryError or any other exception fails. A case is reproducible from its printed
(source, case) pair: its generator is seeded with (SEED, source index, case).
"""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import gemmi
import numpy as np

import xtalscale

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data"
SEED = 20261206
BUDGET_S = 30.0  # total reading time over all sources; the child adds ~5 s of start-up


def _small_unmerged_mtz(source: Path, out: Path, rows: int) -> Path:
    """The first ``rows`` rows of a real unmerged MTZ, header and batches kept (gemmi)."""
    m = gemmi.read_mtz_file(str(source))
    m.set_data(np.array(m.array[:rows], copy=True))
    m.write_to_file(str(out))
    return out


def _sources(tmp: Path) -> list:
    gamma = _small_unmerged_mtz(DATA / "mtz_gamma_aimless" / "HKLOUT_unmerged.mtz.gz",
                                tmp / "gamma_small.mtz", 1500)
    hewl = _small_unmerged_mtz(DATA / "mtz_hewl_ssad_subset" /
                               "HEWL_unmerged_subset_e661054.mtz.gz", tmp / "hewl_small.mtz",
                               1500)
    hewl_gz = tmp / "hewl_small.mtz.gz"
    hewl_gz.write_bytes(gzip.compress(hewl.read_bytes()))
    gamma_gz = tmp / "gamma_small.mtz.gz"
    gamma_gz.write_bytes(gzip.compress(gamma.read_bytes()))
    return [
        ["msgpack", "refl", DATA / "dials_l_cysteine_narrow_wedge" / "11_integrated.refl"],
        ["msgpack", "refl", DATA / "dials_quartz_3ded" / "scaled.refl"],
        ["pickle", "refl", DATA / "dials_l_cysteine_4_sweeps_scaled" / "scaled_35.refl"],
        ["expt", "expt", DATA / "dials_l_cysteine_narrow_wedge" / "11_integrated.expt"],
        ["expt", "expt", DATA / "dials_quartz_3ded" / "scaled.expt"],
        ["mtz", "mtz", gamma],
        ["mtz", "mtz", hewl],
        ["mtz_gz", "mtz", gamma_gz],
        ["mtz_gz", "mtz", hewl_gz],
        ["merged_mtz", "merged_mtz", DATA / "mtz_brap_mad_mosflm_6A" / "brap_pk_6A_scaled2.mtz.gz"],
        ["xds", "xds", DATA / "xds_hewl_ssad_snippets" / "XDS_ASCII.HKL"],
        ["xds", "xds", DATA / "xds_hewl_ssad_snippets" / "INTEGRATE.HKL"],
    ]


def test_mutated_files_give_a_clean_error_or_a_complete_table(tmp_path):
    spec = {"seed": SEED, "budget_s": BUDGET_S, "workdir": str(tmp_path),
            "memory_factor": 10.0, "slack_mb": 64,
            "sources": [[k, r, str(p)] for k, r, p in _sources(tmp_path)]}
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    # The child imports the same xtalscale as this process (source tree or installed wheel).
    package_root = Path(xtalscale.__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(package_root), OMP_NUM_THREADS="1",
               MALLOC_ARENA_MAX="2")
    try:
        proc = subprocess.run([sys.executable, str(HERE / "fuzz_readers_child.py"),
                               str(spec_path)], capture_output=True, text=True, env=env,
                              timeout=BUDGET_S + 60)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        last = [x for x in out.splitlines() if x.startswith("CASE")][-1:]
        raise AssertionError(f"reader hung on {last}") from None
    report = [x for x in proc.stdout.splitlines() if not x.startswith("CASE")]
    assert proc.returncode == 0, "\n".join(report[-40:]) + proc.stderr[-3000:]
    done = [x for x in report if x.startswith("DONE")]
    assert len(done) == len(spec["sources"]), report
    print("\n".join(report))  # cases and outcomes per source (pytest -s shows them)
