"""Kernel benchmark: dense vs 2:4 tensor cores vs packed N:M Triton kernels, and decode.

The code lives in :mod:`nmsparse.kernels.bench` so the installed command can run it too:
``nmsparse bench [options]`` is the same as ``python benchmarks/kernels.py [options]``.
"""

import sys

from nmsparse.kernels.bench import main

if __name__ == "__main__":
    sys.exit(main())
