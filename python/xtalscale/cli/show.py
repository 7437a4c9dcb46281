"""``xtalscale show FILE...``: summarise .refl, .expt, MTZ or XDS files (recognised by content).

Prints rows, columns with types and ranges, flags counted by name, experiments, symmetry,
resolution range and batches.
"""
from __future__ import annotations

from collections.abc import Sequence

__all__ = ["SUMMARY", "run"]

SUMMARY = "summarise .refl/.expt/MTZ/XDS files: columns, ranges, flags, symmetry, batches"


def run(argv: Sequence[str]) -> int:
    """Run ``xtalscale show`` with the arguments after the command name."""
    from ..io.summary import summarise_file

    files = list(argv)
    if not files or any(a in ("-h", "--help") for a in files):
        print(__doc__)
        return 0 if files else 2
    for i, path in enumerate(files):
        if i:
            print()
        print(summarise_file(path))
    return 0
