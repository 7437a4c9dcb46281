"""Scaling models: collections of scale components composed into one inverse scale factor.

Naming convention (the same as DIALS, and easy to get backwards)
----------------------------------------------------------------
The product of a model's component values for a reflection is its **inverse
scale factor** ``g``: the model says the observed intensity is ``I_obs ≈ g·I``,
so the *scaled* intensity is ``I_obs / g`` (with sigma ``σ_obs / g``). DIALS
stores ``g`` in the reflection-table column ``inverse_scale_factor``.

* :meth:`ScalingModelBase.get_scales` returns ``g`` (the product of the
  components), as the commissioning API defines it.
* :meth:`ScalingModelBase.get_inverse_scales` returns ``1/g``, the factor that
  *multiplies* observed intensities to put them on a common scale.
* :func:`inverse_scale_factors` evaluates each experiment's stored model and
  returns ``g`` in table order: compare it with (or write it to)
  ``reflections["inverse_scale_factor"]``.

Contents
--------
* :class:`ScalingModelBase` and the four built-in models
  :class:`PhysicalScalingModel` (``"physical"``), :class:`KBScalingModel`
  (``"KB"``), :class:`ArrayScalingModel` (``"array"``) and :class:`DoseDecay`
  (``"dose_decay"``), with DIALS's defaults, automatic parameterisation,
  image-range limiting and ``.expt`` serialisation (spec section 4).
* A model registry: :func:`register_scaling_model`, :func:`model_from_dict`,
  :func:`create_scaling_model`. Packages can also register models through the
  entry-point group ``xtalscale.scaling_model_ext`` (DIALS: ``dxtbx.scaling_model_ext``).
* Parameter-layout helpers :func:`initialise_smooth_input`,
  :func:`calc_n_param_from_bins`, :func:`calculate_new_offset`,
  :func:`determine_auto_absorption_params`.
* :func:`default_model_params`, a phil-like namespace with DIALS's defaults.
"""
from __future__ import annotations

import copy
import math
import threading
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

from ._core import components as _kern
from ._rows import take_rows
from .reflection_table import Flags

__all__ = [
    "AUTO",
    "ScalingModelError",
    "ScalingModelBase",
    "PhysicalScalingModel",
    "KBScalingModel",
    "ArrayScalingModel",
    "DoseDecay",
    "register_scaling_model",
    "unregister_scaling_model",
    "scaling_model_class",
    "registered_scaling_models",
    "model_from_dict",
    "create_scaling_model",
    "default_model_params",
    "initialise_smooth_input",
    "calc_n_param_from_bins",
    "calculate_new_offset",
    "determine_auto_absorption_params",
    "legacy_crystal_frame_vectors",
    "inverse_scale_factors",
    "suitable_for_scaling",
]

#: Marker for "choose automatically" options (DIALS phil ``Auto``).
AUTO = "auto"

#: Above this many reflections the absorption harmonics use DIALS's 0.5° lookup table.
SH_LOOKUP_THRESHOLD = 100000

class ScalingModelError(ValueError):
    """A scaling-model configuration or parameter set is inconsistent."""


def _is_auto(value: Any) -> bool:
    """True for DIALS's ``Auto`` (libtbx or freephil) or the string "auto" (None is *not* auto)."""
    return ((isinstance(value, str) and value.lower() == "auto")
            or type(value).__name__ in ("Auto", "AutoType"))


# ==========================================================================
# parameter-layout helpers (spec section 4.1)
# ==========================================================================
def initialise_smooth_input(osc_range: Sequence[float], one_osc_width: float,
                            interval: float) -> tuple[int, float, float]:
    """Number of smoother parameters for a rotation range and a target interval.

    Parameters
    ----------
    osc_range : (float, float)
        Start and end of the rotation range (degrees).
    one_osc_width : float
        Rotation per image (degrees).
    interval : float
        Requested maximum parameter spacing (degrees).

    Returns
    -------
    n_param : int
        Number of parameters (2, 3, or n_bins + 2).
    norm_fac : float
        Factor turning a z pixel (image) coordinate into smoother units:
        ``0.999 * one_osc_width / rot_int``.
    rot_int : float
        The actual rotation interval between parameters (degrees).
    """
    interval = float(interval) + 1e-5  # DIALS's fudge: a range of exactly k intervals gives k bins
    span = float(osc_range[1]) - float(osc_range[0])
    if not (math.isfinite(span) and span > 0):
        raise ValueError(f"osc_range must be increasing and finite (got {tuple(osc_range)})")
    if not (math.isfinite(one_osc_width) and one_osc_width > 0):
        raise ValueError(f"one_osc_width must be positive (got {one_osc_width})")
    if span < 2.0 * interval:
        if span <= interval:
            rot_int, n_param = span, 2
        else:
            rot_int, n_param = span / 2.0, 3
    else:
        n_bins = max(int(span / interval) + 1, 3)
        rot_int = span / float(n_bins)
        n_param = n_bins + 2
    return n_param, 0.999 * one_osc_width / rot_int, rot_int


