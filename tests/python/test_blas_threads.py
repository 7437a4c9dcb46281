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


def _printed_in_fresh_processes(code: str, variable: str, value: str) -> tuple[str, str]:
    """What ``code`` prints in a fresh interpreter without ``variable`` in its environment,
    and with ``variable=value``."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != variable}
    outputs = [subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,
                              check=True).stdout.strip() for e in (env, {**env, variable: value})]
    return outputs[0], outputs[1]


def test_command_line_starts_openblas_with_one_thread_only_in_a_fresh_process(monkeypatch):
    """``main`` sets OPENBLAS_NUM_THREADS only before numpy loads (and keeps a user's value)."""
    import os

    from xtalscale.cli import _one_blas_thread_from_load

    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    _one_blas_thread_from_load()  # numpy is loaded in this test process: nothing changes
    assert "OPENBLAS_NUM_THREADS" not in os.environ
    code = ("import os, sys; from xtalscale.cli import _one_blas_thread_from_load; "
            "_one_blas_thread_from_load(); print(os.environ.get('OPENBLAS_NUM_THREADS'))")
    assert _printed_in_fresh_processes(code, "OPENBLAS_NUM_THREADS", "3") == ("1", "3")


def test_openmp_workers_spin_briefly_unless_the_caller_chose_a_policy():
    """``import xtalscale`` gives the OpenMP runtime (which reads it when the extension loads
    it) a short spin count, and leaves a caller's spin count or wait policy alone."""
    report = "import xtalscale; print(os.environ.get('GOMP_SPINCOUNT'))"
    code = "import os; os.environ.pop('OMP_WAIT_POLICY', None); " + report
    assert _printed_in_fresh_processes(code, "GOMP_SPINCOUNT", "5") == ("30000", "5")
    policy = "import os; os.environ['OMP_WAIT_POLICY'] = 'active'; " + report
    assert _printed_in_fresh_processes(policy, "GOMP_SPINCOUNT", "5") == ("None", "5")
