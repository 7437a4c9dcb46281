"""Error models: the correction of the intensity uncertainties, σ'² = a²·(σ² + (b·I)²).

Only the stored form is here so far: :class:`BasicErrorModel` holds DIALS's two parameters
(a, b) and round-trips the error-model entries DIALS writes into a scaling model's
``configuration_parameters`` (``error_model_type``/``error_model_parameters``) and DIALS's
``to_dict`` form. Refining the model (its target and minimiser) belongs to the scaling job.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["ErrorModelError", "BasicErrorModel"]


class ErrorModelError(ValueError):
    """Invalid error-model parameters or dict."""


def _parameter(value: Any, name: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ErrorModelError(f"{name} must be a number (got {value!r})") from None
    if not math.isfinite(x):
        raise ErrorModelError(f"{name} must be finite (got {x})")
    return x


class BasicErrorModel:
    """DIALS's basic error model: σ'² = a²·(σ² + (b·I)²).

    Parameters
    ----------
    a, b : float, optional
        The parameters; None gives DIALS's starting values (a = 1.0, b = 0.02).
    basic_params : namespace, optional
        DIALS's ``error_model.basic`` options: a set ``a`` or ``b`` there overrides the value
        given here (as ``dials.scale`` does with ``basic.a=`` / ``basic.b=``).
    """

    id_ = "basic"
    #: DIALS's starting values.
    default_a = 1.0
    default_b = 0.02

    def __init__(self, a: Any = None, b: Any = None, basic_params: Any = None) -> None:
        a = self.default_a if a is None else a
        b = self.default_b if b is None else b
        if basic_params is not None:
            a = getattr(basic_params, "a", None) or a
            b = getattr(basic_params, "b", None) or b
        self.parameters = [_parameter(a, "a"), _parameter(b, "b")]

    @property
    def a(self) -> float:
        """The overall σ multiplier."""
        return self.parameters[0]

    @property
    def b(self) -> float:
        """The intensity-proportional term."""
        return self.parameters[1]

    def update_variances(self, variances: Any, intensities: Any) -> Any:
        """σ'² = a²·(σ² + (b·I)²), elementwise (numpy arrays in, array out)."""
        import numpy as np  # noqa: PLC0415  (kept out of the import of the stored form)

        v = np.asarray(variances, dtype=np.float64)
        i = np.asarray(intensities, dtype=np.float64)
        if v.shape != i.shape:
            raise ErrorModelError(f"variances and intensities must have the same shape "
                                  f"(got {v.shape} and {i.shape})")
        return self.a * self.a * (v + (self.b * i) ** 2)

    def update_variances_and_weights(self, variances: Any, intensities: Any, n_threads: int = 1) -> tuple[Any, Any]:
        """:meth:`update_variances` and the weights 1/σ'², bit for bit, in one C++ pass over
        ``n_threads`` threads (the job's rounds weight 10⁶ rows this way). A subclass with its
        own :meth:`update_variances` gets that and the weights from numpy."""
        import numpy as np  # noqa: PLC0415  (kept out of the import of the stored form)

        from ._core import job as kernels  # noqa: PLC0415

        if type(self).update_variances is not BasicErrorModel.update_variances:
            var = np.asarray(self.update_variances(variances, intensities), dtype=np.float64)
            return var, 1.0 / var
        v = np.asarray(variances, dtype=np.float64)
        i = np.asarray(intensities, dtype=np.float64)
        if v.shape != i.shape or v.ndim != 1:
            raise ErrorModelError(f"variances and intensities must be 1-dimensional of the same shape "
                                  f"(got {v.shape} and {i.shape})")
        return kernels.error_model_variances(v, i, float(self.a), float(self.b), n_threads=max(1, int(n_threads)))

    def to_dict(self) -> dict:
        """DIALS's dict form: ``{"__id__": "basic", "parameters": [a, b]}``."""
        return {"__id__": self.id_, "parameters": list(self.parameters)}

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> "BasicErrorModel":
        """Read :meth:`to_dict`'s form, or a scaling model's configuration parameters
        (``error_model_type: "BasicErrorModel"`` and ``error_model_parameters``)."""
        if "error_model_parameters" in obj:
            kind, params = obj.get("error_model_type"), obj["error_model_parameters"]
            if kind != cls.__name__:
                raise ErrorModelError(f"error_model_type is {kind!r}, not {cls.__name__!r}")
        elif "parameters" in obj:
            kind, params = obj.get("__id__"), obj["parameters"]
            if kind != cls.id_:
                raise ErrorModelError(f"__id__ is {kind!r}, not {cls.id_!r}")
        else:
            raise ErrorModelError("an error-model dict needs 'parameters' or "
                                  "'error_model_parameters'")
        if len(params) != 2:
            raise ErrorModelError(f"a basic error model has 2 parameters (got {len(params)})")
        return cls(params[0], params[1])

    def __repr__(self) -> str:
        return f"BasicErrorModel(a={self.a!r}, b={self.b!r})"
