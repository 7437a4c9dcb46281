"""PHIL parameters of the scaling job, with dials.scale's names and scopes.

Scripts and the command line share one ``params`` tree built by freephil (the PHIL language
packaged without cctbx). The scopes mirror DIALS's:

* :data:`model_phil_scope` -- ``dials.algorithms.scaling.model.model.model_phil_scope``;
* :data:`error_model_phil_scope` -- ``dials.algorithms.scaling.error_model.error_model.phil_scope``;
* :data:`scaling_phil_scope` -- ``dials.algorithms.scaling.scaling_options.phil_scope``;
* :data:`refinement_phil_scope` -- ``scaling_refiner.scaling_refinery_phil_scope``;
* :data:`scale_phil_scope` -- the whole ``dials.scale`` master (all of the above, ``output``,
  ``exclude_images``, ``dataset_selection``).

Defaults that differ from dials.scale say so in their help text, starting ``[xtalscale]``;
:data:`DIFFERING_DEFAULTS` lists them for the report and the ``-c`` output.

:func:`parse_phil_arguments` turns ``key=value`` words and ``.phil`` files into a params
object; an unknown or misspelt name is a :class:`PhilError` naming the closest definitions.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = [
    "DIFFERING_DEFAULTS",
    "PhilError",
    "default_scale_params",
    "error_model_phil_scope",  # noqa: F822 (module __getattr__, parsed on first use)
    "error_model_phil_str",
    "model_phil_scope",  # noqa: F822 (module __getattr__, parsed on first use)
    "model_phil_str",
    "parse_phil_arguments",
    "phil_definition_paths",
    "refinement_phil_scope",  # noqa: F822 (module __getattr__, parsed on first use)
    "refinement_phil_str",
    "scale_phil_scope",  # noqa: F822 (module __getattr__, parsed on first use)
    "scale_phil_str",
    "scaling_phil_scope",  # noqa: F822 (module __getattr__, parsed on first use)
    "scaling_phil_str",
]


class PhilError(ValueError):
    """A ``key=value`` argument or ``.phil`` file that does not fit the parameter definitions."""


model_phil_str = """
model = physical dose_decay KB array
  .type = choice
  .help = "Scaling model for every experiment. None (the default) chooses per experiment:
           physical for rotation sweeps of at least 1 degree, KB for stills and narrow wedges."
