"""Merging statistics with the conventions of cctbx's ``iotbx.merging_statistics``.

The statistics a crystallographer reads after scaling (DIALS's merging-statistics table,
AIMLESS's "Table 1") computed by one C++ pass over the grouped observations
(:func:`xtalscale._core.stats.merging_statistics`); Python only prepares arrays (ASU
mapping and grouping come from :mod:`xtalscale.symmetry`) and reduces per-shell sums.

Conventions (iotbx ``dataset_statistics`` / ``merging_stats``, as DIALS calls it:
``sigma_filtering=None``; the defaults here are DIALS's ``use_internal_variance=False``,
``eliminate_sys_absent=False``, 20 bins):

* Rows with a non-finite intensity or sigma, or sigma <= 0, are left out of every statistic
  and counted (``n_rejected``; iotbx drops sigma <= 0 the same way). A ``d_min``/``d_max``
  limit is applied first with iotbx's relative tolerance of 1e-6.
* Shells: equal volume in reciprocal space between the observed d*² limits widened by 1e-6
  of their span (cctbx ``binning``), or ``binning_method="counting_sorted"`` for shells of
  about equal numbers of observations. Shell limits use every row inside the d range
  (including sigma <= 0 rows, as iotbx's binner does); an observation with
  ``limits[i-1] <= d*² < limits[i]`` is in shell ``i``.
* ``n_obs``: observations; ``n_uniq``: unique reflections (ASU groups; with ``anomalous``
  I(+) and I(-) of acentric reflections are separate); ``mean_redundancy`` = n_obs/n_uniq.
* ``completeness`` = n_uniq / n_expected (at most 1), n_expected counting the reflections
  of the complete set (ASU, systematic absences excluded, Friedel mates of acentric
  reflections separate when anomalous) inside the shell's d range *and* not beyond the
  highest-resolution reflection observed in that shell: iotbx builds the complete set of
  the shell's merged array down to that array's own d_min. Systematically absent
  observations count in n_uniq unless ``eliminate_sys_absent``.
* merged ⟨I⟩ is the 1/σ²-weighted mean, σ(⟨I⟩) = sqrt(1/Σw) (or with
  ``use_internal_variance`` sqrt(max(wvar/n, 1/Σw))); ``i_over_sigma_mean`` is the mean of
  ⟨I⟩/σ over merged reflections with σ > 0.
* R factors sum over unique reflections with multiplicity > 1:
  Rmerge = Σ|I−⟨I⟩|/ΣI, Rmeas with sqrt(n/(n−1)), Rpim with sqrt(1/(n−1)) (0 if ΣI = 0).
* ``cc_one_half``: Pearson correlation between the 1/σ²-weighted means of two random halves
  (floor(n/2) and the rest) of every reflection with n >= 2. iotbx uses its own generator;
  ours is seeded (``seed``), deterministic and independent of thread count, so values agree
  with iotbx within the split's sampling noise.
* ``cc_one_half_sigma_tau`` = (var_y − ⟨σ²⟩)/(var_y + ⟨σ²⟩) over reflections with n > 1,
  var_y the sample variance of ⟨I⟩ and σ the internal-variance merged sigma.
* ``cc_anom``: correlation of the half-dataset anomalous differences over acentric
  reflections whose I(+) and I(−) both have >= 2 observations (computed in both modes).
* ``cc_star`` = sqrt(2 CC½/(1 + CC½)) (sign kept; -inf below -0.999).
* Anomalous mode: ``anom_completeness`` = Bijvoet pairs measured / acentric reflections of
  the complete set in the shell; ``n_bijvoet_pairs`` is reported too.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from .._core import grouping as _core_grouping
from .._core import stats as _core_stats
from .._rows import negate_rows, take_rows
from ..symmetry import (
    Grouping,
    SpaceGroup,
    UnitCell,
    _asu_symmetry,
    group_reflections,
    map_to_asu,
    miller_array,
    systematic_absences,
)

__all__ = [
    "BatchStatistics",
    "MergedArray",
    "MergingShell",
    "MergingStatistics",
    "MergingStatisticsError",
    "ObservationGroups",
    "batch_statistics",
    "batch_statistics_and_deviations",
    "dataset_statistics",
    "group_observations",
    "normalised_deviations",
    "shell_limits",
]

_D_TOLERANCE = 1e-6  # iotbx d_min_tolerance and cctbx binning relative_tolerance
_FP_EPS = np.finfo(float).eps


class MergingStatisticsError(ValueError):
    """Input that merging statistics cannot be computed from (message says why)."""


# --------------------------------------------------------------------------- shells


def _volume_limits(dss_min: float, dss_max: float, n_bins: int) -> np.ndarray:
    """cctbx ``binning`` limits in d*²: equal volumes of reciprocal space."""
    span = dss_max - dss_min
    lo = max(dss_min - span * _D_TOLERANCE, 0.0)
    hi = dss_max + span * _D_TOLERANCE
    r_lo, r_hi = math.sqrt(lo), math.sqrt(hi)
    v_lo = 4.0 * math.pi * r_lo ** 3 / 3.0
    per_bin = (4.0 * math.pi * r_hi ** 3 / 3.0 - v_lo) / n_bins
    inner = [((v_lo + i * per_bin) * 3.0 / (4.0 * math.pi)) ** (2.0 / 3.0)
             for i in range(1, n_bins)]
    return np.array([lo, *inner, hi])


def _counting_limits(dss: np.ndarray, n_bins: int, reflections_per_bin: int | None
                     ) -> np.ndarray:
    """Limits of shells with about equal numbers of observations (cctbx
    ``setup_binner_counting_sorted``: ``max(ceil(n/n_bins), reflections_per_bin)`` sorted
    d*² values per shell; equal d*² values never straddle a limit)."""
    n = len(dss)
    per_bin = max(1, math.ceil(n / max(1, n_bins)))
    if reflections_per_bin:
        per_bin = max(per_bin, int(reflections_per_bin))
    # the sorted values at 0, n - 1 and every per_bin-th position: selected from the values
    # (the same values as of np.sort(dss), ~1/2 its time at 10⁶ values); sorted when few or
    # not all finite
    positions = np.concatenate([[0, n - 1], np.arange(per_bin, n, per_bin)]).astype(np.int64)
    at = (_core_stats.sorted_values_at(np.asarray(dss, dtype=np.float64), positions)
          if n >= 4096 else None)
    if at is None:
        at = np.sort(dss)[positions]
    first, last, cuts = at[0], at[1], at[2:]
    cuts = cuts[cuts > first]
    span = last - first
    lo = max(first - span * _D_TOLERANCE, 0.0)
    hi = last + span * _D_TOLERANCE
    if hi <= lo:
        hi = lo * (1 + 1e-6) + 1e-12
    return sorted_distinct(np.concatenate([[lo], cuts[cuts < hi], [hi]]))


def sorted_distinct(values) -> np.ndarray:
    """``np.unique(values)``: the distinct values, ascending (NaNs, sorted last, as one).

    numpy 2's ``unique`` imports ``numpy.ma`` on its first plain call (about 15 ms of the
    job's statistics); a sort and a comparison of neighbours give the same values."""
    a = np.sort(np.asarray(values).ravel())
    if len(a) < 2:
        return a
    first = np.empty(len(a), dtype=bool)
    first[0] = True
    np.not_equal(a[1:], a[:-1], out=first[1:])
    if a.dtype.kind in "fc" and np.isnan(a[-1]):  # (NaN != NaN: keep the first NaN only)
        first[1:] &= ~(np.isnan(a[1:]) & np.isnan(a[:-1]))
    return a[first]


def shell_limits(d_star_sq, n_bins: int = 20, binning_method: str = "volume",
                 reflections_per_bin: int | None = None) -> np.ndarray:
    """Shell limits in d*² (ascending, ``n_shells + 1`` values) for the given d*² values.

    Parameters
    ----------
    d_star_sq : array_like
        1/d² of every observation.
    n_bins : int
        Number of shells (``volume``) or the most shells (``counting_sorted``).
    binning_method : {"volume", "counting_sorted"}
    reflections_per_bin : int, optional
        ``counting_sorted`` only: at least this many observations per shell.
    """
    dss = np.asarray(d_star_sq, dtype=np.float64)
    if int(n_bins) < 1:
        raise MergingStatisticsError(f"n_bins must be >= 1, got {n_bins}")
    if len(dss) == 0:
        raise MergingStatisticsError("no observations to bin")
    if binning_method == "volume":
        return _shell_limits_in((float(dss.min()), float(dss.max())), n_bins)
    if binning_method == "counting_sorted":
        return _counting_limits(dss, int(n_bins), reflections_per_bin)
    raise MergingStatisticsError(f"binning_method must be 'volume' or 'counting_sorted', got "
                                 f"{binning_method!r}")


