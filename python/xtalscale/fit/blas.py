"""BLAS threads for the engine's small dense algebra.

The normal matrices the engines factorise are small (tens to a few hundred parameters). A
multi-threaded BLAS gains nothing there and loses much: with OpenBLAS's default of one thread
per core a 230 × 230 Cholesky took 7.8 ms instead of 0.7 ms on our 2-core machine, and
seconds per call when the cores were busy (its threads spin while they wait). The engines
parallelise where the work is (the per-observation kernels, ``n_threads``), so they run their
dense algebra with one BLAS thread. ``threadpoolctl`` sets and restores the limit for every
BLAS library loaded in the process (numpy's and scipy's may be two).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["single_threaded_blas"]


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run the block with one BLAS thread, then restore the previous limits (~0.4 ms)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield
