"""The engines' dense algebra runs with one BLAS thread, and the caller's limit comes back."""
from threadpoolctl import threadpool_info

from xtalscale.fit.blas import single_threaded_blas


def _blas_threads() -> list[int]:
    return [int(lib["num_threads"]) for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_one_blas_thread_inside_and_the_previous_limits_after():
    import numpy as np  # noqa: F401  (loads numpy's BLAS, so threadpoolctl sees it)
    import scipy.linalg  # noqa: F401  (and scipy's)

    before = _blas_threads()
    assert before, "no BLAS library found in the process"
    with single_threaded_blas():
        assert _blas_threads() == [1] * len(before)
    assert _blas_threads() == before