def _shell_limits_in(dss_range: tuple[float, float], n_bins: int) -> np.ndarray:
    """:func:`shell_limits` (volume) of d*² values spanning ``dss_range`` (min, max)."""
    if int(n_bins) < 1:
        raise MergingStatisticsError(f"n_bins must be >= 1, got {n_bins}")
    lo, hi = dss_range
    if hi <= lo:  # one resolution: widen so the single shell has a non-empty range
        hi = lo * (1 + 1e-6) + 1e-12
    return _volume_limits(lo, hi, int(n_bins))


def _d_from_dss(x: float) -> float:
    return 1.0 / math.sqrt(x) if x > 0 else -1.0


# --------------------------------------------------------------------------- results


@dataclass
class MergingShell:
    """Statistics of one resolution shell (or overall), with iotbx ``merging_stats`` names.

    ``completeness`` and ``anom_completeness`` are fractions (0-1) as iotbx stores them;
    :meth:`as_dict` gives percentages as iotbx's ``as_dict`` does.
    """

    d_max: float
    d_min: float
    n_obs: int = 0
    n_uniq: int = 0
    n_expected: int = 0
    mean_redundancy: float = 0.0
    completeness: float = 0.0
    i_mean: float = 0.0
    sigi_mean: float = 0.0
    i_over_sigma_mean: float = 0.0
    i_mean_over_sigi_mean: float = 0.0
    unmerged_i_over_sigma_mean: float = 0.0
    r_merge: float | None = None
    r_meas: float | None = None
    r_pim: float | None = None
    cc_one_half: float = 0.0
    cc_one_half_n_refl: int = 0
    cc_one_half_significance: bool | None = None
    cc_one_half_critical_value: float | None = None
    cc_one_half_sigma_tau: float = 0.0
    cc_one_half_sigma_tau_n_refl: int = 0
    cc_star: float = 0.0
    cc_anom: float = 0.0
    cc_anom_n_pairs: int = 0
    cc_anom_significance: bool | None = None
    cc_anom_critical_value: float | None = None
    anomalous: bool = False
    anom_completeness: float | None = None
    n_bijvoet_pairs: int | None = None
    redundancies: dict = field(default_factory=dict)

    @property
    def multiplicity(self) -> float:
        """Alias of ``mean_redundancy``."""
        return self.mean_redundancy

    @property
    def anom_half_corr(self) -> float:
        """iotbx alias of ``cc_anom``."""
        return self.cc_anom

    @property
    def d_star_sq_min(self) -> float:
        return 1.0 / self.d_min ** 2

    @property
    def d_star_sq_max(self) -> float:
        return 1.0 / self.d_max ** 2 if self.d_max > 0 else 0.0

    def as_dict(self) -> dict:
        """iotbx ``merging_stats.as_dict`` keys (completeness in percent) plus extras."""
        d = {
            "d_star_sq_min": self.d_star_sq_min,
            "d_star_sq_max": self.d_star_sq_max,
            "d_min": self.d_min,
            "d_max": self.d_max,
            "n_obs": self.n_obs,
            "n_uniq": self.n_uniq,
            "multiplicity": self.mean_redundancy,
            "completeness": self.completeness * 100,
            "i_mean": self.i_mean,
            "i_over_sigma_mean": self.i_over_sigma_mean,
            "unmerged_i_over_sigma_mean": self.unmerged_i_over_sigma_mean,
            "r_merge": self.r_merge,
            "r_meas": self.r_meas,
            "r_pim": self.r_pim,
            "cc_one_half": self.cc_one_half,
            "cc_one_half_n_refl": self.cc_one_half_n_refl,
            "cc_one_half_significance": self.cc_one_half_significance,
            "cc_one_half_critical_value": self.cc_one_half_critical_value,
            "cc_one_half_sigma_tau": self.cc_one_half_sigma_tau,
            "cc_star": self.cc_star,
            "cc_anom": self.cc_anom,
            "cc_anom_significance": self.cc_anom_significance,
            "cc_anom_critical_value": self.cc_anom_critical_value,
            "anom_completeness": (None if self.anom_completeness is None
                                  else self.anom_completeness * 100),
            "n_bijvoet_pairs": self.n_bijvoet_pairs,
        }
        return d


@dataclass
class MergedArray:
    """The merged (unique) reflections behind the statistics.

    Attributes
    ----------
    miller_index : ndarray (m, 3) int32
        ASU index; with ``anomalous`` the I(−) entries carry the negated index (cctbx).
    intensity, sigma : ndarray (m,)
        Weighted mean and its sigma (per ``use_internal_variance``).
    multiplicity : ndarray (m,) int32
    bijvoet : ndarray (m,) int8
        +1 I(+), −1 I(−), 0 not separated.
    d : ndarray (m,)
    shell : ndarray (m,) int32
        Shell index (−1 outside every shell).
    centric : ndarray (m,) bool
    half1, half2 : ndarray (m,)
        Means of the two random halves behind CC½ (NaN when multiplicity < 2).
    """

    miller_index: np.ndarray
    intensity: np.ndarray
    sigma: np.ndarray
    multiplicity: np.ndarray
    bijvoet: np.ndarray
    d: np.ndarray
    shell: np.ndarray
    centric: np.ndarray
    half1: np.ndarray
    half2: np.ndarray

    def __len__(self) -> int:
        return len(self.intensity)


