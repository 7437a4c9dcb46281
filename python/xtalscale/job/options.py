"""DIALS's command-line ``ArgumentParser`` (``dials.util.options``) on freephil.

A DIALS script does::

    parser = ArgumentParser(usage=..., phil=phil_scope, read_reflections=True,
                            read_experiments=True, check_format=False)
    params, options = parser.parse_args(args=None, show_diff_phil=True)
    reflections, experiments = reflections_and_experiments_from_files(
        params.input.reflections, params.input.experiments)

and that runs here unchanged: input files are recognised by content
(:func:`xtalscale.job.inputs.file_kind`) and land in ``params.input.reflections`` /
``params.input.experiments`` as objects with ``filename`` and ``data``; ``key=value`` words and
``.phil`` files set parameters, with a :class:`~xtalscale.job.phil.PhilError` (a ValueError)
naming the nearest valid name for a misspelt one instead of DIALS's ``Sorry`` exit.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .phil import PhilError, parse_phil_arguments

__all__ = ["ArgumentParser", "FilenameDataWrapper", "reflections_and_experiments_from_files"]


@dataclass
class FilenameDataWrapper:
    """A file read from the command line: its name and the loaded object."""

    filename: str
    data: Any


def reflections_and_experiments_from_files(reflection_file_object_list: Sequence[Any],
                                           experiment_file_object_list: Sequence[Any]
                                           ) -> tuple[list, Any]:
    """The loaded tables (a list) and one ExperimentList joining the experiment files."""
    from ..experiments import ExperimentList

    tables = [w.data for w in reflection_file_object_list]
    experiments = ExperimentList()
    for w in experiment_file_object_list:
        experiments.extend(w.data)
    return tables, experiments


class ArgumentParser:
    """Parse DIALS-style command lines: files, ``key=value`` words, ``.phil`` files, flags.

    Parameters
    ----------
    usage, epilog : str, optional
        Shown by ``-h``.
    phil : freephil scope, optional
        The master parameters; an ``input { reflections, experiments }`` scope is provided
        on ``params`` when files are read.
    read_reflections, read_experiments : bool
        Accept ``.refl``/``.expt`` files (recognised by content).
    check_format : bool
        Accepted for DIALS compatibility (no image data is ever opened).
    """

    def __init__(self, usage: str | None = None, phil: Any = None, read_reflections: bool = False,
                 read_experiments: bool = False, check_format: bool = True,
                 epilog: str | None = None, **_: Any) -> None:
        from ..io.phil_args import import_freephil

        freephil = import_freephil()
        self.usage = usage or ""
        self.epilog = epilog or ""
        self.phil = phil if phil is not None else freephil.parse("")
        self.read_reflections = read_reflections
        self.read_experiments = read_experiments
        self.check_format = check_format
        self._flags = argparse.ArgumentParser(add_help=False)
        self._flags.add_argument("-h", "--help", action="count", default=0)
        self._flags.add_argument("-c", "--show-config", action="store_true")
        self._flags.add_argument("-a", "--attributes-level", type=int, default=2)
        self._flags.add_argument("-v", "--verbose", action="count", default=0)

    def add_argument(self, *args: Any, **kwargs: Any) -> None:
        """Add an ordinary flag (as ``argparse.ArgumentParser.add_argument``)."""
        self._flags.add_argument(*args, **kwargs)

    def format_help(self) -> str:
        text = [f"usage: {self.usage}" if self.usage else ""]
        if self.epilog:
            text.append(self.epilog)
        text.append("-h shows this help, -c the full configuration with defaults and help "
                    "strings (-c -a N for more attributes), -v more output.")
        return "\n\n".join(t for t in text if t)

    def parse_args(self, args: Sequence[str] | None = None, show_diff_phil: bool = False,
                   return_unhandled: bool = False, quick_parse: bool = False) -> Any:
        """Returns ``(params, options)`` (plus the unhandled words if ``return_unhandled``).

        ``-h`` prints the help and ``-c`` the configuration, then exit with status 0 (as DIALS).
        """
        from .inputs import file_kind, load_inputs

        words = list(sys.argv[1:] if args is None else args)
        options, rest = self._flags.parse_known_args(words)
        if options.help:
            print(self.format_help())
            raise SystemExit(0)
        files, phil_words, unhandled = [], [], []
        for word in rest:
            if "=" in word and not _is_file(word):
                phil_words.append(word)
            elif _is_file(word):
                kind = file_kind(word)
                if kind == "phil":
                    phil_words.append(word)
                elif (kind == "reflections" and self.read_reflections) or (
                        kind == "experiments" and self.read_experiments):
                    files.append(word)
                else:
                    unhandled.append(word)
            else:
                unhandled.append(word)
        params, working = parse_phil_arguments(phil_words, self.phil)
        if options.show_config:
            out = self.phil.fetch(sources=[working]) if working is not None else self.phil
            out.show(attributes_level=options.attributes_level)
            raise SystemExit(0)
        if show_diff_phil:
            diff = self.phil.fetch_diff(source=working).as_str()
            if diff.strip():
                print("The following parameters have been modified:\n\n" + diff)
        reflections, experiments = [], []
        if files:
            loaded = load_inputs(files)
            for table, source in zip(loaded.tables, loaded.sources):
                reflections.append(FilenameDataWrapper(source.split(" + ")[0], table))
            experiments.append(FilenameDataWrapper(
                ";".join(s.split(" + ")[-1] for s in loaded.sources), loaded.experiments))
        params.__inject__("input", _Input(reflections, experiments))
        if unhandled and not return_unhandled:
            raise PhilError(f"unrecognised argument(s): {' '.join(unhandled)}")
        if return_unhandled:
            return params, options, unhandled
        return params, options


class _Input:
    """``params.input``: the files read, as DIALS's parser provides them."""

    def __init__(self, reflections: list, experiments: list) -> None:
        self.reflections = reflections
        self.experiments = experiments


def _is_file(word: str) -> bool:
    from pathlib import Path

    try:
        return Path(word).is_file()
    except OSError:
        return False
