"""nmsparse.tables.format_table: the one table formatter (plain text and Markdown)."""

import pytest

from nmsparse.tables import format_table


def test_plain_text_pads_and_aligns():
    text = format_table(["name", "ms"], [["fc", 1.5], ["conv1", 12.25]], right_aligned=[1])
    assert text.splitlines() == [
        "name      ms",
        "-----  -----",
        "fc       1.5",
        "conv1  12.25",
    ]


def test_markdown_escapes_pipes_and_aligns_right():
    table = format_table(["a", "b"], [["x|y", 1]], right_aligned=[1], markdown=True)
    assert table.splitlines() == ["| a | b |", "| --- | ---: |", "| x\\|y | 1 |"]


def test_empty_rows():
    assert format_table(["a"], [], markdown=True).splitlines() == ["| a |", "| --- |"]
    assert format_table(["abc"], []).splitlines() == ["abc", "---"]


@pytest.mark.parametrize("markdown", [False, True])
def test_ragged_row_is_an_error(markdown):
    with pytest.raises(ValueError, match="table row 2 has 1 cells for 2 columns"):
        format_table(["a", "b"], [[1, 2], [3]], markdown=markdown)
