"""MTZ reading and writing (unmerged and merged) on top of gemmi.

Reading
-------
:func:`read_unmerged_mtz` reads an unmerged MTZ from MOSFLM (partials stored as separate
rows), AIMLESS or DIALS scaled-unmerged (``SCALEUSED``) or a DIALS export (unscaled) into
a :class:`~xtalscale.array_family.flex.reflection_table` plus an
:class:`~xtalscale.experiments.ExperimentList` with one experiment per (MTZ dataset,
contiguous batch run). All column work is vectorised numpy on gemmi's float32 array.

Column mapping (MTZ → DIALS-style table column):

=======================  ==============================================================
``H K L`` + ``M/ISYM``   ``miller_index`` (original, un-mapped index, as DIALS stores it)
``I``, ``SIGI``          ``intensity.sum.value`` / ``.variance`` (σ²); for scaled files
                         see below
``IPR``, ``SIGIPR``      ``intensity.prf.value`` / ``.variance``
``SCALEUSED``            ``inverse_scale_factor`` (g); ``I``/``SIGI`` are the scaled
                         intensity, so ``intensity.scale.*`` (and ``intensity.sum.*``)
                         hold the raw intensity ``I·g``, ``σ·g`` (DIALS convention:
                         scaled = ``intensity.scale.value / inverse_scale_factor``)
``SIGSCALEUSED``         ``inverse_scale_factor_variance`` (σ²)
``BATCH``                ``batch``; experiment index → ``id``
``XDET YDET`` + frame    ``xyzobs.px.value`` (z = fractional array index from ``ROT``)
``ROT``                  ``phi`` (degrees)
``FRACTIONCALC``         ``partiality`` (summed over partial pieces)
``LP``, ``QE``           ``lp``, ``qe``
``BG``, ``SIGBG``        ``background.sum.value`` / ``.variance``
``NPART`` / ``MPART``    ``n_parts`` (pieces summed), ``partial_complete``, ``partial_accepted``,
                         ``batch_first`` / ``batch_last`` (batches of the pieces)
=======================  ==============================================================

Without batch headers the sweep's φ is fitted robustly from ROT against BATCH; rows
more than 5 images off that line stay in the table with ``batch_rot_consistent`` False
and the ``excluded_for_scaling`` flag, and do not enter the fit or the image range.
Miller indices, BATCH and MPART must be integers in range (else MtzFormatError naming
the column and row).

``d`` is computed from the cell. ``flags`` get ``integrated_sum`` where I and SIGI are
finite with SIGI > 0, and ``integrated_prf`` likewise for IPR/SIGIPR: rows with MTZ
missing values (NaN) are kept, but not flagged.

MOSFLM partials (``MPART = 100·nparts + part``, M flag of ``M/ISYM`` set) are summed as
AIMLESS does: pieces with the same original index on consecutive batches form one
reflection; I and σ² add, FRACTIONCALC adds (the summed ``partiality``), position and
ROT are fraction-weighted means, the batch is the middle piece's. ``partial_complete`` is
True when the pieces are exactly parts 1..nparts of one set (fulls are complete).
``partial_accepted`` applies AIMLESS's default acceptance (summed fraction in
[0.95, 1.05], fulls always); rejected reflections stay in the table, flagged
``excluded_for_scaling``.

Writing
-------
:func:`write_unmerged_mtz` writes ``H K L M/ISYM BATCH I SIGI`` (+ ``SCALEUSED``,
``SIGSCALEUSED``, ``FRACTIONCALC``, ``XDET``, ``YDET``, ``ROT``, ``LP`` when available)
with one CCP4 orientation block (batch header) per image of every scan, as
``dials.export`` does; sweeps with overlapping batch ranges are offset by multiples of
1000. Negative (failed) variances are written as missing sigmas. The file is sorted by
ASU index, M/ISYM and BATCH unless ``sort=False``. gemmi reads it back as unmerged data.
:func:`write_merged_mtz` writes ``IMEAN SIGIMEAN`` and, when anomalous,
``I(+) SIGI(+) I(-) SIGI(-) N(+) N(-)`` like ``dials.merge``;
:func:`write_merged_mtz_from_table` merges a table (inverse-variance weights) first.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import gemmi
import numpy as np

from .._rows import take_rows
from ..experiments import Beam, Crystal, Experiment, ExperimentList, Goniometer, Scan
from ..symmetry import (
    SpaceGroup,
    UnitCell,
    centric_flags,
    group_reflections,
    hkl_keys,
    map_to_asu,
    miller_array,
)

__all__ = [
    "MtzFormatError",
    "UnmergedMtz",
    "MergedMtz",
    "read_unmerged_mtz",
    "read_merged_mtz",
    "write_unmerged_mtz",
    "write_merged_mtz",
    "merge_intensities",
    "write_merged_mtz_from_table",
    "anomalous_halves",
]


class MtzFormatError(ValueError):
    """An MTZ file is unreadable, truncated or lacks required columns (names file + problem)."""


# CCP4 orientation-block (batch header) layout: positions in Batch.ints / Batch.floats.
_I_NWORDS, _I_NINTGR, _I_NREALS, _I_IORTYP = 0, 1, 2, 3
_I_LBCELL, _I_MISFLG, _I_JUMPAX, _I_NCRYST, _I_LCRFLG, _I_LDTYPE = 4, 10, 11, 12, 13, 14
_I_JSAXS, _I_NBSCAL, _I_NGONAX, _I_LBMFLG, _I_NDET, _I_NBSETID = 15, 16, 17, 18, 19, 20
_F_CELL, _F_UMAT, _F_PHIXYZ, _F_CRYDAT, _F_DATUM = 0, 6, 15, 21, 33
_F_PHISTT, _F_PHIEND, _F_SCANAX, _F_TIME1, _F_TIME2 = 36, 37, 38, 41, 42
_F_BSCALE, _F_BBFAC, _F_SDBSCALE, _F_SDBFAC, _F_PHIRANGE = 43, 44, 45, 46, 47
_F_E1, _F_E2, _F_E3, _F_SOURCE, _F_SO, _F_ALAMBD = 59, 62, 65, 80, 83, 86
_F_DX, _F_DETLM = 111, 113
# The U matrix is stored column by column (Fortran order): U[j][k] = floats[6 + 3k + j].


# --------------------------------------------------------------------------- helpers


# The header records of an MTZ file (80-byte lines) read for the layout check: NCOL is
# among the first few; the limit only bounds the work on a file without an END record.
_HEADER_BYTES_CHECKED = 80 * 400
_GZIP_CHUNK = 1 << 20


def _read(path) -> gemmi.Mtz:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"MTZ file not found: {path}")
    if not os.path.isfile(path):
        raise MtzFormatError(f"{path}: not a regular file")
    size = os.path.getsize(path)
    if size < 80:
        raise MtzFormatError(f"{path}: not an MTZ file (only {size} bytes)")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic[:2] == b"\x1f\x8b":  # gzip-compressed MTZ (gemmi reads it directly)
        head, header, size = _gzip_layout(path)
    else:
        head, header = _plain_layout(path, size)
    if head[:4] != b"MTZ ":
        raise MtzFormatError(f"{path}: not an MTZ file (bad magic {head[:4]!r})")
    # gemmi allocates what the header promises before it notices a short file: check
    # the header pointer and the record counts against the real size first.
    _check_layout(path, head, header, size)
    try:
        mtz = gemmi.read_mtz_file(path)
    except Exception as exc:  # noqa: BLE001 - gemmi raises RuntimeError/IOError variants
        raise MtzFormatError(f"{path}: unreadable or truncated MTZ ({exc})") from None
    ncol = len(mtz.columns)
    expected = mtz.nreflections * ncol
    data = mtz.array
    if data.size != expected:
        raise MtzFormatError(f"{path}: truncated MTZ: header promises {mtz.nreflections} rows"
                             f" x {ncol} columns but {data.size} values were read")
    return mtz


def _header_offset(head: bytes) -> int:
    """Byte offset of the header records from the 20 leading bytes (-1 if unreadable).

    Word 2 holds the 1-based word position of the header (in the file's byte order, given
    by the machine stamp at byte 8); -1 there means a 64-bit position in words 4-5.
    """
    if len(head) < 20:
        return -1
    order = ">" if head[8] >> 4 == 1 else "<"  # 0x1_ = big-endian IEEE, 0x4_ = little
    word = struct.unpack(order + "i", head[4:8])[0]
    if word == -1:
        word = struct.unpack(order + "q", head[12:20])[0]
    return (word - 1) * 4 if word > 0 else -1


def _plain_layout(path: str, size: int) -> tuple[bytes, bytes]:
    with open(path, "rb") as fh:
        head = fh.read(20)
        offset = _header_offset(head)
        header = b""
        if 80 <= offset < size:
            fh.seek(offset)
            header = fh.read(_HEADER_BYTES_CHECKED)
    return head, header


def _gzip_layout(path: str) -> tuple[bytes, bytes, int]:
    """(leading bytes, header records, uncompressed size) of a gzipped MTZ, streamed in
    chunks (memory stays bounded however large the file claims or turns out to be)."""
    head, header, offset, pos = b"", b"", -1, 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(_GZIP_CHUNK):
                if len(head) < 20:
                    head += chunk[: 20 - len(head)]
                    offset = _header_offset(head)
                end = pos + len(chunk)
                if offset >= 80 and end > offset and len(header) < _HEADER_BYTES_CHECKED:
                    lo = max(offset - pos, 0)
                    header += chunk[lo: lo + _HEADER_BYTES_CHECKED - len(header)]
                pos = end
    except (OSError, EOFError, zlib.error) as exc:
        raise MtzFormatError(f"{path}: corrupt gzip-compressed MTZ ({exc})") from None
    return head, header, pos


def _check_layout(path: str, head: bytes, header: bytes, size: int) -> None:
    offset = _header_offset(head)
    if not 80 <= offset <= size - 80:
        raise MtzFormatError(f"{path}: corrupt MTZ: header position {offset} is outside the "
                             f"{size}-byte file")
    ncol = nref = nbatch = None
    for i in range(0, len(header) - 79, 80):
        record = header[i:i + 80]
        if record.startswith(b"END"):
            break
        if record.startswith(b"NCOL"):
            fields = record[4:].split()
            try:
                ncol, nref, nbatch = (int(x) for x in fields[:3])
            except ValueError:
                raise MtzFormatError(f"{path}: corrupt MTZ header record NCOL") from None
            break
    if ncol is None:
        raise MtzFormatError(f"{path}: corrupt MTZ: no NCOL record in the header")
    if min(ncol, nref, nbatch) < 0 or ncol > 10_000:
        raise MtzFormatError(f"{path}: corrupt MTZ header: NCOL {ncol}, {nref} reflections, "
                             f"{nbatch} batches")
    data_bytes = 4 * ncol * nref
    if data_bytes > offset - 80:
        raise MtzFormatError(f"{path}: truncated or corrupt MTZ: the header promises {nref} "
                             f"rows x {ncol} columns ({data_bytes} bytes) but the data "
                             f"section holds {offset - 80} bytes")
    # each batch header takes at least 3 records plus 185 words of orientation data
    if nbatch * (3 * 80 + 185 * 4) > size - offset:
        raise MtzFormatError(f"{path}: truncated or corrupt MTZ: the header promises "
                             f"{nbatch} batch headers that the file cannot hold")


def _require(mtz: gemmi.Mtz, labels, path: str) -> None:
    present = set(mtz.column_labels())
    missing = [x for x in labels if x not in present]
    if missing:
        raise MtzFormatError(f"{path}: missing required column(s) {', '.join(missing)} "
                             f"(file has {', '.join(mtz.column_labels())})")


def _symmetry(mtz: gemmi.Mtz, path: str) -> tuple[SpaceGroup, UnitCell]:
    if mtz.spacegroup is None:
        raise MtzFormatError(f"{path}: MTZ header has no space group")
    try:
        cell = UnitCell(mtz.cell.parameters)
    except ValueError as exc:
        raise MtzFormatError(f"{path}: bad unit cell in MTZ header ({exc})") from None
    return SpaceGroup(mtz.spacegroup), cell


def _to_table(columns: dict, identifiers: dict):
    """Wrap numpy columns into the project's reflection_table."""
    from ..reflection_table import reflection_table

    table = reflection_table()
    flags = columns.pop("flags", None)
    for name, values in columns.items():
        table[name] = values
    if flags is not None:
        table["flags"] = flags
    ids = table.experiment_identifiers()
    for k, v in identifiers.items():
        ids[k] = v
    return table


