"""The hand-written type stubs of ``xtalscale._core`` match the compiled module (mypy stubtest)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import xtalscale

pytest.importorskip("mypy")

# Classes made only by C++ (no Python constructor) show pybind11's catch-all __init__ at runtime;
# their stubs deliberately offer no constructor.
ALLOWLIST = textwrap.dedent("""
    xtalscale\\._core\\.components\\.WeightMatrix\\.__init__
    xtalscale\\._core\\.components\\.LookupFactors\\.__init__
    xtalscale\\._core\\.model_block\\.ModelTerm\\.__init__
""")


def _mypy_env(package_root: Path) -> dict[str, str]:
    """mypy finds an installed xtalscale through its py.typed marker; a source tree on
    PYTHONPATH (which mypy ignores) must be named in MYPYPATH. Never run mypy from inside
    site-packages: modules there would shadow mypy's own dependencies."""
    env = dict(os.environ)
    if package_root.name not in ("site-packages", "dist-packages"):
        env["MYPYPATH"] = str(package_root)
    return env


def test_core_stubs_match_the_compiled_module(tmp_path: Path) -> None:
    package_root = Path(xtalscale.__file__).resolve().parent.parent
    config = tmp_path / "mypy.ini"
    # Check the stubs only: the pure-Python modules are not what this test is about.
    config.write_text("[mypy]\n[mypy-xtalscale.*]\nignore_errors = True\n"
                      "[mypy-xtalscale._core.*]\nignore_errors = False\n")
    allowlist = tmp_path / "allowlist.txt"
    allowlist.write_text(ALLOWLIST)
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "xtalscale._core", "--mypy-config-file", str(config),
         "--allowlist", str(allowlist), "--ignore-unused-allowlist"],
        capture_output=True, text=True, cwd=tmp_path, env=_mypy_env(package_root))
    # pybind11 classes have their own metaclass, which stubs never spell out.
    errors = [block for block in result.stdout.split("\n\n")
              if block.startswith("error:") and "metaclass differs" not in block]
    assert not errors, "\n\n".join(errors)