physical {
  scale_interval = auto
    .type = float(value_min=1.0)
    .help = "Rotation (degrees) between the smooth scale term's parameters; auto picks it from
             the sweep width."
  decay_correction = True
    .type = bool
    .help = "Refine a smoothly varying relative B factor."
  decay_interval = auto
    .type = float(value_min=1.0)
    .help = "Rotation (degrees) between the B term's parameters; auto picks it from the sweep."
  decay_restraint = 1e-1
    .type = float(value_min=0.0)
    .help = "Weight of the restraint pulling the B parameters towards zero."
  absorption_correction = auto
    .type = bool
    .help = "Refine a spherical-harmonic absorption surface; auto: for sweeps over 60 degrees."
  absorption_level = low medium high
    .type = choice
    .help = "Expected absorption: sets lmax and surface_weight together (low 4/5e5,
             medium 6/5e4, high 6/5e3) and switches the absorption term on."
  lmax = auto
    .type = int(value_min=2)
    .help = "Highest spherical-harmonic order of the absorption surface (auto: 4)."
  surface_weight = auto
    .type = float(value_min=0.0)
    .help = "Restraint weight of the absorption coefficients (auto: 5e5)."
  share.absorption = False
    .type = bool
    .help = "One absorption surface shared by all sweeps."
  fix_initial = True
    .type = bool
    .help = "Keep the first scale parameter fixed in the full-matrix round (a gauge choice)."
  correction.fix = None
    .type = strings
    .help = "Components to keep fixed (scale, decay, absorption)."
  analytical_correction = False
    .type = bool
    .help = "Include the analytical absorption correction column as a fixed component."
}
KB {
  decay_correction = True
    .type = bool
    .help = "Refine an overall relative B factor."
  correction.fix = None
    .type = strings
    .help = "Components to keep fixed (scale, decay)."
  analytical_correction = False
    .type = bool
    .help = "Include the analytical absorption correction column as a fixed component."
}
array {
  decay_correction = True
    .type = bool
    .help = "Refine the 2-D decay grid (rotation x resolution)."
  decay_interval = 20.0
    .type = float(value_min=1.0)
    .help = "Rotation (degrees) between the decay grid's parameters."
  n_resolution_bins = 10
    .type = int(value_min=1)
    .help = "Resolution bins of the decay grid."
  absorption_correction = True
    .type = bool
    .help = "Refine the 3-D absorption grid (detector x, y and rotation)."
  n_absorption_bins = 3
    .type = int(value_min=1)
    .help = "Bins per detector axis of the absorption grid."
  modulation_correction = False
    .type = bool
    .help = "Refine a detector-plane modulation grid."
  n_modulation_bins = 20
    .type = int(value_min=1)
    .help = "Bins per detector axis of the modulation grid."
  correction.fix = None
    .type = strings
    .help = "Components to keep fixed (decay, absorption, modulation)."
  analytical_correction = False
    .type = bool
    .help = "Include the analytical absorption correction column as a fixed component."
}
dose_decay {
  scale_interval = 2.0
    .type = float(value_min=1.0)
    .help = "Rotation (degrees) between the smooth scale term's parameters."
  relative_B_correction = True
    .type = bool
    .help = "Refine an overall relative B per sweep."
  decay_correction = True
    .type = bool
    .help = "Refine the dose-dependent decay."
  share.decay = True
    .type = bool
    .help = "One decay parameter shared by all sweeps."
  resolution_dependence = *quadratic linear
    .type = choice
    .help = "How the decay depends on resolution."
  absorption_correction = False
    .type = bool
    .help = "Refine a spherical-harmonic absorption surface."
  lmax = 4
    .type = int(value_min=2)
    .help = "Highest spherical-harmonic order of the absorption surface."
  surface_weight = 1e6
    .type = float(value_min=0.0)
    .help = "Restraint weight of the absorption coefficients."
  fix_initial = True
    .type = bool
    .help = "Keep the first scale parameter fixed in the full-matrix round."
  correction.fix = None
    .type = strings
    .help = "Components to keep fixed."
  analytical_correction = False
    .type = bool
    .help = "Include the analytical absorption correction column as a fixed component."
}
"""

error_model_phil_str = """
error_model = *basic None
  .type = choice
  .help = "Error model: basic refines sigma'^2 = a^2 (sigma^2 + (b I)^2); None keeps the
           integration variances."
basic {
  a = None
    .type = float
    .help = "A fixed value of a (None: refine it)."
  b = None
    .type = float
    .help = "A fixed value of b (None: refine it)."
  minimisation = *individual regression None
    .type = choice
    .help = "individual: alternate a (normal probability plot) and b (binned variances), as
             DIALS; regression: fit the group variances against sigma^2/I^2."
  min_Ih = 25.0
    .type = float(value_min=0.0)
    .help = "Reflections with a scaled group mean below this are not used to fit the model."
  n_bins = 10
    .type = int(value_min=2)
    .help = "Intensity bins of the b refinement."
  max_observations = 250000
    .type = int(value_min=0)
    .help = "[xtalscale] With more observations than this, the error model is refined on
             random whole groups (seeded by reflection_selection.seed) holding about this
             many: two parameters are determined far below their run-to-run spread by
             2.5e5 observations. 0: always all (as dials.scale)."
  stills {
    min_Isigma = 2.0
      .type = float
      .help = "Stills: minimum I/sigma of a reflection used in the fit."
    min_multiplicity = 4
      .type = int(value_min=2)
      .help = "Stills: minimum multiplicity of a group used in the fit."
  }
}
reset_error_model = False
  .type = bool
  .help = "Start from a = 1, b = 0.02 instead of an error model stored in the input."
grouping = individual grouped *combined
  .type = choice
  .help = "One error model for all sweeps (combined), one per sweep (individual), or one per
           error_model_group."
error_model_group = None
  .type = ints(value_min=1)
  .multiple = True
  .help = "With grouping=grouped: the 1-based sweeps of one group; repeat for more groups, the
           remaining sweeps form a final group."
"""

scaling_phil_str = f"""
anomalous = False
  .type = bool
  .help = "Keep Bijvoet mates apart in scaling and in the error model's groups."
overwrite_existing_models = False
  .type = bool
  .help = "Build new scaling models even where the input already has one."
