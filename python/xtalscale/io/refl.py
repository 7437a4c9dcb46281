"""DIALS reflection files: modern msgpack ``.refl`` and legacy (Python 2) pickles.

Reading
    :func:`read_refl` detects the format from the first bytes (a file named ``.refl`` may be
    either). The msgpack structure is walked first; then every column blob is read straight
    from the file into its final numpy array (one copy, no per-element Python), with
    positional reads spread over a few threads for big files. Legacy pickles go through a
    restricted unpickler that admits only the DIALS/scitbx flex classes it decodes (no other
    pickle code ever runs); each column's base-256 payload is then decoded in C++ (GIL
    released, columns on a few threads for big files).
Writing
    :func:`write_msgpack` writes what DIALS writes (same type strings, key order, integer
    encodings and row-major little-endian blobs), so DIALS reads it and a DIALS-written file
    round-trips byte for byte (shoebox columns excepted: they are skipped on reading).

Every problem in an input file raises :class:`ReflFileError` (a ``ValueError``) whose message
starts with the file name and says what is wrong.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import pickletools
import stat
import struct
import sys
from typing import Any, BinaryIO, Callable

import msgpack
import numpy as np

from .. import flex_arrays as fa
from ..reflection_table import check_identifiers, experiment_id_map, reflection_table

__all__ = [
    "ReflFileError",
    "read_refl",
    "read_msgpack",
    "read_msgpack_bytes",
    "read_legacy_pickle",
    "write_msgpack",
    "msgpack_bytes",
    "write_legacy_pickle",
    "COLUMN_TYPES",
]


class ReflFileError(ValueError):
    """A reflection file is truncated, corrupt, of an unknown layout or inconsistent."""


#: msgpack type string -> (flex type, numpy dtype of one scalar, components per element)
COLUMN_TYPES: dict[str, tuple[type, np.dtype, int]] = {
    "double": (fa.double, np.dtype("<f8"), 1),
    "int": (fa.int, np.dtype("<i4"), 1),
    "std::size_t": (fa.size_t, np.dtype("<u8"), 1),
    "bool": (fa.bool, np.dtype("u1"), 1),
    "vec2<double>": (fa.vec2_double, np.dtype("<f8"), 2),
    "vec3<double>": (fa.vec3_double, np.dtype("<f8"), 3),
    "mat3<double>": (fa.mat3_double, np.dtype("<f8"), 9),
    "int6": (fa.int6, np.dtype("<i4"), 6),
    "cctbx::miller::index<>": (fa.miller_index, np.dtype("<i4"), 3),
}
_SKIPPED_TYPES = {"Shoebox<>", "FrameSlicedShoebox<>"}
_TYPE_NAME = {v[0]: k for k, v in COLUMN_TYPES.items()}
_TYPE_NAME[fa.std_string] = "std::string"
_MAGIC = "dials::af::reflection_table"


def read_refl(
    filename: Any, required_columns: Any = (), experiments: Any = None
) -> reflection_table:
    """Read a DIALS reflection file of either format.

    Parameters
    ----------
    filename : str or path-like
        A msgpack ``.refl`` or a legacy pickle (``.pickle`` or ``.refl``).
    required_columns : iterable of str, optional
        Column names that must be present; a missing one raises ReflFileError.
    experiments : sequence of objects with ``.identifier``, optional
        The experiment list the table belongs to: identifier ``i`` of the table must be the
        identifier of ``experiments[i]``.

    Returns
    -------
    reflection_table

    Raises
    ------
    ReflFileError
        Truncated/corrupt data, unknown column type, inconsistent lengths or identifiers,
        a pickle that refers to anything but DIALS/scitbx flex classes, or missing columns.
    """
    path = os.fspath(filename)
    with open(path, "rb") as f:
        head = f.read(32)
    # Pickles: protocol >= 2 opens with PROTO (0x80); protocol 0/1 pickles of a table open
    # directly with the GLOBAL opcode naming the DIALS class.
    if head[:1] == b"\x80" or head.startswith(b"cdials_array_family_flex_ext\n"):
        table = read_legacy_pickle(path)
    elif head[:1] in (b"\x93", b"\xdc", b"\xdd"):
        table = read_msgpack(path)
    elif not head:
        raise ReflFileError(f"{path}: empty file")
    else:
        raise ReflFileError(
            f"{path}: not a DIALS reflection file (starts with {head[:8]!r}; "
            "expected msgpack 0x93 or pickle 0x80)"
        )
    _require(table, required_columns, path)
    if experiments is not None:
        try:
            check_identifiers(table, experiments, where=path)
        except ValueError as exc:
            raise ReflFileError(str(exc)) from None
    return table


def _require(table: reflection_table, required: Any, path: str) -> None:
    missing = [c for c in required if c not in table]
    if missing:
        raise ReflFileError(f"{path}: missing required columns {missing}")


def _finish(table: reflection_table, path: str) -> reflection_table:
    try:
        check_identifiers(table, where=path)
    except ValueError as exc:
        raise ReflFileError(str(exc)) from None
    return table


# =============================================================================== msgpack
class _Reader:
    """Minimal msgpack reader over a binary file: structure only, blobs read into numpy."""

    def __init__(self, f: BinaryIO, size: int, path: str) -> None:
        self.f, self.size, self.path = f, size, path

    def fail(self, msg: str) -> "ReflFileError":
        return ReflFileError(f"{self.path}: {msg} (at byte {self.f.tell()})")

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise self.fail(f"truncated file (wanted {n} bytes, {len(b)} left)")
        return b

    def _u(self, fmt: str, n: int) -> int:
        return struct.unpack(fmt, self.read(n))[0]

    def header(self) -> tuple[str, int]:
        """Next object's kind and its length/value: ('array'|'map'|'str'|'bin', n) or ('int', v)."""
        t = self.read(1)[0]
        if t <= 0x7F:
            return "int", t
        if t >= 0xE0:
            return "int", t - 0x100
        if 0x80 <= t <= 0x8F:
            return "map", t & 0x0F
        if 0x90 <= t <= 0x9F:
            return "array", t & 0x0F
        if 0xA0 <= t <= 0xBF:
            return "str", t & 0x1F
        table = {
            0xC4: ("bin", ">B", 1),
            0xC5: ("bin", ">H", 2),
            0xC6: ("bin", ">I", 4),
            0xD9: ("str", ">B", 1),
            0xDA: ("str", ">H", 2),
            0xDB: ("str", ">I", 4),
            0xDC: ("array", ">H", 2),
            0xDD: ("array", ">I", 4),
            0xDE: ("map", ">H", 2),
            0xDF: ("map", ">I", 4),
            0xCC: ("int", ">B", 1),
            0xCD: ("int", ">H", 2),
            0xCE: ("int", ">I", 4),
            0xCF: ("int", ">Q", 8),
            0xD0: ("int", ">b", 1),
            0xD1: ("int", ">h", 2),
            0xD2: ("int", ">i", 4),
            0xD3: ("int", ">q", 8),
            0xCA: ("float", ">f", 4),
            0xCB: ("float", ">d", 8),
        }
        if t in table:
            kind, fmt, n = table[t]
            return kind, self._u(fmt, n)
        if t == 0xC0:
            return "nil", 0
        if t in (0xC2, 0xC3):
            return "bool", t - 0xC2
        raise self.fail(f"unsupported msgpack type byte 0x{t:02x}")

    def check_len(self, n: int, what: str) -> None:
        if n > self.size - self.f.tell():
            raise self.fail(f"{what} of {n} bytes runs past the end of the file (truncated)")

    def obj(self, depth: int = 0) -> Any:
        """A small generic object (identifiers, names, numbers)."""
        if depth > 16:
            raise self.fail("msgpack nesting too deep")
        kind, n = self.header()
        if kind in ("int", "float", "nil", "bool"):
            return None if kind == "nil" else (bool(n) if kind == "bool" else n)
        if kind == "str":
            self.check_len(n, "string")
            try:
                return self.read(n).decode("utf-8")
            except UnicodeDecodeError:
                raise self.fail("string is not valid UTF-8") from None
        if kind == "bin":
            self.check_len(n, "binary blob")
            return self.read(n)
        if kind == "array":
            self.check_len(n, "array")
            return [self.obj(depth + 1) for _ in range(n)]
        self.check_len(n, "map")
        out = {}
        for _ in range(n):
            k = self.obj(depth + 1)
            if isinstance(k, (list, dict)):
                raise self.fail("unhashable map key")
            out[k] = self.obj(depth + 1)
        return out

    def expect(self, kind: str, what: str) -> int:
        k, n = self.header()
        if k != kind:
            raise self.fail(f"{what}: expected msgpack {kind}, found {k}")
        return n

    def skip(self, depth: int = 0) -> None:
        if depth > _MAX_SKIP_DEPTH:  # a skipped (shoebox) column is still bounded in depth
            raise self.fail("msgpack nesting too deep in a skipped column")
        kind, n = self.header()
        if kind in ("str", "bin"):
            self.check_len(n, kind)
            self.f.seek(n, io.SEEK_CUR)
        elif kind == "array":
            self.check_len(n, "array")
            for _ in range(n):
                self.skip(depth + 1)
        elif kind == "map":
            self.check_len(2 * n, "map")
            for _ in range(2 * n):
                self.skip(depth + 1)