def _flags(columns: dict) -> np.ndarray:
    from ..reflection_table import Flags

    flags = np.zeros(len(columns["miller_index"]), dtype=np.uint64)
    for kind, bit in (("sum", Flags.integrated_sum), ("prf", Flags.integrated_prf)):
        v = columns.get(f"intensity.{kind}.value")
        var = columns.get(f"intensity.{kind}.variance")
        if v is not None:
            ok = np.isfinite(v) & np.isfinite(var) & (var > 0)
            flags[ok] |= np.uint64(int(bit))
    return flags


# --------------------------------------------------------------------------- reading


@dataclass
class UnmergedMtz:
    """Result of :func:`read_unmerged_mtz`.

    Attributes
    ----------
    table : reflection_table
        One row per observation (per summed reflection for MOSFLM partials).
    experiments : ExperimentList
        One experiment per (dataset, contiguous batch run): beam wavelength, scan
        (batch → image, φ), crystal (cell, space group, batch UMAT as U).
    space_group, unit_cell :
        From the MTZ header.
    batches : dict of ndarray
        Per batch header: ``number``, ``dataset_id``, ``experiment_id``, ``phi_start``,
        ``phi_end``, ``wavelength``.
    kind : str
        ``'mosflm_partials'``, ``'scaled'`` (SCALEUSED present) or ``'unscaled'``.
    n_rows_in_file : int
        Rows before partial summation.
    """

    table: Any
    experiments: ExperimentList
    space_group: SpaceGroup
    unit_cell: UnitCell
    batches: dict
    kind: str
    n_rows_in_file: int
    columns_in_file: list = field(default_factory=list)


def _batch_arrays(mtz: gemmi.Mtz) -> dict:
    nb = len(mtz.batches)
    out = {
        "number": np.empty(nb, dtype=np.int64),
        "dataset_id": np.empty(nb, dtype=np.int64),
        "phi_start": np.empty(nb),
        "phi_end": np.empty(nb),
        "wavelength": np.empty(nb),
        "scan_axis": np.zeros((nb, 3)),
        "umat": np.zeros((nb, 9)),
    }
    for i, b in enumerate(mtz.batches):
        f = b.floats
        out["number"][i] = b.number
        out["dataset_id"][i] = b.dataset_id
        out["phi_start"][i] = f[_F_PHISTT]
        out["phi_end"][i] = f[_F_PHIEND]
        out["wavelength"][i] = f[_F_ALAMBD]
        out["scan_axis"][i] = [f[_F_SCANAX + j] for j in range(3)]
        out["umat"][i] = np.reshape([f[_F_UMAT + j] for j in range(9)], (3, 3)).T.ravel()
    return out


def _runs(numbers: np.ndarray, datasets: np.ndarray) -> np.ndarray:
    """Run index per batch: a new run starts at a new dataset or a gap in batch numbers."""
    order = np.lexsort((numbers, datasets))
    n, d = numbers[order], datasets[order]
    new = np.ones(len(n), dtype=bool)
    new[1:] = (d[1:] != d[:-1]) | (n[1:] != n[:-1] + 1)
    run_sorted = np.cumsum(new) - 1
    run = np.empty(len(n), dtype=np.int64)
    run[order] = run_sorted
    return run


