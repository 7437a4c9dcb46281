"""DIALS .refl I/O on real files: msgpack and legacy pickles, round trips and bad input."""

from __future__ import annotations

import math
import os
import pickle
import struct
from pathlib import Path

import msgpack
import numpy as np
import pytest

from xtalscale import _core
from xtalscale.array_family import flex
from xtalscale.io.refl import ReflFileError, read_refl, write_legacy_pickle

DATA = Path(__file__).resolve().parents[1] / "data"
LCYS = DATA / "dials_l_cysteine_4_sweeps_scaled"
SCALED = [LCYS / "scaled_20_25.refl", LCYS / "scaled_30.refl", LCYS / "scaled_35.refl"]
PICKLE20 = DATA / "dials_l_cysteine_integrated" / "20_integrated.pickle"
QUARTZ = DATA / "dials_quartz_3ded" / "scaled.refl"
CENTROID = DATA / "dials_centroid_x4lots" / "integrated.refl"
WEDGE = DATA / "dials_l_cysteine_narrow_wedge" / "11_integrated.refl"
SSX = DATA / "dials_ssx_cunir_stills" / "integrated.refl"

F = flex.reflection_table.flags


# ----------------------------------------------------------------------------- helpers
def _ref_int(buf: bytes, pos: int) -> tuple[int, int]:
    """Independent pure-Python scitbx base-256 integer decoder (reference for the C++ one)."""
    head = buf[pos]
    n = head & 0x7F
    if n == 0:
        return 0, pos + 1
    v = int.from_bytes(buf[pos + 1 : pos + n], "little")
    return (-v if head > 128 else v), pos + n


def _ref_double(buf: bytes, pos: int) -> tuple[float, int]:
    head = buf[pos]
    n = head & 0x7F
    if n == 0:
        return 0.0, pos + 1
    frac = 0.0
    for b in reversed(buf[pos + 1 : pos + n]):
        frac = (frac + b) / 256.0
    e, nxt = _ref_int(buf, pos + n)
    v = math.ldexp(frac, e)
    return (-v if head > 128 else v), nxt


def _pickle_payloads(path: Path) -> dict[str, bytes]:
    """Column name -> raw scitbx payload, by walking the pickle opcodes (no unpickling)."""
    import pickletools

    # Short strings are names (identifiers too, overwritten by the next name); every column
    # payload in these files is longer than 255 bytes, hence a BINSTRING after its name.
    out, last_name = {}, None
    for op, arg, _ in pickletools.genops(path.read_bytes()):
        if op.name == "SHORT_BINSTRING":
            last_name = arg
        elif op.name == "BINSTRING":
            out[last_name] = arg.encode("latin-1")
    return out


# ----------------------------------------------------------------------------- real data
def test_l_cysteine_scaled_legacy_pickles_rows_flags_and_dials_intensity_relation():
    tables = [flex.reflection_table.from_file(p) for p in SCALED]
    assert [len(t) for t in tables] == [9972, 5308, 5463]
    # 4 sweeps: 4417 + 5555 in the first file, then 5308 and 5463 (data doc row 1)
    assert list(np.bincount(tables[0]["id"].as_numpy_array())) == [4417, 5555]
    assert sum(len(t) for t in tables) == 20743
    n_integrated = sum(t.get_flags(F.integrated_sum).count(True) for t in tables)
    assert n_integrated == 12187
    n_used = 0
    for t in tables:
        used = t.get_flags(F.integrated_sum) & ~t.get_flags(F.bad_for_scaling, all=False)
        n_used += used.count(True)
        m = used.as_numpy_array()
        assert np.all(t["partiality"].as_numpy_array()[m] > 0)
        scale = t["intensity.scale.value"].as_numpy_array()[m]
        expect = (
            t["intensity.sum.value"].as_numpy_array()[m]
            * t["lp"].as_numpy_array()[m]
            / t["dqe"].as_numpy_array()[m]
            / t["partiality"].as_numpy_array()[m]
        )
        # DIALS computed it in double from the same stored values: agreement to rounding.
        assert np.max(np.abs(scale - expect) / np.abs(scale)) < 1e-12
    assert n_used == 11816
    assert dict(tables[0].experiment_identifiers()) == {0: "0", 1: "1"} or tables[
        0
    ].experiment_identifiers().as_dict() == {0: "0", 1: "1"}
    assert tables[1].experiment_identifiers().as_dict() == {0: "2"}
    t = tables[1]
    assert isinstance(t["miller_index"], flex.miller_index)
    assert isinstance(t["bbox"], flex.int6)
    assert isinstance(t["flags"], flex.size_t)
    assert isinstance(t["entering"], flex.bool)
    assert isinstance(t["s1"], flex.vec3_double)
    assert isinstance(t["id"], flex.int)


