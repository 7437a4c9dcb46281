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
