"""Fit kernels: Ih table, target, normal equations (see xtalscale.fit)."""
from typing import Any, Sequence

import numpy as np
import numpy.typing as npt

def model_row_variances(
    block: Any,
    params: npt.ArrayLike,
    V: npt.ArrayLike,
    n_threads: int = 1,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def model_row_variances_into(
    blocks: Sequence[Any],
    params: npt.ArrayLike,
    V: npt.ArrayLike,
    rows: Sequence[npt.ArrayLike],
    variances: npt.NDArray[np.float64],
    g: npt.NDArray[np.float64],
    n_threads: int = 1,
) -> None: ...
def functional_and_scale_gradient(
    group_offsets: npt.ArrayLike,
    intensities: npt.ArrayLike,
    weights: npt.ArrayLike,
    blocks: list[Any],
    fixed_Ih: npt.ArrayLike | None = None,
    n_threads: int = 1,
) -> tuple[float, npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def functional_and_gradient(
    group_offsets: npt.ArrayLike,
    intensities: npt.ArrayLike,
    weights: npt.ArrayLike,
    blocks: list[Any],
    n_params: int,
    gradient: bool = True,
    fixed_Ih: npt.ArrayLike | None = None,
    rows: bool = False,
    n_threads: int = 1,
    check_structure: bool = True,
) -> tuple[float, npt.NDArray[np.float64] | None, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]] | None]: ...

def normal_equations(
    group_offsets: npt.ArrayLike,
    intensities: npt.ArrayLike,
    weights: npt.ArrayLike,
    blocks: list[Any],
    n_params: int,
    kind: str = "schur",
    fixed_Ih: npt.ArrayLike | None = None,
    n_threads: int = 1,
    check_structure: bool = True,
    out: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None = None,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], float, int]: ...

def model_normal_equations(
    group_offsets: npt.ArrayLike,
    intensities: npt.ArrayLike,
    weights: npt.ArrayLike,
    models: list[tuple[Any, npt.ArrayLike, int, int, npt.ArrayLike]],
    n_params: int,
    kind: str = "schur",
    fixed_Ih: npt.ArrayLike | None = None,
    n_threads: int = 1,
    out: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None = None,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], float, int, npt.NDArray[np.float64],
           npt.NDArray[np.float64] | None, bool]: ...

def model_functional_and_gradient(
    group_offsets: npt.ArrayLike,
    intensities: npt.ArrayLike,
    weights: npt.ArrayLike,
    models: list[tuple[Any, npt.ArrayLike, int, int, npt.ArrayLike]],
    n_params: int,
    Ih: bool = False,  # noqa: N803
    n_threads: int = 1,
    g_out: npt.NDArray[np.float64] | None = None,
) -> tuple[float, npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64] | None]: ...

def fold_normal_matrix(matrix: npt.NDArray[np.float64]) -> None: ...

def normal_matrix_diagonal(
    group_offsets: npt.ArrayLike,
    intensities: npt.ArrayLike,
    weights: npt.ArrayLike,
    blocks: list[Any],
    n_params: int,
    fixed_Ih: npt.ArrayLike | None = None,
    check_structure: bool = True,
) -> npt.NDArray[np.float64]: ...

def calc_Ih(
    group_offsets: npt.ArrayLike,
    intensities: npt.ArrayLike,
    weights: npt.ArrayLike,
    g: npt.ArrayLike,
    n_threads: int = 1,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...

def calc_Ih_rows(
    order: npt.ArrayLike,
    group_offsets: npt.ArrayLike,
    intensities: npt.ArrayLike,
    weights: npt.ArrayLike,
    g: npt.ArrayLike,
) -> npt.NDArray[np.float64]: ...

def build_ih_block(
    sources: list[
        tuple[
            npt.NDArray[np.integer],
            int,
            npt.NDArray[np.integer],
            bool,
            npt.NDArray[np.integer] | None,
            npt.NDArray[np.integer] | None,
            Sequence[npt.NDArray[np.floating]],
        ]
    ],
    group_map: npt.NDArray[np.integer] | None,
    n_groups: int,
) -> tuple[
    list[npt.NDArray[np.float64]],
    npt.NDArray[np.int64],
    list[npt.NDArray[np.int64]],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.float64],
    npt.NDArray[np.uint8],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.float64],
]: ...

def sum_in_groups(group_offsets: npt.ArrayLike, values: npt.ArrayLike) -> npt.NDArray[np.float64]: ...

def max_threads() -> int: ...
def row_quadratic_forms(
    indptr: npt.ArrayLike,
    indices: npt.ArrayLike,
    values: npt.ArrayLike,
    V: npt.ArrayLike,
    n_threads: int = 1,
) -> npt.NDArray[np.float64]: ...
def cholesky_solve(lower: npt.ArrayLike, rhs: npt.ArrayLike) -> npt.NDArray[np.float64]: ...
