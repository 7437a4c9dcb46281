"""Modules imported on first use.

``import scipy.sparse`` costs ~0.15–0.2 s (most of it scipy's array-API layer, which imports
numpy.f2py and numpy.testing); the scaling job's path never calls scipy, so the modules on
that path name scipy through a :class:`LazyModule` and only a script that uses a scipy-backed
API (a derivative matrix, an explicit Jacobian) pays for the import.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__all__ = ["LazyModule", "is_scipy_sparse"]


class LazyModule(types.ModuleType):
    """A stand-in for the module ``name``: the first attribute read imports it and copies its
    namespace in (later reads are plain attribute lookups)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__dict__["_lazy_target"] = name

    def __getattr__(self, attribute: str) -> Any:
        module = importlib.import_module(self.__dict__["_lazy_target"])
        self.__dict__.update(module.__dict__)
        return getattr(module, attribute)


def is_scipy_sparse(obj: Any) -> bool:
    """``scipy.sparse.issparse(obj)`` without importing scipy: if scipy.sparse was never
    imported, no object can be one of its matrices."""
    module = sys.modules.get("scipy.sparse")
    return module is not None and bool(module.issparse(obj))
