"""``xtalscale merge``: scaled data → merged MTZ, statistics table, HTML report, JSON.

Usage::

    xtalscale merge scaled.expt scaled.refl [key=value ...]
    xtalscale merge scaled_unmerged.mtz d_min=1.8 output.json=stats.json

Files are recognised by their content. Parameters (``xtalscale merge -h`` lists them) are
those of :data:`xtalscale.merge.params.MERGE_PHIL`.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from typing import Any

from ..io.outputs import output_path

__all__ = ["SUMMARY", "run"]

SUMMARY = "merge scaled data: merged MTZ (IMEAN, I(+/-), F, DANO, N), statistics, report"


def _help() -> str:
    from ..merge.params import MERGE_PHIL

    return (__doc__ or "") + "\nOptions: -v (more output), -h (this help)\n\nParameters:\n" \
        + MERGE_PHIL


def _split_arguments(argv: Sequence[str]) -> tuple[list[str], list[str], int]:
    """(files, PHIL words, verbosity): ``-v``/``-vv``/``--verbose`` counted, the rest split by
    :func:`xtalscale.io.detect.split_arguments`."""
    from ..io.detect import split_arguments

    verbosity, words = 0, []
    for arg in argv:
        if arg == "--verbose":
            verbosity += 1
        elif arg.startswith("-v") and set(arg[1:]) == {"v"}:
            verbosity += len(arg) - 1
        else:
            words.append(arg)
    files, phil = split_arguments(words)
    return files, phil, verbosity


def _load(files: list[str]) -> tuple[Any, Any, Any]:
    """(observations, experiments or None, reflections or None) from the input files."""
    from ..io.detect import detect_file_type
    from ..merge import observations_from_mtz, observations_from_reflections

    kinds: dict[str, list[str]] = {}
    for path in files:
        kinds.setdefault(detect_file_type(path), []).append(path)
    if "mtz" in kinds and len(files) == 1:
        return observations_from_mtz(kinds["mtz"][0]), None, None
    if len(kinds.get("experiments", [])) == 1 and len(kinds.get("reflections", [])) == 1 \
            and len(files) == 2:
        from ..experiments import ExperimentList
        from ..reflection_table import reflection_table

        experiments = ExperimentList.from_file(kinds["experiments"][0])
        reflections = reflection_table.from_file(kinds["reflections"][0])
        source = f"{kinds['experiments'][0]} + {kinds['reflections'][0]}"
        return (observations_from_reflections(experiments, reflections, source=source),
                experiments, reflections)
    found = ", ".join(f"{k}: {len(v)}" for k, v in kinds.items()) or "none"
    raise ValueError(f"give one scaled unmerged MTZ, or one .expt and one .refl file "
                     f"(found {found})")


def _stats_table(stats) -> str:
    return str(stats.as_table())


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _summary(obs, merged) -> list[tuple[str, str]]:
    d = obs.d_spacings()
    return [("Input", obs.source),
            ("Space group", obs.space_group.symbol_and_number()),
            ("Unit cell", " ".join(f"{p:.3f}" for p in obs.unit_cell.parameters())),
            ("Resolution range (Å)", f"{d.max():.3f} - {d.min():.3f}"),
            ("Observations merged", f"{len(obs)} (of {obs.n_rows_read} rows read)"),
            ("Unique reflections", str(len(merged))),
            ("French-Wilson", ", ".join(f"{k}: {v}" for k, v in merged.truncation.items())
             or "not run")]


def _merge(files: list[str], params, log) -> int:
    from ..merge import merge_observations, write_merged_mtz
    from ..report.terminal import aligned_table, progress

    t0 = time.perf_counter()
    with progress("reading input"):
        obs, experiments, _ = _load(files)
    obs = obs.resolution_filter(params.d_min, params.d_max)
    log.info("read %d observations from %s", len(obs), obs.source)
    excluded = [(k, v) for k, v in obs.excluded.items() if v]
    if excluded:
        log.info("%s", aligned_table(["rows not merged", "count"], excluded))
    with progress("merging"):
        merged = merge_observations(
            obs, anomalous=params.anomalous, truncate=params.truncate,
            min_reflections=params.french_wilson.min_reflections,
            fallback_to_flat_prior=params.french_wilson.fallback_to_flat_prior,
            max_bins=params.french_wilson.max_bins)
    t_merge = time.perf_counter() - t0
    write_merged_mtz(params.output.mtz, merged, params.output.project_name,
                     params.output.crystal_name, params.output.dataset_name)
    log.info("merged %d observations into %d unique reflections (%.2f s); wrote %s",
             len(obs), len(merged), t_merge, params.output.mtz)
    if merged.truncation:
        log.info("French-Wilson: %s", ", ".join(f"{k} {v}" for k, v in merged.truncation.items()))
    from ..report import statistics_for_report

    with progress("merging statistics"):
        inputs = statistics_for_report(obs, n_bins=params.n_bins, anomalous=params.anomalous,
                                       use_internal_variance=params.use_internal_variance)
    stats, anomalous_stats, resolution = (inputs.statistics, inputs.anomalous_statistics,
                                          inputs.resolution)
    for note in inputs.notes:
        log.warning("%s", note)
    if stats is not None:
        log.info("\n%s", _stats_table(stats))
    if anomalous_stats is not None:
        log.info("\n%s", _stats_table(anomalous_stats))
    if resolution is not None:
        log.info("\n%s", resolution.summary())
    report_arguments = inputs.report_arguments()
    summary = _summary(obs, merged) + report_arguments.pop("summary")
    json_path, html = output_path(params.output.json), output_path(params.output.html)
    if json_path is not None:
        document = {"summary": dict(summary), "notes": inputs.notes,
                    "statistics": json.loads(stats.as_json()) if stats else None,
                    "anomalous_statistics": (json.loads(anomalous_stats.as_json())
                                             if anomalous_stats else None),
                    "resolution_estimate": (_json_safe(resolution.as_dict())
                                            if resolution is not None else None)}
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(_json_safe(document), f, indent=1)
        log.info("wrote %s", json_path)
    if html is not None:
        from ..report import write_html_report

        with progress("HTML report"):
            t1 = time.perf_counter()
            write_html_report(html, merged=merged, experiments=experiments,
                              summary=summary, title="xtalscale merge report",
                              **report_arguments)
        log.info("wrote %s (%.2f s)", html, time.perf_counter() - t1)
    return 0


def run(argv: Sequence[str]) -> int:
    """Run ``xtalscale merge`` with the arguments after the command name."""
    from ..merge.params import merge_phil_scope, parse_phil_arguments
    from ..report.terminal import configure_logging

    argv = list(argv)
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(_help())
        return 0 if argv else 2
    files, phil_args, verbosity = _split_arguments(argv)
    params = parse_phil_arguments(merge_phil_scope(), phil_args)
    log = configure_logging(verbosity, params.output.log)
    if not files:
        raise ValueError("no input files: give a scaled unmerged MTZ or an .expt and a .refl")
    return _merge(files, params, log)