@dataclass
class _Prepared:
    """Validated, d-filtered observations ready for grouping (kept for re-binning)."""

    hkl: np.ndarray           # (n, 3) int32, rows used (sigma > 0, finite)
    intensity: np.ndarray
    sigma: np.ndarray
    d_star_sq: np.ndarray     # of the used rows
    binning_dss: np.ndarray   # d*² of every row in range (incl. sigma <= 0), for the binner
    used_rows: np.ndarray     # row numbers in the caller's input
    space_group: SpaceGroup
    unit_cell: UnitCell
    n_input: int
    n_rejected: dict
    #: (d_min, anomalous) -> :func:`_complete_set_dss` of this space group and cell, kept for
    #: every pass over these rows (and their subsets): the rebinned passes of the resolution
    #: estimate reach the same highest resolution
    complete_sets: dict = field(default_factory=dict, repr=False, compare=False)
    #: threads for the ASU mapping of :attr:`grouped` (the same result for any number)
    n_threads: int = field(default=1, repr=False, compare=False)

    @cached_property
    def grouped(self) -> tuple:
        """(grouping, friedel_minus per row, centric per group): independent of the shells and
        of ``anomalous``, so computed once for every pass over these rows."""
        # map_to_asu_isym and group_reflections without their input checks (one pass over
        # 10^6 indices each): self.hkl was checked by _prepare (or selected from checked rows)
        # and the kernel's ASU indices need none
        asu_hkl, isym = _core_grouping.map_to_asu(self.hkl, *_asu_symmetry(self.space_group),
                                                   n_threads=self.n_threads)
        order, group_index, offsets = _core_grouping.group_miller_indices(asu_hkl)
        grouping = Grouping(order, group_index, offsets,
                            np.ascontiguousarray(asu_hkl[order[offsets[:-1]]]))
        del asu_hkl
        # a row is a Bijvoet-minus mate if its ISYM is even (the kernel ignores the flag for
        # centric groups); isym is ours, so its parity is taken in place
        friedel_minus = np.equal(np.bitwise_and(isym, 1, out=isym), 0).view(np.uint8)
        return grouping, friedel_minus, _centric(grouping.unique_hkl, self.space_group)

    def use_grouping(self, grouping: Grouping, friedel_minus: np.ndarray) -> bool:
        """Take the grouping of these rows made by the caller as :attr:`grouped` instead of
        mapping and sorting their indices again: ``grouping`` is
        :func:`~xtalscale.symmetry.group_reflections` of the non-anomalous ASU indices of the
        caller's rows, ``friedel_minus`` each row's Bijvoet-minus flag (bool or 0/1).

        Only when every input row is used and nothing has been grouped yet (else False and
        nothing changes). ``map_to_asu``'s ``friedel_minus`` (False for centric rows) serves
        as well as the ISYM parity :attr:`grouped` keeps: the kernels take a centric group's
        rows together and never read their flags.

        Raises
        ------
        MergingStatisticsError
            If the grouping or the flags do not have one entry per row.
        """
        n = self.n_input  # (the caller's rows)
        order, offsets = grouping.order, grouping.offsets
        if not (len(order) == len(grouping.group_index) == len(friedel_minus) == n
                and len(offsets) == len(grouping.unique_hkl) + 1 and int(offsets[-1]) == n):
            raise MergingStatisticsError(f"the grouping given is not one of {n} observations")
        if len(self.used_rows) != self.n_input or "grouped" in self.__dict__:
            return False
        minus = np.asarray(friedel_minus)
        minus = minus.view(np.uint8) if minus.dtype == np.bool_ else minus.astype(np.uint8)
        self.__dict__["grouped"] = (grouping, minus, _centric(grouping.unique_hkl, self.space_group))
        return True

    @cached_property
    def d_star_sq_range(self) -> tuple[float, float]:
        """(min, max) of ``d_star_sq``: the volume shells' span and the overall shell's range
        of every pass over these rows."""
        return float(self.d_star_sq.min()), float(self.d_star_sq.max())

    @cached_property
    def in_group_order(self) -> tuple:
        """(intensity, sigma, friedel_minus) of the rows in group order (``grouping.order``).

        The kernels read them sequentially with an identity order: the same values in the
        same sequence as through ``order`` (so the same sums), without a random read per
        observation in every kernel (which costs them about as much as their arithmetic)."""
        grouping, friedel_minus, _ = self.grouped
        order = grouping.order
        return (np.take(self.intensity, order), np.take(self.sigma, order),
                np.take(friedel_minus, order))

    @cached_property
    def d_star_sq_in_group_order(self) -> np.ndarray:
        return np.take(self.d_star_sq, self.grouped[0].order)

    def subset(self, keep: np.ndarray) -> _Prepared:
        """The used rows with ``keep`` (bool per used row), as :func:`_prepare` would make them
        from those rows alone (all used, no d limits), but with the rows in group order.

        Statistics depend on the groups (in ASU-index order) and on each group's rows in
        input order, which selecting rows from this grouping keeps: they are those of a fresh
        ASU mapping and sort of the kept rows, for a fraction of the cost. Numbering the rows
        of the subset in group order makes its grouping the identity order. When every row
        is kept (the usual case of the Wilson-outlier cut), the subset shares this one's rows,
        grouping and group-ordered values.
        """
        if keep.all():
            n = len(self.intensity)
            sub = dataclasses.replace(self, binning_dss=self.d_star_sq, used_rows=_identity_order(n),
                                      n_input=n, n_rejected=_no_rejections())
            for name in ("grouped", "in_group_order", "d_star_sq_range"):  # (cached properties)
                sub.__dict__[name] = getattr(self, name)
            return sub
        grouping, _, group_centric = self.grouped
        kept = keep[grouping.order]  # per position in group order
        n_kept = np.add.reduceat(kept, grouping.offsets[:-1], dtype=np.int64)
        old_group = np.flatnonzero(n_kept)  # the groups left with a row
        sizes = n_kept[old_group]
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        intensity, sigma, friedel_minus = (a[kept] for a in self.in_group_order)
        d_star_sq = self.d_star_sq_in_group_order[kept]
        n = len(intensity)
        sub = _Prepared(np.take(self.hkl, grouping.order[kept], axis=0), intensity, sigma,
                        d_star_sq, d_star_sq, np.arange(n), self.space_group, self.unit_cell,
                        n, _no_rejections(), self.complete_sets)
        identity = np.arange(n, dtype=np.int64)
        group_index = np.repeat(np.arange(len(old_group), dtype=np.int64), sizes)
        # fill both cached properties
        sub.__dict__["grouped"] = (
            Grouping(identity, group_index, offsets, grouping.unique_hkl[old_group]),
            friedel_minus, group_centric[old_group])
        sub.__dict__["in_group_order"] = (intensity, sigma, friedel_minus)
        sub.__dict__["d_star_sq_in_group_order"] = d_star_sq
        return sub

    def observation_groups(self) -> ObservationGroups | None:
        """The grouping as :func:`group_observations` makes it from the caller's arrays, or
        None if rows other than the unusable ones were left out (d range, absences)."""
        if any(self.n_rejected.get(k, 0) for k in ("outside_d_range", "systematically_absent")):
            return None
        grouping = self.grouped[0]
        intensity, sigma, _ = self.in_group_order
        rows = (grouping.order if len(self.used_rows) == self.n_input  # used_rows = 0..n-1
                else np.take(self.used_rows, grouping.order))
        return ObservationGroups(self.used_rows, grouping, rows, intensity, sigma, self.n_input)


_IDENTITY = np.zeros(0, dtype=np.int64)


def _identity_order(n: int) -> np.ndarray:
    """The ``order`` argument (0..n-1, read-only) of a kernel whose inputs are already in
    group order; one shared array serves every kernel call for the same n (and the row
    numbers of prepared rows that are all the caller's rows)."""
    global _IDENTITY
    identity = _IDENTITY  # (one read: another thread may replace it meanwhile)
    if len(identity) != n:
        identity = np.arange(n, dtype=np.int64)
        identity.flags.writeable = False
        _IDENTITY = identity
    return identity


def _no_rejections() -> dict:
    return {"outside_d_range": 0, "non_finite": 0, "sigma_negative": 0, "sigma_zero": 0}


def _checked_miller_array(hkl) -> np.ndarray:
    """:func:`~xtalscale.symmetry.miller_array` (``"miller_index"``): the indices as (n, 3)
    int32, checked. A C-contiguous (n, 3) int32 array within ±2²⁰ is returned as it is after
    a min and a max (miller_array's ``|h|`` would make a temporary array of them all);
    anything else goes through miller_array, which raises or converts."""
    a = hkl if isinstance(hkl, np.ndarray) else None
    if (a is not None and a.dtype == np.int32 and a.ndim == 2 and a.shape[1] == 3
            and a.flags.c_contiguous and a.size and a.max() < 2**20 and a.min() > -2**20):
        return a
    return miller_array(hkl, "miller_index")


def _prepare(hkl, intensity, sigma, space_group, unit_cell, d_min=None, d_max=None,
             eliminate_sys_absent=False) -> _Prepared:
    sg = space_group if isinstance(space_group, SpaceGroup) else SpaceGroup(space_group)
    cell = unit_cell if isinstance(unit_cell, UnitCell) else UnitCell(unit_cell)
    try:
        sg.gemmi  # noqa: B018 - the ASU needs a tabulated group
    except ValueError as exc:
        raise MergingStatisticsError(str(exc)) from None
    hkl = _checked_miller_array(hkl)
    I = np.asarray(intensity, dtype=np.float64).ravel()
    s = np.asarray(sigma, dtype=np.float64).ravel()
    if not (len(hkl) == len(I) == len(s)):
        raise MergingStatisticsError(
            f"miller_index, intensity and sigma must have equal lengths (got {len(hkl)}, "
            f"{len(I)}, {len(s)})")
    n = len(I)
    if n == 0:
        raise MergingStatisticsError("no observations (empty input)")
    dss = cell.gemmi.calculate_1_d2_array(hkl)  # (cell.d_star_sq of the checked indices)
    if not np.all(dss > 0):
        bad = int(np.flatnonzero(~(dss > 0))[0])
        raise MergingStatisticsError(f"miller_index row {bad} is (0, 0, 0)")
    in_range = None  # all rows (the common case avoids full-size masks and copies)
    if d_min is not None or d_max is not None:
        in_range = np.ones(n, dtype=bool)
        if d_min is not None:
            if d_max is not None and not d_max > d_min:
                raise MergingStatisticsError(f"d_max ({d_max}) must exceed d_min ({d_min})")
            in_range &= dss <= 1.0 / (float(d_min) * (1 - _D_TOLERANCE)) ** 2
        if d_max is not None:
            in_range &= dss >= 1.0 / (float(d_max) * (1 + _D_TOLERANCE)) ** 2
        if not in_range.any():
            raise MergingStatisticsError("no reflections left after applying resolution cutoffs")
    rejected = {"outside_d_range": 0 if in_range is None else int((~in_range).sum())}
    if eliminate_sys_absent:
        absent = systematic_absences(hkl, sg)
        if in_range is not None:
            absent &= in_range
        rejected["systematically_absent"] = int(absent.sum())
        in_range = ~absent if in_range is None else in_range & ~absent
    # (one mask and one scratch mask, updated in place)
    used = np.isfinite(I)
    scratch = np.isfinite(s)
    used &= scratch
    used &= np.greater(s, 0, out=scratch)
    del scratch
    if in_range is not None:
        used &= in_range
    n_used = int(np.count_nonzero(used))
    considered = n if in_range is None else int(in_range.sum())
    if n_used < considered:
        inr = np.ones(n, dtype=bool) if in_range is None else in_range
        finite = np.isfinite(I) & np.isfinite(s)
        rejected["non_finite"] = int((inr & ~finite).sum())
        rejected["sigma_negative"] = int((inr & finite & (s < 0)).sum())
        rejected["sigma_zero"] = int((inr & finite & (s == 0)).sum())
    else:
        rejected.update(non_finite=0, sigma_negative=0, sigma_zero=0)
    if n_used == 0:
        raise MergingStatisticsError(
            "no observations with finite intensity and sigma > 0 "
            f"({rejected['sigma_negative']} with sigma < 0, {rejected['sigma_zero']} with "
            f"sigma = 0, {rejected['non_finite']} non-finite)")
    binning_dss = dss if in_range is None else dss[in_range]
    if n_used == n:  # (used_rows 0..n-1: the shared read-only identity)
        return _Prepared(hkl, I, s, dss, binning_dss, _identity_order(n), sg, cell, n, rejected)
    rows = np.flatnonzero(used)
    return _Prepared(np.ascontiguousarray(take_rows(hkl, rows)), I[rows], s[rows], dss[rows], binning_dss,
                     rows, sg, cell, n, rejected)


