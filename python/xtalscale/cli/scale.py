"""``xtalscale scale``: scale integrated data (dials.scale's job and parameters).

Usage::

    xtalscale scale integrated.refl integrated.expt [more .refl/.expt pairs] [key=value ...]
    xtalscale scale 20_integrated.pickle 20_integrated_experiments.json d_min=1.0
    xtalscale scale -c            # the full configuration with defaults and help

Inputs are recognised by content (.refl/.expt pairs, legacy pickle/JSON, unmerged MTZ, XDS);
parameters use dials.scale's names (a unique suffix is enough: ``d_min=``, ``error_model=None``,
``outlier_rejection=simple``, ``absorption_level=medium``, ``merged_mtz=...``) or a .phil file.
Outputs: scaled.refl + scaled.expt (every input row, with flags), the statistics table, the
HTML report and the log; merged/unmerged MTZ on request.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

__all__ = ["SUMMARY", "run"]

SUMMARY = "scale integrated data (dials.scale): scaled .refl/.expt, statistics, report, MTZ"


def _help() -> str:
    from ..job.phil import DIFFERING_DEFAULTS

    lines = [__doc__ or "", "Options: -h (this help), -c (full configuration; -c -a 3 for all "
             "attributes), -v (more output)", "", "Defaults that differ from dials.scale:"]
    lines += [f"  {name} = {ours}  (dials.scale: {theirs})" for name, ours, theirs in DIFFERING_DEFAULTS]
    return "\n".join(lines)


def run(argv: Sequence[str]) -> int:
    """Run ``xtalscale scale`` with the arguments after the command name."""
    from ..job.inputs import split_arguments
    from ..job.phil import parse_phil_arguments, show_configuration
    from ..job.run import run_scale_job
    from ..report.terminal import configure_logging

    argv = list(argv)
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(_help())
        return 0 if argv else 2
    verbosity = sum(a.count("v") for a in argv if a.startswith("-v") and set(a[1:]) <= {"v"})
    show_config = any(a in ("-c", "--show-config") for a in argv)
    level = 2
    if "-a" in argv:
        level = int(argv[argv.index("-a") + 1])
    words = [a for i, a in enumerate(argv) if not a.startswith("-") and not (i and argv[i - 1] == "-a")]
    unknown = [a for a in argv if a.startswith("-") and a not in ("-c", "--show-config", "-a")
               and not (a.startswith("-v") and set(a[1:]) <= {"v"})]
    if unknown:
        raise ValueError(f"unknown option(s) {' '.join(unknown)} (use -h for help)")
    files, phil_words = split_arguments(words)
    params, working = parse_phil_arguments(phil_words)
    if show_config:
        print(show_configuration(working, attributes_level=level))
        return 0
    if not files:
        raise ValueError("no input files: give integrated .refl and .expt files (or an unmerged "
                         "MTZ / XDS file); -h for help")
    from ..io.outputs import output_path
    from ..job.run import check_outputs_writable

    log_file = output_path(params.output.log)

    check_outputs_writable(params)  # before the log file is created and before any work
    log = configure_logging(verbosity, log_file)
    t0 = time.perf_counter()
    result = run_scale_job(params, files)
    wall = time.perf_counter() - t0
    log.info("time per stage: %s", ", ".join(f"{k.strip()} {v:.2f} s" for k, v in result.timings.items()))
    log.info("xtalscale scale finished in %.2f s", wall)
    return 0
