"""DIALS's Gaussian-smoother window rule in plain numpy, for the bench scripts' reference code."""
from __future__ import annotations

import numpy as np


def numpy_axis_window(z, nvalues, naverage):
    """Window of every normalised coordinate ``z`` on an axis of ``nvalues`` values.

    Returns ``first`` and ``count`` (int64 arrays: the window is values ``first .. first +
    count - 1``), the largest window ``width`` and ``pos0``, the position of value 0 (so value
    ``j`` sits at ``j + pos0``). Round half away from zero, windows clipped to at least 2 values
    at the ends, all values on axes of at most 3 (spec 3.2).
    """
    if nvalues <= 3:
        first = np.zeros(z.shape, dtype=np.int64)
        return first, np.full(z.shape, nvalues), nvalues, 0.0
    v = z - naverage / 2.0
    i1 = (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int64) + 1  # half away from 0
    i2 = i1 + naverage
    low = i1 < 0
    i1 = np.where(low, 0, i1)
    i2 = np.where(low, np.maximum(i2, 2), i2)
    high = i2 > nvalues
    i2 = np.where(high, nvalues, i2)
    i1 = np.where(high, np.minimum(i1, nvalues - 2), i1)
    return i1, i2 - i1, max(naverage, 2), -0.5
