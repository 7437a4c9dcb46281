"""Recognise a crystallographic file by its content (not its name)."""
from __future__ import annotations

import gzip
import os
from typing import Any

__all__ = ["detect_file_type"]


def _head(path: str, n: int = 4096) -> bytes:
    with open(path, "rb") as f:
        head = f.read(n)
    if head[:2] == b"\x1f\x8b":  # gzip: look inside
        with gzip.open(path, "rb") as f:
            head = f.read(n)
    return head


def detect_file_type(path: Any) -> str:
    """``'mtz'``, ``'experiments'``, ``'reflections'`` or ``'xds'`` from the file's bytes.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the content is not one of these formats.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    head = _head(path)
    if head[:4] == b"MTZ ":
        return "mtz"
    text = head.lstrip()
    if text[:1] in (b"{", b"[") and (b"ExperimentList" in head or b'"experiment"' in head):
        return "experiments"
    if head[:1] in (b"\x92", b"\x93", b"\x94") or head[:9] == b"\xa4dials":  # msgpack .refl
        return "reflections"
    if b"dials::af::reflection_table" in head or head[:1] == b"\x80":  # legacy pickle
        return "reflections"
    if head[:1] == b"!" and (b"FORMAT=XDS_ASCII" in head or b"OUTPUT_FILE=INTEGRATE.HKL" in head
                             or b"!ITEM_H=" in head):
        return "xds"
    raise ValueError(f"{path}: not an MTZ, .expt, .refl or XDS file (unrecognised content)")
