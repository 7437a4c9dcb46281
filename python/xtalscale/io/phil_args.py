"""``key=value`` words and ``.phil`` files applied to a freephil master scope.

The one command-line PHIL parser of every command (``xtalscale scale``, ``xtalscale merge``,
the DIALS-style option parser): each command passes its own master scope and the exception
class its errors should have. An unknown or misspelt name is an error naming the nearest
definitions (full dotted paths and leaf names both match).
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["definition_paths", "import_freephil", "parse_phil_words", "suggest_names"]


def import_freephil() -> Any:
    """The ``freephil`` module, imported without ``pkg_resources`` (0.1 s saved per run).

    freephil imports ``pkg_resources`` only to look up ``freephil.converter`` entry points
    while it loads; importing setuptools' ``pkg_resources`` costs about a tenth of a second
    of CPU, a tenth of a small scaling job. While freephil loads, a stand-in module answers
    that one look-up from :mod:`importlib.metadata` (same entry points, same ``load()``);
    it is removed again at once, so a later ``import pkg_resources`` gets the real one.
    """
    import sys

    if "freephil" in sys.modules or "pkg_resources" in sys.modules:
        import freephil

        return freephil
    import importlib.metadata
    import types

    def iter_entry_points(group: str, name: str | None = None) -> list[Any]:
        return [entry for entry in importlib.metadata.entry_points(group=group)
                if name is None or entry.name == name]

    stand_in = types.ModuleType("pkg_resources")
    stand_in.iter_entry_points = iter_entry_points  # type: ignore[attr-defined]
    sys.modules["pkg_resources"] = stand_in
    try:
        import freephil
    finally:
        if sys.modules.get("pkg_resources") is stand_in:
            del sys.modules["pkg_resources"]
    return freephil


def definition_paths(scope: Any) -> list[str]:
    """Full dotted names of every definition in the freephil ``scope``."""
    return [d.path for d in scope.all_definitions()]


def suggest_names(name: str, paths: Sequence[str]) -> str:
    """`` (did you mean a or b?)`` for a misspelt ``name``, or ``""`` when nothing is near."""
    leaves = {p.rsplit(".", 1)[-1]: p for p in paths}
    near = difflib.get_close_matches(name, list(paths), n=3, cutoff=0.6)
    leaf = name.rsplit(".", 1)[-1]
    near += [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=3, cutoff=0.6)]
    unique = list(dict.fromkeys(near))[:3]
    return f" (did you mean {' or '.join(unique)}?)" if unique else ""


def _interpret(interpreter: Any, word: str, paths: Sequence[str], error: type[Exception]) -> Any:
    """One ``key=value`` word as a PHIL object, or ``error`` naming the nearest names."""
    key, sep, _ = word.partition("=")
    if not sep or not key.strip():
        raise error(f"malformed parameter {word!r}: expected name=value")
    try:
        return interpreter.process(arg=word)
    except (SystemExit, RuntimeError, ValueError) as exc:  # freephil's Sorry is a SystemExit
        message = str(exc).strip() or type(exc).__name__
        if "Unknown" in message or "unknown" in message:
            raise error(f"unknown parameter {key.strip()!r}{suggest_names(key.strip(), paths)}") from None
        if "ambiguous" in message.lower():
            raise error(f"ambiguous parameter {key.strip()!r}: {message}") from None
        raise error(f"bad parameter {word!r}: {message}") from None


def _read_phil_file(word: str, paths: Sequence[str], error: type[Exception]) -> Any:
    """A ``.phil`` file as a PHIL object; every definition must be a known (full or suffix) name."""
    freephil = import_freephil()

    try:
        text = Path(word).read_text()
    except OSError as exc:
        raise error(f"cannot read PHIL file {word}: {exc.strerror}") from None
    try:
        source = freephil.parse(text, process_includes=False)
    except (SystemExit, RuntimeError, ValueError) as exc:
        raise error(f"PHIL file {word}: {exc}") from None
    for definition in source.all_definitions():
        name = definition.path
        if not (name in paths or any(p.endswith("." + name) for p in paths)):
            raise error(f"{word}: unknown parameter {name!r}{suggest_names(name, paths)}")
    return source


def parse_phil_words(words: Iterable[str], scope: Any,
                     error: type[Exception] = ValueError) -> tuple[Any, Any]:
    """Apply ``key=value`` words and ``.phil`` files to the master ``scope``.

    Parameters
    ----------
    words : iterable of str
        ``name=value`` (a unique suffix of a dotted name is enough, as in DIALS) or the path
        of a ``.phil`` file.
    scope : freephil scope
        The command's master scope.
    error : exception class
        Raised (with the message) for every problem; the command's own error type.

    Returns
    -------
    (params, working_scope)
        The extracted parameter object and the working PHIL scope (for ``show``/diff).

    Raises
    ------
    error
        Unknown, ambiguous or malformed names (suggesting the nearest valid names), and values
        of the wrong type or outside their limits.
    """
    paths = definition_paths(scope)
    interpreter = scope.command_line_argument_interpreter()
    sources = []
    for word in words:
        if "=" not in word and word.endswith(".phil"):
            sources.append(_read_phil_file(word, paths, error))
        else:
            sources.append(_interpret(interpreter, word, paths, error))
    try:
        working = scope.fetch(sources=sources)
        params = working.extract()
    except (SystemExit, RuntimeError, ValueError) as exc:
        raise error(str(exc).strip()) from None
    return params, working