def _crystal(cell: UnitCell, sg: SpaceGroup, umat) -> Crystal:
    U = np.asarray(umat, dtype=float).reshape(3, 3)
    if not np.allclose(U @ U.T, np.eye(3), atol=1e-3) or np.linalg.det(U) < 0:
        U = np.eye(3)
    # UMAT is stored as float32: snap it to the nearest rotation (polar decomposition) so
    # the crystal's cell equals the header cell to double precision.
    w, _, vt = np.linalg.svd(U)
    U = w @ vt
    A = U @ cell.B_matrix()
    real = np.linalg.inv(A)
    return Crystal({"__id__": "crystal", "real_space_a": real[0].tolist(),
                    "real_space_b": real[1].tolist(), "real_space_c": real[2].tolist(),
                    "space_group_hall_symbol": sg.hall_symbol()})


# A row whose ROT is more than this many image widths from the φ(BATCH) line is
# inconsistent (centroids of a DIALS export lie within about one image of their batch).
_ROT_TOLERANCE_IMAGES = 5.0


def _consistent_batch_rot(row_batch: np.ndarray, rot) -> np.ndarray:
    """Rows whose (BATCH, ROT) agree with a robust φ = start + width·BATCH line.

    The width is the median slope between the median ROT of consecutive batches and the
    start the median intercept, so one absurd BATCH or ROT cannot move the others.
    """
    n = len(row_batch)
    if rot is None or n == 0 or not np.all(np.isfinite(rot)):
        return np.ones(n, dtype=bool)
    numbers, index = np.unique(row_batch, return_inverse=True)
    if len(numbers) < 3:
        return np.ones(n, dtype=bool)
    order = np.argsort(index, kind="stable")
    bounds = np.searchsorted(index[order], np.arange(len(numbers) + 1))
    per_batch = np.array([np.median(rot[order[a:b]]) for a, b in zip(bounds[:-1],
                                                                       bounds[1:])])
    width = float(np.median(np.diff(per_batch) / np.diff(numbers)))
    if width == 0 or not np.isfinite(width):
        return np.ones(n, dtype=bool)
    start = float(np.median(rot - width * row_batch))
    residual_images = np.abs(rot - start - width * row_batch) / abs(width)
    return residual_images <= _ROT_TOLERANCE_IMAGES


def _make_experiments(mtz, batches, row_batch, rot, cell, sg, path):
    """ExperimentList (one per run) and the per-row experiment index and frame z."""
    n = len(row_batch)
    z = np.full(n, np.nan)
    exp_id = np.zeros(n, dtype=np.int32)
    el = ExperimentList()
    default_wl = next((d.wavelength for d in mtz.datasets if d.wavelength > 0), 1.0)
    if len(batches["number"]) == 0:
        # No batch headers (e.g. reciprocalspaceship output): one sweep, φ fitted from ROT
        # robustly; rows whose (BATCH, ROT) disagree with the fit are flagged (see below).
        consistent = _consistent_batch_rot(row_batch, rot)
        batches["row_consistent"] = consistent
        good_batch = row_batch[consistent]
        first, last = int(good_batch.min()), int(good_batch.max())
        width, start = 1.0, float(first - 1)
        if rot is not None and np.isfinite(rot[consistent]).all() and last > first:
            width, start = np.polyfit(good_batch - first + 0.5, rot[consistent], 1)
        scan = Scan({"image_range": [1, last - first + 1], "oscillation": [float(start),
                                                                          float(width)],
                     "batch_offset": first - 1})
        z = (rot - start) / width if rot is not None else row_batch - first + 0.5
        el.append(Experiment(beam=Beam({"direction": [0.0, 0.0, 1.0],
                                        "wavelength": float(default_wl)}),
                             scan=scan, goniometer=Goniometer({"rotation_axis": [1.0, 0, 0]}),
                             crystal=_crystal(cell, sg, np.eye(3)), identifier="0"))
        batches["experiment_id"] = np.zeros(0, dtype=np.int64)
        return el, exp_id, z
    run = _runs(batches["number"], batches["dataset_id"])
    batches["experiment_id"] = run
    # map each row's batch number to its header
    order = np.argsort(batches["number"], kind="stable")
    sorted_numbers = batches["number"][order]
    pos = np.searchsorted(sorted_numbers, row_batch)
    pos = np.clip(pos, 0, len(sorted_numbers) - 1)
    found = sorted_numbers[pos] == row_batch
    if not np.all(found):
        bad = np.unique(row_batch[~found])[:5]
        raise MtzFormatError(f"{path}: {int((~found).sum())} rows refer to batch numbers "
                             f"without a batch header (e.g. {bad.tolist()})")
    header_of_row = order[pos]
    exp_id[:] = run[header_of_row]
    n_runs = int(run.max()) + 1
    phi0s, widths_, firsts = np.zeros(n_runs), np.zeros(n_runs), np.zeros(n_runs)
    for r in range(n_runs):
        sel = np.flatnonzero(run == r)
        sel = sel[np.argsort(batches["number"][sel])]
        first_b = int(batches["number"][sel[0]])
        last_b = int(batches["number"][sel[-1]])
        phi0 = float(batches["phi_start"][sel[0]])
        widths = batches["phi_end"][sel] - batches["phi_start"][sel]
        width = float(np.median(widths)) if len(widths) else 1.0
        wl = float(batches["wavelength"][sel[0]]) or float(default_wl)
        axis = batches["scan_axis"][sel[0]]
        axis = axis if np.linalg.norm(axis) > 0 else np.array([1.0, 0.0, 0.0])
        scan = Scan({"image_range": [1, last_b - first_b + 1], "oscillation": [phi0, width],
                     "batch_offset": first_b - 1})
        el.append(Experiment(
            beam=Beam({"direction": [0.0, 0.0, 1.0], "wavelength": wl}),
            goniometer=Goniometer({"rotation_axis": [float(x) for x in axis]}),
            scan=scan, crystal=_crystal(cell, sg, batches["umat"][sel[0]]), identifier=str(r)))
        phi0s[r], widths_[r], firsts[r] = phi0, width, first_b
    # frame coordinate of every row, vectorised over runs
    if rot is not None and np.all(widths_ != 0):
        z = (rot - phi0s[exp_id]) / widths_[exp_id]
    else:
        z = row_batch - firsts[exp_id] + 0.5
    return el, exp_id, z