def _centric(hkl: np.ndarray, sg: SpaceGroup) -> np.ndarray:
    """:func:`~xtalscale.symmetry.centric_flags` of checked (n, 3) int32 indices by the C++
    test the ASU mapping uses (h R = -h for a rotation of the group; the same flags as
    gemmi's, tests/python/test_symmetry.py), a quarter of gemmi's time per index."""
    return _core_grouping.centric_flags(np.ascontiguousarray(hkl, dtype=np.int32),
                                        _asu_symmetry(sg)[0])


def _complete_set_dss(sg: SpaceGroup, cell: UnitCell, d_min: float, anomalous: bool):
    """d*² (sorted) of the complete ASU set to d_min, sys. absences excluded; also acentric."""
    import gemmi

    hkl = gemmi.make_miller_array(cell.gemmi, sg.gemmi, d_min * (1 - 1e-3), 0, True)
    hkl = np.asarray(hkl, dtype=np.int32).reshape(-1, 3)
    hkl = take_rows(hkl, (hkl[:, 0] | hkl[:, 1] | hkl[:, 2]) != 0)  # not (0, 0, 0)
    dss = cell.d_star_sq(hkl) if len(hkl) else np.zeros(0)
    acentric = ~_centric(hkl, sg) if len(hkl) else np.zeros(0, dtype=bool)
    all_dss = np.concatenate([dss, dss[acentric]]) if anomalous else dss
    return np.sort(all_dss), np.sort(dss[acentric])


def _redundancies(multiplicity: np.ndarray, shell: np.ndarray, n_shells: int) -> list[dict]:
    """{multiplicity: number of merged reflections} (ascending multiplicities) per shell and
    overall (last; the reflections in a shell), as ``np.unique(..., return_counts=True)`` of
    each shell's multiplicities: one count over (shell, multiplicity) for every shell."""
    inside = shell >= 0
    mult = np.asarray(multiplicity, dtype=np.int64)[inside]
    top = int(mult.max()) + 1 if len(mult) else 1
    if len(mult) and (mult.min() < 0 or n_shells * top > max(4 * len(mult), 1 << 20)):
        counts = [np.unique(mult[shell[inside] == k], return_counts=True) for k in range(n_shells)]
        counts.append(np.unique(mult, return_counts=True))
        return [{int(v): int(c) for v, c in zip(values, n)} for values, n in counts]
    table = np.bincount(shell[inside].astype(np.int64) * top + mult,
                        minlength=n_shells * top).reshape(n_shells, top)
    rows = [*table, table.sum(axis=0)]
    return [{int(v): int(row[v]) for v in np.flatnonzero(row)} for row in rows]


def _count_between(sorted_dss: np.ndarray, lo: float, hi: float) -> int:
    """Number of values with lo <= x <= hi."""
    return int(np.searchsorted(sorted_dss, hi, side="right")
               - np.searchsorted(sorted_dss, lo, side="left"))


def _significance(r: float, n: int, p: float) -> tuple[bool, float]:
    """iotbx's one-sided Student-t test of a correlation coefficient."""
    if r == -1 or n <= 2:
        return False, 0.0
    # Student t quantile (C++; scipy.stats.t.ppf's value to ~1e-13) without importing
    # scipy.stats (about a second) or scipy.special (~30 ms)
    from .._core.stats import student_t_quantile

    t = float(student_t_quantile(float(n - 2), 1.0 - p))
    critical = t / math.sqrt(n - 2 + t ** 2)
    return bool(r > critical), critical


def _cc_star(cc: float) -> float:
    if cc == 0:
        return 0.0
    if cc < -0.999:
        return float("-inf")
    return math.copysign(math.sqrt(2 * abs(cc) / (1 + cc)), cc)


_NO_EQUIVALENTS = ("the data contain no symmetry-equivalent observations (already merged?): "
                   "merging statistics need unmerged data")


def _kernel_inputs(p: _Prepared, limits: np.ndarray) -> tuple | None:
    """The merging-statistics kernel's positional arguments for the prepared rows ``p`` in
    the shells ``limits`` (intensity, sigma, friedel_minus, order, offsets, group shells,
    group centric flags, n_shells), then each group's d*² and shell; None if no group has
    two observations."""
    grouping, _, group_centric = p.grouped
    intensity, sigma, friedel_minus = p.in_group_order
    group_dss = p.d_star_sq[grouping.order[grouping.offsets[:-1]]]  # each group's first row
    n_shells = len(limits) - 1
    shell = np.searchsorted(limits, group_dss, side="right") - 1
    shell[(shell < 0) | (shell >= n_shells)] = -1
    if int(grouping.group_sizes().max()) < 2:
        return None
    return (intensity, sigma, friedel_minus, _identity_order(len(intensity)), grouping.offsets,
            shell.astype(np.int32), group_centric.astype(np.uint8), n_shells, group_dss, shell)


