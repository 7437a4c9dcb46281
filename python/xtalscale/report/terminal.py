"""Terminal output: logging set-up (-v, log file), aligned tables and progress for long steps.

Output goes through the ``xtalscale`` logger so that ``-v`` and ``output.log=FILE`` control it
in one place; tables are plain aligned text (the same in a terminal and in a log file).
"""
from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["aligned_table", "configure_logging", "progress"]

logger = logging.getLogger("xtalscale")


def configure_logging(verbosity: int = 0, log_file: Any = None) -> logging.Logger:
    """Send ``xtalscale`` log records to stdout (INFO; DEBUG with ``-v``) and optionally a file.

    Returns the ``xtalscale`` logger. Calling it again replaces the handlers it installed.
    """
    for handler in list(logger.handlers):
        if getattr(handler, "_xtalscale", False):
            logger.removeHandler(handler)
            handler.close()
    level = logging.DEBUG if verbosity > 0 else logging.INFO
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    console.setLevel(level)
    console._xtalscale = True  # type: ignore[attr-defined]
    logger.addHandler(console)
    if log_file is not None:
        to_file = logging.FileHandler(str(log_file), mode="w", encoding="utf-8")
        to_file.setFormatter(logging.Formatter("%(message)s"))
        to_file.setLevel(logging.DEBUG)
        to_file._xtalscale = True  # type: ignore[attr-defined]
        logger.addHandler(to_file)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return logger


def aligned_table(header: Sequence[str], rows: Sequence[Sequence[Any]],
                  footer: Sequence[Sequence[Any]] = ()) -> str:
    """Right-aligned text columns (first column left-aligned), with rules around the body."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows] + \
        [[str(c) for c in r] for r in footer]
    widths = [max(len(r[j]) for r in cells if j < len(r)) for j in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if j == 0 else c.rjust(w)
                         for j, (c, w) in enumerate(zip(row, widths)))

    rule = "-" * len(line(cells[0]))
    out = [line(cells[0]), rule] + [line(r) for r in cells[1:1 + len(rows)]]
    if footer:
        out.append(rule)
        out += [line(r) for r in cells[1 + len(rows):]]
    return "\n".join(out)


@contextlib.contextmanager
def progress(description: str, enabled: bool | None = None) -> Iterator[None]:
    """A transient spinner with elapsed time (rich) while a long step runs.

    Shown only on an interactive terminal (or when ``enabled`` is True); the step's duration
    is always logged at DEBUG level.
    """
    import time

    show = sys.stderr.isatty() if enabled is None else enabled
    start = time.perf_counter()
    if show:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      transient=True) as bar:
            bar.add_task(description, total=None)
            yield
    else:
        yield
    logger.debug("%s: %.2f s", description, time.perf_counter() - start)
