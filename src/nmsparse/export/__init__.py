"""Model files beyond the dense export: packed N:M storage (see :mod:`.packed`) and nested
multi-level N:M storage (see :mod:`.nested`).

Core-level: depends on the core only (the export of a trained run lives in
``nmsparse.app.train.export``). Importing it does not load safetensors.
"""

from .nested import NestedReport, load_nested, read_nested, save_nested
from .packed import (
    FORMAT_NAME,
    FORMAT_VERSION,
    PackedFormatError,
    PackedLayer,
    PackedReport,
    load_packed,
    read_packed_header,
    save_packed,
)

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "PackedFormatError", "PackedLayer", "PackedReport",
           "load_packed", "read_packed_header", "save_packed"]
__all__ += ["NestedReport", "load_nested", "read_nested", "save_nested"]