def calc_n_param_from_bins(value_min: float, value_max: float, n_bins: int) -> tuple[int, float]:
    """Smoother parameter count and bin width for ``n_bins`` bins over a value range.

    Raises
    ------
    ValueError
        If ``n_bins`` is not a positive int (the exception is also an
        ``AssertionError``, which DIALS raises here).
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins <= 0:
        raise _BinsError(f"n_bins must be a positive int (got {n_bins!r})")
    bin_width = (value_max - value_min) / n_bins
    n_param = 2 if n_bins == 1 else 3 if n_bins == 2 else int(n_bins) + 2
    return n_param, bin_width


class _BinsError(ValueError, AssertionError):
    """Bad bin count (ValueError here, AssertionError in DIALS)."""


def calculate_new_offset(current_image_0: int, new_image_0: int, new_norm_fac: float,
                         n_old_param: int, n_new_param: int) -> int:
    """Index of the first old parameter kept when the image range is reduced."""
    if n_old_param == 2:
        return 0  # a smoother cannot have fewer than two parameters
    batch_difference = (new_image_0 - current_image_0) * new_norm_fac
    n_to_shift = int(batch_difference // 1)
    if batch_difference % 1 > 0.5:
        n_to_shift += 1
    return min(n_old_param - n_new_param, n_to_shift)


def determine_auto_absorption_params(level: str) -> tuple[int, float]:
    """``(lmax, surface_weight)`` for an absorption level: low (4, 5e5), medium (6, 5e4), high (6, 5e3)."""
    if level == "high":
        return 6, 5e3
    if level == "medium":
        return 6, 5e4
    return 4, 5e5


# ==========================================================================
# default options (a phil-like namespace)
# ==========================================================================
def default_model_params(**overrides: Any) -> SimpleNamespace:
    """DIALS's model options as a nested namespace (``params.physical.lmax`` ...).

    Parameters
    ----------
    **overrides
        Dotted option names with ``__`` for dots, e.g.
        ``default_model_params(physical__absorption_level="high", model="KB")``.

    Returns
    -------
    types.SimpleNamespace
        ``model`` plus one sub-namespace per built-in model, with ``"auto"``
        where DIALS uses ``Auto``.
    """
    def ns(**kw: Any) -> SimpleNamespace:
        return SimpleNamespace(**kw)

    def base() -> dict[str, Any]:
        return {"correction": ns(fix=None), "analytical_correction": False}

    params = ns(
        model=None,
        physical=ns(scale_interval=AUTO, decay_correction=True, decay_interval=AUTO, decay_restraint=1e-1,
                    absorption_correction=AUTO, absorption_level=None, lmax=AUTO, surface_weight=AUTO,
                    share=ns(absorption=False), fix_initial=True, **base()),
        KB=ns(decay_correction=True, **base()),
        array=ns(decay_correction=True, decay_interval=20.0, n_resolution_bins=10, absorption_correction=True,
                 n_absorption_bins=3, modulation_correction=False, n_modulation_bins=20, **base()),
        dose_decay=ns(scale_interval=2.0, relative_B_correction=True, decay_correction=True,
                      share=ns(decay=True), resolution_dependence="quadratic", absorption_correction=False,
                      lmax=4, surface_weight=1e6, fix_initial=True, **base()),
    )
    for key, value in overrides.items():
        *path, last = key.split("__")
        target = params
        for part in path:
            if not hasattr(target, part):
                raise KeyError(f"unknown option {key.replace('__', '.')!r}")
            target = getattr(target, part)
        if not hasattr(target, last):
            raise KeyError(f"unknown option {key.replace('__', '.')!r}")
        setattr(target, last, value)
    return params


def _opt(params: Any, section: str, name: str, default: Any) -> Any:
    """``params.<section>.<name>``, or ``default`` when params lacks it."""
    sec = getattr(params, section, None) if params is not None else None
    if sec is None:
        return default
    return getattr(sec, name, default)


# ==========================================================================
# reflection-table access (works with flex tables, dicts of arrays, ...)
# ==========================================================================
def _nrows(table: Any) -> int:
    """Row count of a flex table, a dict of columns or a sized sequence."""
    if hasattr(table, "size") and callable(table.size):
        return int(table.size())
    if isinstance(table, Mapping):
        return len(next(iter(table.values()))) if table else 0
    return int(len(table))


def _column(table: Any, name: str) -> np.ndarray:
    if name not in table:
        raise KeyError(f"reflection table has no column {name!r}")
    return np.asarray(table[name])


def _bins(values: np.ndarray, start: float, width: float, inverse_square: bool = False) -> np.ndarray:
    """(v − start)/width with DIALS's operations (v = 1/values² with ``inverse_square``), in
    one pass over a possibly strided column."""
    return _kern.bin_coordinates(values, float(start), float(width), inverse_square)


def _z_px(table: Any) -> np.ndarray:
    xyz = _column(table, "xyzobs.px.value")
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"column 'xyzobs.px.value' must be n x 3 (got shape {xyz.shape})")
    return np.ascontiguousarray(xyz[:, 2], dtype=np.float64)


class _Columns(dict):
    """Minimal reflection table: a dict of numpy columns with ``size()``/``select()``."""

    def size(self) -> int:
        return len(next(iter(self.values()))) if dict.__len__(self) else 0

    def __len__(self) -> int:  # a table's len is its row count, as for flex tables
        return self.size()

    def select(self, mask: Any) -> "_Columns":
        return _Columns({k: np.asarray(v)[mask] for k, v in self.items()})


# ==========================================================================
# components (owned by xtalscale.components; imported lazily so that this
# module imports even while the component layer is being rebuilt)
# ==========================================================================
def _components_module() -> Any:
    from . import components  # noqa: PLC0415

    return components


def _make_component(class_name: str, values: Any, esds: Any = None, **kwargs: Any) -> Any:
    cls = getattr(_components_module(), class_name)
    values = np.asarray(values, dtype=np.float64)
    if esds is not None:
        esds = np.asarray(esds, dtype=np.float64)
        if esds.size == 0:
            esds = None
    return cls(values, parameter_esds=esds, **kwargs) if kwargs else cls(values, esds)


def _is_seed_component(comp: Any) -> bool:
    """True for a commissioning-API component: built on a parameter manager, evaluated on a table."""
    return bool(getattr(comp, "_seed_form", False)) or (
        hasattr(comp, "active_parameter_manager") and not hasattr(comp, "calculate_scales"))


# ==========================================================================
# the base class
# ==========================================================================
_NORMALISATION_KEYS = ("s_norm_fac", "d_norm_fac")


def _check_normalisation(configdict: Mapping[str, Any]) -> None:
    """Smoother normalisation factors (x = z * norm_fac) must be finite and > 0: a stored 0
    would put every row at the first smoother point and give silently wrong scales. The
    absorption settings must be numbers too (lmax an integer 0..50: DIALS uses 4-6)."""
    checks = [(key, lambda v: v > 0, "> 0") for key in _NORMALISATION_KEYS]
    checks += [("abs_surface_weight", lambda v: v >= 0, ">= 0"),
               ("lmax", lambda v: v == int(v) and 0 <= v <= 50, "an integer in 0..50")]
    for key, valid, what in checks:
        if key in configdict:
            value = configdict[key]
            number = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
            if not (number and np.isfinite(value) and valid(value)):
                shown = value if number else type(value).__name__
                raise ScalingModelError(f"configuration_parameters[{key!r}] must be a finite "
                                        f"number {what} (got {shown})")


class ScalingModelBase:
    """Base class of scaling models: named components whose values multiply to ``g``.

    Parameters
    ----------
    configdict : dict
        Model configuration, serialised as ``configuration_parameters``. The
        built-in models require a non-empty ``"corrections"`` list; a custom
        model may omit the key.
    is_scaled : bool, optional
        Whether the parameters have been refined.

    Notes
    -----
    Subclasses fill ``self._components`` (a dict; its insertion order is the
    parameter order) in ``__init__`` or in :meth:`configure_components`.
    ``components`` returns that dict; a custom model may override it (the
    commissioning API's custom models return a list). :meth:`get_scales`
    returns ``g``, the product of the component values (the *inverse* scale
    factor in DIALS's naming); :meth:`get_inverse_scales` returns ``1/g``.
    """

    id_: str | None = None
    #: Names allowed in ``configdict["corrections"]`` (None: anything, for custom models).
    allowed_corrections: tuple[str, ...] | None = None

    def __init__(self, configdict: Mapping[str, Any], is_scaled: bool = False) -> None:
        if not isinstance(configdict, Mapping):
            raise TypeError(f"configdict must be a dict (got {type(configdict).__name__})")
        if "corrections" in configdict or self.allowed_corrections is not None:
            corrections = configdict.get("corrections")
            if not corrections:
                raise ValueError("No model components created: configdict['corrections'] is missing or empty")
            self._check_corrections(corrections)
        _check_normalisation(configdict)
        self._components: dict[str, Any] = {}
        self._configdict = configdict
        self._is_scaled = bool(is_scaled)
        self._error_model = None
        self._fixed_components: list[str] = []
        self._experiment = None
        self._configured_rows: int | None = None
        #: Top-level keys of a deserialised dict that this class does not
        #: interpret (e.g. the pre-2020 ``"is_scaled"``); written back by ``to_dict``.
        self.serialisation_extras: dict[str, Any] = {}
        #: Crystal-frame convention used for absorption directions: "current" or "legacy".
        self.crystal_frame = "current"

    def _check_corrections(self, corrections: Any) -> None:
        if isinstance(corrections, str) or not isinstance(corrections, Sequence):
            raise TypeError(f"configdict['corrections'] must be a list of names (got {corrections!r})")
        if self.allowed_corrections is None:
            return
        unknown = [c for c in corrections if c not in self.allowed_corrections]
        if unknown:
            raise ScalingModelError(f"unknown correction(s) {unknown} for the {self.id_!r} model; "
                                    f"allowed: {list(self.allowed_corrections)}")

    # ---- simple properties -------------------------------------------------
    @property
    def is_scaled(self) -> bool:
        """bool: whether this model has been refined."""
        return self._is_scaled

    def set_scaling_model_as_scaled(self) -> None:
        """Mark the model as refined."""
        self._is_scaled = True

    def set_scaling_model_as_unscaled(self) -> None:
        """Mark the model as not refined."""
        self._is_scaled = False

    @property
    def fixed_components(self) -> list[str]:
        """list of str: components not refined in this run."""
        return self._fixed_components

    @fixed_components.setter
    def fixed_components(self, components: Sequence[str]) -> None:
        if isinstance(components, str):
            components = [components]
        names = list(components or [])
        if self.allowed_corrections is not None:
            unknown = [c for c in names if c not in self.allowed_corrections]
            if unknown:
                raise ScalingModelError(f"cannot fix unknown component(s) {unknown}; "
                                        f"allowed: {list(self.allowed_corrections)}")
        self._fixed_components = names

    @property
    def error_model(self) -> Any:
        """The error model associated with this model (or None)."""
        return self._error_model

    @property
    def configdict(self) -> Mapping[str, Any]:
        """dict: the model configuration (``configuration_parameters``)."""
        return self._configdict

    @property
    def components(self) -> dict[str, Any]:
        """dict: ``{name: component}``, in parameter order."""
        return self._components

    @property
    def n_params(self) -> int:
        """int: total number of parameters over all components (fixed ones included)."""
        return int(sum(c.n_params for c in self._components.values()))

    @property
    def consecutive_refinement_order(self) -> list[list[str]]:
        """list of list of str: components refined together in each consecutive cycle.

        The base class refines all components in one cycle.
        """
        return [list(self._components)]

    def fix_initial_parameter(self, params: Any) -> bool:
        """Fix a parameter for full-matrix refinement; the base model has none."""
        return False

    #: The one component a model may share across datasets (``configdict["shared"]``), if any.
    shareable_component: str | None = None

    def get_shared_components(self) -> str | None:
        """Name of a component shared across datasets, or None."""
        name = self.shareable_component
        if name is not None and name in self.configdict.get("shared", []) \
                and name not in self.fixed_components:
            return name
        return None

    def _fix_initial_scale(self, params: Any) -> bool:
        """Fix the first smoothed-scale parameter when ``<model id>.fix_initial`` (default True)."""
        if "scale" in self.components and _opt(params, self.id_, "fix_initial", True):
            self.components["scale"].fix_initial_parameter()
        return True

    # ---- configuration ------------------------------------------------------
    def configure_components(self, reflection_table: Any, experiment: Any, params: Any) -> None:
        """Give every component the per-reflection data it needs."""
        raise NotImplementedError(f"{type(self).__name__} must implement configure_components")

    def limit_image_range(self, new_image_range: Sequence[int]) -> None:
        """Adapt the model to a reduced image range (nothing to do for the base model)."""

    def set_valid_image_range(self, image_range: Sequence[int]) -> None:
        """Record the valid image range in the configdict."""
        self._configdict["valid_image_range"] = image_range

    def update(self, params: Any) -> None:
        """Apply new options to an existing model (nothing to do for the base model)."""

    @classmethod
    def from_data(cls, params: Any, experiment: Any, reflection_table: Any) -> "ScalingModelBase":
        """Create the model from options and data."""
        raise NotImplementedError(f"{cls.__name__} does not implement from_data")

    # ---- error model / intensity combination ----------------------------------
    def set_error_model(self, error_model: Any) -> None:
        """Associate an error model and record its type and parameters in the configdict."""
        self._error_model = error_model
        self._configdict.update({"error_model_type": type(error_model).__name__,
                                 "error_model_parameters": [float(p) for p in error_model.parameters]})

    def load_error_model(self, error_params: Any) -> None:
        """Create the error model from the stored parameters, unless reset or overridden.

        ``error_params`` has DIALS's ``reset_error_model`` and ``basic.a``/``basic.b``.
        """
        from .error_model import BasicErrorModel  # noqa: PLC0415

        basic = getattr(error_params, "basic", None)
        model = None
        if "error_model_type" in self._configdict and not getattr(error_params, "reset_error_model", False):
            if self._configdict["error_model_type"] == "BasicErrorModel":
                stored = self._configdict["error_model_parameters"]
                a = None if getattr(basic, "a", None) else stored[0]
                b = None if getattr(basic, "b", None) else stored[1]
                model = BasicErrorModel(a, b, basic)
        if model is None:
            model = BasicErrorModel(basic_params=basic)
        self.set_error_model(model)

    def record_intensity_combination_Imid(self, Imid: float) -> None:  # noqa: N802,N803
        """Record the profile/summation combination midpoint."""
        self._configdict["Imid"] = Imid

    def plot_model_components(self, reflection_table: Any = None) -> dict:
        """Plot descriptions (none are produced by xtalscale)."""
        return {}

    # ---- evaluation -----------------------------------------------------------
    def _component_dict(self) -> dict[str, Any]:
        comps = self._components
        if isinstance(comps, Mapping):
            return dict(comps)
        return {str(i): c for i, c in enumerate(comps)}

    def get_scales(self, reflection_table: Any = None, experiment: Any = None,
                   params: Any = None) -> np.ndarray:
        """Return ``g``, the product of all component values, per reflection.

        ``g`` is DIALS's *inverse scale factor*: observed ``I ≈ g·I_true``, so the
        scaled intensity is ``I / g``.

        Parameters
        ----------
        reflection_table : reflection table, optional
            Reflections to evaluate; the components are (re)configured on it.
            If omitted, the data of the last configuration are used.
        experiment : Experiment, optional
            Needed when the model has an absorption component and the table has
            no ``s0c``/``s1c`` columns; defaults to the last one configured.
        params : namespace, optional
            Model options (default :func:`default_model_params`).

        Returns
        -------
        numpy.ndarray
            ``g`` in table order.
        """
        comps = self._component_dict()
        if reflection_table is not None and _nrows(reflection_table) == 0:
            return np.zeros(0)  # nothing to configure the smoothers' extents on
        if reflection_table is not None:
            self.configure_components(reflection_table, experiment if experiment is not None else self._experiment,
                                      params if params is not None else default_model_params())
            self._last_table = reflection_table
            for comp in comps.values():
                if not _is_seed_component(comp):
                    comp.update_reflection_data()
            self._configured_rows = _nrows(reflection_table)
        g = None
        for comp in comps.values():
            # Without a table this uses the components' current data (block 0); a component
            # that has none raises, naming itself.
            s = np.asarray(self._component_scales(comp), dtype=np.float64)
            g = s.copy() if g is None else g * s
        if g is None:
            if self._configured_rows is None:
                raise ValueError("get_scales() needs a reflection_table (the model has no components)")
            g = np.ones(self._configured_rows)
        return g

    def _component_scales(self, comp: Any) -> Any:
        """Block-0 scales of a DIALS-style component, or a seed-API component's scales for the table."""
        if _is_seed_component(comp):
            table = getattr(self, "_last_table", None)
            if table is None:
                raise ValueError("get_scales() needs a reflection_table for seed-API components")
            return comp.calculate_scales_and_derivatives(table)[0]
        return comp.calculate_scales(0)

    def get_inverse_scales(self, reflection_table: Any = None, experiment: Any = None,
                           params: Any = None) -> np.ndarray:
        """Return ``1/g``, the factor that multiplies observed intensities onto a common scale."""
        return 1.0 / self.get_scales(reflection_table, experiment, params)

    # ---- serialisation ---------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The ``scaling_model`` entry written to ``.expt`` files.

        Layout: ``__id__``, any unrecognised top-level keys read by
        :meth:`from_dict`, one entry per component (``n_parameters``,
        ``parameters``, ``null_parameter_value`` and ``est_standard_devs`` when
        esds are set), then ``configuration_parameters``.
        """
        out: dict[str, Any] = {"__id__": self.id_}
        out.update(copy.deepcopy(self.serialisation_extras))
        for name, comp in self._component_dict().items():
            params = np.asarray(comp.parameters, dtype=np.float64)
            entry = {"n_parameters": int(comp.n_params), "parameters": params.tolist(),
                     "null_parameter_value": float(comp.null_parameter_value)}
            esds = comp.parameter_esds
            if esds is not None and len(esds):
                entry["est_standard_devs"] = np.asarray(esds, dtype=np.float64).tolist()
            out[name] = entry
        out["configuration_parameters"] = self._configdict
        return out

    @classmethod
    def _parameters_from_dict(cls, obj: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Read ``{name: {"parameters", "parameter_esds"}}`` for every listed correction."""
        if not isinstance(obj, Mapping):
            raise TypeError(f"scaling model dict must be a dict (got {type(obj).__name__})")
        if obj.get("__id__") != cls.id_:
            raise RuntimeError(f"expected __id__ {cls.id_}, got {obj.get('__id__')}")
        if "configuration_parameters" not in obj:
            raise KeyError("scaling model dict has no 'configuration_parameters'")
        configdict = obj["configuration_parameters"]
        if not isinstance(configdict, Mapping):
            raise ScalingModelError(f"{cls.id_} model: configuration_parameters must be a dict "
                                    f"(got {type(configdict).__name__})")
        out: dict[str, dict[str, Any]] = {}
        corrections = configdict.get("corrections", [])
        if not isinstance(corrections, (list, tuple)) or not all(isinstance(c, str)
                                                                  for c in corrections):
            raise ScalingModelError(f"{cls.id_} model: configuration_parameters['corrections'] "
                                    "must be a list of names")
        for name in corrections:
            if name == "analytical":
                continue
            if name not in obj:
                raise KeyError(f"scaling model dict lists correction {name!r} but has no {name!r} entry")
            entry = obj[name]
            if not isinstance(entry, Mapping) or "parameters" not in entry:
                raise ScalingModelError(f"{cls.id_} model: entry {name!r} must be a dict with "
                                        "'parameters'")
            try:
                values = np.asarray(entry["parameters"], dtype=np.float64)
                esds = entry.get("est_standard_devs")
                esds = None if esds is None else np.asarray(esds, dtype=np.float64)
                n_stored = entry.get("n_parameters", values.size)
                n_stored = int(n_stored) if not isinstance(n_stored, bool) else None
            except (TypeError, ValueError):
                raise ScalingModelError(f"{cls.id_} model: {name} parameters, est_standard_devs "
                                        "and n_parameters must be numbers") from None
            if n_stored != values.size:
                raise ScalingModelError(f"{name}: n_parameters is {entry['n_parameters']} but "
                                        f"{values.size} parameters are stored")
            out[name] = {"parameters": values, "parameter_esds": esds}
        return out

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> "ScalingModelBase":
        """Create the model from a ``scaling_model`` dict; the result is marked as scaled.

        Raises
        ------
        RuntimeError
            If ``obj["__id__"]`` is not this class's ``id_`` (as DIALS).
        """
        if cls is ScalingModelBase:
            raise NotImplementedError("use model_from_dict() or a concrete model class")
        params = cls._parameters_from_dict(obj)
        model = cls(params, obj["configuration_parameters"], is_scaled=True)
        known = {"__id__", "configuration_parameters", *params, "analytical"}
        model.serialisation_extras = {k: copy.deepcopy(v) for k, v in obj.items() if k not in known}
        return model

    def __str__(self) -> str:
        lines = ["Scaling model:", f"  type : {self.id_}"]
        for name, comp in self._component_dict().items():
            lines.append(f"  {str(name).capitalize()} component:")
            esds = comp.parameter_esds
            params = np.asarray(comp.parameters, dtype=np.float64)
            if esds is not None and len(esds):
                lines.append("    parameters (sigma)")
                lines.extend(f"    {p: .4f}   ({e:.4f})" for p, e in zip(params, np.asarray(esds)))
            else:
                lines.append("    parameters")
                lines.extend(f"    {p: .4f}" for p in params)
        lines.append("")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(components={list(self._component_dict())}, is_scaled={self._is_scaled})"


# ==========================================================================
# shared helpers of the built-in models
# ==========================================================================
def _require_entry(parameters_dict: Mapping[str, Any], name: str) -> tuple[np.ndarray, Any]:
    if name not in parameters_dict or parameters_dict[name] is None:
        raise KeyError(f"parameters_dict has no entry for the {name!r} correction")
    setup = parameters_dict[name]
    if setup.get("parameters") is None:
        raise KeyError(f"parameters_dict[{name!r}] has no 'parameters'")
    values = np.asarray(setup["parameters"], dtype=np.float64)
    if values.ndim != 1:
        raise ScalingModelError(f"{name}: parameters must be 1-dimensional (got shape {values.shape})")
    if not np.all(np.isfinite(values)):
        raise ScalingModelError(f"{name}: parameters must be finite")
    esds = setup.get("parameter_esds")
    if esds is not None:
        esds = np.asarray(esds, dtype=np.float64)
        if esds.size and esds.size != values.size:
            raise ScalingModelError(f"{name}: {esds.size} parameter esds for {values.size} parameters")
    return values, esds


def _require_count(name: str, values: np.ndarray, expected: int, why: str) -> None:
    if values.size != expected:
        raise ScalingModelError(f"{name}: expected {expected} parameters ({why}), got {values.size}")


def _require_smoother_count(name: str, values: np.ndarray) -> None:
    if values.size < 2:
        raise ScalingModelError(f"{name}: a smoothed component needs at least 2 parameters, got {values.size}")


def _sh_count(lmax: int) -> int:
    return int(lmax) * (int(lmax) + 2)


def _smooth_component(parameters_dict: Mapping[str, Any], name: str, class_name: str) -> Any:
    """A smoothed component from its stored parameters (at least 2 smoother values)."""
    values, esds = _require_entry(parameters_dict, name)
    _require_smoother_count(name, values)
    return _make_component(class_name, values, esds)


def _absorption_component(parameters_dict: Mapping[str, Any], configdict: Mapping[str, Any]) -> Any:
    """The spherical-harmonic absorption component; its size must match ``lmax`` when given."""
    values, esds = _require_entry(parameters_dict, "absorption")
    if "lmax" in configdict:
        _require_count("absorption", values, _sh_count(configdict["lmax"]),
                       f"lmax={configdict['lmax']} needs lmax^2 + 2 lmax")
    return _make_component("SHScaleComponent", values, esds)


def _add_analytical(model: ScalingModelBase, reflection_table: Any) -> None:
    if "analytical" in model.components:
        if "analytical_correction" not in reflection_table:
            raise ValueError("The reflection table must contain the column 'analytical_correction' "
                             "when using the option analytical_correction=True.")
        model.components["analytical"].data = {"correction": _column(reflection_table, "analytical_correction")}


def _frame_is_computed(model: ScalingModelBase, table: Any, experiment: Any) -> bool:
    """True when the absorption frame is computed here from s1 and the scan (DIALS's frame):
    the table has no s0c/s1c columns, an experiment is given and the frame is not legacy."""
    return not ("s0c" in table and "s1c" in table) and experiment is not None \
        and model.crystal_frame != "legacy"


def _frame_view(table: Any) -> Any:
    """A private view of the columns the crystal frame reads, so that the caller's table does
    not gain s0c/s1c columns."""
    return _Columns({"s1": _column(table, "s1"), "xyzobs.px.value": _column(table, "xyzobs.px.value")})


def _crystal_frame_columns(model: ScalingModelBase, table: Any, experiment: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(s0c, s1c)`` for the absorption surface: the table's columns, or computed."""
    if "s0c" in table and "s1c" in table:
        return _column(table, "s0c"), _column(table, "s1c")
    if experiment is None:
        raise ValueError("an experiment is needed to compute the crystal-frame vectors s0c/s1c "
                         "(or give the reflection table 's0c' and 's1c' columns)")
    if model.crystal_frame == "legacy":
        return legacy_crystal_frame_vectors(table, experiment)
    from .scaling_utilities import absorption_frame_vectors  # noqa: PLC0415

    return absorption_frame_vectors(_frame_view(table), experiment)


def _add_absorption(model: ScalingModelBase, reflection_table: Any, experiment: Any, params: Any = None) -> None:
    """Give the SH absorption component its harmonics and restraint weights (DIALS rules).

    Up to :data:`SH_LOOKUP_THRESHOLD` reflections the harmonics are exact; above
    it they are read from DIALS's 0.5° lookup table, as ``dials.scale`` does
    (results differ by up to ~1e-3 of the absorption term).
    """
    from ._core import components as kern  # noqa: PLC0415

    lmax = int(model.configdict["lmax"])
    absorption = model.components["absorption"]
    absorption.parameter_restraints = np.full(_sh_count(lmax), float(model.configdict["abs_surface_weight"]))
    large = _nrows(reflection_table) > SH_LOOKUP_THRESHOLD
    if large and _frame_is_computed(model, reflection_table, experiment):
        # straight to the grid indices, one C++ pass, no (n, 3) vectors stored
        from .scaling_utilities import absorption_lookup_indices  # noqa: PLC0415

        comps = _components_module()
        # the grid's factors alone: the component forms its rows from them, and the class
        # table (50 MB) is built only if something reads it (see SHScaleComponent)
        comps.sh_lookup_factors(lmax)
        i0, i1 = absorption_lookup_indices(_frame_view(reflection_table), experiment, comps.SH_POINTS_PER_DEGREE,
                                           n_threads=int(_opt(params, "scaling_options", "nproc", 1) or 1))
        absorption.data = {"s0_lookup": i0, "s1_lookup": i1}
        return
    s0c, s1c = _crystal_frame_columns(model, reflection_table, experiment)
    s0c = np.ascontiguousarray(s0c, dtype=np.float64).reshape(-1, 3)
    s1c = np.ascontiguousarray(s1c, dtype=np.float64).reshape(-1, 3)
    if large:
        # grid indices into the class-wide lookup grid (its factors and table are made
        # thread-safely by the components module)
        absorption.data = _components_module().sh_lookup_data(s0c, s1c, lmax)
    else:
        table = kern.sph_harm_table(kern.calc_theta_phi(s0c), kern.calc_theta_phi(s1c), lmax)
        absorption.data = {"sph_harm_table": table.T}  # DIALS's (n_params x n_refl) orientation, a view


def _limit_smoother(model: ScalingModelBase, name: str, conf: Mapping[str, Any], new_osc_range: tuple,
                    one_osc: float, current_image_0: int, new_image_0: int, interval_key: str,
                    norm_key: str) -> None:
    n_param, norm_fac, rot_int = initialise_smooth_input(new_osc_range, one_osc, conf[interval_key])
    comp = model.components[name]
    old = np.asarray(comp.parameters, dtype=np.float64)
    conf[interval_key] = rot_int
    conf[norm_key] = norm_fac
    offset = calculate_new_offset(current_image_0, new_image_0, norm_fac, old.size, n_param)
    comp.set_new_parameters(old[offset:offset + n_param])


def _reduced_ranges(conf: Mapping[str, Any], new_image_range: Sequence[int]) -> tuple[float, tuple, tuple]:
    """One image's rotation, the new relative osc range, and the new absolute osc range."""
    if "valid_image_range" not in conf or "valid_osc_range" not in conf:
        raise KeyError("limit_image_range needs 'valid_image_range' and 'valid_osc_range' in the configdict")
    cur_img = conf["valid_image_range"]
    cur_osc = conf["valid_osc_range"]
    new0, new1 = int(new_image_range[0]), int(new_image_range[1])
    if new1 < new0:
        raise ValueError(f"new_image_range must be (start, end) with start <= end (got {tuple(new_image_range)})")
    one_osc = (cur_osc[1] - cur_osc[0]) / (cur_img[1] - (cur_img[0] - 1))
    relative = ((new0 - cur_img[0]) * one_osc, (new1 - cur_img[0] + 1) * one_osc)
    absolute = (cur_osc[0] + (new0 - cur_img[0]) * one_osc, cur_osc[1] + (new1 - cur_img[1]) * one_osc)
    return one_osc, relative, absolute


def _osc_range(experiment: Any) -> tuple[tuple[float, float], float]:
    scan = getattr(experiment, "scan", None)
    if scan is None:
        raise ValueError("this model needs an experiment with a scan (rotation data)")
    width = float(scan.get_oscillation()[1])
    if hasattr(scan, "get_oscillation_range"):
        osc = tuple(float(v) for v in scan.get_oscillation_range())
    else:
        start = float(scan.get_oscillation()[0])
        first, last = scan.get_image_range()
        osc = (start, start + (last - first + 1) * width)
    return osc, width


def _maybe_fix(model: ScalingModelBase, params: Any, section: str) -> ScalingModelBase:
    fix = _opt(params, section, "correction", None)
    fix = getattr(fix, "fix", None) if fix is not None else None
    if fix:
        model.fixed_components = fix
    return model


def _require_analytical_column(params: Any, section: str, reflection_table: Any, corrections: list) -> None:
    if _opt(params, section, "analytical_correction", False):
        if "analytical_correction" not in reflection_table:
            raise ValueError("The reflection table must contain the column 'analytical_correction' "
                             "when using the option analytical_correction=True.")
        corrections.append("analytical")


# ==========================================================================
# PhysicalScalingModel
# ==========================================================================
class PhysicalScalingModel(ScalingModelBase):
    """DIALS's physical model: smooth scale vs rotation, smooth B vs rotation, SH absorption.

    ``g = scale(φ) · exp(B(φ) / 2d²) · (1 + Σ C_lm Ȳ_lm)`` (spec sections 2.5–2.7, 4.2).

    Parameters
    ----------
    parameters_dict : dict
        ``{name: {"parameters": array, "parameter_esds": array or None}}`` for
        each entry of ``configdict["corrections"]``.
    configdict : dict
        ``corrections`` (subset of scale, decay, absorption, analytical),
        ``s_norm_fac``, ``d_norm_fac``, ``lmax``, ``abs_surface_weight`` ...
    is_scaled : bool, optional

    Raises
    ------
    ScalingModelError
        Unknown correction names, or an absorption parameter count that does
        not match ``lmax`` (``lmax² + 2·lmax``), or fewer than 2 smoother parameters.
    KeyError
        A listed correction without a ``parameters_dict`` entry.
    """

    id_ = "physical"
    shareable_component = "absorption"
    allowed_corrections = ("scale", "decay", "absorption", "analytical")

    def __init__(self, parameters_dict: Mapping[str, Any], configdict: Mapping[str, Any],
                 is_scaled: bool = False) -> None:
        super().__init__(configdict, is_scaled)
        corrections = configdict["corrections"]
        if "scale" in corrections:
            self._components["scale"] = _smooth_component(parameters_dict, "scale", "SmoothScaleComponent1D")
        if "decay" in corrections:
            self._components["decay"] = _smooth_component(parameters_dict, "decay", "SmoothBScaleComponent1D")
        if "absorption" in corrections:
            self._components["absorption"] = _absorption_component(parameters_dict, configdict)
        if "analytical" in corrections:
            self._components["analytical"] = _make_component("AnalyticalComponent", [])

    @property
    def consecutive_refinement_order(self) -> list[list[str]]:
        return [["scale", "decay"], ["absorption"]]

    def fix_initial_parameter(self, params: Any) -> bool:
        """Fix the first scale parameter when ``physical.fix_initial`` (default True)."""
        return self._fix_initial_scale(params)

    def configure_components(self, reflection_table: Any, experiment: Any, params: Any) -> None:
        """Set ``x = z·norm_fac`` for scale/decay, ``d`` for decay, and the absorption harmonics."""
        self._experiment = experiment
        if any(c in self.components for c in ("scale", "decay")):
            z = _z_px(reflection_table)
        if "scale" in self.components:
            self.components["scale"].data = {"x": z * self._configdict["s_norm_fac"]}
        if "decay" in self.components:
            decay = self.components["decay"]
            decay.parameter_restraints = np.full(decay.n_params, float(
                _opt(params, "physical", "decay_restraint", 0.1)))
            decay.data = {"x": z * self._configdict["d_norm_fac"], "d": _column(reflection_table, "d")}
        if "absorption" in self.components:
            _add_absorption(self, reflection_table, experiment, params)
        _add_analytical(self, reflection_table)

    def limit_image_range(self, new_image_range: Sequence[int]) -> None:
        """Keep only the scale/decay parameters covering ``new_image_range`` (spec section 4.6)."""
        conf = self._configdict
        one_osc, relative, absolute = _reduced_ranges(conf, new_image_range)
        cur0 = conf["valid_image_range"][0]
        if "scale" in self.components:
            _limit_smoother(self, "scale", conf, relative, one_osc, cur0, new_image_range[0],
                            "scale_rot_interval", "s_norm_fac")
        if "decay" in self.components:
            _limit_smoother(self, "decay", conf, relative, one_osc, cur0, new_image_range[0],
                            "decay_rot_interval", "d_norm_fac")
        conf["valid_osc_range"] = absolute
        self.set_valid_image_range(tuple(new_image_range))

    @classmethod
    def from_data(cls, params: Any, experiment: Any, reflection_table: Any) -> "PhysicalScalingModel":
        """Automatic parameterisation from the scan and options (spec section 4.2)."""
        opts = lambda name, default: _opt(params, "physical", name, default)  # noqa: E731
        osc_range, one_osc = _osc_range(experiment)
        configdict: dict[str, Any] = {"corrections": [], "valid_osc_range": osc_range}
        parameters_dict: dict[str, Any] = {}
        span = abs(osc_range[1] - osc_range[0])
        auto_scale, auto_decay = _auto_intervals(span)
        scale_interval = opts("scale_interval", AUTO)
        decay_interval = opts("decay_interval", AUTO)
        scale_interval = auto_scale if _is_auto(scale_interval) else float(scale_interval)
        decay_interval = auto_decay if _is_auto(decay_interval) else float(decay_interval)

        configdict["corrections"].append("scale")
        n, norm, rot = initialise_smooth_input(osc_range, one_osc, scale_interval)
        configdict.update({"s_norm_fac": norm, "scale_rot_interval": rot})
        parameters_dict["scale"] = {"parameters": np.ones(n), "parameter_esds": None}
        if opts("decay_correction", True):
            configdict["corrections"].append("decay")
            n, norm, rot = initialise_smooth_input(osc_range, one_osc, decay_interval)
            configdict.update({"d_norm_fac": norm, "decay_rot_interval": rot})
            parameters_dict["decay"] = {"parameters": np.zeros(n), "parameter_esds": None}
        absorption = opts("absorption_correction", AUTO)
        if _is_auto(absorption):
            absorption = span > 60.0 and not _low_angle_only(experiment, reflection_table)
        level = opts("absorption_level", None)
        if absorption or level:
            configdict["corrections"].append("absorption")
            share = opts("share", None)
            if share is not None and getattr(share, "absorption", False):
                configdict["shared"] = ["absorption"]
            if level:
                lmax, weight = determine_auto_absorption_params(level)
            else:
                lmax, weight = opts("lmax", AUTO), opts("surface_weight", AUTO)
                lmax = 4 if _is_auto(lmax) else int(lmax)
                weight = 5e5 if _is_auto(weight) else float(weight)
            configdict.update({"lmax": lmax, "abs_surface_weight": weight})
            parameters_dict["absorption"] = {"parameters": np.zeros(_sh_count(lmax)), "parameter_esds": None}
        _require_analytical_column(params, "physical", reflection_table, configdict["corrections"])
        return _maybe_fix(cls(parameters_dict, configdict), params, "physical")

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> "PhysicalScalingModel":
        model = super().from_dict(obj)
        if "is_scaled" in model.serialisation_extras:
            # Pre-2020 DIALS (1.x/2.x) wrote "is_scaled" and used the legacy crystal frame.
            model.crystal_frame = "legacy"
        return model

    def update(self, params: Any) -> None:
        """Apply ``correction.fix``, absorption level / lmax / surface weight and sharing."""
        fix = _opt(params, "physical", "correction", None)
        if fix is not None and getattr(fix, "fix", None):
            self.fixed_components = fix.fix
        if "absorption" not in self.components:
            return
        new_lmax = None
        level = _opt(params, "physical", "absorption_level", None)
        if level:
            lmax, weight = determine_auto_absorption_params(level)
            self._configdict["abs_surface_weight"] = weight
            if lmax != self._configdict["lmax"]:
                new_lmax = lmax
        else:
            weight = _opt(params, "physical", "surface_weight", AUTO)
            if not _is_auto(weight):
                self._configdict["abs_surface_weight"] = float(weight)
            lmax = _opt(params, "physical", "lmax", AUTO)
            if not _is_auto(lmax) and int(lmax) != self._configdict["lmax"]:
                new_lmax = int(lmax)
        if new_lmax:
            current = np.asarray(self.components["absorption"].parameters, dtype=np.float64)
            n_new = _sh_count(new_lmax)
            values = np.zeros(n_new)
            keep = min(n_new, current.size)
            values[:keep] = current[:keep]  # harmonics are ordered by l, so lower-l terms carry over
            self._configdict["lmax"] = new_lmax
            self._components["absorption"] = _make_component("SHScaleComponent", values, np.zeros(n_new))
        share = _opt(params, "physical", "share", None)
        if share is not None and getattr(share, "absorption", False):
            self._configdict["shared"] = ["absorption"]


def _auto_intervals(span: float) -> tuple[float, float]:
    """DIALS's automatic (scale, decay) intervals for a rotation span in degrees."""
    if span < 5.0:
        return 1.0, 1.5
    if span < 10.0:
        return 2.0, 3.0
    if span < 25.0:
        return 4.0, 5.0
    if span < 90.0:
        return 8.0, 10.0
    return 15.0, 20.0


def _low_angle_only(experiment: Any, reflection_table: Any) -> bool:
    """True if every s1 is within acos(0.999) of s0 (e.g. electron data): no absorption surface."""
    if reflection_table is None or "s1" not in reflection_table or _nrows(reflection_table) == 0:
        return False
    s1 = np.asarray(reflection_table["s1"], dtype=np.float64).reshape(-1, 3)
    s0 = np.asarray(experiment.beam.get_s0(), dtype=np.float64)

    def max_angle(rows: np.ndarray) -> float | None:
        norms = np.linalg.norm(rows, axis=1) * np.linalg.norm(s0)
        ok = norms > 0
        if not np.any(ok):
            return None
        return float(np.max(np.arccos(np.clip((rows[ok] @ s0) / norms[ok], -1.0, 1.0))))

    limit = math.acos(0.999)
    # one wide reflection answers False: X-ray data have one among their first rows, and the
    # whole table (an arccos per row, ~0.03 s per 10⁶) is read only when the sample is narrow
    sample = max_angle(s1[:1024])
    if sample is not None and sample >= limit:
        return False
    widest = max_angle(s1)
    return widest is not None and widest < limit


# ==========================================================================
# KBScalingModel
# ==========================================================================
class KBScalingModel(ScalingModelBase):
    """One overall scale and one relative B per dataset: ``g = k · exp(B / 2d²)``.

    Note DIALS's quirk: ``configdict["corrections"]`` from :meth:`from_data` is
    ``["decay", "scale"]`` while the components (and parameters) are ordered
    scale, decay.
    """

    id_ = "KB"
    allowed_corrections = ("scale", "decay", "analytical")

    def __init__(self, parameters_dict: Mapping[str, Any], configdict: Mapping[str, Any],
                 is_scaled: bool = False) -> None:
        super().__init__(configdict, is_scaled)
        corrections = configdict["corrections"]
        if "scale" in corrections:
            values, esds = _require_entry(parameters_dict, "scale")
            _require_count("scale", values, 1, "a single overall scale")
            self._components["scale"] = _make_component("SingleScaleFactor", values, esds)
        if "decay" in corrections:
            values, esds = _require_entry(parameters_dict, "decay")
            _require_count("decay", values, 1, "a single relative B")
            self._components["decay"] = _make_component("SingleBScaleFactor", values, esds)
        if "analytical" in corrections:
            self._components["analytical"] = _make_component("AnalyticalComponent", [])

    @property
    def consecutive_refinement_order(self) -> list[list[str]]:
        return [["scale", "decay"]]

    def configure_components(self, reflection_table: Any, experiment: Any, params: Any) -> None:
        self._experiment = experiment
        if "scale" in self.components:
            ids = _column(reflection_table, "id") if "id" in reflection_table else np.zeros(_nrows(reflection_table))
            self.components["scale"].data = {"id": ids}
        if "decay" in self.components:
            self.components["decay"].data = {"d": _column(reflection_table, "d")}
        _add_analytical(self, reflection_table)

    def update(self, params: Any) -> None:
        fix = _opt(params, "KB", "correction", None)
        if fix is not None and getattr(fix, "fix", None):
            self.fixed_components = fix.fix

    @classmethod
    def from_data(cls, params: Any, experiment: Any, reflection_table: Any) -> "KBScalingModel":
        configdict: dict[str, Any] = {"corrections": []}
        parameters_dict: dict[str, Any] = {}
        if _opt(params, "KB", "decay_correction", True):
            configdict["corrections"].append("decay")
            parameters_dict["decay"] = {"parameters": np.zeros(1), "parameter_esds": None}
        configdict["corrections"].append("scale")
        parameters_dict["scale"] = {"parameters": np.ones(1), "parameter_esds": None}
        if _opt(params, "KB", "analytical_correction", False):
            _require_analytical_column(params, "KB", reflection_table, configdict["corrections"])
        return _maybe_fix(cls(parameters_dict, configdict), params, "KB")


# ==========================================================================
# ArrayScalingModel
# ==========================================================================
class ArrayScalingModel(ScalingModelBase):
    """XDS-like grids: decay(1/d², time), absorption(x, y, time), modulation(x, y) (spec section 4.4)."""

    id_ = "array"
    allowed_corrections = ("decay", "absorption", "modulation", "analytical")

    def __init__(self, parameters_dict: Mapping[str, Any], configdict: Mapping[str, Any],
                 is_scaled: bool = False) -> None:
        super().__init__(configdict, is_scaled)
        corrections = configdict["corrections"]
        if not any(c in corrections for c in ("decay", "absorption")):
            raise ValueError("Array model must have at least one of decay or absorption corrections")
        if "decay" in corrections:
            shape = (int(configdict["n_res_param"]), int(configdict["n_time_param"]))
            self._components["decay"] = self._grid("SmoothScaleComponent2D", parameters_dict, "decay", shape)
        if "absorption" in corrections:
            shape = (int(configdict["n_x_param"]), int(configdict["n_y_param"]), int(configdict["n_time_param"]))
            self._components["absorption"] = self._grid("SmoothScaleComponent3D", parameters_dict, "absorption",
                                                        shape)
        if "modulation" in corrections:
            shape = (int(configdict["n_x_mod_param"]), int(configdict["n_y_mod_param"]))
            self._components["modulation"] = self._grid("SmoothScaleComponent2D", parameters_dict, "modulation",
                                                        shape)
        if "analytical" in corrections:
            self._components["analytical"] = _make_component("AnalyticalComponent", [])

    @staticmethod
    def _grid(class_name: str, parameters_dict: Mapping[str, Any], name: str, shape: tuple) -> Any:
        values, esds = _require_entry(parameters_dict, name)
        _require_count(name, values, int(np.prod(shape)), f"grid shape {shape}")
        return _make_component(class_name, values, esds, shape=shape)

    @property
    def consecutive_refinement_order(self) -> list[list[str]]:
        return [["decay"], ["absorption"], ["modulation"]]

    def update(self, params: Any) -> None:
        fix = _opt(params, "array", "correction", None)
        if fix is not None and getattr(fix, "fix", None):
            self.fixed_components = fix.fix

    def configure_components(self, reflection_table: Any, experiment: Any, params: Any) -> None:
        self._experiment = experiment
        conf = self.configdict
        xyz = np.asarray(_column(reflection_table, "xyzobs.px.value"), dtype=np.float64).reshape(-1, 3)
        time = np.multiply(xyz[:, 2], conf["time_norm_fac"])
        if "decay" in self.components:
            d = np.asarray(_column(reflection_table, "d"), dtype=np.float64)
            self.components["decay"].data = {
                "x": _bins(d, conf["resmin"], conf["res_bin_width"], inverse_square=True), "y": time}
        if "absorption" in self.components:
            self.components["absorption"].data = {"x": _bins(xyz[:, 0], conf["xmin"], conf["x_bin_width"]),
                                                   "y": _bins(xyz[:, 1], conf["ymin"], conf["y_bin_width"]),
                                                   "z": time}
        if "modulation" in self.components:
            self.components["modulation"].data = {
                "x": _bins(xyz[:, 0], conf["xmin"], conf["x_det_bin_width"]),
                "y": _bins(xyz[:, 1], conf["ymin"], conf["y_det_bin_width"])}
        _add_analytical(self, reflection_table)

    def limit_image_range(self, new_image_range: Sequence[int]) -> None:
        """Keep the time slices covering ``new_image_range`` in decay and absorption."""
        conf = self._configdict
        one_osc, relative, absolute = _reduced_ranges(conf, new_image_range)
        n_param, norm_fac, rot_int = initialise_smooth_input(relative, one_osc, conf["time_rot_interval"])
        if "decay" in self.components:
            n_old = len(self.components["decay"].parameters) // self.components["decay"].n_x_params
        else:
            comp = self.components["absorption"]
            n_old = len(comp.parameters) // (comp.n_x_params * comp.n_y_params)
        offset = calculate_new_offset(conf["valid_image_range"][0], new_image_range[0], norm_fac, n_old, n_param)
        if "absorption" in self.components:
            comp = self.components["absorption"]
            block = comp.n_x_params * comp.n_y_params  # time is the slowest axis
            values = np.asarray(comp.parameters)[offset * block:(offset + n_param) * block]
            comp.set_new_parameters(values, shape=(comp.n_x_params, comp.n_y_params, n_param))
        if "decay" in self.components:
            comp = self.components["decay"]
            block = comp.n_x_params
            values = np.asarray(comp.parameters)[offset * block:(offset + n_param) * block]
            comp.set_new_parameters(values, shape=(comp.n_x_params, n_param))
        conf.update({"n_time_param": n_param, "time_norm_fac": norm_fac, "time_rot_interval": rot_int})
        conf["valid_osc_range"] = absolute
        self.set_valid_image_range(tuple(new_image_range))

    @classmethod
    def from_data(cls, params: Any, experiment: Any, reflection_table: Any) -> "ArrayScalingModel":
        """Grids sized from the scan and the data extent, over reflections with d > 0."""
        opts = lambda name, default: _opt(params, "array", name, default)  # noqa: E731
        d_all = np.asarray(_column(reflection_table, "d"), dtype=np.float64)
        good = d_all > 0.0
        if not np.any(good):
            raise ValueError("the array model needs reflections with d > 0")
        xyz = take_rows(np.asarray(_column(reflection_table, "xyzobs.px.value"), dtype=np.float64).reshape(-1, 3), good)
        d = d_all[good]
        osc_range, one_osc = _osc_range(experiment)
        configdict: dict[str, Any] = {"corrections": [], "valid_osc_range": osc_range}
        n_time, time_norm, time_rot = initialise_smooth_input(osc_range, one_osc, opts("decay_interval", 20.0))
        xmax, xmin = xyz[:, 0].max() + 0.001, xyz[:, 0].min() - 0.001
        ymax, ymin = xyz[:, 1].max() + 0.001, xyz[:, 1].min() - 0.001
        parameters_dict: dict[str, Any] = {}
        if opts("decay_correction", True):
            configdict["corrections"].append("decay")
            resmax = 1.0 / d.min() ** 2 + 1e-6
            resmin = 1.0 / d.max() ** 2 - 1e-6
            n_res, res_width = calc_n_param_from_bins(resmin, resmax, int(opts("n_resolution_bins", 10)))
            configdict.update({"n_res_param": n_res, "n_time_param": n_time, "resmin": resmin,
                               "res_bin_width": res_width, "time_norm_fac": time_norm,
                               "time_rot_interval": time_rot})
            parameters_dict["decay"] = {"parameters": np.ones(n_time * n_res), "parameter_esds": None}
        if opts("absorption_correction", True):
            configdict["corrections"].append("absorption")
            nbins = int(opts("n_absorption_bins", 3))
            n_x, x_width = calc_n_param_from_bins(xmin, xmax, nbins)
            n_y, y_width = calc_n_param_from_bins(ymin, ymax, nbins)
            configdict.update({"n_x_param": n_x, "n_y_param": n_y, "xmin": xmin, "ymin": ymin,
                               "x_bin_width": x_width, "y_bin_width": y_width, "n_time_param": n_time,
                               "time_norm_fac": time_norm, "time_rot_interval": time_rot})
            parameters_dict["absorption"] = {"parameters": np.ones(n_x * n_y * n_time), "parameter_esds": None}
        if opts("modulation_correction", False):
            configdict["corrections"].append("modulation")
            nbins = int(opts("n_modulation_bins", 20))
            n_xm, xm_width = calc_n_param_from_bins(xmin, xmax, nbins)
            n_ym, ym_width = calc_n_param_from_bins(ymin, ymax, nbins)
            configdict.update({"n_x_mod_param": n_xm, "n_y_mod_param": n_ym, "xmin": xmin, "ymin": ymin,
                               "x_det_bin_width": xm_width, "y_det_bin_width": ym_width})
            parameters_dict["modulation"] = {"parameters": np.ones(n_xm * n_ym), "parameter_esds": None}
        _require_analytical_column(params, "array", reflection_table, configdict["corrections"])
        return _maybe_fix(cls(parameters_dict, configdict), params, "array")


# ==========================================================================
# DoseDecay
# ==========================================================================
class DoseDecay(ScalingModelBase):
    """Smooth scale, exponential dose decay ``exp(C·z/d^k)``, relative B, optional SH absorption.

    ``configdict["resolution_dependence"]`` selects ``"quadratic"`` (k = 2,
    default) or ``"linear"`` (k = 1) for the decay (spec section 4.5).
    """

    id_ = "dose_decay"
    shareable_component = "decay"
    allowed_corrections = ("scale", "decay", "relative_B", "absorption", "analytical")

    def __init__(self, parameters_dict: Mapping[str, Any], configdict: Mapping[str, Any],
                 is_scaled: bool = False) -> None:
        super().__init__(configdict, is_scaled)
        corrections = configdict["corrections"]
        if "scale" in corrections:
            self._components["scale"] = _smooth_component(parameters_dict, "scale", "SmoothScaleComponent1D")
        if "decay" in corrections:
            values, esds = _require_entry(parameters_dict, "decay")
            _require_count("decay", values, 1, "a single dose-decay constant")
            dependence = configdict.get("resolution_dependence", "quadratic")
            if dependence not in ("quadratic", "linear"):
                raise ScalingModelError(f"resolution_dependence must be 'quadratic' or 'linear' (got {dependence!r})")
            name = "LinearDoseDecay" if dependence == "linear" else "QuadraticDoseDecay"
            self._components["decay"] = _make_component(name, values, esds)
        if "relative_B" in corrections:
            values, esds = _require_entry(parameters_dict, "relative_B")
            _require_count("relative_B", values, 1, "a single relative B")
            self._components["relative_B"] = _make_component("SingleBScaleFactor", values, esds)
        if "absorption" in corrections:
            self._components["absorption"] = _absorption_component(parameters_dict, configdict)
        if "analytical" in corrections:
            self._components["analytical"] = _make_component("AnalyticalComponent", [])

    @property
    def consecutive_refinement_order(self) -> list[list[str]]:
        return [["scale", "relative_B", "decay"], ["absorption"]]

    def fix_initial_parameter(self, params: Any) -> bool:
        """Fix the first scale parameter when ``dose_decay.fix_initial`` (default True)."""
        return self._fix_initial_scale(params)

    def update(self, params: Any) -> None:
        fix = _opt(params, "dose_decay", "correction", None)
        if fix is not None and getattr(fix, "fix", None):
            self.fixed_components = fix.fix

    def configure_components(self, reflection_table: Any, experiment: Any, params: Any) -> None:
        self._experiment = experiment
        z = _z_px(reflection_table)
        if "scale" in self.components:
            self.components["scale"].data = {"x": z * self._configdict["s_norm_fac"]}
        if "decay" in self.components:
            self.components["decay"].data = {"x": z, "d": _column(reflection_table, "d")}
        if "relative_B" in self.components:
            self.components["relative_B"].data = {"d": _column(reflection_table, "d")}
        if "absorption" in self.components:
            _add_absorption(self, reflection_table, experiment, params)
        _add_analytical(self, reflection_table)

    def limit_image_range(self, new_image_range: Sequence[int]) -> None:
        conf = self._configdict
        one_osc, relative, absolute = _reduced_ranges(conf, new_image_range)
        if "scale" in self.components:
            _limit_smoother(self, "scale", conf, relative, one_osc, conf["valid_image_range"][0],
                            new_image_range[0], "scale_rot_interval", "s_norm_fac")
        conf["valid_osc_range"] = absolute
        self.set_valid_image_range(tuple(new_image_range))

    @classmethod
    def from_data(cls, params: Any, experiment: Any, reflection_table: Any) -> "DoseDecay":
        opts = lambda name, default: _opt(params, "dose_decay", name, default)  # noqa: E731
        osc_range, one_osc = _osc_range(experiment)
        configdict: dict[str, Any] = {"corrections": [], "valid_osc_range": osc_range}
        share = opts("share", None)
        if share is None or getattr(share, "decay", True):
            configdict["shared"] = ["decay"]
        parameters_dict: dict[str, Any] = {}
        configdict["corrections"].append("scale")
        n, norm, rot = initialise_smooth_input(osc_range, one_osc, opts("scale_interval", 2.0))
        configdict.update({"s_norm_fac": norm, "scale_rot_interval": rot})
        parameters_dict["scale"] = {"parameters": np.ones(n), "parameter_esds": None}
        if opts("relative_B_correction", True):
            configdict["corrections"].append("relative_B")
            parameters_dict["relative_B"] = {"parameters": np.zeros(1), "parameter_esds": None}
        if opts("decay_correction", True):
            configdict["corrections"].append("decay")
            configdict["resolution_dependence"] = opts("resolution_dependence", "quadratic")
            parameters_dict["decay"] = {"parameters": np.zeros(1), "parameter_esds": None}
        if opts("absorption_correction", False):
            configdict["corrections"].append("absorption")
            lmax = int(opts("lmax", 4))
            configdict.update({"lmax": lmax, "abs_surface_weight": float(opts("surface_weight", 1e6))})
            parameters_dict["absorption"] = {"parameters": np.zeros(_sh_count(lmax)), "parameter_esds": None}
        _require_analytical_column(params, "dose_decay", reflection_table, configdict["corrections"])
        return _maybe_fix(cls(parameters_dict, configdict), params, "dose_decay")


# ==========================================================================
# registry
# ==========================================================================
_REGISTRY: dict[str, type] = {}
_REGISTRY_LOCK = threading.Lock()  # registration may happen from plugin imports on any thread
_ENTRY_POINT_GROUP = "xtalscale.scaling_model_ext"
_entry_points_loaded = False


def register_scaling_model(cls: type | None = None, *, name: str | None = None, replace: bool = False) -> Any:
    """Register a model class under ``name`` (default ``cls.id_``); usable as a decorator.

    Parameters
    ----------
    cls : type
        A :class:`ScalingModelBase` subclass with ``from_dict`` (and, to be
        created automatically, ``from_data``).
    name : str, optional
        Registry key and ``__id__`` of its dicts; defaults to ``cls.id_``.
    replace : bool, optional
        Allow replacing an existing registration.

    Raises
    ------
    ValueError
        If the name is missing or already registered (and not ``replace``).
    TypeError
        If ``cls`` is not a ScalingModelBase subclass.

    Examples
    --------
    >>> @register_scaling_model
    ... class MyModel(ScalingModelBase):
    ...     id_ = "my_model"
    """
    def register(klass: type) -> type:
        if not (isinstance(klass, type) and issubclass(klass, ScalingModelBase)):
            raise TypeError(f"only ScalingModelBase subclasses can be registered (got {klass!r})")
        key = name or klass.id_
        if not key or not isinstance(key, str):
            raise ValueError(f"{klass.__name__} needs a string id_ (or pass name=) to be registered")
        with _REGISTRY_LOCK:
            if key in _REGISTRY and _REGISTRY[key] is not klass and not replace:
                raise ValueError(f"a scaling model is already registered as {key!r} ({_REGISTRY[key].__name__})")
            _REGISTRY[key] = klass
        return klass

    return register(cls) if cls is not None else register


def unregister_scaling_model(name: str) -> None:
    """Remove a registration (built-in models can be removed too)."""
    with _REGISTRY_LOCK:
        if name not in _REGISTRY:
            raise KeyError(f"no scaling model registered as {name!r}")
        del _REGISTRY[name]


def _load_entry_points() -> None:
    global _entry_points_loaded  # noqa: PLW0603  (one-time plugin discovery)
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    try:
        from importlib.metadata import entry_points  # noqa: PLC0415

        for ep in entry_points(group=_ENTRY_POINT_GROUP):
            if ep.name not in _REGISTRY:
                register_scaling_model(ep.load(), name=ep.name)
    except Exception:  # noqa: BLE001  a broken plugin must not break the built-in models
        pass


def registered_scaling_models() -> list[str]:
    """Names of all registered models (built-ins first)."""
    _load_entry_points()
    with _REGISTRY_LOCK:
        return list(_REGISTRY)


def scaling_model_class(name: str) -> type:
    """The model class registered as ``name``.

    Raises
    ------
    KeyError
        With the list of known names, if ``name`` is not registered.
    """
    _load_entry_points()
    with _REGISTRY_LOCK:
        if name not in _REGISTRY:
            raise KeyError(f"unknown scaling model {name!r}; registered: {list(_REGISTRY)}")
        return _REGISTRY[name]


def model_from_dict(obj: Mapping[str, Any]) -> ScalingModelBase:
    """Deserialise a ``scaling_model`` dict by dispatching on its ``__id__``."""
    if isinstance(obj, ScalingModelBase):
        return obj
    if not isinstance(obj, Mapping) or "__id__" not in obj:
        raise ValueError("a scaling model dict needs an '__id__' entry")
    return scaling_model_class(obj["__id__"]).from_dict(obj)


def create_scaling_model(name: str, params: Any, experiment: Any, reflection_table: Any) -> ScalingModelBase:
    """Create a registered model from data (``from_data``); ``params`` defaults to DIALS's."""
    return scaling_model_class(name).from_data(params if params is not None else default_model_params(),
                                               experiment, reflection_table)


for _cls in (PhysicalScalingModel, KBScalingModel, ArrayScalingModel, DoseDecay):
    register_scaling_model(_cls)


# ==========================================================================
# crystal frame for models refined by DIALS 1.x/2.x (2019)
# ==========================================================================
def legacy_crystal_frame_vectors(reflection_table: Any, experiment: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(s0c, s1c)`` as DIALS 1.x/2.x (2019) computed them for the absorption surface.

    The differences from the current convention
    (:func:`xtalscale.scaling_utilities.absorption_frame_vectors`):
    the rotation angle is ``φ = z·osc_width`` relative to the scan start (the
    table's ``phi`` column when present), vectors are rotated by ``−φ`` about
    ``goniometer.get_rotation_axis()`` ignoring the fixed rotation, ``s0`` is
    the beam vector (source to sample, ``|s0| = 1/λ``), and the frame is then
    turned so that the rotation axis (not lab x) lies along z. These reproduce
    the inverse scale factors of 2019 DIALS files to 1e-15.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        ``n x 3`` arrays; only their directions matter.
    """
    n = _nrows(reflection_table)
    if "phi" in reflection_table:
        phi_deg = np.asarray(reflection_table["phi"], dtype=np.float64)
    else:
        phi_deg = _z_px(reflection_table) * float(experiment.scan.get_oscillation()[1])
    from ._core.components import rotate_vectors_about_axis  # noqa: PLC0415
    from .scaling_utilities import align_axis_along_z  # noqa: PLC0415

    angles = np.ascontiguousarray(-np.radians(phi_deg))
    axis = np.asarray(experiment.goniometer.get_rotation_axis(), dtype=np.float64)
    s0 = np.tile(np.asarray(experiment.beam.get_s0(), dtype=np.float64), (n, 1))
    s1 = np.ascontiguousarray(_column(reflection_table, "s1"), dtype=np.float64).reshape(-1, 3)
    s0c = rotate_vectors_about_axis(axis, s0, angles)
    s1c = rotate_vectors_about_axis(axis, s1, angles)
    # 2019 DIALS turned the rotation axis itself (not lab x) onto z.
    return align_axis_along_z(axis, s0c), align_axis_along_z(axis, s1c)


# ==========================================================================
# one-call evaluation of stored models
# ==========================================================================
_NOT_SCALED = Flags.user_excluded_in_scaling | Flags.excluded_for_scaling


def _experiment_ids(table: Any, experiments: Sequence[Any]) -> list[int]:
    """The table ``id`` value of each experiment (via identifiers when the table has them)."""
    id_map = None
    if hasattr(table, "experiment_identifiers"):
        try:
            id_map = dict(table.experiment_identifiers())
        except Exception:  # noqa: BLE001  tables without identifiers fall back to positions
            id_map = None
    if id_map:
        by_identifier = {str(v): int(k) for k, v in id_map.items()}
        out = []
        for i, expt in enumerate(experiments):
            ident = str(getattr(expt, "identifier", "") or "")
            out.append(by_identifier.get(ident, i))
        return out
    return list(range(len(experiments)))


def suitable_for_scaling(table: Any) -> np.ndarray:
    """Rows DIALS gives a scale: not user-excluded, not excluded for scaling, d > 0.

    Parameters
    ----------
    table : reflection table or mapping of columns
        Uses ``flags`` and ``d`` when present.

    Returns
    -------
    numpy.ndarray
        Boolean mask in table order; the other rows keep ``g = 1`` (DIALS's convention).
    """
    n = _nrows(table)
    mask = np.ones(n, dtype=bool)
    if "flags" in table:
        flags = np.asarray(table["flags"]).astype(np.uint64)
        mask &= (flags & np.uint64(_NOT_SCALED)) == 0
    if "d" in table:
        mask &= np.asarray(table["d"], dtype=np.float64) > 0
    return mask


def _subtable(table: Any, rows: np.ndarray, columns: Sequence[str]) -> _Columns:
    return _Columns({c: np.asarray(table[c])[rows] for c in columns if c in table})


def inverse_scale_factors(experiments: Sequence[Any], reflections: Any, *, crystal_frame: str = "auto",
                          selection: Any = None, fill_value: float = 1.0, params: Any = None) -> Any:
    """Evaluate each experiment's stored scaling model: ``g`` (DIALS's ``inverse_scale_factor``).

    As ``dials.scale`` does when it re-applies a model, each experiment's
    components are configured on that experiment's *suitable* reflections (not
    ``user_excluded_in_scaling``/``excluded_for_scaling``, d > 0), which also
    fixes the smoother extents, and ``g`` is the product of the component
    values. Scaled intensities are ``I / g``.

    Parameters
    ----------
    experiments : ExperimentList or sequence of Experiment
        Each with ``scaling_model`` (a dict from an ``.expt`` file or a model
        object), and a scan/beam/goniometer when the model has absorption.
    reflections : reflection table or list of tables
        One table holding all experiments (rows matched through ``id`` and
        the experiment identifiers), or one table per experiment.
    crystal_frame : {"auto", "current", "legacy"}, optional
        Convention for the absorption directions. ``"legacy"`` is DIALS
        1.x/2.x (see :func:`legacy_crystal_frame_vectors`); ``"auto"`` picks it
        for model dicts carrying the pre-2020 ``"is_scaled"`` key.
    selection : bool array (or list of them), optional
        Rows to evaluate, overriding the default suitability rule.
    fill_value : float, optional
        Value for rows not evaluated (DIALS leaves them at 1.0).
    params : namespace, optional
        Model options (default :func:`default_model_params`).

    Returns
    -------
    numpy.ndarray or list of numpy.ndarray
        ``g`` in table order (a list when ``reflections`` is a list).
    """
    if crystal_frame not in ("auto", "current", "legacy"):
        raise ValueError(f"crystal_frame must be 'auto', 'current' or 'legacy' (got {crystal_frame!r})")
    experiments = list(experiments)
    if isinstance(reflections, (list, tuple)):
        if len(reflections) != len(experiments):
            raise ValueError(f"got {len(reflections)} reflection tables for {len(experiments)} experiments")
        sels = selection if isinstance(selection, (list, tuple)) else [selection] * len(reflections)
        return [_evaluate_table([e], t, crystal_frame, s, fill_value, params, ids=None)
                for e, t, s in zip(experiments, reflections, sels)]
    return _evaluate_table(experiments, reflections, crystal_frame, selection, fill_value, params,
                           ids=_experiment_ids(reflections, experiments))


#: The reflection-table columns the built-in models (physical, KB, array, dose decay) read when
#: they are configured on a table or evaluated on it (a table may lack some of them).
MODEL_COLUMNS = ("xyzobs.px.value", "d", "s1", "phi", "id", "s0c", "s1c", "analytical_correction")


def _evaluate_table(experiments: list, table: Any, crystal_frame: str, selection: Any, fill_value: float,
                    params: Any, ids: list[int] | None) -> np.ndarray:
    n = _nrows(table)
    if selection is None:
        base = suitable_for_scaling(table)
    else:
        base = np.asarray(selection)
        if base.dtype != np.bool_:  # a float or index array cast to bool would be wrong
            raise TypeError(f"selection must be a bool array (got dtype {base.dtype})")
    if base.shape != (n,):
        raise ValueError(f"selection must be a bool array of length {n} (got shape {base.shape})")
    _check_rows_to_evaluate(table, base, ids)
    g = np.full(n, float(fill_value))
    for k, expt in enumerate(experiments):
        raw = getattr(expt, "scaling_model", None)
        if raw is None:
            raise ValueError(f"experiment {k} has no scaling_model")
        model = model_from_dict(raw if isinstance(raw, ScalingModelBase) else copy.deepcopy(raw))
        if crystal_frame != "auto":
            model.crystal_frame = crystal_frame
        rows = base.copy()
        if ids is not None and "id" in table:
            rows &= np.asarray(table["id"]) == ids[k]
        idx = np.flatnonzero(rows)
        if idx.size == 0:
            continue
        sub = _subtable(table, idx, MODEL_COLUMNS)
        g[idx] = model.get_scales(sub, expt, params)
        _check_scales(g, idx, table, k)
    return g


def _first_row(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _check_rows_to_evaluate(table: Any, rows: np.ndarray, ids: list[int] | None) -> None:
    """Refuse rows that cannot get a meaningful g: an id matching no experiment, d not
    finite and > 0, a non-finite xyzobs.px.value, a zero or non-finite s1 (the message
    names the table row, not a position inside one experiment's subset)."""
    if ids is not None and "id" in table:
        row_ids = np.asarray(table["id"])
        orphan = rows & ~np.isin(row_ids, np.asarray(ids))
        if np.any(orphan):
            r = _first_row(orphan)
            raise ValueError(f"table row {r} has id {int(row_ids[r])}, which matches no experiment "
                             f"(experiment ids {sorted(set(ids))}); {int(orphan.sum())} such rows: "
                             "exclude them with the selection or fix the identifiers")
    if "d" in table:
        d = np.asarray(table["d"], dtype=np.float64)
        bad = rows & ~(np.isfinite(d) & (d > 0))
        if np.any(bad):
            r = _first_row(bad)
            raise ValueError(f"table row {r} has d = {d[r]}; d must be finite and > 0")
    if "xyzobs.px.value" in table:  # z places the row on the scale/decay smoothers
        xyz = np.asarray(table["xyzobs.px.value"], dtype=np.float64).reshape(-1, 3)
        bad = rows & ~np.isfinite(xyz).all(axis=1)
        if np.any(bad):
            r = _first_row(bad)
            raise ValueError(f"table row {r} has xyzobs.px.value = {xyz[r].tolist()}; it must "
                             "be finite")
    if "s1" in table:
        s1 = np.asarray(table["s1"], dtype=np.float64).reshape(-1, 3)
        length = np.sqrt(np.einsum("ij,ij->i", s1, s1))
        bad = rows & ~(np.isfinite(length) & (length > 0))
        if np.any(bad):
            r = _first_row(bad)
            raise ValueError(f"table row {r} has s1 = {s1[r].tolist()}; s1 must be a finite "
                             "non-zero vector")


def _check_scales(g: np.ndarray, idx: np.ndarray, table: Any, k: int) -> None:
    """g must be finite and > 0 (e.g. d = 1e-10 overflows the decay term)."""
    bad = ~(np.isfinite(g[idx]) & (g[idx] > 0))
    if np.any(bad):
        r = int(idx[_first_row(bad)])
        d = f", d = {float(np.asarray(table['d'])[r])}" if "d" in table else ""
        raise ValueError(f"experiment {k}'s scaling model gives g = {g[r]} on table row {r}{d}; "
                         f"{int(bad.sum())} rows have a non-finite or non-positive g")
