"""Text summaries of data files (``xtalscale show``): what is in a .refl, .expt, MTZ or XDS file.

Each ``summarise_*`` function returns plain text built from vectorised column reductions:
rows, columns with their types and ranges, flags counted by name, experiments, symmetry,
resolution range and batches.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["summarise_experiments", "summarise_file", "summarise_mtz",
           "summarise_reflections"]


def _table(header, rows) -> str:
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _range_text(values: np.ndarray) -> str:
    """min .. max of the finite values (or a note) of a numeric array of any shape."""
    a = np.asarray(values)
    if a.size == 0:
        return "(empty)"
    if a.dtype.kind == "b":
        return f"{int(a.sum())} true"
    if a.dtype.kind not in "iuf":
        return ""
    flat = a.reshape(len(a), -1) if a.ndim > 1 else a[:, None]
    parts = []
    for j in range(flat.shape[1]):
        col = flat[:, j].astype(np.float64)
        finite = col[np.isfinite(col)]
        missing = col.size - finite.size
        if finite.size == 0:
            parts.append("all missing")
            continue
        text = f"{finite.min():.6g} .. {finite.max():.6g}"
        if missing:
            text += f" ({missing} missing)"
        parts.append(text)
    return "; ".join(parts)


def _flag_counts(flags: np.ndarray) -> list[tuple[str, int]]:
    from ..reflection_table import Flags

    f = np.asarray(flags).astype(np.uint64)
    counts = []
    for flag in Flags:
        value = int(flag)
        if value & (value - 1):  # composite names (integrated, bad_for_scaling...): skip
            continue
        n = int(np.count_nonzero(f & np.uint64(value)))
        if n:
            counts.append((flag.name, n))
    return counts


def summarise_reflections(table, path: str = "") -> str:
    """Rows, columns (type, shape, range), flags by name, experiment ids and d range."""
    out = [f"Reflection table {path}".rstrip(), f"  rows: {len(table)}"]
    rows = []
    for name in sorted(table.keys()):
        values = np.asarray(table[name])
        dtype = str(values.dtype) if values.dtype.kind != "O" else "object"
        shape = "x".join(str(s) for s in values.shape[1:]) or "1"
        rows.append((name, dtype, shape, _range_text(values) if name != "flags" else ""))
    out.append(_table(["column", "type", "shape", "range"], rows))
    if "flags" in table:
        counts = _flag_counts(np.asarray(table["flags"]))
        out.append("\nflags set:")
        out.append(_table(["flag", "rows"], counts) if counts else "  (none)")
    if "id" in table:
        ids, n = np.unique(np.asarray(table["id"]), return_counts=True)
        identifiers = dict(table.experiment_identifiers().items()) \
            if hasattr(table, "experiment_identifiers") else {}
        out.append("\nrows per experiment id:")
        out.append(_table(["id", "identifier", "rows"],
                          [(int(i), identifiers.get(int(i), ""), int(c)) for i, c in zip(ids, n)]))
    if "d" in table:
        d = np.asarray(table["d"], dtype=np.float64)
        d = d[np.isfinite(d) & (d > 0)]
        if d.size:
            out.append(f"\nresolution range: {d.max():.3f} - {d.min():.3f} Å")
    return "\n".join(out)


def summarise_experiments(experiments, path: str = "") -> str:
    """Per experiment: identifier, beam, scan, space group, cell and scaling model."""
    out = [f"Experiment list {path}".rstrip(), f"  experiments: {len(experiments)}"]
    rows = []
    for i, e in enumerate(experiments):
        crystal = e.crystal
        sg = crystal.get_space_group().symbol_and_number() if crystal is not None else "-"
        cell = (" ".join(f"{p:.2f}" for p in crystal.get_unit_cell().parameters())
                if crystal is not None else "-")
        wavelength = f"{e.beam.get_wavelength():.4f}" if e.beam is not None else "-"
        if e.scan is not None:
            first, last = e.scan.get_image_range()
            start, width = e.scan.get_oscillation()
            scan = f"images {first}-{last}, φ {start:.1f}+{width:.3g}°"
        else:
            scan = "still"
        model = getattr(e, "scaling_model", None)
        model_name = (model.get("__id__", "?") if isinstance(model, dict)
                      else type(model).__name__ if model is not None else "-")
        rows.append((i, e.identifier or "", wavelength, scan, sg, cell, model_name))
    out.append(_table(["#", "identifier", "λ (Å)", "scan", "space group", "unit cell",
                       "scaling model"], rows))
    return "\n".join(out)


def summarise_mtz(path: Any) -> str:
    """Rows, columns with types and ranges, symmetry, resolution, datasets and batches."""
    import gemmi

    path = os.fspath(path)
    try:
        mtz = gemmi.read_mtz_file(path)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"{path}: unreadable MTZ ({error})") from error
    data = np.asarray(mtz.array)
    out = [f"MTZ file {path}", f"  title: {mtz.title.strip()}",
           f"  rows: {mtz.nreflections}",
           (f"  space group: {mtz.spacegroup.hm if mtz.spacegroup else 'unknown'}"
            f" ({mtz.spacegroup.number if mtz.spacegroup else '-'})"),
           f"  unit cell: {' '.join(f'{p:.3f}' for p in mtz.cell.parameters)}",
           f"  resolution: {mtz.resolution_high():.3f} - {mtz.resolution_low():.3f} Å"
           if mtz.nreflections else "  resolution: -",
           f"  {'unmerged' if mtz.batches else 'merged'}"]
    rows = [(c.label, c.type, c.dataset_id, _range_text(data[:, j]))
            for j, c in enumerate(mtz.columns)]
    out.append(_table(["column", "type", "dataset", "range"], rows))
    out.append("\ndatasets:")
    out.append(_table(["id", "project", "crystal", "dataset", "λ (Å)"],
                      [(d.id, d.project_name, d.crystal_name, d.dataset_name,
                        f"{d.wavelength:.4f}") for d in mtz.datasets]))
    if mtz.batches:
        numbers = np.array([b.number for b in mtz.batches])
        runs = np.split(np.sort(numbers), np.flatnonzero(np.diff(np.sort(numbers)) != 1) + 1)
        text = ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
        out.append(f"\nbatches: {len(numbers)} ({text})")
    return "\n".join(out)


def summarise_file(path: Any) -> str:
    """The summary of any supported file, recognised by content."""
    from .detect import detect_file_type

    path = os.fspath(path)
    kind = detect_file_type(path)
    if kind == "mtz":
        return summarise_mtz(path)
    if kind == "experiments":
        from ..experiments import ExperimentList

        return summarise_experiments(ExperimentList.from_file(path), path)
    if kind == "reflections":
        from ..reflection_table import reflection_table

        return summarise_reflections(reflection_table.from_file(path), path)
    from .xds import read_xds_hkl

    xds = read_xds_hkl(path)
    return "\n\n".join([f"XDS {xds.kind} file {path}",
                        summarise_experiments(xds.experiments, "(from the header)"),
                        summarise_reflections(xds.table, "(records)")])
