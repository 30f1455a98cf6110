"""The Triton kernels on the CPU through Triton's interpreter, in one subprocess.

The subprocess (``_nm_kernel_cases.py`` with ``TRITON_INTERPRET=1``) keeps the interpreter
flag out of this process: with it set, every CPU call of ``nm_linear`` would take the slow
interpreted Triton path.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _nm_kernel_cases import cases

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="Triton is not installed")

SCRIPT = Path(__file__).with_name("_nm_kernel_cases.py")
CASES = cases()
DTYPE_NAMES = {"fp16": "torch.float16", "bf16": "torch.bfloat16", "fp32": "torch.float32"}


@pytest.fixture(scope="module")
def results() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("NMSPARSE_KERNELS", None)
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_kernel_matches_dense_linear(results, case):
    result = results[case.id]
    assert result["shape"] == result["expected_shape"]
    assert result["dtype"] == DTYPE_NAMES[case.dtype]
    assert result["finite"]
    assert result["excess"] <= 0, f"max error {result['max_err']} beyond tolerance"


def test_op_and_module_route_to_triton_under_the_interpreter(results):
    module = results["module"]
    assert module["triton_imported"], "backend auto + TRITON_INTERPRET=1 should use Triton"
    assert module["module-1"] < 2e-2 and module["module-20"] < 2e-2
