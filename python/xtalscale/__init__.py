"""xtalscale: DIALS-compatible crystallographic scaling on a fast Eigen/C++17 core.

The package mirrors the layout of ``dials`` where DIALS scripts import from
(``xtalscale.algorithms.scaling...``, ``xtalscale.array_family.flex``), so an
existing DIALS-style script runs after changing only its import lines.

Naming convention (as in DIALS): the product of a model's component values is the
*inverse scale factor* ``g``; observed ``I ~ g * I_true`` and scaled ``I = I_obs / g``.
"""
from __future__ import annotations

import os
from pathlib import Path

# The kernels' OpenMP threads spin only briefly (~30k iterations, tens of µs) when a parallel
# region ends, then sleep, unless the caller chose a wait policy or spin count: the job alternates
# short threaded kernels with serial Python. With libgomp's default (300k) a spinning worker held
# the second core through the serial parts, and when another process wanted that core the
# 10⁶-observation job took 6–7 s instead of 2.7 s; with no spin at all (passive) each of the
# thousands of back-to-back kernels of a 60-sweep job waits for a sleeping worker (9.2 s against
# 8.2 s). Read once, when the OpenMP runtime loads with the extension below (no effect if
# another module loaded it first).
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "30000"

from . import _core  # noqa: E402

__version__: str = _core.__version__

__all__ = ["__version__", "get_include", "get_cmake_dir", "inverse_scale_factors"]


def __getattr__(name: str):
    # Lazy: `import xtalscale` stays cheap; the models (and scipy) load on first use.
    if name == "inverse_scale_factors":
        from .models import inverse_scale_factors

        return inverse_scale_factors
    raise AttributeError(f"module 'xtalscale' has no attribute {name!r}")


def get_include() -> str:
    """Directory holding the installed C++ headers (``xtalscale/*.hpp``).

    Returns
    -------
    str
        Absolute path; add it to a compiler's include path.
    """
    return str(Path(__file__).resolve().parent / "include")


def get_cmake_dir() -> str:
    """Directory holding ``xtalscaleConfig.cmake`` of this installation.

    Returns
    -------
    str
        Pass it to CMake as ``-Dxtalscale_DIR=...`` so that
        ``find_package(xtalscale REQUIRED)`` finds the target ``xtalscale::core``.
    """
    return str(Path(__file__).resolve().parent / "lib" / "cmake" / "xtalscale")
