"""Importing nmsparse (and nmsparse.kernels, and running NMLinear on CPU) loads no Triton and
initialises no CUDA: checked in a fresh interpreter."""

import os
import subprocess
import sys

CODE = """
import sys, torch
import nmsparse
assert "triton" not in sys.modules, "import nmsparse imported triton"
assert "torch._dynamo" not in sys.modules, "import nmsparse imported dynamo"
import nmsparse.packing, nmsparse.kernels
from nmsparse.kernels import NMLinear
layer = torch.nn.Linear(16, 4)
with torch.no_grad():
    layer.weight.mul_(nmsparse.nm_mask(layer.weight, 2, 4))
module = NMLinear.from_linear(layer, 2, 4)
module(torch.randn(2, 16))
assert "triton" not in sys.modules, sorted(m for m in sys.modules if "triton" in m)
assert not torch.cuda.is_initialized()
print("ok")
"""


def test_import_loads_no_triton_and_no_cuda():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",
                                                              "NMSPARSE_KERNELS")}
    done = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"