def _sum_partials(cols: dict, npart_raw: np.ndarray,
                  fraction_limits: tuple[float, float]) -> tuple[dict, np.ndarray]:
    """Sum MOSFLM partial pieces (same original hkl, consecutive batches)."""
    hkl, batch = cols["H"], cols["BATCH"]
    order = np.lexsort((batch, hkl[:, 2], hkl[:, 1], hkl[:, 0]))
    hs, bs = take_rows(hkl, order), batch[order]
    n = len(order)
    new = np.ones(n, dtype=bool)
    if n:
        new[1:] = ~((hs[1:] == hs[:-1]).all(axis=1) & (bs[1:] == bs[:-1] + 1))
    starts = np.flatnonzero(new)
    group = np.cumsum(new) - 1
    size = np.diff(np.append(starts, n))

    def add(x):
        return np.add.reduceat(x[order], starts) if n else x[:0]

    out = {"H": hs[starts], "n_parts": size.astype(np.int32)}
    frac = cols.get("FRACTIONCALC")
    w = frac[order] if frac is not None else np.ones(n)
    wsum = np.add.reduceat(w, starts) if n else w[:0]
    safe = np.where(wsum > 0, wsum, 1.0)
    for name, x in cols.items():
        if name in ("H", "BATCH", "M/ISYM", "MPART", "n_parts"):
            continue
        if name in ("I", "IPR", "BG"):
            out[name] = add(x)
        elif name in ("SIGI", "SIGIPR", "SIGBG"):
            out[name] = np.sqrt(add(x.astype(np.float64) ** 2))
        elif name == "FRACTIONCALC":
            out[name] = wsum
        else:  # positions, ROT, LP, ...: fraction-weighted mean over the pieces
            xs = x[order].astype(np.float64)
            mean = np.add.reduceat(xs * w, starts) / safe if n else xs[:0]
            plain = np.add.reduceat(xs, starts) / size if n else xs[:0]
            out[name] = np.where(wsum > 0, mean, plain)
    out["BATCH"] = bs[starts + size // 2]
    out["batch_first"], out["batch_last"] = bs[starts], bs[starts + size - 1]
    # completeness: parts 1..nparts of one set, or a full (MPART == 0)
    mp = npart_raw[order]
    part, nparts = mp % 100, mp // 100
    pos_in_group = np.arange(n) - starts[group]
    row_ok = (part == pos_in_group + 1) & (nparts == nparts[starts][group])
    bad = np.bincount(group, weights=~row_ok, minlength=len(starts)) if n else np.zeros(0)
    full = mp[starts] == 0
    complete = ((bad == 0) & (size == nparts[starts])) | full
    out["partial_complete"] = complete
    # AIMLESS's acceptance test (PARTIALS TEST, default 0.95 1.05) on the summed fraction
    lo, hi = fraction_limits
    out["partial_accepted"] = full | ((wsum >= lo) & (wsum <= hi)) if frac is not None else \
        np.ones(len(starts), dtype=bool)
    return out, order


def read_unmerged_mtz(filename, sum_partials: bool = True,
                      partial_fraction_limits: tuple[float, float] = (0.95, 1.05)) -> UnmergedMtz:
    """Read an unmerged MTZ into a reflection table and experiment list.

    Parameters
    ----------
    filename : str or path
        MOSFLM, AIMLESS/DIALS scaled-unmerged or DIALS-exported unmerged MTZ.
    sum_partials : bool
        Sum MOSFLM partial pieces (``MPART`` column) per reflection (AIMLESS behaviour).
    partial_fraction_limits : (float, float)
        AIMLESS's ``PARTIALS TEST`` limits: a summed partial whose total ``FRACTIONCALC``
        lies outside them stays in the table with ``partial_accepted`` False and the
        ``excluded_for_scaling`` flag (fulls are always accepted).

    Returns
    -------
    UnmergedMtz

    Notes
    -----
    Experiments carry what an MTZ records: wavelength, φ per batch, cell, space group and
    the batch UMAT (in the MTZ's own laboratory frame); there is no detector model. A file
    without batch headers (e.g. reciprocalspaceship output) gives one sweep whose φ is
    fitted from ROT against BATCH; if no wavelength is recorded anywhere the beam gets
    1.0 Å as a placeholder.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    MtzFormatError (ValueError)
        For corrupt/truncated files, merged files, missing required columns or rows whose
        batch has no header; the message names the file.
    ValueError
        If ``partial_fraction_limits`` are not finite or lower > upper.
    """
    lo, hi = (float(v) for v in partial_fraction_limits)
    if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
        raise ValueError("partial_fraction_limits must be two finite numbers, lower <= upper "
                         f"(got {tuple(partial_fraction_limits)!r})")
    path = os.fspath(filename)
    mtz = _read(path)
    _require(mtz, ["H", "K", "L", "M/ISYM", "BATCH"], path)
    labels = mtz.column_labels()
    if "I" not in labels and "IPR" not in labels:
        raise MtzFormatError(f"{path}: missing required intensity column I (or IPR)")
    sg, cell = _symmetry(mtz, path)
    n_in = mtz.nreflections
    stored = mtz.array
    for j, lab in enumerate(("H", "K", "L", "M/ISYM")):  # before gemmi casts them to int
        _integral(stored[:, j].astype(np.float64), lab, path, _MAX_INDEX)
    _check_isym(stored[:, 3], len(mtz.spacegroup.operations().sym_ops), path)
    # gemmi restores the original (measured) indices from M/ISYM in C++.
    try:
        restored = not n_in or mtz.switch_to_original_hkl()
    except (IndexError, RuntimeError) as exc:
        raise MtzFormatError(f"{path}: cannot restore original indices from M/ISYM "
                             f"({exc})") from None
    if not restored:
        raise MtzFormatError(f"{path}: cannot restore original indices from M/ISYM")
    data = mtz.array
    if n_in and not np.all(np.isfinite(data[:, :5])):
        raise MtzFormatError(f"{path}: H, K, L, M/ISYM or BATCH has missing values")
    # One transposing float32 -> float64 pass gives every column as a contiguous row
    # (converting strided column views one by one costs several times more).
    with np.errstate(invalid="ignore"):  # signalling NaNs in a corrupt file become quiet NaN
        by_col = np.ascontiguousarray(data.T, dtype=np.float64)
    col = {lab: by_col[i] for i, lab in enumerate(labels)}
    hkl = np.column_stack([_integral(col[lab], lab, path, _MAX_INDEX) for lab in "HKL"])
    cols: dict[str, np.ndarray] = {
        "H": hkl.astype(np.int32) if n_in else np.zeros((0, 3), np.int32),
        "BATCH": _integral(col["BATCH"], "BATCH", path, _MAX_FLOAT32_INTEGER)}
    for lab in ("I", "SIGI", "IPR", "SIGIPR", "SCALEUSED", "SIGSCALEUSED", "FRACTIONCALC",
                "XDET", "YDET", "ROT", "LP", "QE", "BG", "SIGBG", "NPART"):
        if lab in col:
            cols[lab] = col[lab]
    kind = "scaled" if "SCALEUSED" in col else "unscaled"
    order = None
    if sum_partials and "MPART" in col:
        kind = "mosflm_partials"
        mpart = _integral(col["MPART"], "MPART", path, _MAX_FLOAT32_INTEGER)
        cols, order = _sum_partials(cols, mpart, (lo, hi))
    batches = _batch_arrays(mtz)
    rot = cols.get("ROT")
    el, exp_id, z = _make_experiments(mtz, batches, cols["BATCH"], rot, cell, sg, path)
    out = _columns_from_mtz(cols, kind, z, exp_id, cell)
    consistent = batches.pop("row_consistent", None)
    if consistent is not None:
        # kept, but flagged with the reason: BATCH and ROT disagree with the other rows
        out["batch_rot_consistent"] = consistent
        from ..reflection_table import Flags

        out["flags"][~consistent] |= np.uint64(int(Flags.excluded_for_scaling))
    table = _to_table(out, {i: e.identifier for i, e in enumerate(el)})
    return UnmergedMtz(table, el, sg, cell, batches, kind, n_in, list(labels))


# Miller indices beyond this are not crystallographic data (symmetry.miller_array's
# bound); batch numbers and MPART are exact in float32 up to 2**24.
_MAX_INDEX = (1 << 20) - 1
_MAX_FLOAT32_INTEGER = 1 << 24


def _check_isym(m_isym: np.ndarray, n_ops: int, path: str) -> None:
    """ISYM (M/ISYM mod 256) numbers a symmetry operator and its Friedel mate: 1..2·n_ops."""
    isym = m_isym.astype(np.int64) % 256
    bad = (isym < 1) | (isym > 2 * n_ops)
    if np.any(bad):
        row = int(np.flatnonzero(bad)[0])
        raise MtzFormatError(f"{path}: column M/ISYM row {row} holds {int(m_isym[row])}: ISYM "
                             f"{int(isym[row])} is not in 1..{2 * n_ops} for this space group")


def _integral(values: np.ndarray, label: str, path: str, bound: int) -> np.ndarray:
    """``values`` as int64, refusing non-integral or out-of-range ones (names column, row)."""
    bad = (np.abs(values) > bound) | (values != np.round(values))
    if np.any(bad):
        row = int(np.flatnonzero(bad)[0])
        raise MtzFormatError(f"{path}: column {label} row {row} holds {float(values[row])}, "
                             f"not an "
                             f"integer within +-{bound} ({int(bad.sum())} such rows)")
    return values.astype(np.int64)


def _columns_from_mtz(cols: dict, kind: str, z, exp_id, cell: UnitCell) -> dict:
    n = len(cols["H"])
    out: dict[str, np.ndarray] = {"miller_index": cols["H"].astype(np.int32),
                                  "id": exp_id.astype(np.int32),
                                  "batch": cols["BATCH"].astype(np.int32)}
    with np.errstate(divide="ignore"):
        out["d"] = cell.d(out["miller_index"]) if n else np.zeros(0)
    if "I" in cols:
        value, sig = cols["I"], cols["SIGI"] if "SIGI" in cols else np.full(n, np.nan)
        if kind == "scaled":
            # I is the scaled intensity raw / g; a DIALS table holds the raw (corrected)
            # intensity in intensity.scale.* beside g, and the scaled one is value / g.
            g = cols["SCALEUSED"]
            out["intensity.scale.value"] = value * g
            out["intensity.scale.variance"] = (sig * g) ** 2
            out["inverse_scale_factor"] = g
            if "SIGSCALEUSED" in cols:
                out["inverse_scale_factor_variance"] = cols["SIGSCALEUSED"] ** 2
            out["intensity.sum.value"] = value * g
            out["intensity.sum.variance"] = (sig * g) ** 2
        else:
            out["intensity.sum.value"] = value
            out["intensity.sum.variance"] = sig ** 2
    if "IPR" in cols:
        out["intensity.prf.value"] = cols["IPR"]
        out["intensity.prf.variance"] = cols.get("SIGIPR", np.full(n, np.nan)) ** 2
    if "FRACTIONCALC" in cols:
        frac = cols["FRACTIONCALC"]
        # AIMLESS rewrites FRACTIONCALC to 0 for summed/full data: 0 everywhere means
        # "not recorded", and a partiality of 0 would discard every reflection.
        out["partiality"] = frac if np.any(frac > 0) else np.ones(n)
    else:
        out["partiality"] = np.ones(n)
    if "LP" in cols:
        out["lp"] = cols["LP"]
    if "QE" in cols:
        out["qe"] = cols["QE"]
    if "BG" in cols:
        out["background.sum.value"] = cols["BG"]
        if "SIGBG" in cols:
            out["background.sum.variance"] = cols["SIGBG"] ** 2
    x = cols.get("XDET", np.zeros(n))
    y = cols.get("YDET", np.zeros(n))
    out["xyzobs.px.value"] = np.column_stack([x, y, z]).astype(np.float64)
    if "ROT" in cols:
        out["phi"] = cols["ROT"]
    if "n_parts" in cols:
        out["n_parts"] = cols["n_parts"]
        out["partial_complete"] = cols["partial_complete"]
        out["partial_accepted"] = cols["partial_accepted"]
        out["batch_first"] = cols["batch_first"].astype(np.int32)
        out["batch_last"] = cols["batch_last"].astype(np.int32)
    elif "NPART" in cols:
        out["n_parts"] = cols["NPART"].astype(np.int32)
    out["flags"] = _flags(out)
    if "partial_accepted" in out:
        from ..reflection_table import Flags

        out["flags"][~out["partial_accepted"]] |= np.uint64(int(Flags.excluded_for_scaling))
    return out


@dataclass
class MergedMtz:
    """Result of :func:`read_merged_mtz` (arrays are per unique reflection)."""

    miller_index: np.ndarray
    columns: dict
    space_group: SpaceGroup
    unit_cell: UnitCell
    wavelength: float


def read_merged_mtz(filename) -> MergedMtz:
    """Read a merged MTZ (e.g. ``dials.merge`` or AIMLESS output).

    Returns every column as float64 (integer-typed columns as int64) keyed by its label.

    Raises
    ------
    MtzFormatError (ValueError)
        If the file is unreadable, has batches (unmerged) or no ``IMEAN``/``I(+)``/``F``.
    """
    path = os.fspath(filename)
    mtz = _read(path)
    _require(mtz, ["H", "K", "L"], path)
    if "M/ISYM" in mtz.column_labels():
        raise MtzFormatError(f"{path}: this is an unmerged MTZ (has M/ISYM); "
                             "use read_unmerged_mtz")
    labels = mtz.column_labels()
    if not any(x in labels for x in ("IMEAN", "I(+)", "I", "F", "FP")):
        raise MtzFormatError(f"{path}: no intensity or amplitude column found")
    sg, cell = _symmetry(mtz, path)
    data = mtz.array
    hkl = np.column_stack([_integral(data[:, j].astype(np.float64), lab, path, _MAX_INDEX)
                           for j, lab in enumerate("HKL")]) if len(data) else np.zeros((0, 3))
    cols = {}
    for i, c in enumerate(mtz.columns):
        if i < 3:
            continue
        v = data[:, i].astype(np.float64)
        # integer-typed columns become int64 only when every value is an exact integer
        exact = np.all(np.isfinite(v) & (v == np.round(v)) & (np.abs(v) <= _MAX_FLOAT32_INTEGER))
        cols[c.label] = v.astype(np.int64) if c.type in ("I", "B", "Y") and exact else v
    wl = next((d.wavelength for d in mtz.datasets if d.wavelength > 0), 0.0)
    return MergedMtz(hkl.astype(np.int32), cols, sg, cell, float(wl))


# --------------------------------------------------------------------------- writing


def _col(table, name):
    return np.asarray(table[name]) if name in table else None


def _batch_offsets(ranges: list[tuple[int, int]]) -> list[int]:
    """Offsets (multiples of 1000 beyond the previous run) making batch ranges disjoint."""
    offsets, next_free = [], None
    for first, last in ranges:
        off = 0
        if next_free is not None and first <= next_free:
            off = int(np.ceil((next_free - first + 1) / 1000.0)) * 1000
        offsets.append(off)
        next_free = last + off
    return offsets


def write_unmerged_mtz(filename, table, experiments: ExperimentList,
                       intensity: str | None = None, sort: bool = True,
                       project_name: str = "xtalscale", crystal_name: str = "XTAL",
                       dataset_name: str = "NATIVE") -> np.ndarray:
    """Write an unmerged MTZ (``H K L M/ISYM BATCH I SIGI`` + optional columns).

    Parameters
    ----------
    filename : str or path
    table : reflection_table
        Needs ``miller_index``, ``id``, an intensity (see ``intensity``) and either
        ``batch`` or ``xyzobs.px.value`` (batch = floor(z) + first image + offset).
    experiments : ExperimentList
        Supplies space group, cell, wavelength, φ per batch. Experiments with
        overlapping batch ranges get offsets of multiples of 1000 (as DIALS does).
    intensity : {'scale', 'prf', 'sum'} or None
        Which ``intensity.<kind>`` to write as I/SIGI. Default: ``scale`` if present,
        else ``prf``, else ``sum``. With ``inverse_scale_factor`` present, SCALEUSED and
        SIGSCALEUSED are written and I/SIGI hold the scaled intensity
        ``intensity.scale.value / inverse_scale_factor`` (σ likewise), as ``dials.export``
        and AIMLESS write it; g must then be finite and > 0 on every row.
    sort : bool
        Sort rows by ASU index, M/ISYM, BATCH (recorded in the header sort order).

    Returns
    -------
    ndarray
        The row permutation used: file row i holds ``table`` row ``perm[i]``.

    Raises
    ------
    ValueError / KeyError
        For missing columns, identifiers inconsistent with the experiments, or lengths
        that do not match.
    """
    path = os.fspath(filename)
    hkl, ids, kind = _check_unmerged_input(path, table, experiments, intensity)
    crystal0 = experiments[0].crystal
    sg, cell = crystal0.get_space_group(), crystal0.get_unit_cell()
    batch, offsets = _row_batches(path, table, experiments, ids)
    _check_batch_numbers(batch, path)
    mapping = map_to_asu(hkl, sg)
    isym = mapping.isym.astype(np.int64)
    cols = [("H", "H", mapping.asu_hkl[:, 0]), ("K", "H", mapping.asu_hkl[:, 1]),
            ("L", "H", mapping.asu_hkl[:, 2]), ("M/ISYM", "Y", isym), ("BATCH", "B", batch)]
    cols += _unmerged_data_columns(path, table, experiments, ids, kind)
    wavelength = experiments[0].beam.get_wavelength() if experiments[0].beam else 0.0
    mtz = _new_mtz(sg, cell, wavelength, cols[3:], project_name, crystal_name, dataset_name)
    data = np.empty((len(hkl), len(cols)), dtype=np.float32)
    for j, (_, _, v) in enumerate(cols):
        data[:, j] = v
    perm = np.arange(len(hkl))
    if sort:
        a = mapping.asu_hkl
        perm = _sort_permutation([a[:, 0], a[:, 1], a[:, 2], isym, batch])
        data = data[perm]  # one row gather (contiguous rows) instead of one per column
        mtz.sort_order = [1, 2, 3, 4, 5]
    mtz.set_data(data)
    _add_batch_headers(mtz, experiments, ids, batch, offsets, cell)
    mtz.write_to_file(path)
    return perm


def _check_unmerged_input(path: str, table, experiments, intensity):
    """Validate the writer's inputs; return (hkl, experiment ids, intensity kind)."""
    if len(experiments) == 0:
        raise ValueError(f"{path}: experiments is empty")
    if len(table) == 0:
        # gemmi (like CCP4) cannot read back an MTZ without reflections
        raise ValueError(f"{path}: the reflection table is empty; nothing to write")
    hkl = miller_array(_required(table, "miller_index", path), "miller_index")
    ids = _required(table, "id", path).astype(np.int64)
    bad = (ids < 0) | (ids >= len(experiments))
    if np.any(bad):
        raise KeyError(f"{path}: table id {int(ids[bad][0])} has no experiment (list has "
                       f"{len(experiments)})")
    _check_identifiers(table, experiments, path)
    if experiments[0].crystal is None:
        raise ValueError(f"{path}: experiment 0 has no crystal (space group and cell needed)")
    kind = intensity or next((k for k in ("scale", "prf", "sum")
                              if f"intensity.{k}.value" in table), None)
    if kind is None:
        raise KeyError(f"{path}: table has no intensity.scale/prf/sum.value column")
    for suffix in ("value", "variance"):
        _required(table, f"intensity.{kind}.{suffix}", path)
    return hkl, ids, kind


def _check_batch_numbers(batch: np.ndarray, path: str) -> None:
    """MTZ stores BATCH as float32: integers beyond 2**24 would not read back."""
    bad = (batch < 0) | (batch >= _MAX_FLOAT32_INTEGER)
    if np.any(bad):
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{path}: batch number {int(batch[row])} of table row {row} (after "
                         f"sweep offsets) is outside 0..{_MAX_FLOAT32_INTEGER - 1}, the range "
                         "an MTZ BATCH column holds exactly")


def _row_batches(path: str, table, experiments, ids):
    """Batch number of every row, with per-experiment offsets making ranges disjoint."""
    scans = [e.scan for e in experiments]
    offsets = _batch_offsets([s.get_batch_range() if s is not None else (1, 1)
                              for s in scans])
    if "batch" in table:
        return np.asarray(table["batch"]).astype(np.int64) + np.asarray(offsets)[ids], offsets
    z = np.asarray(_required(table, "xyzobs.px.value", path))[:, 2]
    first = np.array([s.get_image_range()[0] if s is not None else 1 for s in scans])
    boff = np.array([s.get_batch_offset() if s is not None else 0 for s in scans])
    batch = np.floor(z).astype(np.int64) + (first + boff + np.asarray(offsets))[ids]
    return batch, offsets


def _unmerged_data_columns(path: str, table, experiments, ids, kind: str) -> list:
    """(label, MTZ type, values) of the data columns after H K L M/ISYM BATCH."""
    n = len(table)
    var = np.asarray(table[f"intensity.{kind}.variance"], dtype=np.float64)
    # DIALS marks failed measurements with negative variances: they become missing
    # (NaN) sigmas in the MTZ, which CCP4 programs skip.
    value = np.asarray(table[f"intensity.{kind}.value"], dtype=np.float64)
    sigma = np.sqrt(np.where(var >= 0, var, np.nan))
    g = _col(table, "inverse_scale_factor")
    if g is not None and kind == "scale":
        # DIALS/AIMLESS convention: I and SIGI of a scaled unmerged file are the scaled
        # intensity raw / g and its sigma sigma_raw / g; SCALEUSED records the g applied.
        g = _checked_scales(g, path)
        value, sigma = value / g, sigma / g
    cols = [("I", "J", value), ("SIGI", "Q", sigma)]
    if kind != "prf" and "intensity.prf.value" in table:
        # DIALS/MOSFLM convention: I = summation (or scaled), IPR = profile-fitted.
        pv = _required(table, "intensity.prf.variance", path).astype(np.float64)
        cols.append(("IPR", "J", _required(table, "intensity.prf.value", path)))
        cols.append(("SIGIPR", "Q", np.sqrt(np.where(pv >= 0, pv, np.nan))))
    if g is not None and kind == "scale":
        gv = _col(table, "inverse_scale_factor_variance")
        cols.append(("SCALEUSED", "R", g))
        cols.append(("SIGSCALEUSED", "R", np.sqrt(gv) if gv is not None else np.zeros(n)))
    if "partiality" in table:
        cols.append(("FRACTIONCALC", "R", _col(table, "partiality")))
    xyz = _col(table, "xyzobs.px.value")
    if xyz is not None:
        phi = _col(table, "phi")
        if phi is None:
            phi = np.zeros(n)
            for i, e in enumerate(experiments):
                rows = ids == i
                if e.scan is not None:
                    phi[rows] = e.scan.get_angle_from_array_index(xyz[rows, 2])
        cols += [("XDET", "R", xyz[:, 0]), ("YDET", "R", xyz[:, 1]), ("ROT", "R", phi)]
    if "lp" in table:
        cols.append(("LP", "R", _col(table, "lp")))
    return cols


def _checked_scales(g, path: str) -> np.ndarray:
    """Inverse scale factors as float64, refusing non-finite or non-positive ones (by row)."""
    g = np.asarray(g, dtype=np.float64)
    bad = ~(np.isfinite(g) & (g > 0))
    if np.any(bad):
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{path}: inverse_scale_factor must be finite and > 0; row {row} has "
                         f"{g[row]} ({int(bad.sum())} such rows); select the scaled rows first")
    return g


