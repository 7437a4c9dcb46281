"""A merged MTZ as a scaling reference (dials.scale ``reference=`` with an MTZ of intensities).

The merged intensities become one dataset of unit scale: an experiment with the file's cell,
space group and wavelength (no scan, so no rotation model) carrying a fixed KB scale of 1, and a
table of one row per unique reflection with its ``IMEAN``/``SIGIMEAN`` (or ``I``/``SIGI``) as
both the summation and the profile intensity. The job then scales the other datasets against
it with the reference's model held fixed, as for a scaled ``.refl`` reference.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["merged_mtz_reference", "unmerged_mtz_reference"]

_INTENSITY_PAIRS = (("IMEAN", "SIGIMEAN"), ("I", "SIGI"))


def _unit_kb_model() -> Any:
    from ..models import model_from_dict

    return model_from_dict({
        "__id__": "KB",
        "scale": {"n_parameters": 1, "parameters": [1.0], "null_parameter_value": 1.0,
                  "est_standard_devs": [0.0]},
        "configuration_parameters": {"corrections": ["scale"]}})


def merged_mtz_reference(path: str) -> tuple[Any, Any]:
    """(experiments, table) of one reference dataset from a merged MTZ.

    Raises
    ------
    ValueError
        If the file is not a merged MTZ or has no intensity column with its sigma.
    """
    from .. import flex_arrays as fa
    from ..experiments import Beam, Experiment, ExperimentList
    from ..io.mtz import _crystal, read_merged_mtz
    from ..reflection_table import Flags, reflection_table

    merged = read_merged_mtz(path)
    pair = next(((i, s) for i, s in _INTENSITY_PAIRS if i in merged.columns and s in merged.columns), None)
    if pair is None:
        raise ValueError(f"reference={path}: a merged MTZ reference needs IMEAN/SIGIMEAN or I/SIGI "
                         f"(file has {', '.join(merged.columns)})")
    intensity = np.asarray(merged.columns[pair[0]], dtype=np.float64)
    sigma = np.asarray(merged.columns[pair[1]], dtype=np.float64)
    usable = np.isfinite(intensity) & np.isfinite(sigma) & (sigma > 0)
    hkl = merged.miller_index[usable].astype(np.int32)
    intensity, variance = intensity[usable], sigma[usable] ** 2
    if hkl.shape[0] == 0:
        raise ValueError(f"reference={path}: no reflection with a finite intensity and positive sigma")
    wavelength = merged.wavelength if merged.wavelength > 0 else 1.0
    experiment = Experiment(beam=Beam({"direction": [0.0, 0.0, 1.0], "wavelength": wavelength}),
                            crystal=_crystal(merged.unit_cell, merged.space_group, np.eye(3)),
                            identifier=f"reference-{path}")
    experiment.scaling_model = _unit_kb_model()
    n = hkl.shape[0]
    table = reflection_table()
    table["miller_index"] = hkl
    table["id"] = fa.int(np.zeros(n, np.int32))
    table["d"] = fa.double(merged.unit_cell.d(hkl))
    for kind in ("sum", "prf"):
        table[f"intensity.{kind}.value"] = fa.double(intensity)
        table[f"intensity.{kind}.variance"] = fa.double(variance)
    table["partiality"] = fa.double(np.ones(n))
    table["flags"] = np.full(n, np.uint64(int(Flags.integrated_sum) | int(Flags.integrated_prf)))
    table.experiment_identifiers()[0] = experiment.identifier
    return ExperimentList([experiment]), table


def unmerged_mtz_reference(path: str) -> Any:
    """The inputs of an unmerged MTZ as a reference of unit scale.

    A scaled unmerged MTZ stores I/g with its SCALEUSED g; the reader gives back the unscaled
    I and g. The reference is meant to be the scaled intensities, so the intensity is divided
    by g (variance by g²), Lp/QE/partiality are set to 1 (the file's I is already corrected)
    and every experiment gets a fixed KB scale of 1.
    """
    from .. import flex_arrays as fa
    from .inputs import load_inputs

    ref = load_inputs([path])
    for table in ref.tables:
        n = len(table)
        g = (np.asarray(table["inverse_scale_factor"], dtype=np.float64) if "inverse_scale_factor" in table
             else np.ones(n))
        g = np.where(np.isfinite(g) & (g > 0), g, 1.0)
        # the file's I is final: corrected for Lp, QE and partiality already, so none of those
        # may be applied again; the profile columns (IPR, if any) are not the scaled values
        value = np.asarray(table["intensity.sum.value"], dtype=np.float64) / g
        variance = np.asarray(table["intensity.sum.variance"], dtype=np.float64) / g ** 2
        for kind in ("sum", "prf"):
            table[f"intensity.{kind}.value"] = fa.double(value)
            table[f"intensity.{kind}.variance"] = fa.double(variance)
        for name in ("lp", "qe", "partiality", "inverse_scale_factor"):
            table[name] = fa.double(np.ones(n))
    for experiment in ref.experiments:
        experiment.scaling_model = _unit_kb_model()
    return ref
