"""Weighting schemes for scaling (DIALS ``dials.algorithms.scaling.weighting``).

A scheme object is given an Ih table (anything with ``variances``, ``intensities``,
``inverse_scale_factors``, ``Ih_values``, ``size`` and a settable ``weights``) and sets its
weights:

* ``invvar`` (:class:`WeightingBase`, the default): w = 1 / σ², not iterated;
* ``unity`` (:class:`UnityWeights`): w = 1;
* the M-estimators, which start from 1 / σ² and are then re-weighted by
  :meth:`~WeightingBase.apply_iterative_weights` from the relative residual
  e = (I - g Ĩ) / (g Ĩ):

  - ``GM`` (:class:`GemanMcClureWeights`): w = 1 / (1 + e²)²;
  - ``cauchy`` (:class:`CauchyWeights`): w = 1 / (1 + (e / c)²), c = 2.385;
  - ``huber`` (:class:`HuberWeights`): w = 1 for |e| ≤ c, c / |e| beyond, c = 1.345
    (c values for 95 % efficiency at the normal distribution, as DIALS).

The formulas are DIALS's. Where DIALS would divide by zero the weight here is 0 instead of
inf or NaN: a variance ≤ 0 or non-finite gives w = 0 under ``invvar``, and a non-finite
relative residual (g Ĩ = 0) gives w = 0 under the M-estimators; the observation then simply
does not take part in that fit. Everything is vectorised (no loop over observations).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..flex_arrays import double

__all__ = [
    "CauchyWeights",
    "GemanMcClureWeights",
    "HuberWeights",
    "UnityWeights",
    "WeightingBase",
    "get_weighting_scheme",
]


def _array(table: Any, name: str) -> np.ndarray:
    return np.asarray(getattr(table, name), dtype=np.float64).reshape(-1)


def _relative_residuals(table: Any) -> np.ndarray:
    """e = (I - g Ĩ) / (g Ĩ), NaN where g Ĩ is zero or a value is not finite."""
    gi = _array(table, "inverse_scale_factors") * _array(table, "Ih_values")
    intensities = _array(table, "intensities")
    if gi.shape != intensities.shape:
        raise ValueError(f"Ih table has {intensities.size} intensities but {gi.size} "
                         "inverse scale factors / Ih values")
    with np.errstate(divide="ignore", invalid="ignore"):
        return (intensities - gi) / gi


def _set_weights(table: Any, weights: np.ndarray) -> None:
    table.weights = double(np.where(np.isfinite(weights), weights, 0.0))


class WeightingBase:
    """Inverse-variance weights (``invvar``); the base of the other schemes."""

    weighting_scheme = "invvar"

    def __init__(self, Ih_table: Any) -> None:
        self.Ih_table = Ih_table

    def calculate_initial_weights(self) -> None:
        """Set w = 1 / σ² (0 where σ² ≤ 0 or is not finite)."""
        variances = _array(self.Ih_table, "variances")
        with np.errstate(divide="ignore", invalid="ignore"):
            w = np.where(variances > 0, 1.0 / variances, 0.0)
        _set_weights(self.Ih_table, w)

    def apply_iterative_weights(self) -> None:
        """Re-weight from the current fit (nothing to do for inverse-variance weights)."""


class UnityWeights(WeightingBase):
    """Unit weights."""

    weighting_scheme = "unity"

    def calculate_initial_weights(self) -> None:
        _set_weights(self.Ih_table, np.ones(int(self.Ih_table.size)))


class GemanMcClureWeights(WeightingBase):
    """Geman-McClure M-estimator weights, w = 1 / (1 + e²)²."""

    weighting_scheme = "GM"

    def apply_iterative_weights(self) -> None:
        e = _relative_residuals(self.Ih_table)
        _set_weights(self.Ih_table, 1.0 / (1.0 + e * e) ** 2)


class CauchyWeights(WeightingBase):
    """Cauchy M-estimator weights, w = 1 / (1 + (e / c)²)."""

    weighting_scheme = "cauchy"
    c = 2.385

    def apply_iterative_weights(self) -> None:
        e = _relative_residuals(self.Ih_table) / self.c
        _set_weights(self.Ih_table, 1.0 / (1.0 + e * e))


class HuberWeights(WeightingBase):
    """Huber M-estimator weights, w = 1 for |e| ≤ c, c / |e| beyond."""

    weighting_scheme = "huber"
    c = 1.345

    def apply_iterative_weights(self) -> None:
        abs_e = np.abs(_relative_residuals(self.Ih_table))
        with np.errstate(divide="ignore", invalid="ignore"):
            w = np.where(abs_e > self.c, self.c / abs_e, 1.0)
        w[np.isnan(abs_e)] = 0.0
        _set_weights(self.Ih_table, w)


_SCHEMES = {
    "invvar": WeightingBase,
    None: WeightingBase,
    "unity": UnityWeights,
    "GM": GemanMcClureWeights,
    "cauchy": CauchyWeights,
    "huber": HuberWeights,
}


def get_weighting_scheme(Ih_table: Any, weighting_scheme: Any) -> WeightingBase:
    """The scheme object for ``weighting_scheme`` (``invvar`` / None, ``unity``, ``GM``,
    ``cauchy``, ``huber``).

    Raises
    ------
    ValueError
        For any other name.
    """
    try:
        scheme = _SCHEMES[weighting_scheme]
    except (KeyError, TypeError):
        raise ValueError(f"Invalid choice of weighting scheme: {weighting_scheme!r} (choose "
                         "from invvar, unity, GM, cauchy, huber)") from None
    return scheme(Ih_table)