def _new_mtz(sg: SpaceGroup, cell: UnitCell, wavelength: float, data_columns,
             project_name: str, crystal_name: str, dataset_name: str) -> gemmi.Mtz:
    """An empty MTZ with the base dataset (H K L) plus one dataset holding the columns."""
    mtz = gemmi.Mtz(with_base=True)
    mtz.title = "From xtalscale"
    mtz.spacegroup = sg.gemmi
    mtz.set_cell_for_all(cell.gemmi)
    ds = mtz.add_dataset(dataset_name)
    ds.project_name, ds.crystal_name, ds.wavelength = project_name, crystal_name, wavelength
    ds.cell = cell.gemmi
    for label, ctype, _ in data_columns:
        mtz.add_column(label, ctype, dataset_id=1)
    return mtz


def _sort_permutation(keys: list) -> np.ndarray:
    """Stable lexicographic sort permutation over integer keys (most significant first).

    Packs the keys into one int64 (mixed radix from the actual value ranges) when they
    fit in 63 bits -- one stable argsort instead of a multi-key lexsort.
    """
    lows = [int(k.min()) for k in keys]
    spans = [int(k.max()) - lo + 1 for k, lo in zip(keys, lows)]
    if sum(max(int(s - 1).bit_length(), 1) for s in spans) > 62:
        return np.lexsort(tuple(reversed(keys)))
    packed = np.zeros(len(keys[0]), dtype=np.int64)
    for k, lo, span in zip(keys, lows, spans):
        packed = packed * span + (k.astype(np.int64) - lo)
    return np.argsort(packed, kind="stable")


