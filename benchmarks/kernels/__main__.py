"""``python -m benchmarks.kernels``: see :mod:`benchmarks.kernels`."""

import sys

from .cli import main

sys.exit(main())