class MergingStatistics:
    """Overall and per-shell merging statistics (iotbx ``dataset_statistics``-shaped).

    Build it with :meth:`from_arrays`, :meth:`from_mtz` or :meth:`from_reflections`.

    Attributes
    ----------
    overall : MergingShell
    bins : list of MergingShell
        One per resolution shell, low to high resolution.
    merged : MergedArray
        The unique reflections (intensity, sigma, multiplicity, shell).
    cc_one_half_overall, cc_one_half_sigma_tau_overall : float
        iotbx's n_refl-weighted mean of the shells' CC½.
    n_rejected : dict
        Rows left out, by reason (``outside_d_range``, ``non_finite``, ``sigma_negative``,
        ``sigma_zero``, ``systematically_absent``).
    space_group, unit_cell, anomalous, n_bins, binning_method, use_internal_variance, seed
        The settings used.
    """

    def __init__(self, prepared: _Prepared, n_bins: int = 20, anomalous: bool = False,
                 use_internal_variance: bool = False, binning_method: str = "volume",
                 reflections_per_bin: int | None = None, seed: int = 0,
                 cc_one_half_significance_level: float | None = None, _kernel_result=None):
        self._prepared = prepared
        self.space_group = prepared.space_group
        self.unit_cell = prepared.unit_cell
        self.anomalous = bool(anomalous)
        self.use_internal_variance = bool(use_internal_variance)
        self.n_bins = int(n_bins)
        self.binning_method = binning_method
        self.reflections_per_bin = reflections_per_bin
        self.seed = int(seed)
        if self.seed < 0:
            raise MergingStatisticsError(f"seed must be >= 0, got {seed}")
        self.cc_one_half_significance_level = cc_one_half_significance_level
        self.n_rejected = dict(prepared.n_rejected)
        if binning_method == "volume" and prepared.binning_dss is prepared.d_star_sq:
            # (shell_limits of the rows' d*² from their range, found once for every pass)
            self.limits = _shell_limits_in(prepared.d_star_sq_range, n_bins)
        else:
            self.limits = shell_limits(prepared.binning_dss, n_bins, binning_method,
                                       reflections_per_bin)
        # (_kernel_result: the kernel's (merged, sums) of these settings, made already by
        # _with_anomalous_pass)
        self._compute(_kernel_result)

    @classmethod
    def _with_anomalous_pass(cls, prepared: _Prepared, n_bins: int = 20,
                             use_internal_variance: bool = False, seed: int = 0
                             ) -> tuple[MergingStatistics, MergingStatistics]:
        """``(s, s.anomalous_pass())`` for ``s = MergingStatistics(prepared, n_bins,
        use_internal_variance=..., seed=...)``, the same values, from one kernel pass over
        the groups for both (``xtalscale._core.stats.merging_statistics_both``)."""
        if int(seed) < 0:
            raise MergingStatisticsError(f"seed must be >= 0, got {seed}")
        if prepared.binning_dss is prepared.d_star_sq:
            limits = _shell_limits_in(prepared.d_star_sq_range, n_bins)
        else:
            limits = shell_limits(prepared.binning_dss, n_bins)
        inputs = _kernel_inputs(prepared, limits)
        if inputs is None:
            raise MergingStatisticsError(_NO_EQUIVALENTS)
        plain, anomalous = _core_stats.merging_statistics_both(
            *inputs[:-2], use_internal_variance=bool(use_internal_variance), seed=int(seed))
        settings = {"use_internal_variance": use_internal_variance, "seed": seed}
        return (cls(prepared, n_bins, anomalous=False, _kernel_result=plain, **settings),
                cls(prepared, n_bins, anomalous=True, _kernel_result=anomalous, **settings))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_arrays(cls, miller_index, intensity, sigma, space_group, unit_cell,
                    n_bins: int = 20, anomalous: bool = False,
                    use_internal_variance: bool = False, eliminate_sys_absent: bool = False,
                    d_min: float | None = None, d_max: float | None = None,
                    binning_method: str = "volume", reflections_per_bin: int | None = None,
                    seed: int = 0, cc_one_half_significance_level: float | None = None
                    ) -> MergingStatistics:
        """Statistics of unmerged observations given as arrays.

        Parameters
        ----------
        miller_index : array_like (n, 3)
            Observed indices (any symmetry-equivalent form; the original index matters only
            for ``anomalous`` and CC_ano, where it decides I(+) or I(−)).
        intensity, sigma : array_like (n,)
            Scaled intensities and their standard deviations.
        space_group : SpaceGroup or str
        unit_cell : UnitCell or 6 parameters
        n_bins : int
            Resolution shells (iotbx's volume binning; DIALS uses 20).
        anomalous : bool
            Keep I(+) and I(−) of acentric reflections apart.
        use_internal_variance : bool
            Merged sigma from the spread of the observations as well.
        eliminate_sys_absent : bool
            Leave systematically absent observations out.
        d_min, d_max : float, optional
            Resolution limits (Å).
        binning_method : {"volume", "counting_sorted"}
        reflections_per_bin : int, optional
            ``counting_sorted``: minimum observations per shell.
        seed : int
            Seed of the CC½ / CC_ano half split.
        cc_one_half_significance_level : float, optional
            If given, the significance of CC½ and CC_ano (iotbx's t-test) is computed.

        Raises
        ------
        MergingStatisticsError (ValueError)
            For empty input, unequal lengths, no usable observation, an unknown space
            group, no equivalents at all (already merged data), or a bad d range.
        """
        prepared = _prepare(miller_index, intensity, sigma, space_group, unit_cell, d_min, d_max,
                            eliminate_sys_absent)
        return cls(prepared, n_bins, anomalous, use_internal_variance, binning_method,
                   reflections_per_bin, seed, cc_one_half_significance_level)

    @classmethod
    def from_mtz(cls, path, n_bins: int = 20, anomalous: bool = False, **kwargs
                 ) -> MergingStatistics:
        """Statistics of a scaled unmerged MTZ (``I``/``SIGI``, or ``IPR``/``SIGIPR``).

        The intensities are the file's (already scaled) ``I`` and ``SIGI`` (recovered from
        the reader's ``intensity.scale.*`` / ``inverse_scale_factor``); indices are the
        original (measured) ones restored from ``M/ISYM``. Other keyword arguments as for
        :meth:`from_arrays`.

        Raises
        ------
        FileNotFoundError, xtalscale.io.mtz.MtzFormatError
            For missing, unreadable, merged or intensity-less files.
        """
        from ..io.mtz import read_unmerged_mtz

        m = read_unmerged_mtz(path, sum_partials=True)
        t = m.table
        if "intensity.scale.value" in t and "inverse_scale_factor" in t:
            # the reader keeps DIALS's convention (raw I·g beside g): the file's scaled
            # I and SIGI are value/g and sqrt(variance)/g
            g = np.asarray(t["inverse_scale_factor"], dtype=np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                I = np.asarray(t["intensity.scale.value"], dtype=np.float64) / g
                var = np.asarray(t["intensity.scale.variance"], dtype=np.float64) / g ** 2
        elif "intensity.sum.value" in t:
            I, var = t["intensity.sum.value"], t["intensity.sum.variance"]
        else:
            I, var = t["intensity.prf.value"], t["intensity.prf.variance"]
        var = np.asarray(var, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            sig = np.where(var >= 0, np.sqrt(np.abs(var)), -np.sqrt(np.abs(var)))
        stats = cls.from_arrays(np.asarray(t["miller_index"]), np.asarray(I), sig,
                                m.space_group, m.unit_cell, n_bins=n_bins,
                                anomalous=anomalous, **kwargs)
        stats.source = os.fspath(path)
        return stats

    @classmethod
    def from_reflections(cls, experiments, reflections, n_bins: int = 20,
                         anomalous: bool = False, partiality_threshold: float | None = None,
                         combine_partials: bool = True, min_isigi: float | None = None,
                         apply_inverse_scale: bool = True, unit_cell=None, **kwargs
                         ) -> MergingStatistics:
        """Statistics of DIALS-scaled reflection tables (scaled ``.refl`` + ``.expt``).

        Rows are DIALS's scaled selection (not ``bad_for_scaling``, g > 0, variance > 0,
        partiality > 0) with partials combined as ``dials.export`` does
        (:func:`xtalscale.io.scaled_intensities.scaled_intensities`); I is
        ``intensity.scale.value / inverse_scale_factor`` (``apply_inverse_scale=False``: g = 1).
        By default no partiality cut is made (the rows dials.scale reports statistics on);
        ``partiality_threshold=0.99`` gives the rows ``dials.export`` writes. The space group is the first
        experiment's; the unit cell is the median of the experiments' cells (DIALS's
        ``determine_best_unit_cell``) unless ``unit_cell`` is given.

        Parameters
        ----------
        experiments : ExperimentList or list of ExperimentList
        reflections : reflection_table or list of reflection_table
            One table, or one per experiment list (in the same order).
        partiality_threshold : float, optional
            Drop rows whose (combined) partiality is below this.
        combine_partials, min_isigi, apply_inverse_scale :
            As for :func:`~xtalscale.io.scaled_intensities.scaled_intensities`.
        unit_cell : UnitCell or 6 parameters, optional
            Overrides the median cell.
        """
        from ..io.scaled_intensities import scaled_intensities

        tables = reflections if isinstance(reflections, (list, tuple)) else [reflections]
        expt_lists = experiments if isinstance(experiments, (list, tuple)) else [experiments]
        crystals = [e.crystal for el in expt_lists for e in el]
        if not crystals:
            raise MergingStatisticsError("no experiments given")
        sg = crystals[0].get_space_group()
        if unit_cell is None:
            params = np.array([c.get_unit_cell().parameters() for c in crystals])
            unit_cell = UnitCell(np.median(params, axis=0))
        hkl, I, sig = [], [], []
        for t in tables:
            sel = scaled_intensities(t, 0.0 if partiality_threshold is None
                                     else partiality_threshold, combine_partials, min_isigi,
                                     apply_inverse_scale)
            hkl.append(np.asarray(sel["miller_index"]))
            I.append(np.asarray(sel["intensity"]))
            sig.append(np.sqrt(np.asarray(sel["variance"])))
        return cls.from_arrays(np.concatenate(hkl), np.concatenate(I), np.concatenate(sig), sg,
                               unit_cell, n_bins=n_bins, anomalous=anomalous, **kwargs)

    def rebinned(self, n_bins: int = 20, binning_method: str = "volume",
                 reflections_per_bin: int | None = None, **kwargs) -> MergingStatistics:
        """The same observations with other shells (or other settings in ``kwargs``)."""
        settings = {"anomalous": self.anomalous, "use_internal_variance": self.use_internal_variance,
                        "seed": self.seed,
                        "cc_one_half_significance_level": self.cc_one_half_significance_level}
        settings.update(kwargs)
        return MergingStatistics(self._prepared, n_bins, binning_method=binning_method,
                                 reflections_per_bin=reflections_per_bin, **settings)

    def anomalous_pass(self) -> MergingStatistics:
        """The same data and shells with I(+) and I(−) kept apart (DIALS's second pass:
        anomalous completeness, multiplicity and R factors)."""
        return self.rebinned(self.n_bins, self.binning_method, self.reflections_per_bin,
                             anomalous=True)

    def observation_groups(self) -> ObservationGroups | None:
        """The grouping behind these statistics as :func:`group_observations` of the input
        arrays makes it (for :func:`batch_statistics` and :func:`normalised_deviations` of the
        same observations), or None if a d range or ``eliminate_sys_absent`` left usable rows
        out."""
        return self._prepared.observation_groups()

    def group_means(self) -> np.ndarray | None:
        """Each group's weighted mean ⟨I⟩ in the order of :meth:`observation_groups` (one
        merged reflection per group: non-anomalous statistics), or None (anomalous)."""
        if self.anomalous or len(self.merged) != self._prepared.grouped[0].n_groups:
            return None
        return self.merged.intensity

    # ------------------------------------------------------------------ computation
    def _compute(self, kernel_result=None) -> None:
        p = self._prepared
        grouping, _, group_centric = p.grouped
        inputs = _kernel_inputs(p, self.limits)
        if inputs is None:
            raise MergingStatisticsError(_NO_EQUIVALENTS)
        n_shells, group_dss, shell = inputs[7], inputs[-2], inputs[-1]
        if kernel_result is None:
            kernel_result = _core_stats.merging_statistics(
                *inputs[:-2], use_internal_variance=self.use_internal_variance,
                anomalous=self.anomalous, seed=self.seed)
        merged, sums = kernel_result
        g = merged["group"]
        bij = merged["bijvoet"]
        hkl_u = negate_rows(take_rows(grouping.unique_hkl, g), bij < 0)  # (a fresh gather)
        self.merged = MergedArray(hkl_u, merged["intensity"], merged["sigma"],
                                  merged["multiplicity"], bij,
                                  1.0 / np.sqrt(group_dss[g]), shell[g].astype(np.int32),
                                  group_centric[g], merged["half1"], merged["half2"])
        self._sums = sums
        self._shell_obs_dss_max = self._shell_extreme(shell, group_dss, n_shells)
        self._build_shells(n_shells)

    @staticmethod
    def _shell_extreme(shell, group_dss, n_shells) -> np.ndarray:
        """Highest d*² observed per shell (and overall last); 0 for empty shells."""
        out = np.zeros(n_shells + 1)
        ok = shell >= 0
        np.maximum.at(out, shell[ok], group_dss[ok])
        out[n_shells] = group_dss[ok].max() if ok.any() else 0.0
        return out

    def _build_shells(self, n_shells: int) -> None:
        p = self._prepared
        lims = self.limits
        # complete set once, down to the highest resolution observed
        dss_max_obs = float(self._shell_obs_dss_max[n_shells])
        d_min_obs = 1.0 / math.sqrt(dss_max_obs)
        key = (d_min_obs, self.anomalous)
        if key not in p.complete_sets:
            p.complete_sets[key] = _complete_set_dss(p.space_group, p.unit_cell, d_min_obs,
                                                     self.anomalous)
        complete, complete_acentric = p.complete_sets[key]
        redundancies = _redundancies(self.merged.multiplicity, self.merged.shell, n_shells)
        shells = []
        for k in range(n_shells + 1):
            if k < n_shells:
                d_max, d_min = _d_from_dss(lims[k]), _d_from_dss(lims[k + 1])
                lo, hi = lims[k], lims[k + 1]
            else:  # overall: the observed range (iotbx array.d_max_min())
                lo, hi = p.d_star_sq_range
                d_max, d_min = _d_from_dss(lo), _d_from_dss(hi)
            shells.append(self._shell(k, d_max, d_min, lo, hi, complete, complete_acentric,
                                      redundancies[k]))
        self.bins = shells[:n_shells]
        self.overall = shells[n_shells]
        w = np.array([b.cc_one_half_n_refl for b in self.bins], dtype=float)
        cc = np.array([b.cc_one_half for b in self.bins])
        self.cc_one_half_overall = float((w * cc).sum() / w.sum()) if w.sum() > 0 else 0.0
        w2 = np.array([b.cc_one_half_sigma_tau_n_refl for b in self.bins], dtype=float)
        cc2 = np.array([b.cc_one_half_sigma_tau for b in self.bins])
        self.cc_one_half_sigma_tau_overall = (float((w2 * cc2).sum() / w2.sum())
                                              if w2.sum() > 0 else 0.0)

    def _shell(self, k, d_max, d_min, lo, hi, complete, complete_acentric,
               redundancies) -> MergingShell:
        s = {name: values[k] for name, values in self._sums.items()}
        st = MergingShell(d_max=float(d_max), d_min=float(d_min), anomalous=self.anomalous)
        st.n_obs = int(s["n_obs"])
        st.n_uniq = int(s["n_uniq"])
        # iotbx: complete set of the shell's merged array (to its own d_min), then the
        # shell's d range (d_min <= d <= d_max)
        # (compared in d*², with a relative slack of 1e-12 so that a reflection exactly at a
        # limit taken from the data is counted, as iotbx's d comparisons do)
        obs_hi = float(self._shell_obs_dss_max[k])
        upper = (min(hi, obs_hi) if st.n_uniq else hi) * (1 + 1e-12)
        lower = lo * (1 - 1e-12)
        st.n_expected = _count_between(complete, lower, upper)
        st.completeness = min(st.n_uniq / st.n_expected, 1.0) if st.n_expected else 0.0
        if self.anomalous:
            n_acentric = _count_between(complete_acentric, lower, hi * (1 + 1e-12))
            st.n_bijvoet_pairs = int(s["n_bijvoet_pairs"])
            st.anom_completeness = st.n_bijvoet_pairs / n_acentric if n_acentric else 0.0
        st.redundancies = redundancies
        if st.n_uniq > 0:
            st.mean_redundancy = st.n_obs / st.n_uniq
            st.i_mean = float(s["sum_i"]) / st.n_uniq
            st.sigi_mean = float(s["sum_sigma"]) / st.n_uniq
            st.i_over_sigma_mean = (float(s["sum_i_over_sigma"]) / int(s["n_i_over_sigma"])
                                    if s["n_i_over_sigma"] else 0.0)
            st.i_mean_over_sigi_mean = st.i_mean / st.sigi_mean if st.sigi_mean else 0.0
            st.unmerged_i_over_sigma_mean = (float(s["sum_unmerged_i_over_sigma"])
                                             / int(s["n_unmerged_positive_sigma"]))
            st.r_merge = float(s["r_merge"])
            st.r_meas = float(s["r_meas"])
            st.r_pim = float(s["r_pim"])
            st.cc_one_half = float(s["cc_half"])
            st.cc_one_half_n_refl = int(s["cc_half_n"])
            st.cc_one_half_sigma_tau = float(s["cc_half_sigma_tau"])
            st.cc_one_half_sigma_tau_n_refl = int(s["cc_half_sigma_tau_n"])
            st.cc_star = _cc_star(st.cc_one_half)
        st.cc_anom = float(s["cc_anom"])
        st.cc_anom_n_pairs = int(s["cc_anom_n"])
        level = self.cc_one_half_significance_level
        if level is not None:
            st.cc_one_half_significance, st.cc_one_half_critical_value = _significance(
                st.cc_one_half, st.cc_one_half_n_refl, level)
            st.cc_anom_significance, st.cc_anom_critical_value = _significance(
                st.cc_anom, st.cc_anom_n_pairs, level)
        return st

    # ------------------------------------------------------------------ output
    def as_dict(self) -> dict:
        """iotbx ``dataset_statistics.as_dict``: per-shell lists by key plus ``overall``."""
        d: dict[str, Any] = {}
        for b in self.bins:
            for k, v in b.as_dict().items():
                d.setdefault(k, []).append(v)
        d["overall"] = self.overall.as_dict()
        d["settings"] = {"n_bins": self.n_bins, "anomalous": self.anomalous,
                         "use_internal_variance": self.use_internal_variance,
                         "binning_method": self.binning_method, "seed": self.seed,
                         "space_group": self.space_group.symbol(),
                         "unit_cell": list(self.unit_cell.parameters())}
        d["n_rejected"] = dict(self.n_rejected)
        return d

    def as_json(self, file_name=None, indent: int | None = None) -> str:
        """JSON of :meth:`as_dict` (written to ``file_name`` when given)."""
        text = json.dumps(_jsonable(self.as_dict()), indent=indent)
        if file_name is not None:
            with open(file_name, "w") as fh:
                fh.write(text + "\n")
        return text

    def as_table(self, title: bool = True) -> str:
        """The statistics as an aligned text table (DIALS/AIMLESS style)."""
        cols = [("d_max", "{:7.2f}"), ("d_min", "{:7.2f}"), ("#obs", "{:8d}"),
                ("#uniq", "{:7d}"), ("mult.", "{:6.2f}"), ("%comp", "{:6.1f}"),
                ("<I>", "{:9.1f}"), ("<I/sI>", "{:7.1f}"), ("r_mrg", "{:7.3f}"),
                ("r_meas", "{:7.3f}"), ("r_pim", "{:7.3f}"), ("cc1/2", "{:7.3f}"),
                ("cc_ano", "{:7.3f}")]
        if self.anomalous:
            cols.insert(6, ("%anom", "{:6.1f}"))

        def row(s: MergingShell) -> list[str]:
            vals = {"d_max": s.d_max, "d_min": s.d_min, "#obs": s.n_obs, "#uniq": s.n_uniq,
                    "mult.": s.mean_redundancy, "%comp": 100 * s.completeness,
                    "%anom": 100 * (s.anom_completeness or 0.0), "<I>": s.i_mean,
                    "<I/sI>": s.i_over_sigma_mean, "r_mrg": s.r_merge, "r_meas": s.r_meas,
                    "r_pim": s.r_pim, "cc1/2": s.cc_one_half, "cc_ano": s.cc_anom}
            out = []
            for name, fmt in cols:
                v = vals[name]
                out.append("-" if v is None else fmt.format(v))
            return out

        rows = [row(b) for b in self.bins] + [row(self.overall)]
        widths = [max(len(name), *(len(r[i]) for r in rows)) for i, (name, _) in enumerate(cols)]
        lines = []
        if title:
            mode = "anomalous" if self.anomalous else "non-anomalous"
            lines.append(f"Merging statistics ({mode}; {self.space_group.symbol()}; "
                         f"{len(self.bins)} shells)")
        lines.append("  ".join(n.rjust(w) for (n, _), w in zip(cols, widths)))
        for i, r in enumerate(rows):
            if i == len(rows) - 1:
                lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
            lines.append("  ".join(v.rjust(w) for v, w in zip(r, widths)))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.as_table()

    def show(self, out=None) -> None:
        """Print :meth:`as_table` (iotbx ``show``)."""
        import sys

        print(self.as_table(), file=out or sys.stdout)


# iotbx's class name
dataset_statistics = MergingStatistics


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, np.bool_):
        return bool(x)
    return x


# --------------------------------------------------------------------------- per observation


@dataclass
class ObservationGroups:
    """Usable observations grouped by unique reflection, for the per-observation statistics
    and the merge.

    Made by :func:`group_observations` (or taken from a :class:`MergingStatistics` by
    :meth:`MergingStatistics.observation_groups`) once and passed to
    :func:`normalised_deviations`, :func:`batch_statistics` and
    :func:`~xtalscale.merge.merge_observations`, which would otherwise each map and sort the
    same indices again.

    Attributes
    ----------
    usable_rows : ndarray, int64, (m,)
        Row numbers (in the caller's arrays) of the usable observations: finite intensity
        and sigma, sigma > 0; ascending (a shared read-only 0..n-1 when every row is usable).
    grouping : Grouping
        Those rows grouped by ASU index (Bijvoet mates together),
        :func:`~xtalscale.symmetry.group_reflections` of their ASU indices.
    rows : ndarray, int64, (m,)
        ``usable_rows`` in group order: group k is ``rows[offsets[k]:offsets[k+1]]``.
    intensity, sigma : ndarray, float64, (m,)
        The values of ``rows``, in that order.
    n_input : int
        Length of the caller's arrays.
    """

    usable_rows: np.ndarray
    grouping: Grouping
    rows: np.ndarray
    intensity: np.ndarray
    sigma: np.ndarray
    n_input: int

    @property
    def offsets(self) -> np.ndarray:
        return self.grouping.offsets

    def check_length(self, n: int) -> None:
        if n != self.n_input:
            raise MergingStatisticsError(f"groups made from {self.n_input} observations given "
                                         f"with arrays of {n}")


def group_observations(miller_index, intensity, sigma, space_group,
                       anomalous: bool = False) -> ObservationGroups:
    """Group the usable observations (finite I and σ, σ > 0) by ASU index (with
    ``anomalous`` Bijvoet mates apart) with :func:`xtalscale.symmetry.group_reflections`."""
    hkl = miller_array(miller_index, "miller_index")
    I = np.asarray(intensity, dtype=np.float64).ravel()
    s = np.asarray(sigma, dtype=np.float64).ravel()
    if not (len(hkl) == len(I) == len(s)):
        raise MergingStatisticsError(
            f"miller_index, intensity and sigma must have equal lengths (got {len(hkl)}, "
            f"{len(I)}, {len(s)})")
    usable = np.flatnonzero(np.isfinite(I) & np.isfinite(s) & (s > 0))
    grouping = group_reflections(map_to_asu(take_rows(hkl, usable), space_group,
                                            anomalous=anomalous).asu_hkl)
    rows = np.take(usable, grouping.order)
    return ObservationGroups(usable, grouping, rows, np.take(I, rows), np.take(s, rows), len(I))


def _groups_for(miller_index, intensity, sigma, space_group, anomalous: bool,
                groups: ObservationGroups | None) -> ObservationGroups:
    """``groups`` when given (checked against the arrays), else a fresh grouping."""
    if groups is None:
        return group_observations(miller_index, intensity, sigma, space_group, anomalous)
    if anomalous:
        raise MergingStatisticsError("shared groups keep Bijvoet mates together: they do not "
                                     "serve anomalous=True")
    groups.check_length(len(np.asarray(intensity).ravel()))
    return groups


def normalised_deviations(miller_index, intensity, sigma, space_group,
                          anomalous: bool = False,
                          groups: ObservationGroups | None = None) -> np.ndarray:
    """Normalised deviation of each observation from its group's weighted mean.

    ``δ = sqrt((n−1)/n) (I − ⟨I⟩)/σ`` (DIALS's error-model definition with g = 1, i.e. for
    scaled intensities); NaN for single observations and for rows with a non-finite value or
    σ <= 0 (which are left out of the means). Input order. For a normal probability plot.
    ``groups`` (from :func:`group_observations` of the same arrays) saves the grouping.
    """
    g = _groups_for(miller_index, intensity, sigma, space_group, anomalous, groups)
    deviations = _core_stats.normalised_deviations(g.intensity, g.sigma,
                                                   _identity_order(len(g.rows)), g.offsets)
    return _deviations_in_input_order(g, deviations, len(np.asarray(intensity).ravel()))


@dataclass
class BatchStatistics:
    """Per-batch statistics (one entry per batch number present).

    ``r_merge[b] = Σ|I − ⟨I⟩_h| / Σ I`` over the batch's observations (⟨I⟩_h the weighted
    mean of all observations of the reflection; reflections seen once add 0 to the
    numerator), ``i_over_sigma_mean`` the mean unmerged I/σ (xia2/DIALS "vs batch" plots).
    """

    batch: np.ndarray
    dataset: np.ndarray
    n_obs: np.ndarray
    r_merge: np.ndarray
    i_over_sigma_mean: np.ndarray

    def as_dict(self) -> dict:
        return {k: v.tolist() for k, v in asdict(self).items()}


def batch_statistics(miller_index, intensity, sigma, batch, space_group, dataset=None,
                     anomalous: bool = False,
                     groups: ObservationGroups | None = None) -> BatchStatistics:
    """n_obs, Rmerge and ⟨I/σ⟩ against batch (image), per dataset.

    Parameters
    ----------
    miller_index, intensity, sigma : array_like
    batch : array_like (n,) int
        Batch (image) number of every observation.
    space_group : SpaceGroup or str
    dataset : array_like (n,) int, optional
        Dataset (experiment) id; batches are kept apart per dataset.
    groups : ObservationGroups, optional
        :func:`group_observations` of the same arrays (saves the grouping).

    Rows with a non-finite value or σ <= 0 are left out.
    """
    g = _groups_for(miller_index, intensity, sigma, space_group, anomalous, groups)
    ds, batches, index = _batch_pairs(g, batch, dataset, len(np.asarray(intensity).ravel()))
    n_obs, dev, si, sios = _core_stats.batch_sums(g.intensity, g.sigma,
                                                  _identity_order(len(g.rows)), g.offsets,
                                                  index, len(ds))
    return _batch_result(ds, batches, n_obs, dev, si, sios)


def batch_statistics_and_deviations(miller_index, intensity, sigma, batch, space_group,
                                    dataset=None, groups: ObservationGroups | None = None
                                    ) -> tuple[BatchStatistics, np.ndarray]:
    """:func:`batch_statistics` and :func:`normalised_deviations` (non-anomalous) of the same
    observations, the same values, from one pass over the groups (one weighted mean each)."""
    n = len(np.asarray(intensity).ravel())
    g = _groups_for(miller_index, intensity, sigma, space_group, False, groups)
    return _pair_statistics_and_deviations(g, *_row_pairs(batch, dataset, n))


def _pair_statistics_and_deviations(g: ObservationGroups, ds: np.ndarray, batches: np.ndarray,
                                    index: np.ndarray, pair_map: np.ndarray | None = None,
                                    group_means: np.ndarray | None = None,
                                    grouped_pairs: tuple | None = None
                                    ) -> tuple[BatchStatistics, np.ndarray]:
    """:func:`batch_statistics_and_deviations` of the grouped observations ``g`` with each
    input row's (dataset, batch) pair given: pair ``pair_map[index[i]]`` (``index[i]``
    without a map) of the distinct sorted pairs ``(ds, batches)``; a pair without a usable
    row is dropped.

    ``group_means``: each group's weighted mean (the ``merged.intensity`` of non-anomalous
    :class:`MergingStatistics` whose :meth:`~MergingStatistics.observation_groups` ``g``
    is: the value the kernel would compute), so that only the deviations and sums are made,
    each deviation written at its input row. ``grouped_pairs``: ``_pairs_of_grouped_rows``
    of these arguments, made already."""
    g.check_length(len(index))
    ds, batches, index = (grouped_pairs if grouped_pairs is not None
                          else _pairs_of_grouped_rows(g, ds, batches, index, pair_map))
    if group_means is not None:
        deviations, n_obs, dev, si, sios = _core_stats.grouped_deviations_and_batch_sums(
            g.intensity, g.sigma, g.offsets, group_means, g.rows, g.n_input, index, len(ds))
        return _batch_result(ds, batches, n_obs, dev, si, sios), deviations
    deviations, n_obs, dev, si, sios = _core_stats.deviations_and_batch_sums(
        g.intensity, g.sigma, _identity_order(len(g.rows)), g.offsets, index, len(ds))
    return (_batch_result(ds, batches, n_obs, dev, si, sios),
            _deviations_in_input_order(g, deviations, g.n_input))


def _row_pairs(batch, dataset, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_dataset_batch_groups` of every row's (dataset, batch), checked against n rows."""
    b_all = np.asarray(batch).ravel().astype(np.int64, copy=False)
    ds_all = (np.zeros(len(b_all), dtype=np.int64) if dataset is None
              else np.asarray(dataset).ravel().astype(np.int64, copy=False))
    if not len(b_all) == len(ds_all) == n:
        raise MergingStatisticsError("batch, dataset and intensity must have equal lengths")
    return _dataset_batch_groups(ds_all, b_all)


def _batch_pairs(g: ObservationGroups, batch, dataset, n: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (dataset, batch) pairs of the grouped rows (sorted) and each grouped row's pair
    number, in the groups' row order."""
    return _pairs_of_grouped_rows(g, *_row_pairs(batch, dataset, n))


def _pairs_of_grouped_rows(g: ObservationGroups, ds: np.ndarray, batches: np.ndarray,
                           index: np.ndarray, pair_map: np.ndarray | None = None
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs (numbered ``pair_map[index]`` per input row, or ``index``) of the grouped
    rows (those without one dropped) and each grouped row's pair number in group order."""
    # pairs of every row (sequential reads), then each grouped row's pair (one gather; the
    # map from a small table, in place); the pairs of rows left out (σ <= 0, ...) are dropped
    if pair_map is not None and len(pair_map) <= np.iinfo(np.int16).max:
        # few pairs (the report's grouped batches): each row's pair as int16, so that the
        # random gather in group order reads 2 bytes a row instead of 8
        index = np.take(np.take(pair_map.astype(np.int16), index), g.rows).astype(np.int64)
    else:
        index = np.take(index, g.rows)
        if pair_map is not None:
            np.take(pair_map, index, out=index, mode="clip")  # (index < len(pair_map))
    if len(g.rows) < g.n_input:
        present = np.zeros(len(ds), dtype=bool)
        present[index] = True
        renumber = np.cumsum(present, dtype=np.int64) - 1
        ds, batches, index = ds[present], batches[present], renumber[index]
    return ds, batches, index


def _batch_result(ds, batches, n_obs, dev, si, sios) -> BatchStatistics:
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(si != 0, dev / si, 0.0)
        ios = np.where(n_obs > 0, sios / np.maximum(n_obs, 1), 0.0)
    return BatchStatistics(batches, ds, n_obs, r, ios)


def _deviations_in_input_order(g: ObservationGroups, deviations: np.ndarray,
                               n: int) -> np.ndarray:
    """Deviations of the grouped rows (group order) spread to the caller's n rows (NaN for
    the rows left out)."""
    # (every row is written when all are grouped: no fill first)
    out = np.empty(n) if len(g.rows) == n else np.full(n, np.nan)
    out[g.rows] = deviations
    return out


def _dataset_batch_groups(dataset: np.ndarray, batch: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct (dataset, batch) pairs in lexicographic order and each row's pair
    number, as ``np.unique(pairs, axis=0, return_inverse=True)`` gives them.

    Batch numbers are image numbers: a packed key ``(dataset, batch)`` spans a small range,
    so a table over that range (mark the keys present, number them in key order) does it in
    two O(n) passes instead of a sort.
    """
    if len(batch) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    d_lo, b_lo = int(dataset.min()), int(batch.min())
    d_span, b_span = int(dataset.max()) - d_lo + 1, int(batch.max()) - b_lo + 1
    if d_span * b_span > max(4 * len(batch), 1 << 20):  # sparse numbers: sort the pairs
        pairs, index = np.unique(np.stack([dataset, batch], axis=1), axis=0,
                                 return_inverse=True)
        return pairs[:, 0].copy(), pairs[:, 1].copy(), np.asarray(index).ravel().astype(np.int64)
    # key (dataset - d_lo) * b_span + (batch - b_lo), built in one array
    key = np.subtract(dataset, d_lo, dtype=np.int64)
    key *= b_span
    key += batch
    key -= b_lo
    present = np.zeros(d_span * b_span, dtype=bool)
    present[key] = True
    keys = np.flatnonzero(present)
    number = np.cumsum(present, dtype=np.int64) - 1
    # each row's number, written over its key (every key is in range: no checks)
    return keys // b_span + d_lo, keys % b_span + b_lo, np.take(number, key, out=key, mode="clip")


def batch_statistics_from_reflections(experiments, reflections, anomalous: bool = False,
                                      apply_inverse_scale: bool = True) -> BatchStatistics:
    """:func:`batch_statistics` of DIALS-scaled tables, one dataset per experiment.

    Rows are DIALS's scaled selection with partials combined
    (:func:`~xtalscale.io.scaled_intensities.scaled_intensities`, no partiality cut). The
    batch of a row is ``floor(z) + 1 + batch_offset`` with z the observed frame coordinate
    (``xyzobs.px.value``) and the scan's batch offset, as DIALS assigns batches; the dataset
    number runs over the experiments of all lists in order. The space group is the first
    experiment's.
    """
    from ..io.scaled_intensities import scaled_intensities

    tables = reflections if isinstance(reflections, (list, tuple)) else [reflections]
    expt_lists = experiments if isinstance(experiments, (list, tuple)) else [experiments]
    if len(tables) != len(expt_lists):
        raise MergingStatisticsError(f"{len(tables)} reflection tables but {len(expt_lists)} "
                                     "experiment lists")
    hkl, inten, sig, batch, dataset = [], [], [], [], []
    first_dataset = 0
    for el, t in zip(expt_lists, tables):
        sel = scaled_intensities(t, 0.0, True, None, apply_inverse_scale)
        ids = np.asarray(sel["id"]).astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(el)):
            raise MergingStatisticsError(f"reflection ids {ids.min()}..{ids.max()} do not match "
                                         f"{len(el)} experiments")
        offsets = np.array([(e.scan.get_batch_offset() if e.scan is not None else 0)
                            for e in el], dtype=np.int64)
        z = np.asarray(sel["xyzobs.px.value"])[:, 2]
        hkl.append(np.asarray(sel["miller_index"]))
        inten.append(np.asarray(sel["intensity"]))
        sig.append(np.sqrt(np.asarray(sel["variance"])))
        batch.append(np.floor(z).astype(np.int64) + 1 + offsets[ids])
        dataset.append(ids + first_dataset)
        first_dataset += len(el)
    sg = expt_lists[0][0].crystal.get_space_group()
    return batch_statistics(np.concatenate(hkl), np.concatenate(inten), np.concatenate(sig),
                            np.concatenate(batch), sg, np.concatenate(dataset), anomalous)
