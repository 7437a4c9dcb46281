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

import xtalscale
from xtalscale.io.refl import ReflFileError, read_refl

# The children import the same xtalscale as this process: the source tree with an in-place build,
# or site-packages for an installed wheel (the source tree there has no compiled _core).
PYTHON_DIR = Path(xtalscale.__file__).resolve().parents[1]


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


def test_column_less_table_cannot_claim_unbounded_rows(tmp_path):
    import msgpack

    p = tmp_path / "rows.refl"
    p.write_bytes(msgpack.packb(["dials::af::reflection_table", 1,
                                 {"nrows": 10**15, "identifiers": {}, "data": {}}]))
    with pytest.raises(ReflFileError, match=r"rows\.refl: a table without columns claims"):
        read_refl(p)
    p.write_bytes(TABLE_HEAD + b"(K\x02}\x8a\x07\x00\x80\xc6\xa4\x7e\x8d\x03K\x00}tb.")
    with pytest.raises(ReflFileError, match=r"a table without columns claims 1000000000000000"):
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


def test_merged_mtz_indices_must_be_integral_and_in_range(tmp_path):
    from xtalscale.io.mtz import MtzFormatError, read_merged_mtz

    merged = DATA / "mtz_brap_mad_mosflm_6A" / "brap_pk_6A_scaled2.mtz.gz"
    assert len(read_merged_mtz(merged).miller_index) > 0
    with pytest.raises(MtzFormatError, match=r"column K row 2 holds 3000000000.0"):
        read_merged_mtz(_edited_mtz(merged, tmp_path / "m.mtz", _set("K", 2, 3e9)))


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


# ------------------------------------------------------------------ XDS, .expt (3, 4, 6, 7)

XDS_ASCII = DATA / "xds_hewl_ssad_snippets" / "XDS_ASCII.HKL"
QUARTZ = DATA / "dials_quartz_3ded"


def _edited_xds(tmp_path: Path, old: str, new: str) -> Path:
    text = XDS_ASCII.read_text()
    assert old in text
    p = tmp_path / "XDS_ASCII.HKL"
    p.write_text(text.replace(old, new, 1))
    return p


def _first_record(text: str) -> str:
    return next(x for x in text.splitlines() if x.strip() and not x.startswith("!"))


def test_readers_refuse_devices_instead_of_reading_them_forever():
    """9.3: /dev/zero was read until memory ran out (.expt and XDS); bounded child."""
    out = run_bounded("""
        from xtalscale.experiments import ExperimentList
        from xtalscale.io.xds import read_xds_hkl
        from xtalscale.io.mtz import read_unmerged_mtz
        from xtalscale.io.refl import read_refl
        for reader in (ExperimentList.from_file, read_xds_hkl, read_unmerged_mtz, read_refl):
            try:
                reader("/dev/zero")
            except ValueError as exc:
                print("refused:", exc)
    """, timeout=30, memory_mb=600)
    assert out.count("/dev/zero: not a regular file") == 3, out
    assert out.count("refused:") == 4, out


@pytest.mark.parametrize("old, new, expected", [
    ("!OSCILLATION_RANGE=  0.500000", "!OSCILLATION_RANGE=  0.0", "OSCILLATION_RANGE"),
    ("!DATA_RANGE=       1    1439", "!DATA_RANGE=       1    1e300", "DATA_RANGE"),
    ("!STARTING_FRAME=       1", "!STARTING_FRAME=       1e300", "STARTING_FRAME"),
    ("!NX=  2463", "!NX=  1e400", "NX"),
    ("!NUMBER_OF_ITEMS_IN_EACH_DATA_RECORD=12", "!NUMBER_OF_ITEMS_IN_EACH_DATA_RECORD=x",
     "NUMBER_OF_ITEMS_IN_EACH_DATA_RECORD"),
])
def test_xds_absurd_header_values_are_refused(tmp_path, old, new, expected):
    from xtalscale.io.xds import XdsFormatError, read_xds_hkl

    with pytest.raises(XdsFormatError, match=rf"XDS_ASCII\.HKL: header {expected}"):
        read_xds_hkl(_edited_xds(tmp_path, old, new))


