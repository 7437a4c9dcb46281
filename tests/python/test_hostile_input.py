"""Hostile input (issue 9): bounded work, clear errors and no silent corruption.

Cases that could hang or exhaust memory before their fix run in a child process with a
time limit and an address-space cap (``RLIMIT_AS``), so a regression fails the test instead
of stalling the suite.
"""
from __future__ import annotations

import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from xtalscale.io.refl import ReflFileError, read_refl

PYTHON_DIR = Path(__file__).resolve().parents[2] / "python"


def run_bounded(code: str, timeout: float = 20.0, memory_mb: int = 1500) -> str:
    """Run ``code`` in a child Python with a wall-time and address-space limit; its stdout.

    The child's exit status must be 0: a hang (timeout), a crash or MemoryError fails.
    """
    limit = memory_mb << 20

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
        timeout=timeout, preexec_fn=cap, env={"PYTHONPATH": str(PYTHON_DIR),
                                              "OMP_NUM_THREADS": "1", "PATH": "/usr/bin"})
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stderr[-2000:]}"
    return proc.stdout


# ------------------------------------------------------------------ 2. legacy pickle DoS


def _shared_nested_tuples(levels: int) -> bytes:
    """Opcodes building t_k = (t_{k-1}, t_{k-1}) through the memo: 2**levels leaves in a
    few hundred bytes."""
    body = b")q\x00"  # EMPTY_TUPLE BINPUT 0
    body += b"0h\x00h\x00\x86q\x00" * levels  # POP BINGET 0 BINGET 0 TUPLE2 BINPUT 0
    return body


TABLE_HEAD = b"\x80\x02cdials_array_family_flex_ext\nreflection_table\n)R"


def test_pickle_shared_tuple_used_as_dict_key_is_refused_quickly(tmp_path):
    """9.2(a): hashing the key would visit 2**60 items; the opcode pre-pass refuses it."""
    p = tmp_path / "key.refl"
    p.write_bytes(b"\x80\x02}" + _shared_nested_tuples(60) + b"K\x01s.")
    assert len(p.read_bytes()) < 500
    out = run_bounded(f"""
        from xtalscale.io.refl import read_refl, ReflFileError
        try:
            read_refl({str(p)!r})
        except ReflFileError as exc:
            print(exc)
    """)
    assert "refusing pickle" in out and "key.refl" in out


def test_pickle_error_messages_never_repr_the_untrusted_object(tmp_path):
    """9.2(b): a table state whose version is a shared nested tuple; the message would repr
    2**40 leaves. Small structures pass the pre-pass and are named by type and size."""
    p = tmp_path / "repr.refl"
    p.write_bytes(TABLE_HEAD + b"(" + _shared_nested_tuples(40) + b"K\x00K\x00}tb.")
    out = run_bounded(f"""
        from xtalscale.io.refl import read_refl, ReflFileError
        try:
            read_refl({str(p)!r})
        except ReflFileError as exc:
            print(exc)
    """)
    assert "repr.refl: refusing pickle" in out
    small = tmp_path / "small.refl"
    small.write_bytes(TABLE_HEAD + b"(" + _shared_nested_tuples(3) + b"K\x00K\x00}tb.")
    with pytest.raises(ReflFileError, match=r"version/layout \(tuple of length 2 of a "
                                            r"4-tuple\)") as info:
        read_refl(small)
    assert "((" not in str(info.value)


@pytest.mark.parametrize("depth", [40, 100_000])
def test_deeply_nested_pickle_is_refused(tmp_path, depth):
    p = tmp_path / "deep.refl"
    p.write_bytes(b"\x80\x02" + b")" + b"\x85" * depth + b".")  # TUPLE1 nested `depth` deep
    with pytest.raises(ReflFileError, match=r"deep\.refl: refusing pickle: nesting deeper"):
        read_refl(p)


def test_pickle_memo_and_unknown_opcodes_are_bounded(tmp_path):
    p = tmp_path / "memo.refl"
    p.write_bytes(b"\x80\x02N" + b"".join(b"r" + i.to_bytes(4, "little")
                                           for i in range(70_000)) + b".")
    with pytest.raises(ReflFileError, match="more than 65536 memo entries"):
        read_refl(p)
    p.write_bytes(b"\x80\x02N\xff.")
    with pytest.raises(ReflFileError, match="unknown opcode 0xff"):
        read_refl(p)
    p.write_bytes(b"\x80\x02h\x05.")
    with pytest.raises(ReflFileError, match="missing memo entry"):
        read_refl(p)


def test_real_legacy_pickles_pass_the_pre_pass():
    data = Path(__file__).resolve().parents[1] / "data"
    t = read_refl(data / "dials_l_cysteine_4_sweeps_scaled" / "scaled_35.refl")
    assert len(t) > 0 and np.all(np.isfinite(np.asarray(t["d"])))


# ------------------------------------------------------------------ MTZ (3, 4, 5)

DATA = Path(__file__).resolve().parents[1] / "data"
HEWL_MTZ = DATA / "mtz_hewl_ssad_subset" / "HEWL_unmerged_subset_e661054.mtz.gz"
GAMMA_MTZ = DATA / "mtz_gamma_aimless" / "HKLOUT_unmerged.mtz.gz"


