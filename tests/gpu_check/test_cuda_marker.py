"""The `cuda` marker of tests/conftest.py: marked tests are skipped without CUDA (the dry run
of the GPU check shows `pytest -m cuda` selecting them); a test that skips itself for want of
CUDA without the marker stops the collection (so `pytest -m cuda` cannot miss it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def collect(tmp_path: Path, source: str, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(source)
    env = {**os.environ, "PYTHONPATH": str(TESTS), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-q",
                           "-p", "no:cacheprovider", str(tmp_path), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


MARKED = """
import pytest

@pytest.mark.cuda
def test_on_gpu():
    raise AssertionError("must not run without CUDA")

def test_on_cpu():
    pass
"""


def test_marked_tests_skip_without_cuda(tmp_path):
    proc = collect(tmp_path, MARKED, "-rs")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed, 1 skipped" in proc.stdout and "needs a CUDA GPU (marked cuda)" in proc.stdout


def test_an_unmarked_cuda_skip_stops_the_collection(tmp_path):
    proc = collect(tmp_path, """
import pytest
import torch

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hidden():
    pass
""")
    assert proc.returncode != 0
    assert "lack @pytest.mark.cuda" in proc.stdout + proc.stderr
    assert "test_sample.py::test_hidden" in proc.stdout + proc.stderr
