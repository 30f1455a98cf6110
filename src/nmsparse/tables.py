"""Tables of reports: plain text for a terminal, or Markdown for files.

    format_table(["layer", "ms"], [["fc", 1.5]], right_aligned=[1])
    format_table(["layer", "ms"], [["fc", 1.5]], right_aligned=[1], markdown=True)

Cells are turned into text with ``str``. Plain text pads every column to its widest cell
(right-aligned columns hug the right) and rules off the header. Markdown writes one
``| a | b |`` line per row, escapes ``|`` inside cells and right-aligns through the
separator row (``---:``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence


def format_table(headers: Sequence[object], rows: Sequence[Sequence[object]],
                 right_aligned: Collection[int] = (), *, markdown: bool = False) -> str:
    """``rows`` under ``headers``; ``right_aligned`` holds column indices."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    for number, row in enumerate(cells[1:], 1):
        if len(row) != len(headers):
            raise ValueError(f"table row {number} has {len(row)} cells for "
                             f"{len(headers)} columns")
    right = set(right_aligned)
    if markdown:
        def md_line(row: list[str]) -> str:
            return "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"

        rule = "| " + " | ".join("---:" if i in right else "---"
                                 for i in range(len(headers))) + " |"
        return "\n".join([md_line(cells[0]), rule, *(md_line(row) for row in cells[1:])])
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        parts = [cell.rjust(w) if i in right else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])
