# Stubs for xtalscale._core.smoothers: raw Gaussian-smoother kernels (see xtalscale.smoothing).
from typing import Optional, Sequence, Tuple

import numpy as np
import numpy.typing as npt

_Coords = Sequence[npt.ArrayLike]
_Multi = Tuple[
    npt.NDArray[np.float64],            # value
    npt.NDArray[np.float64],            # sumweight
    Optional[npt.NDArray[np.float64]],  # CSR data (None if want_matrix is False)
    Optional[npt.NDArray[np.integer]],  # CSR indices (int32, or int64 for huge outputs)
    Optional[npt.NDArray[np.integer]],  # CSR indptr (same dtype as indices)
]

class _Smoother:
    def set_smoothing(self, num_average: int, sigma: float) -> None: ...
    @property
    def coordinate_shift(self) -> Tuple[float, ...]: ...
    @coordinate_shift.setter
    def coordinate_shift(self, shift: Sequence[float]) -> None: ...
    @property
    def num_values(self) -> int: ...
    @property
    def sigma(self) -> float: ...
    @property
    def max_row_nnz(self) -> int: ...
    def axis_num_values(self, axis: int) -> int: ...
    def axis_num_samples(self, axis: int) -> int: ...
    def axis_num_average(self, axis: int) -> int: ...
    def axis_spacing(self, axis: int) -> float: ...
    def axis_positions(self, axis: int) -> npt.NDArray[np.float64]: ...
    def value_weight(
        self, coord: Sequence[float], values: npt.ArrayLike, first_fixed: bool = False
    ) -> Tuple[float, npt.NDArray[np.int64], npt.NDArray[np.float64], float]: ...
    def multi_value_weight(
        self,
        coords: _Coords,
        values: npt.ArrayLike,
        normalised: bool = False,
        first_fixed: bool = False,
        want_matrix: bool = True,
    ) -> _Multi: ...
    def values(self, coords: _Coords, values: npt.ArrayLike) -> npt.NDArray[np.float64]: ...
    def multi_value_weight_into(
        self,
        coords: _Coords,
        values: npt.ArrayLike,
        value: npt.NDArray[np.float64],
        sumweight: npt.NDArray[np.float64],
        indptr: npt.NDArray[np.integer],
        indices: npt.NDArray[np.integer],
        data: npt.NDArray[np.float64],
        normalised: bool = False,
        first_fixed: bool = False,
    ) -> int: ...
    def value_error(
        self, coords: _Coords, values: npt.ArrayLike, esds: Optional[npt.ArrayLike] = None
    ) -> Tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...

class Smoother1D(_Smoother):
    def __init__(self, ranges: Sequence[Tuple[float, float]], num_intervals: Sequence[int]) -> None: ...

class Smoother2D(_Smoother):
    def __init__(self, ranges: Sequence[Tuple[float, float]], num_intervals: Sequence[int]) -> None: ...

class Smoother3D(_Smoother):
    def __init__(self, ranges: Sequence[Tuple[float, float]], num_intervals: Sequence[int]) -> None: ...

def nparam_to_val(n_params: int) -> int: ...