# DIALS shoebox columns nest 3 levels; anything far deeper is corrupt.
_MAX_SKIP_DEPTH = 32


def read_msgpack(filename: Any) -> reflection_table:
    """Read a modern DIALS msgpack ``.refl`` file (shoebox columns are skipped)."""
    path = os.fspath(filename)
    with open(path, "rb") as f:
        return _read_msgpack_stream(f, os.fstat(f.fileno()).st_size, path)


def read_msgpack_bytes(data: bytes, name: str = "<msgpack bytes>") -> reflection_table:
    """A table from in-memory msgpack ``.refl`` bytes."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name}: expected bytes (got {type(data).__name__})")
    return _read_msgpack_stream(io.BytesIO(data), len(data), name)


def _read_msgpack_stream(f: BinaryIO, size: int, path: str) -> reflection_table:
    r = _Reader(f, size, path)
    try:
        table = _read_msgpack_body(r)
    except ReflFileError:
        raise
    except (struct.error, OverflowError, MemoryError, UnicodeDecodeError) as exc:
        raise r.fail(f"corrupt msgpack data ({exc})") from None
    if f.tell() != size:
        raise r.fail(f"{size - f.tell()} unexpected bytes after the table")
    return _finish(table, path)


def _read_msgpack_body(r: _Reader) -> reflection_table:
    if r.expect("array", "top level") != 3:
        raise r.fail("top level must be a 3-element array")
    magic = r.obj()
    if magic != _MAGIC:
        raise r.fail(f"not a reflection table (type tag: {_describe(magic)})")
    version = r.obj()
    if version not in (1, 2):
        raise r.fail(f"unsupported reflection table version ({_describe(version)})")
    nkeys = r.expect("map", "table header")
    nrows = None
    ids: dict = {}
    cols: dict[str, fa.FlexArray] = {}
    seen_data = False
    for _ in range(nkeys):
        key = r.obj()
        if key == "nrows":
            nrows = r.obj()
            if not isinstance(nrows, int) or isinstance(nrows, bool) or nrows < 0:
                raise r.fail(f"nrows must be a non-negative integer (got {_describe(nrows)})")
        elif key == "identifiers":
            ids = r.obj()
            if not isinstance(ids, dict):
                raise r.fail("identifiers must be a map")
        elif key == "data":
            seen_data = True
            ncols = r.expect("map", "data")
            for _ in range(ncols):
                name = r.obj()
                if not isinstance(name, str):
                    raise r.fail(f"column name must be a string (got {_describe(name)})")
                if name in cols:
                    raise r.fail(f"duplicate column {name!r}")
                col = _read_column(r, name)
                if col is not None:
                    cols[name] = col
        else:
            raise r.fail(f"unknown key ({_describe(key)}) in the table header")
    if nrows is None:
        raise r.fail("missing required key 'nrows'")
    if not seen_data:
        raise r.fail("missing required key 'data'")
    end = r.f.tell()
    blobs = [c for c in cols.values() if isinstance(c, _Blob)]
    _fill_blobs(r, blobs)
    r.f.seek(end)
    cols = {k: (c.finish(r) if isinstance(c, _Blob) else c) for k, c in cols.items()}
    _check_row_count(nrows, len(cols), r.size, r.path)
    table = reflection_table(nrows)
    for name, col in cols.items():
        if len(col) != nrows:
            raise r.fail(f"column {name!r} has {len(col)} rows but nrows is {nrows}")
        table._cols[name] = col
    try:
        table._ids = experiment_id_map(ids)
    except (TypeError, ValueError) as exc:
        raise r.fail(f"bad identifiers map: {exc}") from None
    return table


def _check_row_count(nrows: int, ncols: int, size: int, path: str) -> None:
    """Without columns nothing bounds nrows: refuse more rows than the file has bytes (a
    column-less table of 10**15 rows would make the first per-row mask exhaust memory)."""
    if ncols == 0 and nrows > size:
        raise ReflFileError(f"{path}: a table without columns claims {nrows} rows")


def _read_column(r: _Reader, name: str) -> Any:
    if r.expect("array", f"column {name!r}") != 2:
        raise r.fail(f"column {name!r} must be a [type, data] pair")
    type_name = r.obj()
    if type_name in _SKIPPED_TYPES:
        r.skip()
        return None
    if type_name == "std::string":
        body = r.obj()
        if (
            not isinstance(body, list)
            or len(body) != 2
            or not isinstance(body[1], list)
            or body[0] != len(body[1])
            or not all(isinstance(s, str) for s in body[1])
        ):
            raise r.fail(f"column {name!r}: malformed std::string column")
        return fa.std_string(body[1])
    if type_name not in COLUMN_TYPES:
        raise r.fail(f"column {name!r} has unknown type {_describe(type_name)}")
    ftype, dtype, ncomp = COLUMN_TYPES[type_name]
    if r.expect("array", f"column {name!r} data") != 2:
        raise r.fail(f"column {name!r}: data must be a [size, blob] pair")
    n = r.obj()
    if not isinstance(n, int) or n < 0:
        raise r.fail(f"column {name!r}: bad element count ({_describe(n)})")
    nbytes = r.expect("bin", f"column {name!r} blob")
    if nbytes != n * ncomp * dtype.itemsize:
        raise r.fail(
            f"column {name!r} ({type_name}): blob has {nbytes} bytes, expected "
            f"{n} x {ncomp * dtype.itemsize}"
        )
    r.check_len(nbytes, f"column {name!r} blob")
    shape = (n, ncomp) if ncomp > 1 else (n,)
    # The blob is read later, straight into this array (the only copy of the data): the
    # structure is walked first so that all blobs can then be read in one parallel pass.
    blob = _Blob(name, ftype, np.empty(shape, dtype=dtype), r.f.tell(), nbytes)
    r.f.seek(nbytes, io.SEEK_CUR)
    return blob


class _Blob:
    """A column whose bytes sit at ``offset`` in the file, to be read into ``arr``."""

    __slots__ = ("name", "ftype", "arr", "offset", "nbytes")

    def __init__(self, name: str, ftype: type, arr: np.ndarray, offset: int, nbytes: int):
        self.name, self.ftype, self.arr, self.offset, self.nbytes = name, ftype, arr, offset, nbytes

    def finish(self, r: _Reader) -> fa.FlexArray:
        """Validate the bytes read and wrap them as the column's flex type."""
        arr = self.arr
        if arr.dtype.kind == "u" and arr.dtype.itemsize == 1:  # bool: only 0/1 are valid
            if arr.size and arr.max() > 1:
                raise r.fail(f"column {self.name!r}: bool column holds bytes other than 0/1")
            arr = arr.view(np.bool_)
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        return self.ftype._wrap(arr)


