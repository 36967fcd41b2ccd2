"""Fixed-width tables for the console, at most `CONSOLE_WIDTH` columns wide.

A table wider than that is cut into blocks of columns, one under the other,
each block repeating the key columns that name a row (e.g. variant and
shape), so that every line fits a 120-column terminal and each row can still
be read across.
"""

from __future__ import annotations

from collections.abc import Sequence

CONSOLE_WIDTH = 120
_GAP = "  "


def _block(header: Sequence[str], body: Sequence[Sequence[str]], columns: Sequence[int]) -> list[str]:
    widths = {i: max(len(header[i]), *(len(row[i]) for row in body)) for i in columns}
    lines = [_GAP.join(header[i].rjust(widths[i]) for i in columns)]
    lines += [_GAP.join(row[i].rjust(widths[i]) for i in columns) for row in body]
    return lines


def _width(header: Sequence[str], body: Sequence[Sequence[str]], i: int) -> int:
    return max(len(header[i]), *(len(row[i]) for row in body))


def fixed_width(header: Sequence[str], body: Sequence[Sequence[str]], keys: int = 1,
                width: int = CONSOLE_WIDTH) -> str:
    """Right-aligned columns, in blocks no wider than `width`.

    Args:
      header: Column titles.
      body: Rows of cells (strings), each as long as `header`.
      keys: The first `keys` columns name a row; every block repeats them.
      width: Most characters per line (a single column wider than what the
        keys leave is still given its own block).

    Returns:
      The table: one block, or several separated by a blank line.
    """
    if any(len(row) != len(header) for row in body):
        raise ValueError("Every row needs one cell per column.")
    keys = min(keys, len(header))
    key_width = sum(_width(header, body, i) for i in range(keys)) + len(_GAP) * max(0, keys - 1)
    blocks: list[list[int]] = []
    current: list[int] = []
    used = key_width
    for i in range(keys, len(header)):
        extra = _width(header, body, i) + (len(_GAP) if keys or current else 0)
        if current and used + extra > width:
            blocks.append(current)
            current, used = [], key_width
            extra = _width(header, body, i) + (len(_GAP) if keys else 0)
        current.append(i)
        used += extra
    if current or not blocks:
        blocks.append(current)
    parts = ["\n".join(_block(header, body, [*range(keys), *columns])) for columns in blocks]
    return "\n\n".join(parts)
