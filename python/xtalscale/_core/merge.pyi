"""Merging kernels: French–Wilson truncation (see xtalscale.merge.french_wilson)."""
import numpy as np
import numpy.typing as npt

def french_wilson(
    intensity: npt.ArrayLike,
    sigma: npt.ArrayLike,
    expected: npt.ArrayLike,
    centric: npt.ArrayLike,
    h_min: float = -4.0,
    n_threads: int = 1,
) -> tuple[
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.bool_],
]: ...
def french_wilson_moments(h: float, centric: bool) -> tuple[float, float, float, float]: ...