_PARALLEL_READ_BYTES = 32 << 20  # below this, one thread reads faster than a pool starts
_IO_CHUNK = 8 << 20  # work unit of parallel positional I/O, so threads finish together


def _positional_io(fd: int, transfer, pieces: list, short, parallel: bool) -> None:
    """Move every byte of ``pieces`` (``(view, file offset, label)``) with ``transfer``
    (``os.preadv`` or ``os.pwritev``), in chunks of ``_IO_CHUNK``, on up to 4 threads when
    ``parallel`` (the GIL is released inside each call). A call that moves nothing raises
    ``short(label, file offset)``."""
    tasks = [(view[start : start + _IO_CHUNK], at + start, label)
             for view, at, label in pieces for start in range(0, len(view), _IO_CHUNK)]

    def run(task: tuple) -> None:
        view, at, label = task
        done = 0
        while done < len(view):
            moved = transfer(fd, [view[done:]], at + done)
            if moved <= 0:
                raise short(label, at + done)
            done += moved

    workers = min(4, os.cpu_count() or 1)
    if not parallel or workers < 2:
        for t in tasks:
            run(t)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(run, tasks):
            pass


def _fill_blobs(r: _Reader, blobs: list) -> None:
    """Read every blob into its array: positional reads on a few threads for big files
    (each read goes straight from the page cache into the column, with the GIL released)."""
    total = sum(b.nbytes for b in blobs)
    fd = _fileno(r.f)
    if fd is None or not hasattr(os, "preadv"):
        for b in blobs:  # in-memory stream or a platform without preadv
            r.f.seek(b.offset)
            got = r.f.readinto(_bytes_view(b.arr)) if b.nbytes else 0
            if got != b.nbytes:
                raise r.fail(f"column {b.name!r}: truncated blob ({got} of {b.nbytes} bytes)")
        return
    pieces = [(_bytes_view(b.arr), b.offset, b.name) for b in blobs]
    _positional_io(fd, os.preadv, pieces,
                   lambda name, _: ReflFileError(f"{r.path}: column {name!r}: truncated blob"),
                   parallel=total >= _PARALLEL_READ_BYTES)


