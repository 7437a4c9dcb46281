"""cctbx import path ``cctbx.uctbx`` (facade): ``uctbx.unit_cell`` is
:class:`xtalscale.symmetry.UnitCell`, backed by gemmi.

Subset: ``unit_cell(parameters)`` (six numbers or a string of them) with ``parameters()``,
``reciprocal_parameters()``, ``reciprocal()``, ``volume()``, ``metrical_matrix()``,
``fractionalization_matrix()``, ``orthogonalization_matrix()``, ``d(hkl)``, ``d_star_sq(hkl)``,
``two_theta(hkl, wavelength, deg=False)`` and ``is_similar_to(other, ...)``.

gemmi is imported on first use of ``unit_cell``, not when this module is imported.
"""
from __future__ import annotations

__all__ = ["unit_cell"]  # noqa: F822  (provided lazily by __getattr__)


def __getattr__(name: str):
    if name == "unit_cell":
        from xtalscale.symmetry import UnitCell

        return UnitCell
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