def test_legacy_decoder_matches_independent_python_decoder_bit_for_bit():
    payloads = _pickle_payloads(LCYS / "scaled_30.refl")
    t = flex.reflection_table.from_file(LCYS / "scaled_30.refl")
    for name, kind in [
        ("intensity.sum.value", "d"),
        ("s1", "d"),
        ("miller_index", "i"),
        ("bbox", "i"),
        ("flags", "i"),
        ("id", "i"),
    ]:
        buf = payloads[name]
        count, pos = _ref_int(buf, 0)
        assert count == 5308
        vals = []
        while pos < len(buf):
            v, pos = (_ref_double if kind == "d" else _ref_int)(buf, pos)
            vals.append(v)
        got = t[name].as_numpy_array().ravel()
        assert len(vals) == got.size
        assert np.array_equal(np.asarray(vals, dtype=got.dtype), got), name


def test_integrated_pickle_skips_shoebox_and_matches_scaled_sweep_rows():
    p = flex.reflection_table.from_file(PICKLE20)
    assert len(p) == 4417 and p.ncols() == 34 and "shoebox" not in p
    s = flex.reflection_table.from_file(SCALED[0])
    s0 = s.select(s["id"] == 0)
    for name in [
        "miller_index",
        "intensity.sum.value",
        "intensity.prf.variance",
        "xyzobs.px.value",
    ]:
        assert np.array_equal(p[name].as_numpy_array(), s0[name].as_numpy_array()), name
    # dials.scale only added its own bits (22..26: scaling exclusions, outliers, scaled)
    scaling_bits = np.uint64(0b11111 << 22)
    assert np.array_equal(p["flags"].as_numpy_array(), s0["flags"].as_numpy_array() & ~scaling_bits)
    assert p.get_flags(F.integrated_sum).count(True) == 2389


@pytest.mark.parametrize(
    "path, nrows, ncols, nids",
    [(QUARTZ, 1620, 38, 1), (CENTROID, 2269, 34, 0), (WEDGE, 92, 34, 1), (SSX, 5203, 24, 5)],
)
def test_msgpack_files_load_with_expected_shape(path, nrows, ncols, nids):
    t = read_refl(path)
    raw = msgpack.unpackb(path.read_bytes(), strict_map_key=False)
    types = {k: v[0] for k, v in raw[2]["data"].items()}
    assert len(t) == nrows == raw[2]["nrows"]
    assert t.ncols() == ncols == len([k for k in types if types[k] != "Shoebox<>"])
    assert len(t.experiment_identifiers()) == nids
    expected = {
        "double": flex.double,
        "int": flex.int,
        "std::size_t": flex.size_t,
        "bool": flex.bool,
        "vec3<double>": flex.vec3_double,
        "int6": flex.int6,
        "cctbx::miller::index<>": flex.miller_index,
    }
    for name, tn in types.items():
        if tn == "Shoebox<>":
            assert name not in t
            continue
        assert type(t[name]) is expected[tn], name
        # value identity with an independent decode of the raw blob
        blob = raw[2]["data"][name][1][1]
        assert t[name].as_numpy_array().tobytes() == blob, name


def test_msgpack_specific_values():
    q = read_refl(QUARTZ)
    assert q.experiment_identifiers()[0] == "001f4105-10c8-4ecd-ac88-2c789f79b510"
    assert q["miller_index"][0] == (7, -7, 2)
    assert q.get_flags(F.scaled).count(True) == 1401
    c = read_refl(CENTROID)
    assert c.get_flags(F.integrated_sum).count(True) == 1679  # data doc row 9
    s = read_refl(SSX)
    assert list(np.bincount(s["id"].as_numpy_array())) == [704, 554, 2472, 580, 893]


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("path", [QUARTZ, SSX])
def test_msgpack_round_trip_is_byte_identical_to_dials_files(path, tmp_path):
    t = read_refl(path)
    out = tmp_path / "rt.refl"
    t.as_file(out)
    assert out.read_bytes() == path.read_bytes()