def _required(table, name: str, path: str) -> np.ndarray:
    if name not in table:
        raise KeyError(f"{path}: reflection table is missing required column {name!r}")
    return np.asarray(table[name])


def _check_identifiers(table, experiments: ExperimentList, path: str) -> None:
    ids_map = table.experiment_identifiers()
    for k, v in ids_map.items():
        if not 0 <= int(k) < len(experiments):
            raise KeyError(f"{path}: table identifier map has id {k} but only "
                           f"{len(experiments)} experiments")
        if experiments[int(k)].identifier and experiments[int(k)].identifier != v:
            raise ValueError(f"{path}: table id {k} has identifier {v!r} but experiment {k} "
                             f"has {experiments[int(k)].identifier!r}")


def _batch_template(e, cell: UnitCell) -> gemmi.Mtz.Batch:
    """The orientation block shared by all batches of one experiment (φ set per batch)."""
    hdr = gemmi.Mtz.Batch()
    hdr.dataset_id = 1
    ints = hdr.ints
    for pos, v in ((_I_NCRYST, 1), (_I_LDTYPE, 2), (_I_JSAXS, 1), (_I_NGONAX, 1),
                   (_I_NDET, 1), (_I_NBSETID, 1)):
        ints[pos] = v
    f = hdr.floats
    for j, v in enumerate(cell.parameters()):
        f[_F_CELL + j] = v
    U = np.asarray(e.crystal.get_U()).reshape(3, 3) if e.crystal is not None else np.eye(3)
    for j, v in enumerate(U.T.ravel()):  # column-major, see _F_UMAT
        f[_F_UMAT + j] = float(v)
    f[_F_BSCALE] = 1.0
    axis = e.goniometer.get_rotation_axis() if e.goniometer is not None else (1.0, 0.0, 0.0)
    for j in range(3):
        f[_F_SCANAX + j] = float(axis[j])
        f[_F_E1 + j] = float(axis[j])
    if e.beam is not None:
        f[_F_ALAMBD] = e.beam.get_wavelength()
        unit_s0 = np.asarray(e.beam.get_unit_s0())
        k = int(np.argmax(np.abs(unit_s0)))
        # idealised source vector: the lab axis the beam comes from; so: with tilts
        f[_F_SOURCE + k] = -float(np.sign(unit_s0[k]))
        for j in range(3):
            f[_F_SO + j] = float(-unit_s0[j])
    if e.scan is not None:
        f[_F_PHIRANGE] = e.scan.get_oscillation()[1]
    hdr.ints = ints
    hdr.floats = f
    hdr.axes = ["AXIS"]
    return hdr


