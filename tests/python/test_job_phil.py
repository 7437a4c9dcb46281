"""The scaling job's PHIL parameters, the DIALS ArgumentParser facade and input recognition."""
from __future__ import annotations

from pathlib import Path

import pytest

from xtalscale.job.inputs import InputError, file_kind, load_inputs, split_arguments
from xtalscale.job.phil import (
    DIFFERING_DEFAULTS,
    PhilError,
    default_scale_params,
    parse_phil_arguments,
    show_configuration,
)
from xtalscale.models import _is_auto, default_model_params

DATA = Path(__file__).resolve().parents[1] / "data"
INTEGRATED = DATA / "dials_l_cysteine_integrated"
WEDGE = DATA / "dials_l_cysteine_narrow_wedge"


def test_dials_scale_names_resolve_by_suffix():
    params, _ = parse_phil_arguments([
        "model=physical", "absorption_level=medium", "d_min=1.0", "anomalous=True",
        "intensity_choice=profile", "outlier_rejection=simple", "outlier_zmax=8",
        "error_model=None", "error_model.grouping=individual", "full_matrix=False",
        "refinement_order=consecutive", "exclude_images=0:1:100",
        "reflection_selection.method=quasi_random", "use_free_set=1", "nproc=2",
        "output.reflections=a.refl", "output.experiments=a.expt", "output.html=r.html",
        "output.log=l.log", "merged_mtz=m.mtz", "unmerged_mtz=u.mtz",
        "physical.scale_interval=10"])
    assert params.model == "physical"
    assert params.physical.absorption_level == "medium"
    assert params.physical.scale_interval == 10.0
    assert params.cut_data.d_min == 1.0
    assert params.anomalous is True
    assert params.reflection_selection.intensity_choice == "profile"
    assert params.scaling_options.outlier_rejection == "simple"
    assert params.scaling_options.outlier_zmax == 8.0
    assert params.weighting.error_model.error_model is None
    assert params.weighting.error_model.grouping == "individual"
    assert params.scaling_options.full_matrix is False
    assert params.refinement.refinement_order == "consecutive"
    assert params.exclude_images == [["0:1:100"]]
    assert params.reflection_selection.method == "quasi_random"
    assert params.scaling_options.use_free_set is True
    assert params.scaling_options.nproc == 2
    assert (params.output.reflections, params.output.experiments) == ("a.refl", "a.expt")
    assert (params.output.merged_mtz, params.output.unmerged_mtz) == ("m.mtz", "u.mtz")


def test_defaults_match_the_model_layer_and_dials():
    p = default_scale_params()
    ns = default_model_params()
    assert _is_auto(p.physical.scale_interval) and _is_auto(p.physical.lmax)
    assert p.physical.decay_restraint == ns.physical.decay_restraint
    assert p.array.n_resolution_bins == ns.array.n_resolution_bins
    assert p.dose_decay.scale_interval == ns.dose_decay.scale_interval
    assert p.dose_decay.surface_weight == ns.dose_decay.surface_weight
    assert p.cut_data.partiality_cutoff == 0.4 and p.cut_data.min_isigi == -5
    assert p.scaling_options.outlier_zmax == 6.0 and p.scaling_options.emax == 10
    em = p.weighting.error_model
    assert (em.error_model, em.grouping, em.basic.min_Ih, em.basic.n_bins) == ("basic", "combined", 25.0, 10)
    assert p.reflection_selection.random.min_reflections == 50000
    assert p.reflection_selection.random.min_groups == 2000


@pytest.mark.parametrize("word, expect", [
    ("dmin=1", "cut_data.d_min"),
    ("absorbtion_level=high", "physical.absorption_level"),
    ("outlier_zmx=5", "outlier_zmax"),
])
def test_misspelt_names_suggest_the_nearest(word, expect):
    with pytest.raises(PhilError, match="unknown parameter") as info:
        parse_phil_arguments([word])
    assert expect in str(info.value)


@pytest.mark.parametrize("word", ["outlier_rejection=foo", "nproc=0", "d_min", "outlier_zmax=1",
                                  "d_min=abc"])
def test_bad_values_are_clear_errors(word):
    with pytest.raises(PhilError):
        parse_phil_arguments([word])


def test_cross_checks_and_phil_files(tmp_path):
    with pytest.raises(PhilError, match="d_min"):
        parse_phil_arguments(["d_min=3", "d_max=2"])
    good = tmp_path / "opts.phil"
    good.write_text("cut_data { d_min = 1.2 }\nscaling_options.outlier_rejection = simple\n")
    params, _ = parse_phil_arguments([str(good)])
    assert params.cut_data.d_min == 1.2 and params.scaling_options.outlier_rejection == "simple"
    bad = tmp_path / "bad.phil"
    bad.write_text("cut_data { dmin = 1.2 }\n")
    with pytest.raises(PhilError, match="did you mean cut_data.d_min"):
        parse_phil_arguments([str(bad)])