def test_msgpack_round_trip_of_every_column_type(tmp_path):
    rng = np.random.default_rng(3)
    n = 257
    t = flex.reflection_table()
    t["d"] = rng.normal(size=n)
    t["i"] = rng.integers(-(2**31), 2**31 - 1, size=n, dtype=np.int32)
    t["flags"] = rng.integers(0, 2**63, size=n, dtype=np.uint64)
    t["b"] = rng.random(n) > 0.5
    t["v3"] = rng.normal(size=(n, 3))
    t["mi"] = rng.integers(-50, 50, size=(n, 3), dtype=np.int32)
    t["bbox"] = flex.int6(rng.integers(0, 1000, size=(n, 6), dtype=np.int32))
    t["v2"] = flex.vec2_double(rng.normal(size=(n, 2)))
    t["m3"] = flex.mat3_double(rng.normal(size=(n, 9)))
    t["id"] = np.zeros(n, dtype=np.int32)
    t.experiment_identifiers()[0] = "abc"
    out = tmp_path / "all.refl"
    t.as_file(out)
    back = flex.reflection_table.from_msgpack_file(out)
    assert back.keys() == sorted(t.keys())
    for k in t.keys():
        assert type(back[k]) is type(t[k])
        assert np.array_equal(back[k].as_numpy_array(), t[k].as_numpy_array()), k
    assert back.experiment_identifiers().as_dict() == {0: "abc"}
    # an independent msgpack reader sees the DIALS layout
    raw = msgpack.unpackb(out.read_bytes(), strict_map_key=False)
    assert raw[0] == "dials::af::reflection_table" and raw[1] == 1
    assert raw[2]["data"]["mi"][0] == "cctbx::miller::index<>"
    assert raw[2]["data"]["flags"][0] == "std::size_t"


def test_legacy_pickle_writer_payloads_equal_scitbx_bytes(tmp_path):
    payloads = _pickle_payloads(LCYS / "scaled_35.refl")
    t = read_refl(LCYS / "scaled_35.refl")
    kinds = {
        flex.double: "double",
        flex.vec3_double: "double",
        flex.int: "int",
        flex.miller_index: "int",
        flex.int6: "int",
        flex.size_t: "size_t",
        flex.bool: "bool",
    }
    for name, col in t.cols():
        enc = _core.refl.encode_base256_column(col.as_numpy_array(), kinds[type(col)])
        assert enc == payloads[name], name
    out = tmp_path / "legacy.pickle"
    write_legacy_pickle(t, out)
    back = read_refl(out)
    assert back.keys() == t.keys()
    for k in t.keys():
        assert np.array_equal(back[k].as_numpy_array(), t[k].as_numpy_array()), k
    assert back.experiment_identifiers().as_dict() == {0: "3"}


def test_base256_codec_extremes():
    d = np.array(
        [
            0.0,
            1.0,
            -1.0,
            5e-324,
            -2.2250738585072014e-308,
            1.7976931348623157e308,
            np.pi,
            -1e-300,
            0.1,
        ],
        dtype=np.float64,
    )
    enc = _core.refl.encode_base256_column(d, "double")
    assert np.array_equal(_core.refl.decode_base256_column(enc, "double"), d)
    i = np.array([0, 1, -1, 2**31 - 1, -(2**31), 255, -256], dtype=np.int32)
    assert np.array_equal(
        _core.refl.decode_base256_column(_core.refl.encode_base256_column(i, "int"), "int"), i
    )
    u = np.array([0, 1, 2**64 - 1, 2**32], dtype=np.uint64)
    assert np.array_equal(
        _core.refl.decode_base256_column(_core.refl.encode_base256_column(u, "size_t"), "size_t"), u
    )
    with pytest.raises(ValueError, match="not finite"):
        _core.refl.encode_base256_column(np.array([np.nan]), "double")


# ----------------------------------------------------------------------------- bad input
def _small_table() -> flex.reflection_table:
    t = flex.reflection_table()
    t["id"] = flex.int([0, 0, 1])
    t["intensity.sum.value"] = flex.double([1.0, 2.0, 3.0])
    t["miller_index"] = flex.miller_index([(1, 2, 3), (0, 0, 1), (-1, 2, 5)])
    t.experiment_identifiers()[0] = "a"
    t.experiment_identifiers()[1] = "b"
    return t


