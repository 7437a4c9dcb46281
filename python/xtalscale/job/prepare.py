"""Input preparation of the scaling job (spec §8.1–8.2): DIALS's filters and intensity choice.

Nothing is deleted: every rule flags rows (``user_excluded_in_scaling`` for what the user's
options exclude, ``excluded_for_scaling`` for data unfit to scale) and :class:`Reasons` counts
why, for the end-of-job summary.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import flex_arrays as fa
from .._core import job as _kern
from .._rows import take_rows
from ..reflection_table import Flags

__all__ = [
    "BadDatasetForScalingException",
    "Reasons",
    "apply_exclude_images",
    "apply_resolution_and_partiality_cuts",
    "calculate_prescaling_correction",
    "choose_initial_scaling_intensities",
    "filter_bad_reflections",
    "flags_of",
    "parse_exclude_images",
]


class BadDatasetForScalingException(ValueError):
    """A dataset left with nothing to scale (DIALS's name)."""


class Reasons:
    """Counts of rows excluded, by reason (DIALS ``scaling_utilities.Reasons``)."""

    def __init__(self) -> None:
        self.reasons: OrderedDict[str, int] = OrderedDict()

    def add_reason(self, text: str, number: int) -> None:
        self.reasons[text] = self.reasons.get(text, 0) + int(number)

    def __repr__(self) -> str:
        lines = ["Reflections passing individual criteria:"]
        lines += [f"criterion: {k}, reflections: {v}" for k, v in self.reasons.items()]
        return "\n".join(lines) + "\n"


def flags_of(table: Any) -> np.ndarray:
    """The ``flags`` column as uint64 (zeros if absent)."""
    if "flags" not in table:
        return np.zeros(len(table), dtype=np.uint64)
    return np.asarray(table["flags"]).astype(np.uint64)


def _column(table: Any, name: str) -> np.ndarray:
    return np.asarray(table[name], dtype=np.float64)


def calculate_prescaling_correction(reflection_table: Any) -> Any:
    """Add ``prescaling_correction`` = lp / qe (``qe`` or ``dqe``, only where > 0; else 1).

    >>> # lp = [1, .9, .8], qe = [.6, .5, .4] gives [1/.6, .9/.5, .8/.4]
    """
    n = len(reflection_table)
    conv = _column(reflection_table, "lp").copy() if "lp" in reflection_table else np.ones(n)
    qe_name = "qe" if "qe" in reflection_table else "dqe" if "dqe" in reflection_table else None
    if qe_name is not None:
        qe = _column(reflection_table, qe_name)
        np.divide(conv, qe, out=conv, where=qe > 0)
    reflection_table["prescaling_correction"] = fa.double(conv)
    return reflection_table


def _intensity_kinds(table: Any, intensity_choice: str) -> list[str]:
    has = {k for k in ("prf", "sum") if f"intensity.{k}.value" in table and f"intensity.{k}.variance" in table}
    if intensity_choice == "profile":
        wanted = ["prf"]
    elif intensity_choice == "sum":
        wanted = ["sum"]
    elif intensity_choice == "combine":
        wanted = [k for k in ("sum", "prf") if k in has] or ["prf"]
    else:
        raise ValueError(f"intensity_choice must be profile, sum or combine (got {intensity_choice!r})")
    missing = [k for k in wanted if k not in has]
    if missing:
        name = {"prf": "profile", "sum": "summation"}[missing[0]]
        raise KeyError(f"intensity_choice={intensity_choice} needs the {name} intensities: the table "
                       f"has no 'intensity.{missing[0]}.value'/'intensity.{missing[0]}.variance' columns")
    return wanted


def filter_bad_reflections(reflection_table: Any, partiality_cutoff: float = 0.4, min_isigi: float = -5.0,
                           intensity_choice: str = "combine", reasons: Reasons | None = None) -> Any:
    """Flag rows unfit for scaling ``excluded_for_scaling`` (DIALS's filter, spec §8.2 step 1).

    A row is unfit when: its ``id`` < 0; it was integrated by none of the chosen methods; a
    chosen method's variance is ≤ 0 where that method's flag is set; ``qe``/``dqe`` ≤ 0;
    partiality < ``partiality_cutoff`` (rows counted as user-excluded in DIALS's cut, flagged
    here as excluded_for_scaling too as its filter does); or I/σ < ``min_isigi`` for a chosen
    method. Existing flags are kept (only added to). One C++ pass over the rows
    (``_core.job.filter_unfit_rows``).
    """
    kinds = _intensity_kinds(reflection_table, intensity_choice)
    reasons = reasons if reasons is not None else Reasons()
    table = reflection_table

    def optional(name: str, dtype: Any = np.float64) -> np.ndarray | None:
        return np.asarray(table[name], dtype=dtype) if name in table else None

    methods = [(int(Flags.integrated_prf if k == "prf" else Flags.integrated_sum),
                _column(table, f"intensity.{k}.value"), _column(table, f"intensity.{k}.variance")) for k in kinds]
    qe_name = next((name for name in ("qe", "dqe") if name in table), None)
    hkl = np.asarray(table["miller_index"]).reshape(-1, 3) if "miller_index" in table else None
    bad, counts = _kern.filter_unfit_rows(
        methods, optional("flags", np.uint64), optional("id", np.int32), hkl,
        None if qe_name is None else _column(table, qe_name), optional("partiality"),
        float(partiality_cutoff), float(min_isigi))
    # the reasons of the columns the table has, in DIALS's order
    if "id" in table:
        reasons.add_reason("negative experiment id", counts[0])
    if hkl is not None:
        reasons.add_reason("miller index (0, 0, 0)", counts[1])
    reasons.add_reason("not integrated by the chosen method(s)", counts[2])
    for m, k in enumerate(kinds):
        reasons.add_reason(f"{k} variance <= 0", counts[3 + 2 * m])
        reasons.add_reason(f"{k} I/sigma < {min_isigi}", counts[4 + 2 * m])
    if qe_name is not None:
        reasons.add_reason(f"{qe_name} <= 0", counts[7])
    if "partiality" in table:
        reasons.add_reason(f"partiality < {partiality_cutoff}", counts[8])
    table.set_flags(bad, Flags.excluded_for_scaling)
    return table


def choose_initial_scaling_intensities(reflection_table: Any, intensity_choice: str = "profile") -> Any:
    """Set ``intensity``/``variance`` (with the prescaling correction) as DIALS does (§8.2 step 4).

    profile: I_prf·c, V_prf·c²; sum and combine: I_sum·c/p, V_sum·(c/p)² (1/p only where p > 0,
    plus (I_sum·c)²·``partiality.inv.variance`` if present), and for combine the profile values
    overwrite where ``integrated_prf`` is set. Rows with variance ≤ 0 are flagged
    ``excluded_for_scaling``. One C++ pass over the rows (``_core.job.choose_initial_intensities``).
    """
    kinds = _intensity_kinds(reflection_table, intensity_choice)
    table = reflection_table
    if "prescaling_correction" not in table:
        calculate_prescaling_correction(table)

    def optional(name: str) -> np.ndarray | None:
        return _column(table, name) if name in table else None

    kind = "profile" if kinds == ["prf"] else ("combine" if intensity_choice == "combine" else "sum")
    prf_value = optional("intensity.prf.value")
    prf_variance = optional("intensity.prf.variance")
    if kind == "combine" and prf_value is not None and prf_variance is None:
        raise KeyError("intensity_choice=combine: the table has 'intensity.prf.value' but no "
                       "'intensity.prf.variance' column")
    flags = np.asarray(table["flags"], dtype=np.uint64) if "flags" in table else None
    intensity, variance, not_positive = _kern.choose_initial_intensities(
        kind, _column(table, "prescaling_correction"), prf_value, prf_variance,
        optional("intensity.sum.value"), optional("intensity.sum.variance"), optional("partiality"),
        optional("partiality.inv.variance"), flags, int(Flags.integrated_prf))
    table["intensity"] = fa.double(intensity)
    table["variance"] = fa.double(variance)
    table.set_flags(not_positive, Flags.excluded_for_scaling)
    return table


def parse_exclude_images(values: Sequence[Any], n_experiments: int) -> list[tuple[int, int, int]]:
    """``exclude_images`` words → (experiment, first image, last image).

    Each word is ``start:end`` (only for a single experiment) or ``exp:start:end``; several may
    be given comma-separated. Raises ValueError naming the malformed word.
    """
    out = []
    flat = []
    for v in values or []:
        items = v if isinstance(v, (list, tuple)) else [v]
        for item in items:
            flat.extend(p for p in str(item).split(",") if p)
    for word in flat:
        parts = word.split(":")
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"exclude_images: {word!r} is not start:end or exp:start:end") from None
        if len(numbers) == 2:
            if n_experiments != 1:
                raise ValueError(f"exclude_images: {word!r} needs the experiment index (exp:start:end) "
                                 f"with {n_experiments} experiments")
            numbers = [0] + numbers
        if len(numbers) != 3:
            raise ValueError(f"exclude_images: {word!r} is not start:end or exp:start:end")
        exp, start, end = numbers
        if not 0 <= exp < n_experiments:
            raise ValueError(f"exclude_images: experiment {exp} does not exist "
                             f"(0..{n_experiments - 1})")
        if end < start:
            raise ValueError(f"exclude_images: {word!r} has end < start")
        out.append((exp, start, end))
    return out


