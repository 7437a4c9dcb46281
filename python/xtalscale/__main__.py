"""``python -m xtalscale``: print paths for C++ consumers, or run the command-line program."""
from __future__ import annotations

import sys


def _paths(argv: list[str]) -> int | None:
    from . import get_cmake_dir, get_include

    if argv == ["--cmake-dir"]:
        print(get_cmake_dir())
        return 0
    if argv == ["--include"]:
        print(get_include())
        return 0
    return None


if __name__ == "__main__":
    status = _paths(sys.argv[1:])
    if status is None:
        from .cli import main

        status = main(sys.argv[1:])
    sys.exit(status)
