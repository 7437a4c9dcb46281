"""A small cctbx ``miller.array``: indices with data and sigmas on a crystal symmetry.

What scripts get from :meth:`xtalscale.fit.IhTable.as_miller_array` (DIALS hands them a cctbx
array there) and what :meth:`~xtalscale.fit.IhTableBlock.setup_binner` bins. The subset:
``size()``, ``indices()``, ``data()``, ``sigmas()``, ``unit_cell()``, ``space_group()``,
``anomalous_flag()``, ``d_spacings()`` / ``d_star_sq()`` (arrays of the same indices),
``select(bool or int array)``, the x-ray-intensity observation type, ``set_info``/``info`` and
``setup_binner_d_star_sq_step`` (equal steps in d*², as cctbx). Values are numpy arrays inside;
the accessors return flex arrays as cctbx does.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import flex_arrays as flex
from .symmetry import UnitCell, miller_array

__all__ = ["MillerArray", "StepBinner"]


class StepBinner:
    """Resolution bins of equal width in d*² between ``d_max`` and ``d_min`` (cctbx's
    ``setup_binner_d_star_sq_step``). Bin 0 and bin ``n_bins_all() - 1`` are cctbx's
    out-of-range bins (below d_max / beyond d_min); bins ``1 .. n_bins_used()`` are the range."""

    def __init__(self, d_star_sq: np.ndarray, d_max: float, d_min: float, step: float) -> None:
        if not (d_max > d_min > 0) or not step > 0:
            raise ValueError(f"need d_max > d_min > 0 and a positive d*² step (got d_max={d_max}, "
                             f"d_min={d_min}, step={step})")
        lo, hi = 1.0 / d_max**2, 1.0 / d_min**2
        self._n = max(1, int(np.ceil((hi - lo) / step - 1e-9)))
        self._limits = lo + step * np.arange(self._n + 1)
        self._limits[-1] = max(self._limits[-1], hi)
        inner = np.searchsorted(self._limits, d_star_sq, side="right")  # 0: below, n+1: beyond
        self._bin_indices = np.clip(inner, 0, self._n + 1).astype(np.int64)

    def n_bins_used(self) -> int:
        return self._n

    def n_bins_all(self) -> int:
        return self._n + 2

    def range_used(self) -> range:
        return range(1, self._n + 1)

    def limits(self) -> Any:
        """The n_bins_used() + 1 bin limits in d*²."""
        return flex.double(self._limits)

    def bin_d_range(self, i_bin: int) -> tuple[float, float]:
        """(d_max, d_min) of bin ``i_bin`` (1-based; −1 marks an open end, as cctbx)."""
        if not 0 <= i_bin <= self._n + 1:
            raise IndexError(f"bin {i_bin} is outside 0..{self._n + 1}")
        if i_bin == 0:
            return (-1.0, float(self._limits[0] ** -0.5))
        if i_bin == self._n + 1:
            return (float(self._limits[-1] ** -0.5), -1.0)
        return (float(self._limits[i_bin - 1] ** -0.5), float(self._limits[i_bin] ** -0.5))

    def bin_indices(self) -> Any:
        """The bin of each reflection of the array the binner was set up on."""
        return flex.size_t(self._bin_indices)

    def counts(self) -> list[int]:
        """Reflections per bin, for all n_bins_all() bins."""
        return np.bincount(self._bin_indices, minlength=self._n + 2).tolist()


class MillerArray:
    """Miller indices with data (and optionally sigmas) on a unit cell and space group."""

    def __init__(self, unit_cell: Any, space_group: Any, indices: Any, data: Any = None,
                 sigmas: Any = None, anomalous_flag: bool = False) -> None:
        self._unit_cell = unit_cell if isinstance(unit_cell, UnitCell) else UnitCell(unit_cell)
        self._space_group = space_group
        self._indices = miller_array(indices, "indices")
        n = self._indices.shape[0]
        self._data = None if data is None else self._column(data, n, "data")
        self._sigmas = None if sigmas is None else self._column(sigmas, n, "sigmas")
        self._anomalous = bool(anomalous_flag)
        self._observation_type: str | None = None
        self._info: Any = None
        self.binner: StepBinner | None = None

    @staticmethod
    def _column(values: Any, n: int, name: str) -> np.ndarray:
        a = np.asarray(values, dtype=np.float64).reshape(-1)
        if a.size != n:
            raise ValueError(f"{name} has {a.size} values for {n} indices")
        return a

    def _like(self, data: np.ndarray | None, sigmas: np.ndarray | None = None,
              rows: np.ndarray | None = None) -> "MillerArray":
        idx = self._indices if rows is None else self._indices[rows]
        out = MillerArray(self._unit_cell, self._space_group, idx, data, sigmas, self._anomalous)
        out._observation_type = self._observation_type
        out._info = self._info
        return out

    # ---------------------------------------------------------------- cctbx accessors
    def size(self) -> int:
        return int(self._indices.shape[0])

    def __len__(self) -> int:
        return self.size()

    def indices(self) -> Any:
        return flex.miller_index(self._indices)

    def data(self) -> Any:
        return None if self._data is None else flex.double(self._data)

    def sigmas(self) -> Any:
        return None if self._sigmas is None else flex.double(self._sigmas)

    def set_sigmas(self, sigmas: Any) -> "MillerArray":
        self._sigmas = self._column(sigmas, self.size(), "sigmas")
        return self

    def unit_cell(self) -> UnitCell:
        return self._unit_cell

    def space_group(self) -> Any:
        return self._space_group

    def anomalous_flag(self) -> bool:
        return self._anomalous

    def set_observation_type_xray_intensity(self) -> "MillerArray":
        self._observation_type = "xray.intensity"
        return self

    def is_xray_intensity_array(self) -> bool:
        return self._observation_type == "xray.intensity"

    def set_info(self, info: Any) -> "MillerArray":
        self._info = info
        return self

    def info(self) -> Any:
        return self._info

    def _d_values(self) -> np.ndarray:
        """d (Å) of every index."""
        return np.atleast_1d(self._unit_cell.d(self._indices))

    def d_spacings(self) -> "MillerArray":
        """The same indices with data d (Å)."""
        return self._like(self._d_values())

    def d_star_sq(self) -> "MillerArray":
        """The same indices with data 1/d² (Å⁻²)."""
        return self._like(1.0 / self._d_values() ** 2)

    def d_min(self) -> float:
        return float(np.min(self._d_values()))

    def select(self, selection: Any) -> "MillerArray":
        """Rows by a bool mask (of size()) or by integer positions."""
        sel = np.asarray(selection)
        if sel.dtype == bool and sel.size != self.size():
            raise ValueError(f"a bool selection needs {self.size()} values, got {sel.size}")
        rows = np.flatnonzero(sel) if sel.dtype == bool else sel.astype(np.int64)
        return self._like(None if self._data is None else self._data[rows],
                          None if self._sigmas is None else self._sigmas[rows], rows)

    def setup_binner_d_star_sq_step(self, auto_binning: bool = False, d_max: float | None = None,
                                    d_min: float | None = None, d_star_sq_step: float | None = None
                                    ) -> StepBinner:
        """Bins of equal d*² width ``d_star_sq_step`` from d_max to d_min (defaults: the data's
        range); stored as ``binner`` and returned."""
        dss = 1.0 / self._d_values() ** 2
        if not dss.size:
            raise ValueError("cannot bin an empty array")
        d_max = float(d_max) if d_max else float(dss.min() ** -0.5)
        d_min = float(d_min) if d_min else float(dss.max() ** -0.5)
        step = float(d_star_sq_step) if d_star_sq_step else (d_min**-2 - d_max**-2) / 10 or 0.004
        self.binner = StepBinner(dss, d_max, d_min, step)
        return self.binner