def apply_exclude_images(table: Any, experiment: Any, ranges: Sequence[tuple[int, int]],
                         reasons: Reasons | None = None) -> Any:
    """Flag rows on the given (inclusive) image ranges ``user_excluded_in_scaling`` and narrow
    the scan's valid image range when the exclusion is at an end (as DIALS does)."""
    if not ranges:
        return table
    z = np.asarray(table["xyzobs.px.value"], dtype=np.float64).reshape(-1, 3)[:, 2]
    # image i covers z in [i - 1, i) (DIALS: image number = floor(z) + 1)
    image = np.floor(z).astype(np.int64) + 1
    excluded = np.zeros(len(table), dtype=bool)
    for start, end in ranges:
        excluded |= (image >= start) & (image <= end)
    table.set_flags(excluded, Flags.user_excluded_in_scaling)
    if reasons is not None:
        reasons.add_reason("exclude_images", int(excluded.sum()))
    scan = getattr(experiment, "scan", None)
    if scan is not None:
        first, last = scan.get_image_range()
        keep = np.ones(last - first + 1, dtype=bool)
        for start, end in ranges:
            keep[max(start, first) - first: max(min(end, last) - first + 1, 0)] = False
        if keep.any():
            valid = np.flatnonzero(keep) + first
            ident = getattr(experiment, "identifier", "")
            try:
                scan.set_valid_image_ranges(ident, [(int(valid[0]), int(valid[-1]))])
            except (AttributeError, TypeError, ValueError):
                pass
    return table


