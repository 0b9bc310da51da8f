"""What the operator commands print: text made safe for a terminal, and tables.

Much of what ``chatgate usage``, ``blocks``, ``limits show`` and ``usage anomalies``
print came from callers: end-user ids, tags, request ids, block reasons that name them.
A user id holding an escape sequence could clear the operator's screen, rewrite lines
above it, retitle the window or set the clipboard (OSC 52) — or a bidi override could
make a row read differently from what it holds. Every cell and every caller-supplied
value these commands print goes through :func:`shown`, which spells such characters out
as Python escapes (``\\x1b``, ``\\u202e``): nothing is dropped, nothing acts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TextIO


def shown(value: object) -> str:
    """``value`` as text safe to print: each non-printable character (C0/C1 controls,
    DEL, format characters such as bidi overrides, unassigned code points) escaped."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(c: str) -> str:
    code = ord(c)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def print_table(
    header: Sequence[str],
    rows: Sequence[Sequence[object]],
    out: TextIO,
    *,
    text_columns: int | None = None,
    footer: Sequence[object] | None = None,
    rules: bool = False,
) -> None:
    """Columns padded to their widest cell, every cell through :func:`shown`. Columns
    from ``text_columns`` on are right-aligned (numbers); ``rules`` draws a line under
    the header and above the footer."""
    lines = [[shown(c) for c in header], *([shown(c) for c in row] for row in rows)]
    tail = [shown(c) for c in footer] if footer is not None else None
    everything = [*lines, *([tail] if tail is not None else [])]
    widths = [max(len(r[i]) for r in everything) for i in range(len(header))]
    left = len(header) if text_columns is None else text_columns

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    print(line(lines[0]), file=out)
    if rules:
        print(rule, file=out)
    for cells in lines[1:]:
        print(line(cells), file=out)
    if tail is not None:
        if rules:
            print(rule, file=out)
        print(line(tail), file=out)
