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
