"""PHIL parameters of ``xtalscale merge`` (``key=value`` on the command line).

:func:`parse_merge_arguments` splits a command line into files and parameters and returns
the extracted parameters; bad parameters raise ``ValueError`` naming them.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["MERGE_PHIL", "merge_phil_scope", "parse_phil_arguments"]

MERGE_PHIL = """
d_min = None
  .type = float(value_min=0)
  .help = "High-resolution limit (Å) applied before merging"
d_max = None
  .type = float(value_min=0)
  .help = "Low-resolution limit (Å) applied before merging"
anomalous = True
  .type = bool
  .help = "Also merge Bijvoet halves: I(+), I(-), F(+), F(-), DANO"
truncate = True
  .type = bool
  .help = "French-Wilson amplitudes (F, SIGF, ...)"
partiality_threshold = 0.4
  .type = float(value_min=0)
  .help = "Leave out reflections whose summed partiality is below this (as dials.merge)"
n_bins = 20
  .type = int(value_min=1)
  .help = "Resolution shells of the merging statistics"
use_internal_variance = False
  .type = bool
  .help = "Merged sigmas from the spread of the observations (iotbx option)"
french_wilson {
  min_reflections = 200
    .type = int(value_min=0)
    .help = "Fewer merged reflections than this: flat positive prior (or an error)"
  fallback_to_flat_prior = True
    .type = bool
  max_bins = 60
    .type = int(value_min=1)
    .help = "Bins (in d*^3) for the prior mean intensity"
}
output {
  mtz = merged.mtz
    .type = path
  html = xtalscale.merge.html
    .type = path
    .help = "HTML report (None: no report)"
  json = None
    .type = path
    .help = "Merging statistics as JSON"
  log = None
    .type = path
    .help = "Also write the log to this file"
  project_name = xtalscale
    .type = str
  crystal_name = XTAL
    .type = str
  dataset_name = NATIVE
    .type = str
}
"""


def merge_phil_scope() -> Any:
    """The parsed master scope (freephil)."""
    from ..io.phil_args import import_freephil

    return import_freephil().parse(MERGE_PHIL)


def parse_phil_arguments(master: Any, arguments: Sequence[str]) -> Any:
    """Extract ``key=value`` arguments (and ``.phil`` files) against ``master``.

    Raises
    ------
    ValueError
        For an unknown key (naming the nearest valid names) or a value of the wrong type.
    """
    from ..io.phil_args import parse_phil_words

    return parse_phil_words(arguments, master, error=ValueError)[0]
