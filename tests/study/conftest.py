"""The study lives in ``benchmarks/`` (not an installed package): import it from the repo."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
