"""Tables as text: columns aligned in plain text for the terminal, or a markdown table for REPORT.md."""
from __future__ import annotations


def text_table(header: list[str], rows: list[list], right: tuple[int, ...] = ()) -> str:
    """Each column as wide as its widest cell, two spaces apart, a rule of dashes under the header; the columns
    numbered in `right` aligned right (numbers to compare), the others left. No line ends in spaces."""
    cells = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    align = lambda text, column: text.rjust(widths[column]) if column in right else text.ljust(widths[column])
    lines = ["  ".join(align(text, column) for column, text in enumerate(row)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A markdown table: the header, its rule, then one line per row (cells as given, `|` escaped by the caller)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
