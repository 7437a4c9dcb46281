"""Merging-statistics kernels (see xtalscale.stats.merging)."""
import numpy as np
import numpy.typing as npt

def merging_statistics(
    intensity: npt.ArrayLike,
    sigma: npt.ArrayLike,
    friedel_minus: npt.ArrayLike | None,
    order: npt.ArrayLike,
    offsets: npt.ArrayLike,
    group_shell: npt.ArrayLike,
    group_centric: npt.ArrayLike | None,
    n_shells: int,
    use_internal_variance: bool = False,
    anomalous: bool = False,
    seed: int = 0,
    sigma_dynamic_range: float = 1e-06,
    weighted_halves: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]: ...

def normalised_deviations(
    intensity: npt.ArrayLike,
    sigma: npt.ArrayLike,
    order: npt.ArrayLike,
    offsets: npt.ArrayLike,
) -> npt.NDArray[np.float64]: ...

def batch_sums(
    intensity: npt.ArrayLike,
    sigma: npt.ArrayLike,
    order: npt.ArrayLike,
    offsets: npt.ArrayLike,
    batch_index: npt.ArrayLike,
    n_batches: int,
) -> tuple[
    npt.NDArray[np.int64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
]: ...

def deviations_and_batch_sums(
    intensity: npt.ArrayLike,
    sigma: npt.ArrayLike,
    order: npt.ArrayLike,
    offsets: npt.ArrayLike,
    batch_index: npt.ArrayLike,
    n_batches: int,
) -> tuple[
    npt.NDArray[np.float64],
    npt.NDArray[np.int64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
]: ...
def merging_statistics_both(
    intensity: npt.ArrayLike,
    sigma: npt.ArrayLike,
    friedel_minus: npt.ArrayLike | None,
    order: npt.ArrayLike,
    offsets: npt.ArrayLike,
    group_shell: npt.ArrayLike,
    group_centric: npt.ArrayLike | None,
    n_shells: int,
    use_internal_variance: bool = False,
    seed: int = 0,
    sigma_dynamic_range: float = 1e-06,
    weighted_halves: bool = True,
) -> tuple[
    tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
    tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
]: ...

def grouped_deviations_and_batch_sums(
    intensity: npt.ArrayLike,
    sigma: npt.ArrayLike,
    offsets: npt.ArrayLike,
    mean: npt.ArrayLike,
    position: npt.ArrayLike,
    n_out: int,
    batch_index: npt.ArrayLike,
    n_batches: int,
) -> tuple[
    npt.NDArray[np.float64],
    npt.NDArray[np.int64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
]: ...

def classify_scaled_rows(
    id: npt.ArrayLike | None,
    flags: npt.ArrayLike | None,
    bad_bits: int,
    g: npt.ArrayLike,
    variance: npt.ArrayLike,
    partiality: npt.ArrayLike | None,
    threshold: float,
    hkl: npt.ArrayLike,
) -> tuple[npt.NDArray[np.uint8], dict[str, object]]: ...

def gather_scaled_rows(
    code: npt.ArrayLike,
    n_out: int,
    value: npt.ArrayLike,
    variance: npt.ArrayLike,
    g: npt.ArrayLike,
    apply_inverse_scale: bool,
    hkl: npt.ArrayLike,
    id: npt.ArrayLike | None,
    xyz: npt.ArrayLike | None,
) -> tuple[
    npt.NDArray[np.int64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.int32],
    npt.NDArray[np.int64],
    npt.NDArray[np.float64] | None,
]: ...

def quasi_normalised_e_squared(
    d_star_sq: npt.ArrayLike,
    intensity: npt.ArrayLike,
    epsilon: np.ndarray,
    lo: float,
    step: float,
    n_shells: int,
) -> npt.NDArray[np.float64]: ...

def sorted_values_at(
    values: npt.ArrayLike, positions: npt.ArrayLike
) -> npt.NDArray[np.float64] | None: ...
def normal_quantile(p: npt.ArrayLike) -> npt.NDArray[np.float64]: ...
def normal_cdf(x: npt.ArrayLike) -> npt.NDArray[np.float64]: ...
def erf(x: npt.ArrayLike) -> npt.NDArray[np.float64]: ...
def student_t_quantile(df: float, p: float) -> float: ...
