"""Output file parameters of the command-line jobs."""
from __future__ import annotations

from typing import Any

__all__ = ["output_path"]


def output_path(value: Any) -> str | None:
    """An output parameter's file name, or None when that output is not wanted: unset, empty
    or ``None`` (PHIL gives ``output.html=None`` as None; a quoted ``"None"`` counts too)."""
    if value is None:
        return None
    text = str(value).strip()
    return None if not text or text.lower() == "none" else text