def _add_batch_headers(mtz, experiments, ids, batch, offsets, cell: UnitCell) -> None:
    # One header per image of every scan (as dials.export), plus any batch used by a row
    # outside its scan's range.
    owner: dict[int, int] = {}
    order = np.argsort(ids, kind="stable")
    bounds = np.searchsorted(ids[order], np.arange(len(experiments) + 1))
    for i, e in enumerate(experiments):
        if e.scan is not None:
            first, last = e.scan.get_batch_range()
            for b in range(first + offsets[i], last + offsets[i] + 1):
                owner.setdefault(b, i)
        for b in np.unique(batch[order[bounds[i]:bounds[i + 1]]]).tolist():
            owner.setdefault(int(b), i)
    templates = [_batch_template(e, cell) for e in experiments]
    for b in sorted(owner):
        i = owner[b]
        e = experiments[i]
        hdr = templates[i].clone()
        hdr.number = int(b)
        hdr.title = f"Batch {int(b)}"
        if e.scan is not None:
            image = int(b) - offsets[i] - e.scan.get_batch_offset()
            start = e.scan.get_angle_from_image_index(image)
            f = hdr.floats
            f[_F_PHISTT], f[_F_PHIEND] = start, start + e.scan.get_oscillation()[1]
            hdr.floats = f
        mtz.batches.append(hdr)


def merge_intensities(hkl, intensities, variances, space_group, anomalous: bool = False,
                      grouping=None):
    """Inverse-variance weighted merge per unique (ASU) reflection (vectorised).

    ``grouping`` (optional) is the grouping of the usable rows (in input order) by ASU
    index, as :func:`~xtalscale.symmetry.group_reflections` makes it (Bijvoet mates apart
    only with ``anomalous``), when the caller has it already.

    Returns
    -------
    tuple
        ``(unique_hkl, mean, sigma, multiplicity)``; rows with variance <= 0 or
        non-finite values are ignored.
    """
    I = np.asarray(intensities, dtype=np.float64)
    V = np.asarray(variances, dtype=np.float64)
    hkl = miller_array(hkl, "hkl")
    if not (len(I) == len(V) == len(hkl)):
        raise ValueError(f"hkl, intensities and variances must have equal lengths "
                         f"(got {len(hkl)}, {len(I)}, {len(V)})")
    ok = np.isfinite(I) & np.isfinite(V) & (V > 0)
    if grouping is None:
        grouping = group_reflections(map_to_asu(take_rows(hkl, ok), space_group,
                                                anomalous=anomalous).asu_hkl)
    elif len(grouping.group_index) != np.count_nonzero(ok):
        raise ValueError(f"the grouping has {len(grouping.group_index)} rows, not the "
                         f"{np.count_nonzero(ok)} usable ones")
    g = grouping
    w = 1.0 / V[ok]
    sw = np.bincount(g.group_index, weights=w, minlength=g.n_groups)
    swi = np.bincount(g.group_index, weights=w * I[ok], minlength=g.n_groups)
    return g.unique_hkl, swi / sw, np.sqrt(1.0 / sw), g.group_sizes()