def _pack(data_map, nrows=3, ids=None, extra=None):
    head = {"identifiers": ids if ids is not None else {0: "a"}, "nrows": nrows, "data": data_map}
    if extra:
        head.update(extra)
    return msgpack.packb(["dials::af::reflection_table", 1, head], use_bin_type=True)


def test_truncated_msgpack_at_every_kind_of_boundary_raises_naming_file(tmp_path):
    good = tmp_path / "good.refl"
    _small_table().as_file(good)
    raw = good.read_bytes()
    for cut in [1, 5, 40, len(raw) // 2, len(raw) - 1]:
        bad = tmp_path / f"cut{cut}.refl"
        bad.write_bytes(raw[:cut])
        with pytest.raises(ReflFileError, match=r"cut\d+\.refl: .*(truncated|past the end)"):
            read_refl(bad)
    extra = tmp_path / "extra.refl"
    extra.write_bytes(raw + b"\x00")
    with pytest.raises(ReflFileError, match="unexpected bytes"):
        read_refl(extra)


def test_unknown_column_type_and_bad_sizes(tmp_path):
    p = tmp_path / "x.refl"
    p.write_bytes(_pack({"a": ["float128", [3, b"\0" * 48]]}))
    with pytest.raises(ReflFileError, match=r"x\.refl: column 'a' has unknown type 'float128'"):
        read_refl(p)
    p.write_bytes(_pack({"a": ["double", [3, b"\0" * 16]]}))
    with pytest.raises(ReflFileError, match="blob has 16 bytes, expected 3 x 8"):
        read_refl(p)
    p.write_bytes(_pack({"a": ["double", [2, b"\0" * 16]]}))  # unequal length vs nrows
    with pytest.raises(ReflFileError, match="column 'a' has 2 rows but nrows is 3"):
        read_refl(p)
    p.write_bytes(_pack({"a": ["bool", [3, b"\x00\x01\x02"]]}))
    with pytest.raises(ReflFileError, match="bytes other than 0/1"):
        read_refl(p)


def test_missing_header_keys_and_required_columns(tmp_path):
    p = tmp_path / "m.refl"
    p.write_bytes(msgpack.packb(["dials::af::reflection_table", 1, {"data": {}}]))
    with pytest.raises(ReflFileError, match="missing required key 'nrows'"):
        read_refl(p)
    p.write_bytes(msgpack.packb(["something_else", 1, {"nrows": 0, "data": {}}]))
    with pytest.raises(ReflFileError, match="not a reflection table"):
        read_refl(p)
    p.write_bytes(_pack({"x": ["double", [3, b"\0" * 24]]}))
    with pytest.raises(ReflFileError, match=r"missing required columns \['intensity.sum.value'\]"):
        read_refl(p, required_columns=["x", "intensity.sum.value"])


def test_identifiers_that_do_not_match(tmp_path):
    p = tmp_path / "ids.refl"
    ids_blob = np.array([0, 1, 2], dtype="<i4").tobytes()
    p.write_bytes(_pack({"id": ["int", [3, ids_blob]]}, ids={0: "a", 1: "b"}))
    with pytest.raises(ReflFileError, match=r"ids\.refl: experiment ids \[2\] .* no identifier"):
        read_refl(p)
    p.write_bytes(_pack({"id": ["int", [3, ids_blob]]}, ids={0: "a", 1: "a", 2: "c"}))
    with pytest.raises(ReflFileError, match="duplicate experiment identifiers"):
        read_refl(p)
    t = _small_table()
    other = _small_table()
    other.experiment_identifiers()[1] = "zzz"
    with pytest.raises(ValueError, match="identifiers do not match for id 1"):
        t.extend(other)


def test_not_a_reflection_file(tmp_path):
    p = tmp_path / "t.refl"
    p.write_bytes(b"hello world")
    with pytest.raises(ReflFileError, match=r"t\.refl: not a DIALS reflection file"):
        read_refl(p)
    p.write_bytes(b"")
    with pytest.raises(ReflFileError, match="empty file"):
        read_refl(p)


def test_truncated_and_corrupt_legacy_pickles(tmp_path):
    raw = (LCYS / "scaled_35.refl").read_bytes()
    for cut in [2, 100, len(raw) // 3, len(raw) - 2]:
        p = tmp_path / f"cut{cut}.pickle"
        p.write_bytes(raw[:cut])
        with pytest.raises(ReflFileError, match=rf"cut{cut}\.pickle: "):
            read_refl(p)
    # Flip a payload byte so that one value claims to run past the end of its column.
    payloads = _pickle_payloads(LCYS / "scaled_35.refl")
    blob = payloads["intensity.sum.value"]
    i = raw.index(blob)
    corrupt = bytearray(raw)
    corrupt[i + len(blob) - 2] = 0x09  # a length byte claiming 8 mantissa bytes at the end
    p = tmp_path / "corrupt.pickle"
    p.write_bytes(bytes(corrupt))
    with pytest.raises(ReflFileError, match=r"corrupt\.pickle: column 'intensity.sum.value'"):
        read_refl(p)


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    p = tmp_path / "evil.refl"
    p.write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(
        ReflFileError, match=r"evil\.refl: refusing to load '(posix|os|nt)\.system'"
    ):
        read_refl(p)
    assert not marker.exists()
    # A pickle that hides the call inside an allowed-looking table state is refused too.
    p.write_bytes(
        b"\x80\x02cdials_array_family_flex_ext\nreflection_table\n)R(K\x02}cbuiltins\neval\n"
        b"U\x0bprint('hi')\x85RK\x00K\x00}tb."
    )
    with pytest.raises(ReflFileError, match="refusing to load 'builtins.eval'"):
        read_refl(p)


def test_pickle_without_a_table_is_refused(tmp_path):
    p = tmp_path / "list.pickle"
    p.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(ReflFileError, match="does not hold a DIALS reflection_table"):
        read_refl(p)


def test_decode_rejects_impossible_counts_and_trailing_bytes():
    with pytest.raises(ValueError, match="exceeds the"):
        _core.refl.decode_base256_column(b"\x05\xff\xff\xff\xff" + b"\x00", "double", 1, "c")
    with pytest.raises(ValueError, match="trailing bytes"):
        _core.refl.decode_base256_column(b"\x02\x01\x00\x00", "int", 1, "c")
    with pytest.raises(ValueError, match="does not fit int32"):
        _core.refl.decode_base256_column(b"\x02\x01" + b"\x06\x00\x00\x00\x00\x01", "int", 1, "c")
    with pytest.raises(ValueError, match="kind must be one of"):
        _core.refl.decode_base256_column(b"\x00", "float", 1, "c")
    assert struct.calcsize("<d") == 8


@pytest.mark.parametrize("source", [WEDGE, LCYS / "scaled_35.refl"])
def test_random_corruption_never_crashes_or_returns_a_short_table(source, tmp_path):
    """Deterministic byte flips/cuts give a clean ReflFileError or a full, consistent table."""
    raw = source.read_bytes()
    good = read_refl(source)
    rng = np.random.default_rng(7)
    p = tmp_path / "m.refl"
    outcomes = {"error": 0, "loaded": 0}
    for _ in range(60):
        data = bytearray(raw)
        for pos in rng.integers(0, len(data), size=int(rng.integers(1, 4))):
            data[pos] = int(rng.integers(0, 256))
        if rng.random() < 0.3:
            data = data[: int(rng.integers(1, len(data)))]
        p.write_bytes(bytes(data))
        try:
            t = read_refl(p)
        except ReflFileError as exc:
            assert str(exc).startswith(str(p))
            outcomes["error"] += 1
            continue
        outcomes["loaded"] += 1
        # a flip inside a value blob is undetectable, but the table is never short
        assert len(t) == len(good) and t.is_consistent() and t.ncols() == good.ncols()
    assert outcomes["error"] > 0 and outcomes["loaded"] > 0


def test_legacy_pickle_string_columns_and_their_corruption(tmp_path):
    t = _small_table()
    t["label"] = flex.std_string(["x", "", "a,b"])  # commas inside strings are length-delimited
    out = tmp_path / "s.pickle"
    write_legacy_pickle(t, out)
    back = read_refl(out)
    assert list(back["label"]) == ["x", "", "a,b"]
    raw = out.read_bytes()
    # scitbx layout "3,1,x,0,,3,a,b," -> break the middle element's length
    assert b"3,1,x,0,,3,a,b," in raw
    out.write_bytes(raw.replace(b"3,1,x,0,,3,a,b,", b"3,1,x,7,,3,a,b,"))
    with pytest.raises(ReflFileError, match=r"s\.pickle: column 'label': truncated std_string"):
        read_refl(out)


def test_protocol_0_style_pickle_without_proto_header_is_detected(tmp_path):
    t = read_refl(LCYS / "scaled_35.refl")
    out = tmp_path / "p.pickle"
    write_legacy_pickle(t, out)
    raw = out.read_bytes()
    assert raw[:2] == b"\x80\x02"
    old = tmp_path / "old.refl"
    old.write_bytes(raw[2:])  # no PROTO opcode: starts with GLOBAL, as protocol-0/1 files do
    back = read_refl(old)
    assert len(back) == 5463
    assert np.array_equal(back["s1"].as_numpy_array(), t["s1"].as_numpy_array())


def test_missing_file_is_an_oserror_not_a_format_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_refl(tmp_path / "nope.refl")
    from xtalscale.io.refl import read_legacy_pickle

    with pytest.raises(FileNotFoundError):
        read_legacy_pickle(tmp_path / "nope.pickle")
    empty = tmp_path / "e.pickle"
    empty.write_bytes(b"")
    with pytest.raises(ReflFileError, match="empty file"):
        read_legacy_pickle(empty)


def test_parallel_legacy_decode_matches_serial_and_reports_errors(tmp_path, monkeypatch):
    import xtalscale.io.refl as refl_mod

    serial = read_refl(LCYS / "scaled_30.refl")
    monkeypatch.setattr(refl_mod, "_PARALLEL_DECODE_BYTES", 0)  # force the thread pool
    parallel = read_refl(LCYS / "scaled_30.refl")
    assert parallel.keys() == serial.keys()
    for k in serial.keys():
        assert np.array_equal(parallel[k].as_numpy_array(), serial[k].as_numpy_array()), k
    raw = (LCYS / "scaled_30.refl").read_bytes()
    blob = _pickle_payloads(LCYS / "scaled_30.refl")["xyzcal.px"]
    i = raw.index(blob)
    bad = bytearray(raw)
    bad[i + len(blob) - 2] = 0x09
    p = tmp_path / "bad.pickle"
    p.write_bytes(bytes(bad))
    with pytest.raises(ReflFileError, match=r"bad\.pickle: column 'xyzcal.px'"):
        read_refl(p)


def test_grid_that_disagrees_with_the_payload_is_refused(tmp_path):
    t = _small_table()
    out = tmp_path / "g.pickle"
    write_legacy_pickle(t, out)
    raw = out.read_bytes()
    # The grid of every column is flex.grid((0,), (3,), True): "K\x00\x85K\x03\x85\x88\x87R".
    grid = b"K\x00\x85K\x03\x85\x88\x87R"
    assert raw.count(grid) == 3
    out.write_bytes(raw.replace(grid, b"K\x00\x85K\x04\x85\x88\x87R", 1))
    with pytest.raises(ReflFileError, match=r"g\.pickle: column 'id': flex.grid arguments \(tuple of length 3\) do not describe 3"):
        read_refl(out)


def test_concurrent_reads_are_independent_and_identical():
    from concurrent.futures import ThreadPoolExecutor

    paths = [LCYS / "scaled_35.refl", QUARTZ] * 3
    with ThreadPoolExecutor(max_workers=4) as pool:
        tables = list(pool.map(read_refl, paths))
    for a, b in [(tables[0], tables[2]), (tables[1], tables[3])]:
        assert a.keys() == b.keys()
        for k in a.keys():
            assert np.array_equal(a[k].as_numpy_array(), b[k].as_numpy_array()), k


def test_parallel_chunked_msgpack_read_matches_raw_blobs(monkeypatch):
    import xtalscale.io.refl as refl_mod

    monkeypatch.setattr(refl_mod, "_PARALLEL_READ_BYTES", 0)  # force the thread pool
    monkeypatch.setattr(refl_mod, "_IO_CHUNK", 4096 + 3)  # many odd-sized chunks per column
    t = read_refl(SSX)
    raw = msgpack.unpackb(SSX.read_bytes(), strict_map_key=False)
    for name, (_, (_, blob)) in raw[2]["data"].items():
        assert t[name].as_numpy_array().tobytes() == blob, name


# ----------------------------------------------------------------------------- properties
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_KINDS = {
    "double": lambda rng, n: flex.double(rng.normal(size=n) * 10.0 ** rng.integers(-300, 300)),
    "int": lambda rng, n: flex.int(rng.integers(-(2**31), 2**31 - 1, size=n, dtype=np.int32)),
    "size_t": lambda rng, n: flex.size_t(rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64)),
    "bool": lambda rng, n: flex.bool(rng.random(n) > 0.5),
    "vec3": lambda rng, n: flex.vec3_double(rng.normal(size=(n, 3))),
    "miller": lambda rng, n: flex.miller_index(rng.integers(-99, 99, size=(n, 3), dtype=np.int32)),
    "int6": lambda rng, n: flex.int6(rng.integers(-5, 5000, size=(n, 6), dtype=np.int32)),
    "str": lambda rng, n: flex.std_string([f"s{i},{'x' * int(i % 3)}" for i in range(n)]),
}


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 40),
    st.lists(st.sampled_from(sorted(_KINDS)), min_size=1, max_size=6),
    st.integers(0, 2**32 - 1),
)
def test_random_tables_round_trip_through_both_formats(nrows, kinds, seed):
    import tempfile

    rng = np.random.default_rng(seed)
    t = flex.reflection_table()
    for i, k in enumerate(kinds):
        t[f"c{i}.{k}"] = _KINDS[k](rng, nrows)
    t["id"] = flex.int(nrows, 0)
    t.experiment_identifiers()[0] = f"expt-{seed}"
    back = flex.reflection_table.from_msgpack(t.as_msgpack())
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "t.pickle")
        t.as_pickle(p)
        legacy = read_refl(p)
    for other in (back, legacy):
        assert len(other) == nrows and sorted(other.keys()) == sorted(t.keys())
        assert other.experiment_identifiers().as_dict() == {0: f"expt-{seed}"}
        for k in t.keys():
            assert type(other[k]) is type(t[k]), k
            if isinstance(t[k], flex.std_string):
                assert list(other[k]) == list(t[k])
            else:
                assert np.array_equal(other[k].as_numpy_array(), t[k].as_numpy_array()), k


