"""The ``xtalscale`` command-line program: ``xtalscale COMMAND ARGS...``.

Each command lives in its own module of this package with ``SUMMARY`` (one line for the
overview) and ``run(argv) -> int`` (its own argument parsing: argparse or PHIL ``key=value``).
To add a command, add its module to ``_COMMANDS``.
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

__all__ = ["main", "no_huge_pages", "one_malloc_arena", "reuse_freed_memory"]

# command name -> module in this package (imported only when the command runs)
_COMMANDS = {
    "scale": "scale",
    "apply-model": "apply_model",
    "merge": "merge",
    "show": "show",
}

# Errors a user can cause with bad input; they print one clear line instead of a traceback.
_USER_ERRORS = (ValueError, KeyError, IndexError, OSError)


def _usage() -> str:
    lines = ["usage: xtalscale COMMAND [ARGS...]", "", "commands:"]
    for name, module_name in _COMMANDS.items():
        module = importlib.import_module(f"{__name__}.{module_name}")
        lines.append(f"  {name:<14}{module.SUMMARY}")
    lines.append("")
    lines.append("xtalscale COMMAND -h shows a command's own help.")
    return "\n".join(lines)


def _one_blas_thread_from_load() -> None:
    """Start OpenBLAS with one thread when this process has not loaded numpy yet.

    A command runs all its BLAS calls with one thread (:func:`single_threaded_blas`), but
    each OpenBLAS library (numpy's and scipy's are two) starts a pool of one thread per core
    when it loads, and an idle pool thread spins before it sleeps: ~0.1 s of CPU per small
    job, taken from the other jobs on a busy machine. ``OPENBLAS_NUM_THREADS`` read at load
    avoids the pools. A value the user set is kept; an interpreter that already holds numpy
    (a test, a script calling :func:`main`) is left alone.
    """
    if "numpy" not in sys.modules:
        import os

        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def one_malloc_arena() -> bool:
    """Give this process's threads glibc's main malloc arena only (``M_ARENA_MAX`` = 1).

    With ``nproc`` > 1 each worker thread otherwise gets its own arena, and memory one thread
    freed is not reused by another: at 10⁶ observations the job's peak was ~0.1 GB higher
    with two threads (1.08 vs 0.97 GiB; same time). The commands' threads allocate a few large
    buffers each, so sharing one arena costs no measurable time. Advice for the allocator
    only: returns False (and changes nothing) off glibc. Called by :func:`main`; a program
    embedding the job may call it itself.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_ARENA_MAX = -8  # noqa: N806 (glibc's malloc.h name)
        return bool(libc.mallopt(M_ARENA_MAX, 1))
    except (OSError, AttributeError):
        return False


def reuse_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the kernel.

    By default glibc maps every allocation above a (dynamic) threshold afresh and unmaps it on
    free, and trims the heap's free top: the job's per-block buffers (a streamed block's
    derivatives, 10–20 MB each, freed after use) then come back as fresh pages the kernel must
    zero on first touch. With the mmap threshold at its 32 MB maximum and a 1 GB trim
    threshold they are reused from the heap: evaluating a 60k-row model block after freeing
    its buffers measured 250 → 87 ns/row, the job's page faults 340k → 222k (about its peak
    resident size, so the peak itself does not grow: 912 against 926–941 MB). Returns False
    (and changes nothing) off glibc. Called by :func:`main`.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # noqa: N806 (glibc's malloc.h names)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


def no_huge_pages() -> bool:
    """Stop numpy (and xtalscale's C++ buffers) asking the kernel for transparent huge pages.

    numpy advises huge pages on every array of 4 MB or more. On a virtual machine a huge page
    is usually guest memory the host has not backed yet, and its first touch then costs about
    five times as much as 4 kB pages (measured here: 2.1 against 0.4 s per GiB); the scale job
    at 1.1 × 10⁶ observations ran 0.3–0.6 s faster without the advice (4.8–5.2 s against
    5.3–5.5 s, alternating runs). Process-wide advice for the allocator only; returns False
    where numpy offers no switch. Called by :func:`main`; a program embedding the job may call
    it itself.
    """
    from .. import _core

    _core.set_huge_pages(False)
    import numpy as np

    for module in ("_core", "core"):  # numpy 2 / numpy 1
        setter = getattr(getattr(getattr(np, module, None), "multiarray", None), "_set_madvise_hugepage", None)
        if setter is not None:
            setter(False)
            return True
    return False


def no_cyclic_gc() -> bool:
    """Turn Python's cyclic garbage collector off; returns whether it was on.

    A scaling job's memory is numpy arrays, freed by reference counting; the collector only
    walks the many small objects the orchestration makes, dozens of times per job, and frees
    nothing of size (the 10⁶-observation bench: 40-60 ms of the job, the same peak memory).
    Process-wide, like the allocator settings above: :func:`main` turns it off for its command
    and back on after; a program embedding the job decides for itself (its own threads'
    cycles would wait).
    """
    import gc

    was_enabled = gc.isenabled()
    gc.disable()
    return was_enabled


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in _COMMANDS:
        import difflib

        near = difflib.get_close_matches(command, list(_COMMANDS), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        print(f"xtalscale: error: unknown command {command!r}{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    _one_blas_thread_from_load()
    one_malloc_arena()
    reuse_freed_memory()
    no_huge_pages()
    gc_was_enabled = no_cyclic_gc()
    module = importlib.import_module(f"{__name__}.{_COMMANDS[command]}")
    from ..fit.blas import single_threaded_blas

    try:
        # the commands' own kernels are the parallel part (nproc); BLAS calls are small
        with single_threaded_blas():
            return int(module.run(rest))
    except BrokenPipeError:
        # the reader went away (``xtalscale merge -h | head``): stop quietly, as Python's docs
        # advise, pointing stdout at devnull so the interpreter's final flush cannot fail again
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except _USER_ERRORS as error:
        print(f"xtalscale: error: {error}", file=sys.stderr)
        return 2
    finally:
        if gc_was_enabled:  # (a program calling main keeps its collector)
            import gc

            gc.enable()


if __name__ == "__main__":
    sys.exit(main())
