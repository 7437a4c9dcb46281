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

__all__ = ["SUMMARY", "run"]

SUMMARY = "merge scaled data: merged MTZ (IMEAN, I(+/-), F, DANO, N), statistics, report"


def _help() -> str:
    from ..merge.params import MERGE_PHIL

    return (__doc__ or "") + "\nOptions: -v (more output), -h (this help)\n\nParameters:\n" \
        + MERGE_PHIL


def _split_arguments(argv: Sequence[str]) -> tuple[list[str], list[str], int]:
    files, phil, verbosity = [], [], 0
    for arg in argv:
        if arg in ("-v", "--verbose"):
            verbosity += 1
        elif arg.startswith("-v") and set(arg[1:]) == {"v"}:
            verbosity += len(arg) - 1
        elif "=" in arg:
            phil.append(arg)
        else:
            files.append(arg)
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


def _statistics(obs, params, log, experiments=None, reflections=None) -> tuple[Any, Any, list[str]]:
    """(statistics, anomalous statistics, notes) from xtalscale.merging_statistics."""
    try:
        from .. import merging_statistics
    except ImportError:
        return None, None, ["Merging statistics are not available in this build "
                            "(xtalscale.merging_statistics is missing)."]
    notes = []
    stats = anomalous = None
    limits = {"n_bins": params.n_bins, "d_min": params.d_min, "d_max": params.d_max,
              "use_internal_variance": params.use_internal_variance}

    def compute(anomalous_flag: bool):
        cls = merging_statistics.dataset_statistics
        if reflections is None:
            return cls.from_mtz(obs.source, anomalous=anomalous_flag, **limits)
        return cls.from_reflections(experiments, reflections, anomalous=anomalous_flag,
                                    **limits)

    try:
        stats = compute(False)
        if params.anomalous and not obs.space_group.is_centric():
            anomalous = compute(True)
    except ValueError as error:  # e.g. no multiplicity: say so in the table's place
        notes.append(f"Merging statistics could not be computed: {error}")
        log.warning("merging statistics: %s", error)
    return stats, anomalous, notes


def _stats_table(stats) -> str:
    from ..report import STATISTICS_COLUMNS, statistics_as_dict
    from ..report.html import _format
    from ..report.terminal import aligned_table

    if hasattr(stats, "as_table"):
        return str(stats.as_table())
    d = statistics_as_dict(stats) or {}
    columns = [c for c in STATISTICS_COLUMNS if c[0] in (d.get("overall") or {})]
    rows = [[_format(b.get(n), f, n) for n, _, f in columns] for b in d.get("bins", [])]
    overall = [_format(d["overall"].get(n), f, n) for n, _, f in columns]
    return aligned_table([h for _, h, _ in columns], rows, [overall])


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
        obs, experiments, reflections = _load(files)
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
    with progress("merging statistics"):
        stats, anomalous_stats, notes = _statistics(obs, params, log, experiments, reflections)
    for note in notes:
        log.info("%s", note)
    if stats is not None:
        log.info("\nMerging statistics\n%s", _stats_table(stats))
    summary = _summary(obs, merged)
    if params.output.json:
        from ..report import statistics_as_dict

        document = {"summary": dict(summary), "notes": notes,
                    "statistics": statistics_as_dict(stats),
                    "anomalous_statistics": statistics_as_dict(anomalous_stats)}
        with open(params.output.json, "w", encoding="utf-8") as f:
            json.dump(_json_safe(document), f, indent=1)
        log.info("wrote %s", params.output.json)
    if params.output.html and params.output.html.lower() != "none":
        from ..report import write_html_report

        with progress("HTML report"):
            t1 = time.perf_counter()
            write_html_report(params.output.html, statistics=stats, merged=merged,
                              experiments=experiments, summary=summary, notes=notes,
                              title="xtalscale merge report",
                              **_stats_extras(stats))
        log.info("wrote %s (%.2f s)", params.output.html, time.perf_counter() - t1)
    return 0


def _stats_extras(stats) -> dict:
    """Per-batch statistics and normalised deviations, where the statistics provide them."""
    extras: dict = {}
    if stats is None:
        return extras
    if hasattr(stats, "batch_statistics"):
        extras["batch_statistics"] = stats.batch_statistics()
    if hasattr(stats, "normalised_deviations"):
        extras["normalised_deviations"] = stats.normalised_deviations()
    return extras


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