@pytest.mark.parametrize("h", ["5000000000", "22.5"])
def test_xds_miller_indices_must_be_integral_and_in_range(tmp_path, h):
    """9.4: H=5e9 read as -2147483648 before."""
    from xtalscale.io.xds import XdsFormatError, read_xds_hkl

    record = _first_record(XDS_ASCII.read_text())
    fields = record.split()
    p = _edited_xds(tmp_path, record, record.replace(fields[0], h, 1))
    with pytest.raises(XdsFormatError, match=r"record 1: H=.* is not an integer"):
        read_xds_hkl(p)


def test_deeply_nested_expt_json_is_a_format_error(tmp_path):
    """9.7: RecursionError before."""
    from xtalscale.experiments import ExperimentFormatError, ExperimentList

    p = tmp_path / "deep.expt"
    p.write_text('{"experiment": [], "beam": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ExperimentFormatError, match=r"deep\.expt: JSON nested too deeply"):
        ExperimentList.from_file(p)


def test_deeply_nested_shoebox_column_is_a_format_error(tmp_path):
    """9.7: a skipped (shoebox) msgpack column nested 100,000 deep: RecursionError before."""
    import msgpack

    deep = b"\x91" * 100_000 + b"\xc0"  # [[[...[nil]...]]]
    head = msgpack.packb(["dials::af::reflection_table", 1,
                          {"nrows": 0, "identifiers": {}, "data": {}}])
    # replace the empty data map by one Shoebox<> column holding the nested list
    column = msgpack.packb("shoebox") + b"\x92" + msgpack.packb("Shoebox<>") + deep
    p = tmp_path / "shoebox.refl"
    p.write_bytes(head[:-1] + b"\x81" + column)
    with pytest.raises(ReflFileError, match=r"shoebox\.refl: msgpack nesting too deep"):
        read_refl(p)


# ------------------------------------------------------------------ models, selections (6)


def _quartz():
    from xtalscale.experiments import ExperimentList
    from xtalscale.reflection_table import reflection_table

    return (ExperimentList.from_file(QUARTZ / "scaled.expt"),
            reflection_table.from_file(str(QUARTZ / "scaled.refl")))


@pytest.mark.parametrize("key", ["s_norm_fac", "d_norm_fac"])
def test_zero_normalisation_factor_in_a_stored_model_is_refused(key):
    from xtalscale.models import ScalingModelError, model_from_dict

    experiments, _ = _quartz()
    stored = experiments[0].scaling_model
    stored = stored if isinstance(stored, dict) else stored.to_dict()
    import copy

    bad = copy.deepcopy(stored)
    bad["configuration_parameters"][key] = 0.0
    with pytest.raises(ScalingModelError, match=rf"configuration_parameters\['{key}'\] must be"):
        model_from_dict(bad)
    bad["configuration_parameters"] = ["not", "a", "dict"]
    with pytest.raises(ScalingModelError, match="configuration_parameters must be a dict"):
        model_from_dict(bad)


def test_rows_matching_no_experiment_bad_d_and_s1_are_refused():
    from xtalscale.models import inverse_scale_factors

    experiments, table = _quartz()
    ids = np.asarray(table["id"]).copy()
    ids[5] = 7
    table["id"] = ids
    with pytest.raises(ValueError, match=r"table row 5 has id 7, which matches no experiment"):
        inverse_scale_factors(experiments, table)
    experiments, table = _quartz()
    d = np.asarray(table["d"]).copy()
    d[9] = 1e-10
    table["d"] = d
    with pytest.raises(ValueError, match=r"g = inf on table row 9, d = 1e-10"):
        inverse_scale_factors(experiments, table)
    experiments, table = _quartz()
    from xtalscale.models import suitable_for_scaling

    row = int(np.flatnonzero(suitable_for_scaling(table))[20])
    s1 = np.asarray(table["s1"]).copy()
    s1[row] = 0.0
    table["s1"] = s1
    with pytest.raises(ValueError, match=rf"table row {row} has s1 = \[0.0, 0.0, 0.0\]"):
        inverse_scale_factors(experiments, table)
    # a bad z is named by its table row, not by its position in the experiment's subset
    experiments, table = _quartz()
    xyz = np.asarray(table["xyzobs.px.value"]).copy()
    xyz[row, 2] = np.nan
    table["xyzobs.px.value"] = xyz
    with pytest.raises(ValueError, match=rf"table row {row} has xyzobs.px.value"):
        inverse_scale_factors(experiments, table)


def test_selections_are_not_silently_reinterpreted():
    from xtalscale.array_family import flex
    from xtalscale.models import inverse_scale_factors

    experiments, table = _quartz()
    with pytest.raises(TypeError, match="selection must be a bool array"):
        inverse_scale_factors(experiments, table, selection=np.ones(len(table)))
    t = flex.reflection_table()
    t["x"] = flex.double([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(TypeError, match="mixes bools and indices"):
        t.select([True, 3])
    assert list(t.select([1, 3])["x"]) == [2.0, 4.0]
    assert list(t.select([True, False, False, True])["x"]) == [1.0, 4.0]


def test_smoother_interval_count_is_bounded_with_a_message():
    """9.3: GaussianSmoother1D((0, 10), 10**9) allocated 7.7 GB; 2**31 gave bad_alloc."""
    from xtalscale.smoothing import GaussianSmoother1D, GaussianSmoother3D

    for n in (10**9, 2**31):
        with pytest.raises(ValueError, match=rf"num_intervals must be <= 1000000 \(got {n}\)"):
            GaussianSmoother1D((0, 10), n)
    with pytest.raises(ValueError, match="would hold over 10000000 values"):
        GaussianSmoother3D((0, 1), 1000, (0, 1), 1000, (0, 1), 1000)
    assert GaussianSmoother1D((0, 10), 1000).num_values() == 1002


# ------------------------------------------------------------------ CLI (7)


def _write_quartz_subset(tmp_path: Path, keep) -> tuple[Path, Path]:
    import shutil

    from xtalscale.reflection_table import reflection_table

    table = reflection_table.from_file(str(QUARTZ / "scaled.refl"))
    keep = keep(table)
    sub = table.select(keep) if keep.dtype == np.bool_ else table
    refl = tmp_path / "sub.refl"
    sub.as_file(str(refl))
    expt = tmp_path / "sub.expt"
    shutil.copy(QUARTZ / "scaled.expt", expt)
    return expt, refl


def test_cli_empty_and_all_excluded_tables_give_a_clear_error(tmp_path, capsys):
    from xtalscale.cli import main
    from xtalscale.reflection_table import Flags

    expt, refl = _write_quartz_subset(tmp_path, lambda t: np.zeros(len(t), dtype=bool))
    assert main(["apply-model", str(expt), str(refl), "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "sub.refl: the reflection table is empty" in err and "index -1" not in err

    def exclude_all(t):
        t["flags"] = np.asarray(t["flags"]) | np.uint64(int(Flags.excluded_for_scaling))
        return np.ones(len(t), dtype=bool)

    expt, refl = _write_quartz_subset(tmp_path, exclude_all)
    assert main(["apply-model", str(expt), str(refl), "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "sub.refl: none of the 1620 reflections is suitable for scaling" in err


def test_wrongly_typed_expt_and_model_fields_give_format_errors(tmp_path):
    """Structural mutations of a real .expt: a dict where a number belongs, a non-list
    'corrections', non-numeric n_parameters or esds (TypeError before)."""
    import json

    from xtalscale.experiments import ExperimentFormatError, ExperimentList
    from xtalscale.models import ScalingModelError, model_from_dict

    src = json.loads((QUARTZ / "scaled.expt").read_text())
    p = tmp_path / "t.expt"
    bad = json.loads(json.dumps(src))
    bad["beam"][0]["wavelength"] = {"a": 1}
    p.write_text(json.dumps(bad))
    with pytest.raises(ExperimentFormatError, match=r"t\.expt: beam\[0\]: wrong type"):
        ExperimentList.from_file(p)
    model = src["scaling_model"][0]
    for path, value in ((("configuration_parameters", "corrections"), None),
                        (("decay", "n_parameters"), None),
                        (("absorption", "est_standard_devs"), {"a": 1}),
                        (("configuration_parameters", "abs_surface_weight"), None),
                        (("configuration_parameters", "lmax"), 10**9)):
        m = json.loads(json.dumps(model))
        m[path[0]][path[1]] = value
        with pytest.raises(ScalingModelError):
            model_from_dict(m)