def _edited_mtz(source: Path, out: Path, edit) -> Path:
    """Copy of an MTZ with ``edit(labels, array)`` applied to its data (gemmi writes it)."""
    import gemmi

    m = gemmi.read_mtz_file(str(source))
    data = np.array(m.array, copy=True)
    edit(m.column_labels(), data)
    m.set_data(data)
    m.write_to_file(str(out))
    return out


def _set(label: str, row: int, value: float):
    def edit(labels, data):
        data[row, labels.index(label)] = value
    return edit


def test_mtz_header_pointer_and_counts_are_checked_before_gemmi_allocates(tmp_path):
    """9.3: a corrupted header pointer or random bytes behind 'MTZ ' fail fast, in a child
    capped at 400 MB (gemmi alone allocated 2-8 GB for these)."""
    import gzip

    from xtalscale.io.mtz import MtzFormatError, read_unmerged_mtz

    raw = bytearray(gzip.decompress(GAMMA_MTZ.read_bytes()))
    pointer = tmp_path / "pointer.mtz"
    bad = bytearray(raw)
    bad[4:8] = (2**31 - 1).to_bytes(4, "little")
    pointer.write_bytes(bytes(bad))
    with pytest.raises(MtzFormatError, match=r"pointer\.mtz: corrupt MTZ: header position"):
        read_unmerged_mtz(pointer)
    # NCOL record promising far more rows than the data section holds
    ncol_at = raw.index(b"NCOL")
    counts = tmp_path / "counts.mtz"
    bad = bytearray(raw)
    bad[ncol_at:ncol_at + 80] = b"NCOL   14   500000000   100".ljust(80)
    counts.write_bytes(bytes(bad))
    with pytest.raises(MtzFormatError, match=r"header promises 500000000 rows x 14 columns"):
        read_unmerged_mtz(counts)
    rng = np.random.default_rng(3)
    noise = tmp_path / "noise.mtz.gz"
    noise.write_bytes(gzip.compress(b"MTZ " + rng.integers(0, 256, 5000, np.uint8).tobytes()))
    out = run_bounded(f"""
        from xtalscale.io.mtz import read_unmerged_mtz, MtzFormatError
        for p in ({str(noise)!r}, {str(pointer)!r}, {str(counts)!r}):
            try:
                read_unmerged_mtz(p)
            except MtzFormatError as exc:
                print("refused", exc)
    """, memory_mb=400)
    assert out.count("refused") == 3


@pytest.mark.parametrize("label, value, expected", [
    ("H", 3e9, r"column H row 7 holds 3000000000.0, not an integer"),
    ("H", 22.5, r"column H row 7 holds 22.5, not an integer"),
    ("BATCH", 3e9, r"column BATCH row 7 holds 3000000000.0, not an integer"),
])
def test_mtz_indices_and_batches_must_be_integral_and_in_range(tmp_path, label, value,
                                                               expected):
    """9.4: H=3e9 read as (0,-9,4), H=22.5 as 22, BATCH=3e9 as -1294967296 before."""
    from xtalscale.io.mtz import MtzFormatError, read_unmerged_mtz

    p = _edited_mtz(HEWL_MTZ, tmp_path / "x.mtz", _set(label, 7, value))
    with pytest.raises(MtzFormatError, match=expected):
        read_unmerged_mtz(p)


def test_mtz_writer_refuses_batches_float32_cannot_hold(tmp_path):
    from xtalscale.io.mtz import read_unmerged_mtz, write_unmerged_mtz

    r = read_unmerged_mtz(GAMMA_MTZ)
    t = r.table
    batch = np.asarray(t["batch"]).copy()
    batch[3] = 1 << 24
    t["batch"] = batch.astype(np.int32)
    with pytest.raises(ValueError, match=r"batch number 16777216 of table row 3"):
        write_unmerged_mtz(tmp_path / "b.mtz", t, r.experiments)


@pytest.mark.parametrize("label, value", [("BATCH", 100000), ("ROT", 1e6)])
def test_one_inconsistent_row_does_not_move_the_others(tmp_path, label, value):
    """9.5: without batch headers φ(BATCH) is fitted robustly; the bad row is flagged."""
    from xtalscale.io.mtz import read_unmerged_mtz
    from xtalscale.reflection_table import Flags

    good = read_unmerged_mtz(HEWL_MTZ)
    row = 11
    bad = read_unmerged_mtz(_edited_mtz(HEWL_MTZ, tmp_path / "one.mtz", _set(label, row,
                                                                             value)))
    assert good.experiments[0].scan.get_image_range() == (1, 1440)
    assert np.all(np.asarray(good.table["batch_rot_consistent"]))
    assert bad.experiments[0].scan.get_image_range() == (1, 1440)
    consistent = np.asarray(bad.table["batch_rot_consistent"])
    # the file is sorted; find the edited row by its flag
    assert (~consistent).sum() == 1
    others = consistent
    z_good = np.asarray(good.table["xyzobs.px.value"])[:, 2]
    z_bad = np.asarray(bad.table["xyzobs.px.value"])[:, 2]
    # refitting without the one row moves the others by < 1e-5 image (up to 2,000 before)
    np.testing.assert_allclose(z_bad[others], z_good[others], atol=1e-4)
    flags = np.asarray(bad.table["flags"])
    assert flags[~consistent][0] & int(Flags.excluded_for_scaling)
