"""The ``nmsparse`` command line (``nmsparse ...`` or ``python -m nmsparse ...``)."""

from .main import main

__all__ = ["main"]