def test_identifiers_checked_against_the_experiment_list():
    from xtalscale.experiments import ExperimentList

    expts = ExperimentList.from_file(str(QUARTZ.with_suffix(".expt")))
    t = read_refl(QUARTZ, experiments=expts)
    assert t.experiment_identifiers()[0] == expts[0].identifier
    other = ExperimentList.from_file(
        str(DATA / "dials_l_cysteine_narrow_wedge" / "11_integrated.expt")
    )
    with pytest.raises(ReflFileError, match=r"scaled\.refl: identifier for id 0 is '001f4105"):
        read_refl(QUARTZ, experiments=other)


def test_rewriting_an_existing_refl_reuses_it_safely(tmp_path, monkeypatch):
    # Writing over an existing .refl overwrites that file's own blocks (then trims its tail):
    # the result is byte-identical whether the old file was longer, shorter or absent, and a
    # hard-linked or symlinked old file is never written through (its other names keep
    # their content).
    from xtalscale.io.refl import msgpack_bytes

    big = read_refl(QUARTZ)
    small = big.select(np.arange(len(big)) < 10)
    out = tmp_path / "scaled.refl"
    for table in (big, small, big, small):
        table.as_file(out)
        assert out.read_bytes() == msgpack_bytes(table)
        assert not (tmp_path / "scaled.refl.tmp-xtalscale").exists()
    assert out.read_bytes() != QUARTZ.read_bytes()
    keep = tmp_path / "kept.refl"
    os.link(out, keep)
    before = keep.read_bytes()
    big.as_file(out)
    assert keep.read_bytes() == before and out.read_bytes() == msgpack_bytes(big)
    target = tmp_path / "target.refl"
    small.as_file(target)
    link = tmp_path / "link.refl"
    link.symlink_to(target)
    big.as_file(link)
    assert target.read_bytes() == msgpack_bytes(small)
    assert not link.is_symlink() and link.read_bytes() == msgpack_bytes(big)
    # the rewrite keeps the file (its inode); a file this user may not write is replaced by a
    # new one (as before the in-place rewrite), never written through or lost
    inode = out.stat().st_ino
    small.as_file(out)
    assert out.stat().st_ino == inode
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: mode != os.W_OK and real_access(path, mode, **kw))
    big.as_file(out)
    monkeypatch.undo()
    assert out.stat().st_ino != inode and out.read_bytes() == msgpack_bytes(big)