def _bytes_view(arr: np.ndarray) -> memoryview:
    """Flat writable byte view of a C-contiguous array (also for empty (0, k) arrays, which
    ``memoryview.cast`` refuses)."""
    return memoryview(arr.reshape(-1).view(np.uint8))


def _fileno(f: Any) -> int | None:
    try:
        return f.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None


def write_msgpack(table: reflection_table, filename: Any) -> None:
    """Write ``table`` as a DIALS msgpack ``.refl`` (format version 1, columns in name order).

    The file is written beside the target and renamed into place, so a failure never leaves
    a half-written ``.refl`` under the requested name. When the target already exists as a
    plain file with no other hard link (a job run again into the same folder), that file
    itself becomes the one written beside the target (:func:`_reuse_as_scratch`): its pages
    are still in the page cache, and overwriting them is a copy, where a new file of some
    hundred MB must first be given fresh memory (measured on the project VM at 10⁶ rows:
    0.33-0.53 s for a new file against ~0.1 s). Its old content is then gone even if the
    write fails, as it would be after a successful one, and a program still reading the old
    file sees it change, as with DIALS, which writes in place.
    """
    path = os.fspath(filename)
    segments = _msgpack_segments(table, path)
    tmp = path + ".tmp-xtalscale"
    try:
        reused = _reuse_as_scratch(path, tmp)
        with open(tmp, "r+b" if reused else "wb") as f:
            _write_segments(f, segments)
            f.truncate()  # an old, longer file's tail
        _move_into_place(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _reuse_as_scratch(path: str, tmp: str) -> bool:
    """Rename an existing ``path`` to ``tmp`` if it is a regular file with one link (so that
    overwriting it changes no other name's content); False (nothing done) otherwise."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or not os.access(path, os.W_OK):
        return False  # (a read-only file is replaced by a new one, as before)
    try:
        os.replace(path, tmp)
    except OSError:
        return False
    return True


def _move_into_place(tmp: str, path: str) -> None:
    """Rename the complete file ``tmp`` to ``path``, removing an older ``path`` first.

    Renaming over an existing file makes ext4 (``auto_da_alloc``) start writing the new
    file's blocks to disk inside the rename, which for a table of a few hundred MB takes as
    long again as the write; renamed to a free name, the new file is written back by the
    kernel in its own time, as a file written in place (what DIALS does) is.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.rename(tmp, path)


def msgpack_bytes(table: reflection_table) -> bytes:
    """The msgpack ``.refl`` bytes of ``table``."""
    return b"".join(bytes(s) for s in _msgpack_segments(table, "<msgpack bytes>"))


def _msgpack_segments(table: reflection_table, path: str) -> list:
    """The file as a list of byte segments: small headers and zero-copy column views."""
    if not table.is_consistent():
        raise ValueError(f"{path}: table columns have unequal lengths")
    p = msgpack.Packer(use_bin_type=True)
    names = sorted(table.keys(), key=lambda s: s.encode("utf-8"))  # std::map order
    # Version 1: what the DIALS releases that wrote our reference files emit; every DIALS
    # reader accepts it (newer ones also accept 2, with the same layout).
    out = [p.pack_array_header(3), p.pack(_MAGIC), p.pack(1), p.pack_map_header(3)]
    ids = table.experiment_identifiers()
    out += [p.pack("identifiers"), p.pack_map_header(len(ids))]
    for k, v in ids.items():
        out += [p.pack(k), p.pack(v)]
    out += [p.pack("nrows"), p.pack(len(table)), p.pack("data"), p.pack_map_header(len(names))]
    segments: list = []
    for name in names:
        col = table[name]
        type_name = _TYPE_NAME.get(type(col))
        if type_name is None:
            raise TypeError(
                f"{path}: column {name!r} of type {type(col).__name__} cannot be written"
            )
        out += [p.pack(name), p.pack_array_header(2), p.pack(type_name), p.pack_array_header(2)]
        if type_name == "std::string":
            out += [p.pack(len(col)), p.pack(list(col))]
            continue
        data = np.ascontiguousarray(col.as_numpy_array())
        if data.dtype.byteorder == ">" or (data.dtype.byteorder == "=" and sys.byteorder == "big"):
            data = data.astype(data.dtype.newbyteorder("<"))  # .refl blobs are little-endian
        out += [p.pack(len(col)), _bin_header(data.nbytes)]
        segments += [b"".join(out), _bytes_view(data)]
        out = []
    segments.append(b"".join(out))
    return segments


def _write_segments(f: BinaryIO, segments: list) -> None:
    """Write the segments in order from the start of ``f``, without copying the columns.
    One thread: concurrent writes to one file wait for each other on the inode's lock
    (``perf``: 15 % of a 4-thread write spinning there) and were no faster."""
    f.seek(0)
    for seg in segments:
        f.write(seg)


def _bin_header(n: int) -> bytes:
    if n < 1 << 8:
        return b"\xc4" + struct.pack(">B", n)
    if n < 1 << 16:
        return b"\xc5" + struct.pack(">H", n)
    if n < 1 << 32:
        return b"\xc6" + struct.pack(">I", n)
    raise ValueError(f"column blob of {n} bytes exceeds the msgpack limit of 4 GiB")


# =============================================================================== legacy pickle
# Kinds of scitbx/DIALS flex payloads: flex type, scalar codec kind, components per element.
_PICKLE_FLEX: dict[tuple[str, str], tuple[type, str, int]] = {
    ("scitbx_array_family_flex_ext", "double"): (fa.double, "double", 1),
    ("scitbx_array_family_flex_ext", "int"): (fa.int, "int", 1),
    ("scitbx_array_family_flex_ext", "size_t"): (fa.size_t, "size_t", 1),
    ("scitbx_array_family_flex_ext", "bool"): (fa.bool, "bool", 1),
    ("scitbx_array_family_flex_ext", "vec2_double"): (fa.vec2_double, "double", 2),
    ("scitbx_array_family_flex_ext", "vec3_double"): (fa.vec3_double, "double", 3),
    ("scitbx_array_family_flex_ext", "mat3_double"): (fa.mat3_double, "double", 9),
    ("cctbx_array_family_flex_ext", "miller_index"): (fa.miller_index, "int", 3),
    ("dials_array_family_flex_ext", "int6"): (fa.int6, "int", 6),
}
_PICKLE_SKIP = {("dials_array_family_flex_ext", "shoebox")}
# flex.std_string uses scitbx's "double buffered" text layout instead (see _decode_std_string).
_PICKLE_STRING = ("scitbx_array_family_flex_ext", "std_string")


class _Stub:
    """Placeholder built by the restricted unpickler; keeps constructor args and state only."""

    __slots__ = ("key", "args", "state")

    def __init__(self, key: tuple[str, str], args: tuple) -> None:
        self.key, self.args, self.state = key, args, None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _StubFactory:
    __slots__ = ("key",)

    def __init__(self, key: tuple[str, str]) -> None:
        self.key = key

    def __call__(self, *args: Any) -> _Stub:
        return _Stub(self.key, args)


_TABLE_KEY = ("dials_array_family_flex_ext", "reflection_table")
_GRID_KEY = ("scitbx_array_family_flex_ext", "grid")
_ALLOWED = {_TABLE_KEY, _GRID_KEY, _PICKLE_STRING, *_PICKLE_FLEX, *_PICKLE_SKIP}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler resolving only a reflection table's DIALS/scitbx classes, to inert stubs."""

    def __init__(self, f: BinaryIO, path: str) -> None:
        super().__init__(f, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> Callable[..., _Stub]:
        key = (module, name)
        if key not in _ALLOWED:
            raise ReflFileError(
                f"{self.path}: refusing to load '{module}.{name}': a reflection "
                "pickle may only refer to DIALS/scitbx flex classes"
            )
        return _StubFactory(key)

    def persistent_load(self, pid: Any) -> Any:
        raise ReflFileError(f"{self.path}: persistent ids are not allowed in a reflection pickle")


def read_legacy_pickle(filename: Any) -> reflection_table:
    """Read a legacy DIALS reflection-table pickle without executing any pickle code.

    Before unpickling, one pass over the opcodes (payload strings are skipped, not read)
    bounds the work the unpickler can be made to do: nesting depth, the number of items a
    container reaches through shared (memoised) references, the memo and opcode counts.
    """
    path = os.fspath(filename)
    with open(path, "rb") as f:  # OSError (missing file, ...) propagates unchanged
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ReflFileError(f"{path}: not a regular file")
        if st.st_size == 0:
            raise ReflFileError(f"{path}: empty file")
        # Unpickle straight from a read-only map: payload strings are copied once, from the
        # page cache, instead of reading the whole file into memory first.
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            _check_pickle_bounds(m, path)
            m.seek(0)
            root = _load_restricted(m, path)
    if not isinstance(root, _Stub) or root.key != _TABLE_KEY:
        raise ReflFileError(f"{path}: pickle does not hold a DIALS reflection_table")
    table = _table_from_state(root.state, path)
    _check_row_count(len(table), table.ncols(), st.st_size, path)
    return _finish(table, path)


# Bounds of the opcode pre-pass. A real table pickle has ~10 opcodes, ~3 memo entries and
# containers of <= 5 items per column, nested 4 deep; these limits are generous for any
# real file and keep a hostile one to milliseconds (hashing or walking nested tuples
# shared through the memo costs 2**depth otherwise).
_PICKLE_MAX_OPS = 1 << 20
_PICKLE_MAX_MEMO = 1 << 16
_PICKLE_MAX_DEPTH = 32
_PICKLE_MAX_ITEMS = 1 << 16  # items reachable from one container, shared ones counted again
_ARG_LENGTH = {  # pickletools' variable-length argument codes -> (length bytes, format)
    pickletools.TAKEN_FROM_ARGUMENT1: (1, "<B"),
    pickletools.TAKEN_FROM_ARGUMENT4: (4, "<i"),
    pickletools.TAKEN_FROM_ARGUMENT4U: (4, "<I"),
    pickletools.TAKEN_FROM_ARGUMENT8U: (8, "<Q"),
}
_MUTATING_OPS = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "BUILD", "ADDITEMS"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}


def _pickle_opcodes(m: Any, path: str):
    """(opcode name, argument) of each opcode; string payloads are skipped, not read."""
    size = len(m)
    while True:
        pos = m.tell()
        code = m.read(1)
        if not code:
            raise ReflFileError(f"{path}: truncated pickle (no STOP opcode)")
        op = pickletools.code2op.get(code.decode("latin-1"))
        if op is None:
            raise ReflFileError(f"{path}: corrupt pickle (unknown opcode 0x{code[0]:02x} "
                                f"at byte {pos})")
        arg = None
        if op.arg is not None:
            if op.arg.n in _ARG_LENGTH:
                width, fmt = _ARG_LENGTH[op.arg.n]
                raw = m.read(width)
                if len(raw) != width:
                    raise ReflFileError(f"{path}: truncated pickle at byte {pos}")
                n = struct.unpack(fmt, raw)[0]
                if n < 0 or n > size - m.tell():
                    raise ReflFileError(f"{path}: truncated or corrupt pickle ({op.name} of "
                                        f"{n} bytes at byte {pos})")
                m.seek(n, io.SEEK_CUR)
            else:
                try:
                    arg = op.arg.reader(m)
                except (ValueError, struct.error) as exc:
                    raise ReflFileError(f"{path}: corrupt pickle ({op.name} at byte {pos}: "
                                        f"{type(exc).__name__})") from None
        yield op, arg
        if op.name == "STOP":
            return


def _check_pickle_bounds(m: Any, path: str) -> None:
    """Simulate the unpickler's stack on item counts only and refuse hostile structure."""

    def refuse(what: str) -> ReflFileError:
        return ReflFileError(f"{path}: refusing pickle: {what} (not a reflection table)")

    mark = object()
    stack: list = []  # cells [items reachable, depth] shared with the memo, or ``mark``
    memo: dict = {}
    for count, (op, arg) in enumerate(_pickle_opcodes(m, path)):
        if count > _PICKLE_MAX_OPS:
            raise refuse(f"more than {_PICKLE_MAX_OPS} opcodes")
        name = op.name
        if name in ("PROTO", "FRAME", "STOP"):
            continue
        if name == "MARK":
            stack.append(mark)
        elif name in _PUT_OPS or name == "MEMOIZE":
            if not stack or stack[-1] is mark:
                raise refuse(f"{name} on an empty stack")
            memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
            if len(memo) > _PICKLE_MAX_MEMO:
                raise refuse(f"more than {_PICKLE_MAX_MEMO} memo entries")
        elif name in _GET_OPS:
            if arg not in memo:
                raise refuse(f"{name} of a missing memo entry")
            stack.append(memo[arg])
        elif name == "DUP":
            stack.append(stack[-1] if stack else mark)
        else:
            popped = _pop_operands(stack, op, mark, refuse)
            items = sum(c[0] for c in popped)
            depth = max((c[1] for c in popped), default=0)
            if name in _MUTATING_OPS and popped:
                # the container stays the same object (shared with the memo): grow it
                target, added = popped[0], popped[1:]
                target[0] += sum(c[0] for c in added)
                target[1] = max([target[1]] + [1 + c[1] for c in added])
                new = [target]
            else:
                new = [[1 + items, 1 + depth] for _ in op.stack_after]
            for cell in new:
                if cell[0] > _PICKLE_MAX_ITEMS:
                    raise refuse(f"a container reaches more than {_PICKLE_MAX_ITEMS} items")
                if cell[1] > _PICKLE_MAX_DEPTH:
                    raise refuse(f"nesting deeper than {_PICKLE_MAX_DEPTH}")
            stack.extend(new)
        if len(stack) > _PICKLE_MAX_OPS:
            raise refuse("stack too large")


def _pop_operands(stack: list, op: Any, mark: object, refuse: Callable) -> list:
    """Pop what ``op`` consumes (everything down to the last MARK for mark-taking ops)."""
    before = op.stack_before
    popped: list = []
    if pickletools.markobject in before:
        while True:
            if not stack:
                raise refuse(f"{op.name} without a MARK")
            item = stack.pop()
            if item is mark:
                break
            popped.append(item)
        fixed = len(before) - 2  # markobject + stackslice
    else:
        fixed = len(before)
    for _ in range(fixed):
        if not stack:
            raise refuse(f"{op.name} on an empty stack")
        popped.append(stack.pop())
    popped.reverse()  # bottom first: the container of a mutating op is popped[0]
    return popped


def _load_restricted(stream: Any, path: str) -> Any:
    try:
        return _RestrictedUnpickler(stream, path).load()
    except ReflFileError:
        raise
    except RecursionError:
        raise ReflFileError(f"{path}: corrupt pickle (nesting too deep)") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise ReflFileError(
            f"{path}: corrupt or truncated pickle ({type(exc).__name__}: {exc})"
        ) from None


def _table_from_state(state: Any, path: str) -> reflection_table:
    def bad(msg: str) -> ReflFileError:
        return ReflFileError(f"{path}: {msg}")

    if not isinstance(state, tuple) or not state:
        raise bad("reflection_table pickle state is not a tuple")
    if state[0] == 1 and len(state) == 4:
        ids, (nrows, ncols, columns) = {}, state[1:]
    elif state[0] == 2 and len(state) == 5:
        ids, nrows, ncols, columns = state[1:]
    else:
        raise bad("unsupported reflection_table pickle version/layout "
                  f"({_describe(state[0])} of a {len(state)}-tuple)")
    if not isinstance(nrows, int) or not isinstance(ncols, int) or nrows < 0:
        raise bad("bad nrows/ncols in pickle state")
    if not isinstance(columns, dict) or len(columns) != ncols:
        raise bad(
            f"pickle declares {ncols} columns but holds "
            f"{len(columns) if isinstance(columns, dict) else 'no'} column map"
        )
    if not isinstance(ids, dict):
        raise bad("identifiers in pickle state are not a dict")
    table = reflection_table(nrows)
    todo = []
    for raw_name, stub in columns.items():
        name = _text(raw_name, path, "column name")
        if not isinstance(stub, _Stub):
            raise bad(f"column {name!r} is not a flex array")
        if stub.key not in _PICKLE_SKIP:
            todo.append((name, stub))
    for name, col in zip([n for n, _ in todo], _decode_all(todo, path)):
        if len(col) != nrows:
            raise bad(f"column {name!r} has {len(col)} rows but nrows is {nrows}")
        table._cols[name] = col
    try:
        table._ids = experiment_id_map({k: _text(v, path, "identifier") for k, v in ids.items()})
    except (TypeError, ValueError) as exc:
        raise bad(f"bad identifiers map: {exc}") from None
    return table


_PARALLEL_DECODE_BYTES = 8 << 20  # below this, thread start-up costs more than it saves


def _decode_all(todo: list, path: str) -> list:
    """Decode the column payloads, on a few threads for big files (the C++ decoder releases
    the GIL and each column is independent, so the result does not depend on scheduling)."""
    total = sum(len(stub.state[1]) for _, stub in todo if _payload_ok(stub))
    workers = min(4, os.cpu_count() or 1, len(todo))
    if total < _PARALLEL_DECODE_BYTES or workers < 2:
        return [_decode_flex(stub, name, path) for name, stub in todo]
    from concurrent.futures import ThreadPoolExecutor

    # Largest payloads first, so the threads finish together.
    order = sorted(range(len(todo)), key=lambda i: -_payload_len(todo[i][1]))
    out: list = [None] * len(todo)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {i: pool.submit(_decode_flex, todo[i][1], todo[i][0], path) for i in order}
        for i in range(len(todo)):  # in column order, so the first bad column is reported
            out[i] = futures[i].result()
    return out


def _payload_ok(stub: _Stub) -> bool:
    st = stub.state
    return isinstance(st, tuple) and len(st) == 2 and isinstance(st[1], bytes)


def _payload_len(stub: _Stub) -> int:
    return len(stub.state[1]) if _payload_ok(stub) else 0


def _describe(x: Any) -> str:
    """Type and size of an untrusted object, never its repr (which may walk 2**n items)."""
    if isinstance(x, bool) or x is None or (isinstance(x, (str, bytes)) and len(x) <= 64):
        return repr(x)
    if isinstance(x, int):
        return repr(x) if abs(x) < 1 << 64 else f"int of {x.bit_length()} bits"
    if isinstance(x, (tuple, list, dict, bytes, str)):
        return f"{type(x).__name__} of length {len(x)}"
    return type(x).__name__


def _text(x: Any, path: str, what: str) -> str:
    if isinstance(x, bytes):
        try:
            return x.decode("utf-8")
        except UnicodeDecodeError:
            raise ReflFileError(f"{path}: {what} is not valid UTF-8") from None
    if isinstance(x, str):
        return x
    raise ReflFileError(f"{path}: {what} must be a string (got {type(x).__name__})")


def _decode_std_string(payload: bytes, name: str, path: str) -> fa.std_string:
    """scitbx double-buffered strings: ``"<count>,"`` then ``"<len>,<bytes>,"`` per element.

    String columns are rare and short, so this walks the elements in Python.
    """

    def bad(msg: str) -> ReflFileError:
        return ReflFileError(f"{path}: column {name!r}: {msg}")

    def number(pos: int) -> tuple[int, int]:
        end = payload.find(b",", pos, pos + 21)
        if end < 0 or not payload[pos:end].isdigit():
            raise bad(f"malformed std_string payload at byte {pos}")
        return int(payload[pos:end]), end + 1

    count, pos = number(0)
    if count > len(payload):
        raise bad(f"element count {count} exceeds the payload")
    out = []
    for _ in range(count):
        n, pos = number(pos)
        if pos + n + 1 > len(payload) or payload[pos + n : pos + n + 1] != b",":
            raise bad(f"truncated std_string payload at byte {pos}")
        try:
            out.append(payload[pos : pos + n].decode("utf-8"))
        except UnicodeDecodeError:
            raise bad("string is not valid UTF-8") from None
        pos += n + 1
    if pos != len(payload):
        raise bad(f"{len(payload) - pos} unexpected trailing bytes")
    return fa.std_string(out)


def _encode_std_string(values: list) -> bytes:
    parts = [f"{len(values)},".encode()]
    for v in values:
        b = v.encode("utf-8")
        parts += [f"{len(b)},".encode(), b, b","]
    return b"".join(parts)


def _decode_flex(stub: _Stub, name: str, path: str) -> fa.FlexArray:
    from .._core import refl as _refl_core

    if stub.key == _PICKLE_STRING:
        st = stub.state
        if not (isinstance(st, tuple) and len(st) == 2 and isinstance(st[1], bytes)):
            raise ReflFileError(f"{path}: column {name!r}: flex state is not (grid, bytes)")
        return _decode_std_string(st[1], name, path)
    if stub.key not in _PICKLE_FLEX:
        raise ReflFileError(f"{path}: column {name!r} has unsupported type {'.'.join(stub.key)}")
    ftype, kind, ncomp = _PICKLE_FLEX[stub.key]
    st = stub.state
    if not (isinstance(st, tuple) and len(st) == 2 and isinstance(st[1], bytes)):
        raise ReflFileError(f"{path}: column {name!r}: flex state is not (grid, bytes)")
    grid = st[0]
    try:
        arr = _refl_core.decode_base256_column(st[1], kind, ncomp, f"{path}: column {name!r}")
    except ValueError as exc:
        raise ReflFileError(str(exc)) from None
    # scitbx stores the accessor as flex.grid((0,), (n,), True): a 1-D grid of n elements.
    if not (isinstance(grid, _Stub) and grid.key == _GRID_KEY):
        raise ReflFileError(f"{path}: column {name!r}: flex state has no flex.grid accessor")
    dims = grid.args[1] if len(grid.args) >= 2 else None
    if not (isinstance(dims, tuple) and len(dims) == 1 and dims[0] == arr.shape[0]):
        raise ReflFileError(
            f"{path}: column {name!r}: flex.grid arguments ({_describe(grid.args)}) do not "
            f"describe {arr.shape[0]} decoded elements"
        )
    return ftype._wrap(arr)


def write_legacy_pickle(table: reflection_table, filename: Any) -> None:
    """Write the legacy DIALS pickle layout (protocol 2, version-2 state, scitbx payloads).

    Intended for tests/benchmarks and for old cctbx/DIALS tools; modern DIALS reads msgpack.
    """
    from .._core import refl as _refl_core

    path = os.fspath(filename)
    if not table.is_consistent():
        raise ValueError(f"{path}: table columns have unequal lengths")
    rev = {v[0]: (k, v[1]) for k, v in _PICKLE_FLEX.items()}
    rev[fa.std_string] = (_PICKLE_STRING, "std_string")
    n = len(table)
    w = _PickleWriter()
    w.raw(b"\x80\x02")
    w.global_(*_TABLE_KEY)
    w.raw(b")R(")  # EMPTY_TUPLE REDUCE MARK
    w.int(2)
    w.raw(b"}(")  # EMPTY_DICT MARK
    for k, v in table.experiment_identifiers().items():
        w.int(k)
        w.string(v.encode("utf-8"))
    w.raw(b"u")  # SETITEMS
    w.int(n)
    w.int(table.ncols())
    w.raw(b"}(")
    for name, col in table.cols():
        if type(col) not in rev:
            raise TypeError(
                f"{path}: column {name!r} ({type(col).__name__}) has no legacy pickle form"
            )
        key, kind = rev[type(col)]
        w.string(name.encode("utf-8"))
        w.global_(*key)
        w.raw(b")R")
        w.global_(*_GRID_KEY)
        w.int(0)
        w.raw(b"\x85")  # TUPLE1
        w.int(n)
        w.raw(b"\x85\x88\x87R")  # TUPLE1 NEWTRUE TUPLE3 REDUCE
        w.int(n)
        w.raw(b"\x85b")  # TUPLE1 BUILD (grid focus state, as scitbx writes)
        if kind == "std_string":
            payload = _encode_std_string(list(col))
        else:
            payload = _refl_core.encode_base256_column(
                np.ascontiguousarray(col.as_numpy_array()), kind
            )
        w.string(payload)
        w.raw(b"\x86b")  # TUPLE2 BUILD
    # SETITEMS (columns), TUPLE (closes the state's MARK: version, ids, nrows, ncols,
    # columns), BUILD (table.__setstate__), STOP
    w.raw(b"utb.")
    data = w.getvalue()
    tmp = path + ".tmp-xtalscale"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class _PickleWriter:
    """Emits the handful of protocol-2 opcodes the legacy layout needs."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def raw(self, b: bytes) -> None:
        self.parts.append(b)

    def global_(self, module: str, name: str) -> None:
        self.parts.append(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def int(self, v: int) -> None:
        if 0 <= v < 256:
            self.parts.append(b"K" + struct.pack("<B", v))
        elif 0 <= v < 65536:
            self.parts.append(b"M" + struct.pack("<H", v))
        elif -(1 << 31) <= v < (1 << 31):
            self.parts.append(b"J" + struct.pack("<i", v))
        else:
            raise ValueError(f"integer {v} too large for the legacy pickle layout")

    def string(self, b: bytes) -> None:
        if len(b) < 256:
            self.parts.append(b"U" + struct.pack("<B", len(b)) + b)
        elif len(b) < (1 << 31):
            self.parts.append(b"T" + struct.pack("<i", len(b)) + b)
        else:
            raise ValueError("column payload exceeds 2 GiB, the legacy pickle limit")

    def getvalue(self) -> bytes:
        return b"".join(self.parts)
