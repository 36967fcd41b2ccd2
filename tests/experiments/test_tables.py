"""Console tables fit 120 columns: a wide table is cut into blocks of columns,
each repeating the columns that name a row."""

from __future__ import annotations

import pytest

from gqa_t5x.experiments import tables


def test_a_narrow_table_is_one_right_aligned_block():
    text = tables.fixed_width(["name", "value"], [["a", "1.5"], ["long name", "12.25"]])
    assert text.splitlines() == ["     name  value", "        a    1.5", "long name  12.25"]


def test_a_wide_table_is_cut_into_blocks_that_repeat_the_key_columns():
    header = ["variant", "kv"] + [f"a long column title {i}" for i in range(12)]
    body = [["MQA", "1"] + [f"{i}.0" for i in range(12)], ["GQA-8", "8"] + [f"{i}.5" for i in range(12)]]
    text = tables.fixed_width(header, body, keys=2)
    blocks = text.split("\n\n")
    assert len(blocks) > 1
    assert max(len(line) for line in text.splitlines()) <= tables.CONSOLE_WIDTH
    for block in blocks:
        lines = block.splitlines()
        assert lines[0].split()[:2] == ["variant", "kv"] and lines[1].split()[:2] == ["MQA", "1"]
    # Every column is in exactly one block, in order.
    titles = [t for block in blocks for t in block.splitlines()[0].split("  ") if "title" in t]
    assert [t.strip() for t in titles] == header[2:]


def test_rows_must_have_a_cell_per_column():
    with pytest.raises(ValueError, match="one cell per column"):
        tables.fixed_width(["a", "b"], [["1"]])