def test_show_configuration_lists_help_and_differences():
    text = show_configuration()
    assert "outlier_zmax = 6.0" in text and ".help" in text
    for name, _, _ in DIFFERING_DEFAULTS:
        assert name in text
    assert "[xtalscale]" in text


def test_files_recognised_by_content(tmp_path):
    assert file_kind(INTEGRATED / "20_integrated.pickle") == "reflections"
    assert file_kind(INTEGRATED / "20_integrated_experiments.json") == "experiments"
    assert file_kind(WEDGE / "11_integrated.refl") == "reflections"
    assert file_kind(WEDGE / "11_integrated.expt") == "experiments"
    assert file_kind(DATA / "mtz_gamma_aimless" / "HKLOUT_unmerged.mtz.gz") == "mtz"
    assert file_kind(DATA / "xds_hewl_ssad_snippets" / "INTEGRATE.HKL") == "xds"
    renamed = tmp_path / "data.bin"
    renamed.write_bytes((WEDGE / "11_integrated.refl").read_bytes())
    assert file_kind(renamed) == "reflections"
    with pytest.raises(InputError, match="not a recognised input"):
        file_kind(INTEGRATED / "README.txt")
    with pytest.raises(InputError, match="cannot read"):
        file_kind(tmp_path / "missing.refl")
    files, words = split_arguments([str(renamed), "d_min=2"])
    assert files == [str(renamed)] and words == ["d_min=2"]
    with pytest.raises(InputError, match="no such file"):
        split_arguments(["nonexistent.refl"])


def test_load_inputs_pairs_and_renumbers():
    inputs = load_inputs([INTEGRATED / "20_integrated.pickle", INTEGRATED / "20_integrated_experiments.json",
                          WEDGE / "11_integrated.refl", WEDGE / "11_integrated.expt"])
    assert len(inputs.experiments) == 2 and len(inputs.tables) == 2
    assert inputs.tables[1].experiment_identifiers().keys() == [1]
    assert inputs.experiments[1].identifier == inputs.tables[1].experiment_identifiers()[1]
    with pytest.raises(InputError, match="reflection file"):
        load_inputs([INTEGRATED / "20_integrated.pickle"])
    with pytest.raises(InputError, match="mismatched experiment identifiers"):
        load_inputs([WEDGE / "11_integrated.refl", INTEGRATED / "20_integrated_experiments.json"])


def test_dials_argument_parser_facade():
    from xtalscale.algorithms.scaling.model.model import model_phil_scope
    from xtalscale.algorithms.scaling.scaling_options import phil_scope
    from xtalscale.util.options import (
        ArgumentParser,
        reflections_and_experiments_from_files,
    )

    assert phil_scope.extract().scaling_options.outlier_rejection == "standard"
    assert model_phil_scope.extract().physical.decay_correction is True
    import freephil

    master = freephil.parse("d_min = None\n .type = float\n")
    parser = ArgumentParser(usage="test", phil=master, read_reflections=True, read_experiments=True)
    params, _ = parser.parse_args([str(INTEGRATED / "20_integrated.pickle"),
                                   str(INTEGRATED / "20_integrated_experiments.json"), "d_min=1.5"])
    tables, experiments = reflections_and_experiments_from_files(params.input.reflections,
                                                                 params.input.experiments)
    assert params.d_min == 1.5 and len(tables) == 1 and len(experiments) == 1
    assert len(tables[0]) == 4417
    with pytest.raises(PhilError, match="unrecognised"):
        parser.parse_args(["--foo"])


def test_freephil_loads_without_pkg_resources_and_with_the_same_converters():
    """A fresh interpreter: freephil's converter registry is the one the real pkg_resources
    gives, and no pkg_resources module is left behind."""
    import subprocess
    import sys

    code = ("import sys; from xtalscale.io.phil_args import import_freephil; import_freephil(); "
            "import freephil.common as c; print('pkg_resources' in sys.modules, sorted(c.default_converter_registry))")
    ours = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    real = subprocess.run([sys.executable, "-W", "ignore", "-c",
                           "import pkg_resources, sys; import freephil.common as c; "
                           "print('pkg_resources' in sys.modules, sorted(c.default_converter_registry))"],
                          capture_output=True, text=True, check=True).stdout
    assert ours.startswith("False ")
    assert ours.split(" ", 1)[1] == real.split(" ", 1)[1]
