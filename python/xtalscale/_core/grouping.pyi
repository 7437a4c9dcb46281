"""Reciprocal ASU mapping kernel (see xtalscale.symmetry.map_to_asu)."""
from typing import ClassVar

import numpy as np
import numpy.typing as npt

class AsuCondition:
    """Reciprocal-ASU condition of a Laue class (reference setting)."""

    __members__: ClassVar[dict[str, AsuCondition]]
    triclinic: ClassVar[AsuCondition]
    monoclinic: ClassVar[AsuCondition]
    orthorhombic: ClassVar[AsuCondition]
    tetragonal_low: ClassVar[AsuCondition]
    tetragonal_high: ClassVar[AsuCondition]
    trigonal_low: ClassVar[AsuCondition]
    trigonal_312: ClassVar[AsuCondition]
    trigonal_321: ClassVar[AsuCondition]
    cubic_low: ClassVar[AsuCondition]
    cubic_high: ClassVar[AsuCondition]
    def __init__(self, value: int) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def __ne__(self, other: object) -> bool: ...
    def __hash__(self) -> int: ...
    def __index__(self) -> int: ...
    def __int__(self) -> int: ...
    def __getstate__(self) -> int: ...
    def __setstate__(self, state: int) -> None: ...
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...

def asu_condition_text(condition: AsuCondition) -> str: ...

def centric_flags(hkl: npt.ArrayLike, rotations: npt.ArrayLike, n_threads: int = 1) -> npt.NDArray[np.bool_]: ...
def map_to_asu(
    hkl: npt.ArrayLike,
    rotations: npt.ArrayLike,
    basis: npt.ArrayLike,
    condition: int,
    n_threads: int = 1,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]: ...

def map_to_asu_bijvoet(
    hkl: npt.ArrayLike,
    rotations: npt.ArrayLike,
    basis: npt.ArrayLike,
    condition: int,
    n_threads: int = 1,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.bool_]]: ...

def group_keys(
    keys: npt.ArrayLike,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...

def counting_order(
    keys: npt.ArrayLike, n_keys: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...

def group_miller_indices(
    hkl: npt.ArrayLike,
    n_threads: int = 1,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
def split_bijvoet_groups(
    order: npt.ArrayLike,
    offsets: npt.ArrayLike,
    keys: npt.ArrayLike,
    minus: npt.ArrayLike,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
