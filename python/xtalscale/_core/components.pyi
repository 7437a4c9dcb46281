# Stubs for xtalscale._core.components: scale-component kernels and spherical harmonics.
from typing import Optional, Sequence, Tuple

import numpy as np
import numpy.typing as npt

_F64 = npt.NDArray[np.float64]
_I32 = npt.NDArray[np.int32]
_I64 = npt.NDArray[np.int64]

class WeightMatrix:
    """Normalised smoother weights of one block (CSR, built once, read-only views)."""

    @property
    def shape(self) -> Tuple[int, int]: ...
    @property
    def n_params(self) -> int: ...
    @property
    def nnz(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def fixed_first(self) -> bool: ...
    @property
    def indptr(self) -> _I32: ...
    @property
    def indices(self) -> _I32: ...
    @property
    def data(self) -> _F64: ...
    @property
    def first_col(self) -> Optional[_F64]: ...
    def values(self, parameters: npt.ArrayLike) -> _F64: ...
    def b_scales(
        self, parameters: npt.ArrayLike, factor: npt.ArrayLike, derivatives: bool = True
    ) -> Tuple[_F64, Optional[_F64]]: ...

def weight_matrix(
    coords: Sequence[npt.ArrayLike],
    ranges: Sequence[Tuple[float, float]],
    intervals: Sequence[int],
    num_average: int = 3,
    sigma: float = -1.0,
    first_fixed: bool = False,
) -> WeightMatrix: ...
def smoother_weights(
    coords: Sequence[npt.ArrayLike],
    ranges: Sequence[Tuple[float, float]],
    intervals: Sequence[int],
    num_average: int = 3,
    sigma: float = -1.0,
    first_fixed: bool = False,
) -> Tuple[_I32, _I32, _F64, Optional[_F64]]:
    """Normalised smoother weights w/Σw as CSR (indptr, indices, data) and, with first_fixed,
    the dense column of p₀ (the others shifted down by one)."""

def csr_matvec(
    indptr: _I32,
    indices: _I32,
    data: _F64,
    parameters: npt.ArrayLike,
    first_col: Optional[_F64] = None,
    p0: float = 0.0,
) -> _F64: ...
def bin_coordinates(
    values: npt.NDArray[np.float64], start: float, width: float, inverse_square: bool = False
) -> _F64: ...
def exp_scales(factor: npt.ArrayLike, coef: float, derivatives: bool = True) -> Tuple[_F64, Optional[_F64]]: ...
def smooth_b_scales(
    indptr: _I32,
    indices: _I32,
    data: _F64,
    parameters: npt.ArrayLike,
    factor: npt.ArrayLike,
    first_col: Optional[_F64] = None,
    p0: float = 0.0,
    derivatives: bool = True,
) -> Tuple[_F64, Optional[_F64]]: ...
def row_multiply(indptr: npt.ArrayLike, data: npt.ArrayLike, v: npt.ArrayLike) -> _F64: ...
def sh_scales(harmonic_values: npt.ArrayLike, parameters: npt.ArrayLike) -> _F64: ...
def calc_theta_phi(xyz: npt.ArrayLike) -> _F64: ...
def calc_lookup_index(theta_phi: npt.ArrayLike, points_per_degree: float) -> _I64: ...
def sph_harm_table(s0_theta_phi: npt.ArrayLike, s1_theta_phi: npt.ArrayLike, lmax: int) -> _F64: ...
def sph_harm_lookup_table(lmax: int, points_per_degree: int) -> _F64: ...
def harmonics_from_lookup(
    s0_selection: npt.ArrayLike, s1_selection: npt.ArrayLike, table: npt.ArrayLike, n_params: int
) -> _F64: ...
def lookup_sh_scales(
    s0_lookup: npt.NDArray[np.int32], s1_lookup: npt.NDArray[np.int32], table: npt.ArrayLike,
    parameters: npt.ArrayLike
) -> _F64: ...
def smooth_1d_prepare(
    x: npt.ArrayLike, x_shift: float, range: Tuple[float, float], n_intervals: int,
    num_average: int, sigma: float
) -> Tuple[npt.NDArray[np.uint16], _F64]: ...
def smooth_1d_apply(
    x: npt.ArrayLike, x_shift: float, range: Tuple[float, float], n_intervals: int,
    num_average: int, sigma: float, window: npt.NDArray[np.uint16], q: npt.ArrayLike,
    parameters: npt.ArrayLike, first_fixed: bool = False,
    factor: Optional[npt.ArrayLike] = None, derivatives: bool = True,
    scales_out: Optional[_F64] = None,
    indptr_out: Optional[_I32] = None, indices_out: Optional[_I32] = None,
    data_out: Optional[_F64] = None, write_pattern: bool = True
) -> Tuple[_F64, Optional[_I32], Optional[_I32], Optional[_F64], int]: ...
def sh_scales_f32(harmonic_values: npt.ArrayLike, parameters: npt.ArrayLike) -> _F64: ...
def harmonics_from_lookup_f32(
    s0_lookup: npt.NDArray[np.int32], s1_lookup: npt.NDArray[np.int32], table: npt.ArrayLike,
    n_params: int
) -> npt.NDArray[np.float32]: ...
def rotate_vectors_about_axis(rot_axis: npt.ArrayLike, vectors: npt.ArrayLike, angles: npt.ArrayLike) -> _F64: ...
def grid_lookup_indices(xyz: npt.ArrayLike, points_per_degree: int) -> _I64: ...
def absorption_frame_vectors(rotation_axis: npt.ArrayLike, fixed_rotation: npt.ArrayLike,
                             setting_rotation: npt.ArrayLike, sample_to_source: npt.ArrayLike,
                             align_axis: npt.ArrayLike, s1: npt.ArrayLike,
                             phi: npt.ArrayLike) -> tuple[_F64, _F64]: ...
def absorption_lookup_indices(rotation_axis: npt.ArrayLike, fixed_rotation: npt.ArrayLike,
                              setting_rotation: npt.ArrayLike, sample_to_source: npt.ArrayLike,
                              align_axis: npt.ArrayLike, s1: npt.ArrayLike, phi: npt.ArrayLike,
                              points_per_degree: int, n_threads: int = 1) -> tuple[_I64, _I64]: ...
def real_harmonics(lmax: int, theta: float, phi: float) -> _F64: ...
def n_sph_harm_params(lmax: int) -> int: ...
