"""Architecture rules: the import contracts (pyproject.toml [tool.importlinter]) hold, they name
every core module and every DIALS-path facade, and the facades define nothing of their own."""
from __future__ import annotations

import ast
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import xtalscale

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIR = Path(xtalscale.__file__).resolve().parent
#: Top-level names of the DIALS-path facades (thin re-exports of core objects).
FACADES = ("algorithms", "array_family", "dxtbx", "util", "lstbx", "scitbx", "cctbx", "command_line",
           "merging_statistics")
#: Package entry points that belong to no layer.
UNLAYERED = ("_core", "__main__")


def _contracts() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        config = tomllib.load(fh)["tool"]["importlinter"]
    return {c["id"]: c for c in config["contracts"]}


def _is_facade(name: str) -> bool:
    return name in FACADES or (name.startswith("dials_") and name.endswith("_ext"))


def _top_level_modules() -> list:
    return sorted(m.name for m in pkgutil.iter_modules([str(PACKAGE_DIR)]))


def test_import_contracts_hold():
    """lint-imports, on the xtalscale under test, keeps every contract."""
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_DIR.parent))
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command;"
         " sys.exit(lint_imports_command())", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=PACKAGE_DIR.parent, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def test_contracts_name_every_core_module_and_facade():
    contracts = _contracts()
    layered = {m.strip().strip("()") for line in contracts["core-layers"]["layers"]
               for part in line.replace("|", ":").split(":") for m in [part]}
    forbidden = contracts["core-never-imports-facades"]
    modules = [m for m in _top_level_modules() if m not in UNLAYERED]
    core = {f"xtalscale.{m}" for m in modules if not _is_facade(m)}
    facades = {f"xtalscale.{m}" for m in modules if _is_facade(m)}
    assert core - layered == set(), "core modules missing from the layers contract"
    assert core - set(forbidden["source_modules"]) == set()
    assert facades - set(forbidden["forbidden_modules"]) == set(), "facades not forbidden"


def _facade_files() -> list:
    files = []
    for name in _top_level_modules():
        if not _is_facade(name):
            continue
        path = PACKAGE_DIR / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]
    return files


def _definitions(tree: ast.Module) -> list:
    """Statements other than a docstring, imports and ``__all__`` (line, kind)."""
    found = []
    for i, node in enumerate(tree.body):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) \
                and isinstance(node.value.value, str):
            continue
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else [])
        if targets and all(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            continue
        found.append((node.lineno, type(node).__name__))
    return found


def test_facades_only_re_export():
    files = _facade_files()
    assert len(files) > 10  # the DIALS paths exist
    offenders = {}
    for path in files:
        found = _definitions(ast.parse(path.read_text(), str(path)))
        if found:
            offenders[str(path.relative_to(PACKAGE_DIR))] = found
    assert offenders == {}


def test_definition_check_finds_a_function():
    """The facade check is not vacuous: a function or a class is reported."""
    tree = ast.parse('"""doc"""\nimport os\n__all__ = ["f"]\ndef f():\n    pass\nclass A: ...\n')
    assert _definitions(tree) == [(4, "FunctionDef"), (6, "ClassDef")]


def test_the_scaling_job_never_imports_scipy(tmp_path):
    """scipy costs ~0.15-0.2 s at start-up and the job calls none of it: the four-sweep job from
    the command line runs with scipy unimportable (a finder that refuses it), so any scipy call
    on the job's path fails here instead of silently costing the import."""
    data = ROOT / "tests" / "data" / "dials_l_cysteine_integrated"
    files = [str(p) for p in sorted(data.glob("*_integrated.pickle"))[:2]] + \
        [str(p) for p in sorted(data.glob("*_integrated_experiments.json"))[:2]]
    code = (
        "import sys\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'scipy' or name.startswith('scipy.'):\n"
        "            raise ImportError('scipy is not to be imported by the scaling job: ' + name)\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "from xtalscale.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    result = subprocess.run([sys.executable, "-c", code, "scale", *files, "unmerged_mtz=u.mtz", "merged_mtz=m.mtz"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "scaled.refl").exists() and (tmp_path / "xtalscale.scale.html").exists()