reflection_selection {{
  method = *auto quasi_random intensity_ranges use_all random
    .type = choice
    .help = "[xtalscale] Reflections used to minimise the model. auto: use_all for rotation
             data (every suitable observation, fitted by Gauss-Newton/Levenberg-Marquardt),
             intensity_ranges for stills. dials.scale's auto is quasi_random (a ~50k subset);
             set method=quasi_random for DIALS's behaviour."
  main_rounds_subset = 60000
    .type = int(value_min=0)
    .help = "[xtalscale] auto/use_all with more suitable observations than twice this: the
             first rounds (before the last, full-matrix round) are minimised on random whole
             groups of about this many observations (seeded), and so is the error model that
             weights the last round; the last round (see last_round_subset) and the final error
             model use every suitable observation, so the final model is the all-data fit. 0: never."
  last_round_subset = 0
    .type = int(value_min=0)
    .help = "[xtalscale] auto/use_all with more non-outlier suitable observations than this: the
             last (full-matrix) round is minimised on seeded random whole groups of about this
             many of them instead of all; the scales are still expanded to every observation,
             and the outliers and the final error model judged on every one. The fit's random
             error grows as 1/sqrt(observations): on the 1.1M-observation simulation 0.21 %
             rms with every observation, 0.29 % with 400000. 0: the last round fits every one."
  random {{
    multi_dataset {{
      Isigma_cutoff = 1.0
        .type = float
        .help = "Minimum mean I/sigma of a group chosen across datasets."
    }}
    min_groups = 2000
      .type = int(value_min=1)
      .help = "Minimum number of groups in a random selection."
    min_reflections = 50000
      .type = int(value_min=1)
      .help = "Minimum number of reflections in a random selection."
  }}
  E2_range = 0.8, 5.0
    .type = floats(size=2)
    .help = "intensity_ranges: normalised intensity (E^2) range of the subset."
  Isigma_range = 2.0, 0.0
    .type = floats(size=2)
    .help = "I/sigma range of the subset (0 as maximum: no upper limit)."
  d_range = None
    .type = floats(size=2)
    .help = "d range of the subset."
  min_partiality = 0.25
    .type = float
    .help = "Minimum partiality of a reflection used for the model and the error model."
  intensity_choice = profile sum *combine
    .type = choice
    .help = "Profile-fitted, summation, or the combination with the lowest Rmeas."
  combine.Imid = None
    .type = floats
    .help = "Candidate midpoints of the profile/summation combination (0: profile, 1: sum);
             None: a list derived from the data."
  combine.joint_analysis = True
    .type = bool
    .help = "One Imid for all datasets (True) or one per dataset."
  combine.refit_candidates = True
    .type = bool
    .help = "[xtalscale] Compare the Imid candidates (joint_analysis) after a short refit of the
             models to each candidate's intensities (True), or on the first round's scales, which
             were fitted to the profile intensities (False: dials.scale's comparison)."
  seed = 42
    .type = int
    .help = "[xtalscale] Seed of the random selections (DIALS seeds scitbx's generator with 42
             at import; its sequence cannot be reproduced)."
}}
weighting {{
  weighting_scheme = *invvar
    .type = choice
    .help = "Weights of the group means: inverse variance."
  error_model {{
{error_model_phil_str}
  }}
}}
cut_data {{
  d_min = None
    .type = float(value_min=0.0)
    .help = "Exclude reflections with d < d_min (flagged user_excluded_in_scaling)."
  d_max = None
    .type = float(value_min=0.0)
    .help = "Exclude reflections with d > d_max."
  partiality_cutoff = 0.4
    .type = float
    .help = "Exclude reflections with partiality below this."
  min_isigi = -5
    .type = float
    .help = "Exclude reflections whose profile or summation I/sigma is below this."
  small_scale_cutoff = 0.001
    .type = float
    .help = "After scaling, exclude reflections whose inverse scale is below this."
}}
scaling_options {{
  target_cycle = True
    .type = bool
    .help = "With scaled and unscaled datasets: scale the unscaled ones against the scaled ones
             first."
  only_target = False
    .type = bool
    .help = "Only scale the unscaled datasets against the scaled ones."
  reference = None
    .type = path
    .help = "A reference to scale against: scaled .refl (with its .expt beside it) or a merged
             MTZ."
  reference_model = *KB physical
    .type = choice
    .help = "Scaling model of the datasets scaled against a reference."
  nproc = 1
    .type = int(value_min=1)
    .help = "Threads of the C++ kernels (results are identical for any value)."
  use_free_set = False
    .type = bool
    .help = "Keep a free set of groups out of the fit and report work/free statistics."
  free_set_percentage = 10.0
    .type = float(value_min=0.0, value_max=100.0)
    .help = "Percentage of groups in the free set."
  free_set_offset = 0
    .type = int(value_min=0)
    .help = "Offset of the free groups."
  full_matrix = True
    .type = bool
    .help = "Finish with a full-matrix (Levenberg-Marquardt) round that gives the parameter
             esds and the scale-factor variances."
  outlier_rejection = *standard simple
    .type = choice
    .help = "standard: iterative leave-one-out normalised deviations; simple: one pass against
             the group mean including the reflection."
  outlier_zmax = 6.0
    .type = float(value_min=3.0)
    .help = "Normalised-deviation cut-off of the outlier rejection."
  emax = 10
    .type = float(value_min=0)
    .help = "Reject reflections with a normalised intensity E^2 above emax^2."
}}
"""

refinement_phil_str = """
refinement {
  engine = SimpleLBFGS GaussNewton *LevMar
    .type = choice
    .help = "[xtalscale] Minimiser of the scaling rounds. dials.scale uses SimpleLBFGS (on a
             subset) and keeps Levenberg-Marquardt for the full-matrix round; ours is fast
             enough to use Levenberg-Marquardt on every observation throughout."
  refinement_order = *concurrent consecutive
    .type = choice
    .help = "Refine all components together or one after the other."
  max_iterations = None
    .type = int(value_min=1)
    .help = "Iteration limit of a scaling round (None: the engine's default)."
  rmsd_tolerance = 0.0001
    .type = float(value_min=1e-12)
    .help = "Stop when the relative change of the rmsd is below this."
  full_matrix_engine = GaussNewton *LevMar
    .type = choice
    .help = "Engine of the full-matrix round."
  full_matrix_max_iterations = None
    .type = int(value_min=1)
    .help = "Iteration limit of the full-matrix round (None: 100)."
}
"""

_output_phil_str = """
output {
  log = xtalscale.scale.log
    .type = path
    .help = "[xtalscale] Log file (dials.scale: dials.scale.log)."
  experiments = scaled.expt
    .type = path
    .help = "Scaled experiments with their scaling models."
  reflections = scaled.refl
    .type = path
    .help = "Scaled reflections: every input row, with inverse_scale_factor and flags."
  html = xtalscale.scale.html
    .type = path
    .help = "[xtalscale] HTML report (dials.scale: dials.scale.html); None: no report."
  json = None
    .type = path
    .help = "Merging statistics as JSON."
  unmerged_mtz = None
    .type = path
    .help = "Also write the scaled data as an unmerged MTZ."
  merged_mtz = None
    .type = path
    .help = "Also write the merged data (with French-Wilson amplitudes) as an MTZ."
  crystal_name = XTAL
    .type = str
    .help = "Crystal name in the MTZ files."
  project_name = DIALS
    .type = str
    .help = "Project name in the MTZ files."
  use_internal_variance = False
    .type = bool
    .help = "Merging statistics from the internal spread instead of the sigmas."
  merging.nbins = 20
    .type = int(value_min=1)
    .help = "Resolution shells of the merging statistics."
  additional_stats = False
    .type = bool
    .help = "Also compute Rsplit and weighted CC1/2."
}
exclude_images = None
  .type = strings
  .multiple = True
  .help = "Images to exclude: start:end for one sweep, or exp:start:end (experiment index);
           repeat for more ranges."
