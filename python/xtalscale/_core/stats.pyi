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
def normal_quantile(p: npt.ArrayLike) -> npt.NDArray[np.float64]: ...
def normal_cdf(x: npt.ArrayLike) -> npt.NDArray[np.float64]: ...
def erf(x: npt.ArrayLike) -> npt.NDArray[np.float64]: ...
def student_t_quantile(df: float, p: float) -> float: ...
