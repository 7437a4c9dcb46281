"""Reciprocal ASU mapping kernel (see xtalscale.symmetry.map_to_asu)."""
import numpy as np
import numpy.typing as npt

def map_to_asu(
    hkl: npt.ArrayLike,
    rotations: npt.ArrayLike,
    basis: npt.ArrayLike,
    condition: int,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]: ...

def group_keys(
    keys: npt.ArrayLike,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...

def group_miller_indices(
    hkl: npt.ArrayLike,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