dataset_selection {
  use_datasets = None
    .type = ints(value_min=0)
    .help = "Experiment indices to use (the others are left out)."
  exclude_datasets = None
    .type = ints(value_min=0)
    .help = "Experiment indices to leave out."
}
"""

scale_phil_str = model_phil_str + _output_phil_str + scaling_phil_str + refinement_phil_str


def _parse(text: str) -> Any:
    import re

    from ..io.phil_args import import_freephil

    freephil = import_freephil()
    # Help strings above are wrapped for reading; join their continuation lines (indented
    # deeper than any definition, not starting with an attribute's ".") into one line.
    return freephil.parse(re.sub(r"\n {9,}(?=[^\s.])", " ", text))


_SCOPE_TEXTS = {
    "model_phil_scope": model_phil_str,
    "error_model_phil_scope": error_model_phil_str,
    "scaling_phil_scope": scaling_phil_str,
    "refinement_phil_scope": refinement_phil_str,
    "scale_phil_scope": scale_phil_str,
}
_SCOPES: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    """The scopes are parsed on first use (parsing all of them costs ~0.7 s at import)."""
    if name in _SCOPE_TEXTS:
        if name not in _SCOPES:
            _SCOPES[name] = _parse(_SCOPE_TEXTS[name])
        return _SCOPES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

#: Defaults that differ from dials.scale: (parameter, xtalscale default, dials.scale default).
DIFFERING_DEFAULTS: tuple[tuple[str, str, str], ...] = (
    ("reflection_selection.method", "auto -> use_all (rotation data)", "auto -> quasi_random"),
    ("refinement.engine", "LevMar", "SimpleLBFGS"),
    ("reflection_selection.combine.refit_candidates", "True (each Imid candidate judged after a refit to it)",
     "no such option: candidates judged on the first round's profile-fitted scales"),
    ("output.log", "xtalscale.scale.log", "dials.scale.log"),
    ("output.html", "xtalscale.scale.html", "dials.scale.html"),
    ("reflection_selection.Isigma_range", "2.0, 0.0 (spec §8.3)", "-5.0, 0.0 in the current source"),
    ("reflection_selection.min_partiality", "0.25 (spec §8.3)", "0.95 in the current source"),
    ("reflection_selection.seed", "42 (new: seeded numpy selections)", "scitbx's generator seeded at import"),
    ("weighting.error_model.basic.max_observations", "250000 (random whole groups beyond that)",
     "no such option: every filtered observation"),
)


def phil_definition_paths(scope: Any = None) -> list[str]:
    """Full dotted names of every definition in ``scope`` (default: the dials.scale master)."""
    from ..io.phil_args import definition_paths

    return definition_paths(__getattr__("scale_phil_scope") if scope is None else scope)


def parse_phil_arguments(words: Iterable[str], scope: Any = None) -> tuple[Any, Any]:
    """Apply ``key=value`` words and ``.phil`` files to ``scope`` (default
    :data:`scale_phil_scope`); returns ``(params, working_scope)``.

    :func:`xtalscale.io.phil_args.parse_phil_words` does the parsing; this adds the
    cross-parameter checks of the scaling job.

    Raises
    ------
    PhilError
        Unknown, ambiguous or malformed names, and values of the wrong type or outside their
        limits; the message names the parameter and suggests the nearest valid names.
    """
    from ..io.phil_args import parse_phil_words

    scope = __getattr__("scale_phil_scope") if scope is None else scope
    params, working = parse_phil_words(words, scope, error=PhilError)
    _check_values(params)
    return params, working


def _check_values(params: Any) -> None:
    """Cross-parameter checks freephil cannot express."""
    cut = getattr(params, "cut_data", None)
    if cut is not None and cut.d_min is not None and cut.d_max is not None and cut.d_min >= cut.d_max:
        raise PhilError(f"cut_data.d_min ({cut.d_min}) must be below cut_data.d_max ({cut.d_max})")
    rs = getattr(params, "reflection_selection", None)
    if rs is not None and rs.combine.Imid is not None:
        if any(v < 0 for v in rs.combine.Imid):
            raise PhilError("reflection_selection.combine.Imid values must be >= 0")


def default_scale_params() -> Any:
    """The dials.scale parameter object with every default (``params`` of a plain run)."""
    return __getattr__("scale_phil_scope").extract()


def show_configuration(working: Any = None, attributes_level: int = 2) -> str:
    """The full configuration with defaults and help strings (``-c`` output)."""
    import io

    working = __getattr__("scale_phil_scope") if working is None else working
    out = io.StringIO()
    working.show(out=out, attributes_level=attributes_level)
    lines = ["# xtalscale scale: full configuration (defaults unless given on the command line)",
             "# Defaults that differ from dials.scale:"]
    for name, ours, theirs in DIFFERING_DEFAULTS:
        lines.append(f"#   {name}: {ours}  (dials.scale: {theirs})")
    return "\n".join(lines) + "\n" + out.getvalue()