def apply_resolution_and_partiality_cuts(table: Any, d_min: float | None, d_max: float | None,
                                         reasons: Reasons | None = None) -> Any:
    """Flag ``d < d_min`` and ``d > d_max`` as ``user_excluded_in_scaling``."""
    if d_min is None and d_max is None:
        return table
    d = _column(table, "d")
    cut = np.zeros(len(table), dtype=bool)
    if d_min is not None:
        cut |= d < float(d_min)
    if d_max is not None:
        cut |= d > float(d_max)
    table.set_flags(cut, Flags.user_excluded_in_scaling)
    if reasons is not None:
        reasons.add_reason("outside d_min/d_max", int(cut.sum()))
    return table


def quasi_normalisation(reflection_table: Any, experiment: Any) -> Any:
    """Add ``Esq``, the normalised intensity E² of each row (DIALS ``scaling_utilities``).

    With 10000 or fewer suitable rows every Esq is 1 (too few for the shell means, as DIALS).
    Otherwise E² = I/(ε N(d)) with N the shell mean of I/ε (negatives as 0) in equal-d*² shells
    (10, 15 or 20 for more than 15000 / 20000 rows), interpolated in d*.
    """
    from ..symmetry import SpaceGroup
    from .outlier_rejection import quasi_normalised_intensities

    n = len(reflection_table)
    flags = flags_of(reflection_table)
    good = (flags & np.uint64(int(Flags.bad_for_scaling))) == 0
    esq = np.ones(n)
    if good.sum() > 10000:
        sg = experiment.crystal.get_space_group()
        sg = sg if isinstance(sg, SpaceGroup) else SpaceGroup(str(sg))
        hkl = take_rows(np.asarray(reflection_table["miller_index"]).reshape(-1, 3), good)
        eps = np.asarray(sg.epsilon(hkl), dtype=np.float64)
        esq[good] = quasi_normalised_intensities(_column(reflection_table, "intensity")[good],
                                                 _column(reflection_table, "d")[good], eps)
    reflection_table["Esq"] = fa.double(esq)
    return reflection_table


def set_wilson_outliers(reflection_table: Any) -> Any:
    """Flag ``outlier_in_scaling`` where E² > 23.91 (centric) or > 13.82 (acentric) (DIALS).

    Needs ``Esq`` and a ``centric_flag`` column."""
    esq = _column(reflection_table, "Esq")
    centric = np.asarray(reflection_table["centric_flag"], dtype=bool)
    outliers = np.where(centric, esq > 23.91, esq > 13.82)
    reflection_table.set_flags(outliers, Flags.outlier_in_scaling)
    return reflection_table
