"""The README's main job: `xtalscale apply-model` on the shipped quartz data, end to end."""
from __future__ import annotations

import re
from pathlib import Path

import gemmi
import numpy as np
import pytest

from xtalscale.cli import main
from xtalscale.reflection_table import reflection_table

QUARTZ = Path(__file__).resolve().parents[1] / "data" / "dials_quartz_3ded"


def test_apply_model_reproduces_dials_and_writes_readable_files(tmp_path, capsys):
    status = main(["apply-model", str(QUARTZ / "scaled.expt"), str(QUARTZ / "scaled.refl"),
                   "-o", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0, out
    # 1,620 rows in the file; DIALS scaled the 1,512 that are not flagged as excluded.
    assert "evaluated the stored scaling model on 1512 reflections" in out
    max_rel = float(re.search(r"max \|rel\| = (\S+),", out).group(1))
    assert max_rel < 1e-12  # DIALS-exact: only floating-point rounding differs

    original = reflection_table.from_file(str(QUARTZ / "scaled.refl"))
    written = reflection_table.from_file(str(tmp_path / "scaled.refl"))
    assert len(written) == len(original)  # nothing dropped, excluded rows kept
    np.testing.assert_allclose(np.asarray(written["inverse_scale_factor"]),
                               np.asarray(original["inverse_scale_factor"]), rtol=1e-12)

    unmerged = gemmi.read_mtz_file(str(tmp_path / "scaled_unmerged.mtz"))
    assert unmerged.nreflections == 1512
    assert unmerged.spacegroup.hm == "P 31 2 1"
    assert {"I", "SIGI", "SCALEUSED", "BATCH", "M/ISYM"} <= {c.label for c in unmerged.columns}
    merged = gemmi.read_mtz_file(str(tmp_path / "scaled_merged.mtz"))
    assert merged.nreflections == 298
    imean = np.asarray(merged.column_with_label("IMEAN"))
    assert np.all(np.isfinite(imean))


def test_apply_model_reports_a_missing_file_cleanly(tmp_path, capsys):
    status = main(["apply-model", str(tmp_path / "missing.expt"), str(QUARTZ / "scaled.refl")])
    assert status == 2
    assert "missing.expt" in capsys.readouterr().err


def test_apply_model_requires_both_files():
    with pytest.raises(SystemExit):
        main(["apply-model"])


def test_apply_model_unmerged_mtz_holds_scaled_intensities(tmp_path, capsys):
    """Issue 9.1: I/SIGI of scaled_unmerged.mtz are raw / g and sigma / g (DIALS export and
    AIMLESS convention). Merging the written file gives the Rmerge of raw / g on the 1,512
    scaled rows, 0.168; the unscaled intensities written before the fix gave 0.180. (On
    DIALS's own selection without outliers the same scales give DIALS's 0.109, see
    test_mtz.py::test_dials_scaled_table_exports_like_dials_export.)"""
    assert main(["apply-model", str(QUARTZ / "scaled.expt"), str(QUARTZ / "scaled.refl"),
                 "-o", str(tmp_path)]) == 0
    capsys.readouterr()
    mtz = gemmi.read_mtz_file(str(tmp_path / "scaled_unmerged.mtz"))
    columns = {c.label: np.asarray(c, dtype=np.float64) for c in mtz.columns}
    # I * SCALEUSED gives back the raw intensities of the scaled rows (float32 storage)
    from xtalscale.models import suitable_for_scaling

    table = reflection_table.from_file(str(tmp_path / "scaled.refl"))
    raw = np.asarray(table["intensity.scale.value"])[suitable_for_scaling(table)]
    np.testing.assert_allclose(np.sort(columns["I"] * columns["SCALEUSED"]), np.sort(raw),
                               rtol=2e-6, atol=1e-6)
    data = gemmi.Intensities()
    data.import_mtz(mtz, gemmi.DataType.Unmerged)
    stats = data.calculate_merging_stats(None, use_weights="N")[0]
    assert stats.all_refl == 1512
    # gemmi 0.1674 vs textbook numpy 0.1681 (gemmi's bookkeeping detail, see test_mtz.py)
    assert stats.r_merge() == pytest.approx(0.168, abs=2e-3)


def test_help_into_a_closed_pipe_ends_quietly():
    # `xtalscale merge -h | head -1`: the reader closes the pipe after one line
    import os
    import subprocess
    import sys

    import xtalscale

    env = dict(os.environ, PYTHONPATH=str(Path(xtalscale.__file__).parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "xtalscale", "merge", "-h"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, bufsize=0)
    first = proc.stdout.read(10)
    proc.stdout.close()  # the reader goes away
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    proc.wait(timeout=60)
    assert first
    assert "Broken pipe" not in stderr and "Traceback" not in stderr


def test_one_malloc_arena_is_glibc_advice():
    """The command line limits glibc to one malloc arena (threads then reuse each other's
    freed memory); in a child process so this test process keeps its allocator settings."""
    import subprocess
    import sys

    for name in ("one_malloc_arena", "reuse_freed_memory"):
        code = f"from xtalscale.cli import {name}; import sys; sys.exit(0 if {name}() else 3)"
        rc = subprocess.run([sys.executable, "-c", code]).returncode
        assert rc == (0 if sys.platform.startswith("linux") else 3), name


def test_no_huge_pages_turns_off_numpy_and_core_advice():
    """The command line stops numpy and the C++ buffers advising huge pages (first touch of a
    huge page is ~5x slower on a VM); in a child process, so this process keeps numpy's."""
    import subprocess
    import sys

    code = ("import numpy as np\n"
            "from xtalscale import _core\n"
            "from xtalscale.cli import no_huge_pages\n"
            "_core.set_huge_pages(True)\n"
            "assert no_huge_pages()\n"
            "assert not _core.huge_pages()\n"
            "assert not np._core.multiarray._get_madvise_hugepage()\n"
            "a = np.ones(2**20); assert a.sum() == 2**20  # allocations work as before\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
