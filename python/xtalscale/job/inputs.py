"""Input files of the scaling job, recognised by their content (as DIALS does).

DIALS's own test inputs are named ``20_integrated.pickle`` and
``20_integrated_experiments.json``, so the extension says little: :func:`file_kind` reads the
first bytes (home: :mod:`xtalscale.io.detect`, re-exported here with :func:`split_arguments`
and :class:`InputError`). Kinds: ``"reflections"`` (DIALS msgpack ``.refl`` or legacy pickle),
``"experiments"`` (``.expt``/JSON experiment list), ``"mtz"`` (unmerged MTZ), ``"xds"``
(``INTEGRATE.HKL`` / ``XDS_ASCII.HKL``) and ``"phil"`` (a parameter file).

:func:`load_inputs` pairs experiments with reflection tables and checks their identifiers.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io.detect import InputError, file_kind, split_arguments

__all__ = ["InputError", "ScalingInputs", "file_kind", "load_inputs", "split_arguments"]


@dataclass
class ScalingInputs:
    """Experiments and reflection tables ready for the scaling job.

    ``tables[k]`` holds the rows of the experiments it was read with; ``sources`` names the
    file(s) each table came from.
    """

    experiments: Any
    tables: list = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    @property
    def n_reflections(self) -> int:
        return sum(len(t) for t in self.tables)


def load_inputs(paths: Sequence[str | Path]) -> ScalingInputs:
    """Read and pair the inputs.

    Reflection and experiment files pair in the order given (the k-th reflection file with
    the k-th experiment file); an unmerged MTZ or XDS file brings its own experiments. Every
    table's identifiers must match its experiments'.

    Raises
    ------
    InputError
        Unrecognised or unreadable files, unpaired reflection/experiment files, or
        mismatched experiment identifiers.
    """
    from ..experiments import ExperimentList
    from ..reflection_table import check_identifiers, reflection_table

    refl_files, expt_files, self_contained = [], [], []
    for path in paths:
        kind = file_kind(path)
        {"reflections": refl_files, "experiments": expt_files}.get(kind, self_contained).append(
            (str(path), kind))
    if len(refl_files) != len(expt_files):
        raise InputError(f"{len(refl_files)} reflection file(s) but {len(expt_files)} experiment "
                         f"file(s): give each .refl with its .expt")
    if not refl_files and not self_contained:
        raise InputError("no input files (give integrated .refl and .expt files, an unmerged MTZ "
                         "or an XDS file)")
    experiments = ExperimentList()
    inputs = ScalingInputs(experiments)
    for (refl_path, _), (expt_path, _) in zip(refl_files, expt_files):
        try:
            expts = ExperimentList.from_file(expt_path)
            table = reflection_table.from_file(refl_path)
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"{refl_path} / {expt_path}: {exc}") from None
        _attach(inputs, expts, table, f"{refl_path} + {expt_path}", check_identifiers)
    for path, kind in self_contained:
        if kind == "phil":
            continue
        expts, table = _read_self_contained(path, kind)
        _attach(inputs, expts, table, path, check_identifiers)
    return inputs


def _read_self_contained(path: str, kind: str) -> tuple[Any, Any]:
    try:
        if kind == "mtz":
            from ..io.mtz import read_unmerged_mtz

            data = read_unmerged_mtz(path)
            return data.experiments, data.table
        from ..io.xds import read_xds_hkl

        xds = read_xds_hkl(path)
        return xds.experiments, xds.table
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{path}: {exc}") from None


def _attach(inputs: ScalingInputs, expts: Any, table: Any, source: str, check: Any) -> None:
    """Append one file pair, renumbering ids after the experiments already read."""
    import numpy as np

    from .. import flex_arrays as fa

    ids = table.experiment_identifiers()
    if len(ids) == 0 and len(expts) == 1 and "id" in table:
        # Old files (DIALS < 2.0) carry no identifiers: give the single experiment one.
        identifier = expts[0].identifier or f"{len(inputs.experiments)}-{Path(source.split(' + ')[0]).stem}"
        expts[0].identifier = identifier
        ids[0] = identifier
    try:
        check(table, expts, where=source)
    except ValueError as exc:
        raise InputError(f"mismatched experiment identifiers: {exc}") from None
    offset = len(inputs.experiments)
    if offset:
        id_col = np.asarray(table["id"]).astype(np.int64)
        shifted = np.where(id_col >= 0, id_col + offset, id_col)
        table["id"] = fa.int(shifted.astype(np.int32))
        mapping = dict(ids.items())
        for k in list(ids.keys()):
            del ids[k]
        for k, v in mapping.items():
            ids[k + offset] = v
    try:
        inputs.experiments.extend(expts)
    except ValueError as exc:
        raise InputError(f"{source}: {exc}") from None
    inputs.tables.append(table)
    inputs.sources.append(source)
