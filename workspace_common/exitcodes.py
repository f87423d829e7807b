"""One table per command's exit codes, from which its ``--help`` and the reference page are both made.

A command defines its :class:`ExitTable` once, beside its code; ``--help``
shows :meth:`ExitTable.help`, ``docs/reference/exit-codes.md`` is made of
every table's :meth:`ExitTable.markdown` (``python -m admin_tools.reference``),
and ``tests/test_reference.py`` checks that the page is what the tables make.
"""

from __future__ import annotations

import dataclasses
import textwrap


@dataclasses.dataclass(frozen=True)
class ExitCodeRow:
    """One exit status: its number, an optional short name (``restore-failed``) and what it means."""

    code: int
    meaning: str
    name: str = ""


@dataclasses.dataclass(frozen=True)
class ExitTable:
    """A command's exit codes, in order; ``preamble``: lines said before them (e.g. a range passed through)."""

    command: str
    rows: tuple[ExitCodeRow, ...]
    preamble: tuple[tuple[str, str], ...] = ()

    def help(self, width: int = 79) -> str:
        """The ``exit codes:`` block of ``--help``, wrapped at ``width``."""
        codes = [label for label, _ in self.preamble] + [str(row.code) for row in self.rows]
        pad = max(len(code) for code in codes)
        lines = ["exit codes:"]
        for label, text in self.preamble:
            lines.append(textwrap.fill(text, width=width, initial_indent=f"  {label:>{pad}}  ",
                                       subsequent_indent=" " * (pad + 4)))
        for row in self.rows:
            text = f"{row.name}: {row.meaning}" if row.name else row.meaning
            lines.append(textwrap.fill(text, width=width, initial_indent=f"  {row.code:>{pad}}  ",
                                       subsequent_indent=" " * (pad + 4)))
        return "\n".join(lines)

    def markdown(self) -> str:
        """The table as Markdown: a heading, then code, name and meaning per row."""
        lines = [f"## `{self.command}`", "", "| code | name | meaning |", "|---|---|---|"]
        lines += [f"| {label} | | {text} |" for label, text in self.preamble]
        lines += [f"| {row.code} | {row.name and f'`{row.name}`'} | {row.meaning} |" for row in self.rows]
        return "\n".join(lines) + "\n"
