"""cctbx import path ``cctbx.uctbx`` (facade): ``uctbx.unit_cell`` is
:class:`xtalscale.symmetry.UnitCell`, backed by gemmi.

Subset: ``unit_cell(parameters)`` (six numbers or a string of them) with ``parameters()``,
``reciprocal_parameters()``, ``reciprocal()``, ``volume()``, ``metrical_matrix()``,
``fractionalization_matrix()``, ``orthogonalization_matrix()``, ``d(hkl)``, ``d_star_sq(hkl)``,
``two_theta(hkl, wavelength, deg=False)`` and ``is_similar_to(other, ...)``.
"""
from __future__ import annotations

from xtalscale.symmetry import UnitCell as unit_cell  # noqa: N813  (cctbx's name)

__all__ = ["unit_cell"]
