"""Recognise a crystallographic file by its content (not its name), and split command lines.

DIALS's own test inputs are named ``20_integrated.pickle`` and
``20_integrated_experiments.json``, so the extension says little: the recognisers read the
first bytes. Kinds: ``"reflections"`` (DIALS msgpack ``.refl`` or legacy pickle),
``"experiments"`` (``.expt``/JSON experiment list), ``"mtz"`` (unmerged MTZ, also gzipped),
``"xds"`` (``INTEGRATE.HKL`` / ``XDS_ASCII.HKL``) and, for command lines, ``"phil"`` (a
parameter file).

* :func:`detect_file_type` -- the data kinds; ``FileNotFoundError`` / ``ValueError``.
* :func:`file_kind` -- the same plus ``"phil"``; every failure is an :class:`InputError`.
* :func:`split_arguments` -- command-line words into input files and PHIL words.
"""
from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["InputError", "detect_file_type", "file_kind", "split_arguments"]


class InputError(ValueError):
    """An input file that cannot be used: unreadable, unrecognised or inconsistent."""


def _head(path: str, n: int = 4096) -> bytes:
    with open(path, "rb") as f:
        head = f.read(n)
    if head[:2] == b"\x1f\x8b":  # gzip (gemmi reads gzipped MTZ directly): look inside
        try:
            with gzip.open(path, "rb") as f:
                head = f.read(n)
        except (OSError, EOFError):
            return b""
    return head


def _looks_like_phil(text: str) -> bool:
    first = next((ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")), "")
    return "=" in first or first.rstrip().endswith("{")


def _recognise(path: str, head: bytes, allow_phil: bool) -> str | None:
    """The kind of a file whose first bytes are ``head``, or None."""
    if head[:4] == b"MTZ ":
        return "mtz"
    if head[:1] in (b"\x92", b"\x93", b"\x94") or head[:9] == b"\xa4dials":  # msgpack .refl
        return "reflections"
    if head[:1] == b"\x80":  # legacy pickle
        return "reflections"
    text = head.decode("utf-8", errors="replace").lstrip()
    if text[:1] in ("{", "[") and ("ExperimentList" in text or '"experiment"' in text
                                   or '"crystal"' in text):
        return "experiments"
    if b"dials::af::reflection_table" in head:  # msgpack .refl with another header layout
        return "reflections"
    if text[:1] == "!" and ("XDS_ASCII" in text or "INTEGRATE.HKL" in text or "!ITEM_H=" in text):
        return "xds"
    if allow_phil and (Path(path).suffix == ".phil" or _looks_like_phil(text)):
        return "phil"
    return None


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
    kind = _recognise(path, _head(path), allow_phil=False)
    if kind is None:
        raise ValueError(f"{path}: not an MTZ, .expt, .refl or XDS file (unrecognised content)")
    return kind


def file_kind(path: str | Path) -> str:
    """What a command-line input file holds, from its content: a data kind or ``"phil"``.

    Raises
    ------
    InputError
        If the file cannot be read or its content is none of the known kinds.
    """
    p = Path(path)
    try:
        head = _head(str(p))
    except OSError as exc:
        raise InputError(f"cannot read {p}: {exc.strerror}") from None
    kind = _recognise(str(p), head, allow_phil=True)
    if kind is None:
        raise InputError(f"{p}: not a recognised input (expected DIALS .refl/.expt, an unmerged "
                         f"MTZ, an XDS INTEGRATE.HKL/XDS_ASCII.HKL or a .phil file)")
    return kind


def split_arguments(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split command-line words into input files and PHIL words (``key=value`` or ``.phil``).

    A word that names an existing file is a file (a parameter file goes with the PHIL words);
    any other word with ``=`` is a parameter.

    Raises
    ------
    InputError
        A word that is neither an existing file nor ``name=value``.
    """
    files, phil = [], []
    for word in argv:
        path = Path(word)
        if path.is_file():
            (phil if file_kind(path) == "phil" else files).append(word)
        elif "=" in word:
            phil.append(word)
        else:
            raise InputError(f"{word}: no such file, and not a name=value parameter")
    return files, phil
