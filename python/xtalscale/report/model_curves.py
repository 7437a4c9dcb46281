"""Scaling-model components evaluated on a grid, for the report's model plots.

The components are evaluated by the model code itself (a copy of each component is given
grid data instead of reflection data), so the curves are exactly what scaling applied.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np

__all__ = ["model_component_curves"]


def _model(experiment) -> Any:
    from ..models import model_from_dict

    model = getattr(experiment, "scaling_model", None)
    if model is None:
        return None
    if isinstance(model, dict):
        model = model_from_dict(model)
    return model


def _rotation_grid(config: dict, experiment, n_points: int) -> tuple[np.ndarray, np.ndarray]:
    """(φ in degrees, z in frames) over the model's valid range."""
    osc_start, osc_end = (float(v) for v in config["valid_osc_range"])
    phi = np.linspace(osc_start, osc_end, n_points)
    first_image = int(config["valid_image_range"][0])
    width = (experiment.scan.get_oscillation()[1] if experiment.scan is not None
             else (osc_end - osc_start) / max(np.ptp(config["valid_image_range"]) + 1, 1))
    scan_start = (experiment.scan.get_oscillation()[0] if experiment.scan is not None
                  else osc_start)
    first_frame = experiment.scan.get_image_range()[0] if experiment.scan is not None else 1
    z = (phi - scan_start) / width + (first_frame - 1)
    del first_image
    return phi, z


def _absorption_map(component, lmax: int, n_theta: int = 37, n_azimuth: int = 73):
    from .._core import components as kernel

    theta = np.linspace(0.0, 180.0, n_theta)
    azimuth = np.linspace(0.0, 360.0, n_azimuth)
    t, a = np.meshgrid(np.radians(theta), np.radians(azimuth), indexing="ij")
    v = np.stack([np.sin(t) * np.cos(a), np.sin(t) * np.sin(a), np.cos(t)], axis=-1)
    v = np.ascontiguousarray(v.reshape(-1, 3))
    angles = kernel.calc_theta_phi(v)
    table = kernel.sph_harm_table(angles, angles, lmax)
    c = copy.deepcopy(component)
    c.data = {"sph_harm_table": table.T}
    c.update_reflection_data()
    return theta, azimuth, np.asarray(c.calculate_scales(0)).reshape(n_theta, n_azimuth)


def model_component_curves(experiment, n_points: int = 200) -> dict | None:
    """Curves of the experiment's scaling-model components.

    Returns
    -------
    dict or None
        ``"scale"``: (φ, scale), ``"decay"``: (φ, B in Å²), ``"absorption"``:
        (θ, azimuth, map) for the components the model has; None without a model or without
        a rotation range (e.g. KB models of stills).
    """
    model = _model(experiment)
    if model is None:
        return None
    config = dict(model.configdict)
    components = model.components
    curves: dict = {}
    if "valid_osc_range" in config and "valid_image_range" in config:
        phi, z = _rotation_grid(config, experiment, n_points)
        if "scale" in components and "s_norm_fac" in config:
            c = copy.deepcopy(components["scale"])
            c.data = {"x": z * config["s_norm_fac"]}
            c.update_reflection_data()
            curves["scale"] = (phi, np.asarray(c.calculate_scales(0)))
        if "decay" in components and "d_norm_fac" in config:
            c = copy.deepcopy(components["decay"])
            # the decay term is exp(B / (2 d²)): at d² = 1/2 it is exp(B)
            c.data = {"x": z * config["d_norm_fac"], "d": np.full(z.shape, np.sqrt(0.5))}
            c.update_reflection_data()
            curves["decay"] = (phi, np.log(np.asarray(c.calculate_scales(0))))
    if "absorption" in components and "lmax" in config:
        curves["absorption"] = _absorption_map(components["absorption"], int(config["lmax"]))
    return curves or None
