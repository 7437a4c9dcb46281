"""Timing helper shared by the bench scripts (run them from the repository root or bench/)."""
from __future__ import annotations

import time
from typing import Callable


def best_time(fn: Callable[[], object], repeat: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """Shortest of ``repeat`` timed calls of ``fn``: the least disturbed run on a shared machine.

    ``clock`` defaults to wall time; pass ``time.thread_time`` to count only this thread's CPU.
    """
    best = float("inf")
    for _ in range(repeat):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def best_times_alternating(first: Callable[[], object], second: Callable[[], object],
                           repeat: int = 5) -> tuple[float, float]:
    """Shortest of ``repeat`` timed calls of each of two functions, called in alternation, so
    that a change in the machine's load during the measurement reaches both alike."""
    best_first = best_second = float("inf")
    for _ in range(repeat):
        best_first = min(best_first, best_time(first, 1))
        best_second = min(best_second, best_time(second, 1))
    return best_first, best_second
