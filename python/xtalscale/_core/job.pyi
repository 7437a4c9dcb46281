"""Per-group kernels of the scaling job (see xtalscale.job.outlier_rejection)."""
import numpy as np
import numpy.typing as npt

def sum_in_groups(
    order: npt.ArrayLike, offsets: npt.ArrayLike, values: npt.ArrayLike
) -> npt.NDArray[np.float64]: ...
def weighted_group_sums(
    order: npt.ArrayLike,
    offsets: npt.ArrayLike,
    intensity: npt.ArrayLike,
    weight: npt.ArrayLike,
    scale: npt.ArrayLike,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def normdev_leave_one_out(
    order: npt.ArrayLike,
    offsets: npt.ArrayLike,
    intensity: npt.ArrayLike,
    weight: npt.ArrayLike,
    scale: npt.ArrayLike,
) -> npt.NDArray[np.float64]: ...
def normdev_simple(
    order: npt.ArrayLike,
    offsets: npt.ArrayLike,
    intensity: npt.ArrayLike,
    weight: npt.ArrayLike,
    scale: npt.ArrayLike,
) -> npt.NDArray[np.float64]: ...
def pick_group_outliers(
    order: npt.ArrayLike, offsets: npt.ArrayLike, abs_z: npt.ArrayLike, zmax: float
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
def limit_outlier_weights(
    order: npt.ArrayLike, offsets: npt.ArrayLike, weight: npt.ArrayLike
) -> npt.NDArray[np.float64]: ...
def select_rows_in_groups(
    order: npt.ArrayLike, offsets: npt.ArrayLike, keep: npt.ArrayLike
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
def error_model_bin_moments(
    numerator: npt.ArrayLike,
    variance: npt.ArrayLike,
    intensity_sq: npt.ArrayLike,
    bin: npt.ArrayLike,
    n_bins: int,
    b_squared: float,
    n_threads: int = 1,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def standard_outlier_rows(
    order: npt.ArrayLike,
    offsets: npt.ArrayLike,
    intensity: npt.ArrayLike,
    weight: npt.ArrayLike,
    scale: npt.ArrayLike,
    zmax: float,
    n_threads: int = 1,
) -> npt.NDArray[np.int64]: ...
def subset_grouping(
    order: npt.ArrayLike, offsets: npt.ArrayLike, keep: npt.ArrayLike, n_threads: int = 1
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
def gather_values(
    values: npt.ArrayLike, rows: npt.ArrayLike, out: npt.NDArray[np.float64] | None = None, n_threads: int = 1
) -> npt.NDArray[np.float64]: ...
def error_model_variances(
    variance: npt.ArrayLike, intensity: npt.ArrayLike, a: float, b: float, n_threads: int = 1
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def error_model_filter(
    order: npt.ArrayLike,
    offsets: npt.ArrayLike,
    intensity: npt.ArrayLike,
    variance: npt.ArrayLike,
    scale: npt.ArrayLike,
    considered: npt.ArrayLike,
    min_Ih: float,
    n_threads: int = 1,
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def error_model_normalised_deviations(
    deviation: npt.ArrayLike,
    variance: npt.ArrayLike,
    intensity: npt.ArrayLike,
    scale: npt.ArrayLike,
    a: float,
    b: float,
    n_threads: int = 1,
) -> npt.NDArray[np.float64]: ...
def rmeas_group_sums(
    order: npt.ArrayLike,
    offsets: npt.ArrayLike,
    intensity: npt.ArrayLike,
    variance: npt.ArrayLike,
    scale: npt.ArrayLike,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def filter_unfit_rows(
    methods: list[tuple[int, npt.ArrayLike, npt.ArrayLike]],
    flags: npt.ArrayLike | None,
    id: npt.ArrayLike | None,
    hkl: npt.ArrayLike | None,
    qe: npt.ArrayLike | None,
    partiality: npt.ArrayLike | None,
    partiality_cutoff: float,
    min_isigi: float,
) -> tuple[npt.NDArray[np.bool_], list[int]]: ...
def choose_initial_intensities(
    kind: str,
    correction: npt.ArrayLike,
    prf_value: npt.ArrayLike | None,
    prf_variance: npt.ArrayLike | None,
    sum_value: npt.ArrayLike | None,
    sum_variance: npt.ArrayLike | None,
    partiality: npt.ArrayLike | None,
    partiality_inv_variance: npt.ArrayLike | None,
    flags: npt.ArrayLike | None,
    prf_flag: int,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.bool_]]: ...
def error_model_search_b(
    numerator: npt.ArrayLike,
    variance: npt.ArrayLike,
    intensity_sq: npt.ArrayLike,
    bin: npt.ArrayLike,
    counts: npt.ArrayLike,
    weights: npt.ArrayLike,
    lo: float,
    hi: float,
    tol: float,
    n_threads: int = 1,
) -> float: ...
def esq_bin_sums(
    scaled_intensity: npt.ArrayLike, epsilon: npt.ArrayLike, bin: npt.ArrayLike, n_bins: int
) -> npt.NDArray[np.float64]: ...
def group_of_rows(order: npt.ArrayLike, offsets: npt.ArrayLike) -> npt.NDArray[np.int64]: ...
def esq_scaled_bin_sums(
    intensity: npt.ArrayLike, scale: npt.ArrayLike, epsilon: npt.ArrayLike, bin: npt.ArrayLike, n_bins: int
) -> npt.NDArray[np.float64]: ...
def esq_rows_above(
    intensity: npt.ArrayLike,
    scale: npt.ArrayLike,
    epsilon: npt.ArrayLike,
    group: npt.ArrayLike,
    group_norm: npt.ArrayLike,
    threshold: float,
    n_threads: int = 1,
) -> npt.NDArray[np.int64]: ...
def esq_values(
    scaled_intensity: npt.ArrayLike,
    epsilon: npt.ArrayLike,
    group: npt.ArrayLike,
    group_norm: npt.ArrayLike,
) -> npt.NDArray[np.float64]: ...
