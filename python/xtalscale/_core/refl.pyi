# Type stubs for xtalscale._core.refl (legacy DIALS pickle column codec).
import numpy as np
import numpy.typing as npt

def decode_base256_column(
    payload: bytes, kind: str, ncomp: int = 1, what: str = "column"
) -> npt.NDArray[np.generic]: ...
def encode_base256_column(values: npt.ArrayLike, kind: str) -> bytes: ...
