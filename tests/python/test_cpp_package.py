"""Build the C++ unit tests and a consumer against the *installed* CMake package, then run ctest.

This checks three promises at once: the installed headers and library work, the package config
(`find_package(xtalscale)` giving `xtalscale::core`) is complete, and the C++ unit tests pass.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import xtalscale

TESTS_CPP = Path(__file__).resolve().parents[1] / "cpp"


def _cmake_prefix_path() -> str:
    """Eigen comes from cmeel-eigen when installed (a system Eigen is found by default)."""
    out = subprocess.run([sys.executable, "-m", "cmeel", "cmake"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cpp_unit_tests_and_consumer_against_installed_package(tmp_path: Path) -> None:
    cmake_dir = Path(xtalscale.get_cmake_dir())
    assert (cmake_dir / "xtalscaleConfig.cmake").is_file(), cmake_dir
    assert (Path(xtalscale.get_include()) / "xtalscale" / "core.hpp").is_file()
    build = tmp_path / "build"
    configure = ["cmake", "-S", str(TESTS_CPP), "-B", str(build), f"-Dxtalscale_DIR={cmake_dir}",
                 "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_PREFIX_PATH={_cmake_prefix_path()}"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    for cmd in (configure, ["cmake", "--build", str(build)],
                ["ctest", "--test-dir", str(build), "--output-on-failure"]):
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
    assert "100% tests passed" in result.stdout
