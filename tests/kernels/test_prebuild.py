"""``python -m nmsparse.kernels.cpu`` builds the CPU libraries ahead of first use and says what
runs; without a compiler it says so in its output and exits 1."""

import os
import subprocess
import sys

import pytest

from nmsparse.kernels import cpu
from nmsparse.kernels.cpu._build import cache_dir


def _run(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nmsparse.kernels.cpu"], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(cpu.build_error() is not None, reason="the CPU kernels cannot build here")
def test_prebuild():
    # the user's cache, as the suite's other kernel tests use it: a build here is one they
    # would pay anyway, and a second run finds them built
    result = _run(dict(os.environ))
    assert result.returncode == 0, result.stdout + result.stderr
    folder = cache_dir()
    assert f"cache folder: {folder}" in result.stdout
    assert "training mask pass: built" in result.stdout
    assert f"Linear kernels use: {cpu.isa()}" in result.stdout
    assert ("prepared layout (PreparedNMLinear): available" in result.stdout) == (
        cpu.isa() == "avx512bf16")
    assert ("AMX: bf16 calls from" in result.stdout) == ("amx" in cpu.features())
    built = [p.name for p in folder.glob("*.so")]
    for prefix in ("nm_linear_avx2-", "nm_mask_"):
        assert any(name.startswith(prefix) for name in built), built


def test_prebuild_without_a_compiler(tmp_path):
    env = {**os.environ, "NMSPARSE_CACHE_DIR": str(tmp_path), "PATH": ""}
    env.pop("CXX", None)
    result = _run(env)
    assert result.returncode == 1
    assert "no C++ compiler" in result.stdout and "Traceback" not in result.stderr