def write_merged_mtz(filename, hkl, imean, sigimean, space_group, unit_cell,
                     wavelength: float, i_plus=None, sigi_plus=None, i_minus=None,
                     sigi_minus=None, n_plus=None, n_minus=None,
                     project_name: str = "xtalscale", crystal_name: str = "XTAL",
                     dataset_name: str = "NATIVE", *, n=None, f=None, sigf=None,
                     f_plus=None, sigf_plus=None, f_minus=None, sigf_minus=None,
                     dano=None, sigdano=None) -> None:
    """Write a merged MTZ (``IMEAN SIGIMEAN`` [+ ``I(+) SIGI(+) I(-) SIGI(-) N(+) N(-)``]).

    With the optional amplitude arrays the columns and types are those of ``dials.merge``:
    ``IMEAN J SIGIMEAN Q N I F F SIGF Q I(+) K SIGI(+) M I(-) K SIGI(-) M N(+) I N(-) I
    F(+) G SIGF(+) L F(-) G SIGF(-) L DANO D SIGDANO Q`` (in that order; absent ones left out).

    Parameters
    ----------
    hkl : array_like (n, 3)
        Unique reflections (ASU indices).
    imean, sigimean : array_like (n,)
    space_group : SpaceGroup or str
    unit_cell : UnitCell or 6 parameters
    wavelength : float
    i_plus, sigi_plus, i_minus, sigi_minus, n_plus, n_minus : array_like (n,), optional
        Anomalous columns (NaN = not measured); all four intensity arrays are needed.
    n : array_like (n,), optional
        Multiplicity of IMEAN (``N``).
    f, sigf, f_plus, sigf_plus, f_minus, sigf_minus, dano, sigdano : array_like, optional
        Amplitudes (e.g. French–Wilson); each value/σ pair must be given together.

    Raises
    ------
    ValueError
        On unequal lengths, non-ASU indices or inconsistent anomalous arrays.
    """
    path = os.fspath(filename)
    hkl = miller_array(hkl, "hkl")
    sg = space_group if isinstance(space_group, SpaceGroup) else SpaceGroup(space_group)
    cell = unit_cell if isinstance(unit_cell, UnitCell) else UnitCell(unit_cell)
    n_rows = len(hkl)
    cols = [("IMEAN", "J", imean), ("SIGIMEAN", "Q", sigimean)]
    if n is not None:
        cols.append(("N", "I", n))
    cols += _optional_columns(path, [("F", "F", f), ("SIGF", "Q", sigf)])
    anom = [i_plus, sigi_plus, i_minus, sigi_minus]
    if any(a is not None for a in anom):
        if any(a is None for a in anom):
            raise ValueError(f"{path}: i_plus, sigi_plus, i_minus and sigi_minus are all "
                             "required for anomalous output")
        cols += [("I(+)", "K", i_plus), ("SIGI(+)", "M", sigi_plus), ("I(-)", "K", i_minus),
                 ("SIGI(-)", "M", sigi_minus)]
        if n_plus is not None and n_minus is not None:
            cols += [("N(+)", "I", n_plus), ("N(-)", "I", n_minus)]
    cols += _optional_columns(path, [("F(+)", "G", f_plus), ("SIGF(+)", "L", sigf_plus),
                                     ("F(-)", "G", f_minus), ("SIGF(-)", "L", sigf_minus)])
    cols += _optional_columns(path, [("DANO", "D", dano), ("SIGDANO", "Q", sigdano)])
    for label, _, v in cols:
        if len(np.asarray(v)) != n_rows:
            raise ValueError(f"{path}: {label} has length {len(np.asarray(v))}, hkl has {n_rows}")
    if n_rows:
        m = map_to_asu(hkl, sg)
        if not np.array_equal(m.asu_hkl, hkl):
            bad = int(np.flatnonzero((m.asu_hkl != hkl).any(axis=1))[0])
            raise ValueError(f"{path}: hkl row {bad} {tuple(hkl[bad])} is not in the ASU")
    mtz = _new_mtz(sg, cell, wavelength, cols, project_name, crystal_name, dataset_name)
    data = np.empty((n_rows, 3 + len(cols)), dtype=np.float32)
    data[:, :3] = hkl
    for j, (_, _, v) in enumerate(cols):
        data[:, 3 + j] = np.asarray(v, dtype=np.float64)
    mtz.set_data(data)
    mtz.write_to_file(path)


def _optional_columns(path: str, group: list) -> list:
    """The (label, type, values) of a group of columns given all together, or none."""
    given = [v is not None for _, _, v in group]
    if any(given) and not all(given):
        raise ValueError(f"{path}: {', '.join(label for label, _, _ in group)} must be "
                         "given together")
    return group if all(given) else []


def anomalous_halves(unique_hkl, anomalous_hkl, *values) -> list:
    """Split arrays merged per anomalous ASU index into (+) and (-) halves of ``unique_hkl``.

    Parameters
    ----------
    unique_hkl : (n, 3)
        Non-anomalous ASU indices (the rows of the merged file).
    anomalous_hkl : (m, 3)
        Anomalous ASU indices, sorted as :func:`merge_intensities` returns them.
    *values : array_like (m,)
        Arrays per anomalous index.

    Returns
    -------
    list of tuples
        ``[(plus values...), (minus values...)]``, each array of length n with NaN where the
        half was not observed (for centric reflections only the (+) half exists).
    """
    keys = hkl_keys(miller_array(anomalous_hkl, "anomalous_hkl"))
    hkl = miller_array(unique_hkl, "unique_hkl")
    halves = []
    for sign in (1, -1):
        want = hkl_keys(sign * hkl)
        pos = np.clip(np.searchsorted(keys, want), 0, max(len(keys) - 1, 0))
        hit = keys[pos] == want if len(keys) else np.zeros(len(hkl), dtype=bool)
        halves.append(tuple(np.where(hit, np.asarray(v, dtype=np.float64)[pos], np.nan)
                            if len(keys) else np.full(len(hkl), np.nan) for v in values))
    return halves


def write_merged_mtz_from_table(filename, table, experiments: ExperimentList,
                                intensity: str | None = None, anomalous: bool = True,
                                duplicate_centrics: bool = False, **names) -> int:
    """Merge a reflection table and write a merged MTZ (like ``dials.merge``).

    Means are inverse-variance weighted over symmetry equivalents (rows with a
    non-positive or non-finite variance are skipped). With ``anomalous=True`` the file also
    holds ``I(+) SIGI(+) I(-) SIGI(-) N(+) N(-)``; a Bijvoet half with no observation is
    missing (NaN in all three columns). Centric reflections have only a (+) half, as in
    ``dials.merge`` output; ``duplicate_centrics=True`` copies it to (-) as AIMLESS does.

    Parameters
    ----------
    filename : str or path
    table : reflection_table
        ``miller_index``, ``id`` and ``intensity.<kind>.value/.variance``; select the rows
        to merge beforehand (e.g. integrated and not ``bad_for_scaling``). For
        ``intensity.scale`` with ``inverse_scale_factor`` present the scaled intensity
        ``value / g`` (variance ``/ g²``) is merged.
    experiments : ExperimentList
        Space group and cell from experiment 0, wavelength from its beam.
    intensity : {'scale', 'prf', 'sum'} or None
        As in :func:`write_unmerged_mtz`.
    anomalous : bool
    duplicate_centrics : bool
    **names
        ``project_name``, ``crystal_name``, ``dataset_name``.

    Returns
    -------
    int
        Number of unique reflections written.
    """
    path = os.fspath(filename)
    hkl, _, kind = _check_unmerged_input(path, table, experiments, intensity)
    crystal = experiments[0].crystal
    sg, cell = crystal.get_space_group(), crystal.get_unit_cell()
    I = np.asarray(table[f"intensity.{kind}.value"], dtype=np.float64)
    V = np.asarray(table[f"intensity.{kind}.variance"], dtype=np.float64)
    if kind == "scale" and "inverse_scale_factor" in table:
        # merge the scaled intensities raw / g (as dials.merge does)
        g = _checked_scales(table["inverse_scale_factor"], path)
        I, V = I / g, V / g**2
    uh, mean, sig, _ = merge_intensities(hkl, I, V, sg)
    if len(uh) == 0:
        raise ValueError(f"{path}: no observation has a positive variance; nothing to merge")
    wavelength = experiments[0].beam.get_wavelength() if experiments[0].beam else 0.0
    extra = {}
    if anomalous:
        ah, am, asig, an = merge_intensities(hkl, I, V, sg, anomalous=True)
        (ip, sp, nplus), (im, sm, nminus) = anomalous_halves(uh, ah, am, asig, an)
        if duplicate_centrics:
            centric = centric_flags(uh, sg)
            im, sm, nminus = (np.where(centric, a, b) for a, b in ((ip, im), (sp, sm),
                                                                   (nplus, nminus)))
        extra = dict(i_plus=ip, sigi_plus=sp, i_minus=im, sigi_minus=sm, n_plus=nplus,
                     n_minus=nminus)
    write_merged_mtz(path, uh, mean, sig, sg, cell, wavelength, **extra, **names)
    return len(uh)
