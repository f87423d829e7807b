"""Text that came from a client, made safe for one log line or one terminal cell.

Pilots (one of which may be compromised) and clients send free text: a
notification's ``message``, a VM's failure ``reason``, field names, peer
names. Written raw, a ``\\n`` forges a whole log line and an escape
sequence repaints an operator's terminal. :func:`printable` shows every
character that is not printable the way Python's ``repr`` does
(``\\n``, ``\\x1b``, ``\\u202e``), and leaves the rest as it is.
"""

from __future__ import annotations

__all__ = ["printable"]


def printable(text: object) -> str:
    """``str(text)`` with each non-printable character (controls, line and bidi marks, lone surrogates) escaped.

    Backslashes are escaped too, so an escaped form cannot be mistaken for
    one that the sender typed. Printable text (also non-ASCII letters)
    comes back unchanged and without copying.
    """
    text = str(text)
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(_escape(char) for char in text)


def _escape(char: str) -> str:
    if char == "\\":
        return "\\\\"
    if char.isprintable():
        return char
    return repr(char)[1:-1]  # '\n' -> \n, '\x1b' -> \x1b, '\ud800' -> \ud800
