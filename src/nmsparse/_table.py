"""Kept for the core modules that still import ``format_table`` from here; new code imports
it from :mod:`nmsparse.tables` (one formatter, plain text or Markdown)."""

from .tables import format_table

__all__ = ["format_table"]
