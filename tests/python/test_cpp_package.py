"""Build C++ programs against *installed* xtalscale CMake packages, then run them with ctest.

Two installations are checked:

* the one inside the installed wheel (``xtalscale.get_cmake_dir()``): the C++ unit tests and the
  README's consumer program are built against it, proving that the headers, the library and the
  package config (``find_package(xtalscale)`` giving ``xtalscale::core``) are complete;
* a plain ``cmake --install`` of the source tree as a *shared* library built against a *system*
  Eigen (Debian's libeigen3-dev), proving that C++ users need neither Python nor cmeel-eigen and
  that every symbol the tests use is exported (the library hides everything else).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import xtalscale

REPO = Path(__file__).resolve().parents[2]
TESTS_CPP = REPO / "tests" / "cpp"
SYSTEM_EIGEN_DIR = Path("/usr/share/eigen3/cmake")

needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")


def _cmeel_prefix() -> str:
    """Eigen from PyPI's cmeel-eigen, when installed."""
    out = subprocess.run([sys.executable, "-m", "cmeel", "cmake"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


def _generator() -> list[str]:
    return ["-G", "Ninja"] if shutil.which("ninja") else []


def _run(cmd: list[str]) -> str:
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _build_and_ctest(build: Path, configure_args: list[str]) -> str:
    _run(["cmake", "-S", str(TESTS_CPP), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
          *_generator(), *configure_args])
    _run(["cmake", "--build", str(build)])
    return _run(["ctest", "--test-dir", str(build), "--output-on-failure"])


@needs_cmake
def test_cpp_unit_tests_and_consumer_against_installed_wheel(tmp_path: Path) -> None:
    cmake_dir = Path(xtalscale.get_cmake_dir())
    assert (cmake_dir / "xtalscaleConfig.cmake").is_file(), cmake_dir
    assert (Path(xtalscale.get_include()) / "xtalscale" / "core.hpp").is_file()
    out = _build_and_ctest(tmp_path / "build", [f"-Dxtalscale_DIR={cmake_dir}",
                                                f"-DCMAKE_PREFIX_PATH={_cmeel_prefix()}"])
    assert "100% tests passed" in out
    assert "consumer" in out


@needs_cmake
@pytest.mark.skipif(not SYSTEM_EIGEN_DIR.is_dir(),
                    reason="system Eigen not installed (apt-get install libeigen3-dev; CI does)")
def test_shared_cmake_install_with_system_eigen(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    eigen = f"-DEigen3_DIR={SYSTEM_EIGEN_DIR}"
    _run(["cmake", "-S", str(REPO), "-B", str(tmp_path / "core"), "-DCMAKE_BUILD_TYPE=Release",
          "-DXTALSCALE_BUILD_PYTHON=OFF", "-DBUILD_SHARED_LIBS=ON", eigen, f"-DCMAKE_INSTALL_PREFIX={prefix}", *_generator()])
    _run(["cmake", "--build", str(tmp_path / "core")])
    _run(["cmake", "--install", str(tmp_path / "core")])
    config = next(prefix.glob("lib*/cmake/xtalscale/xtalscaleConfig.cmake"))
    assert (prefix / "include" / "xtalscale" / "export.hpp").is_file()
    assert list(prefix.glob("lib*/libxtalscale.so*")), "shared library not installed"
    out = _build_and_ctest(tmp_path / "tests", [f"-Dxtalscale_DIR={config.parent}", eigen])
    assert "100% tests passed" in out
