"""What every command line of the project shares: one-line argument errors with exit code 2, and argument types."""

from __future__ import annotations

import argparse
from urllib.parse import urlsplit

#: The exit code of a bad command-line argument, for every command of the project.
USAGE_EXIT = 2
#: The largest number an argument takes: seconds, about three years (longer waits overflow timeout types);
#: MB, 100 TB.
MAX_ARGUMENT = 10**8


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line (``prog: error: ... (see --help)``) and exits 2."""

    def error(self, message: str):
        self.exit(USAGE_EXIT, f"{self.prog}: error: {message} (see --help)\n")


def positive(kind, noun: str = "a number", *, zero: bool = False):
    """An argparse type: a ``kind`` (int or float) above 0 (or 0 too, with ``zero``) and at most
    :data:`MAX_ARGUMENT`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not (value >= 0 if zero else value > 0):
            raise argparse.ArgumentTypeError(f"{text} must be {'0 or more' if zero else 'above 0'}")
        if not value <= MAX_ARGUMENT:
            raise argparse.ArgumentTypeError(f"{text} is too large (at most {MAX_ARGUMENT})")
        return value

    return parse


def http_url(text: str) -> str:
    """An argparse type: an http:// or https:// URL with a host (a trailing / dropped)."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL with a host")
    return text.rstrip("/")


class WrappingFormatter(argparse.HelpFormatter):
    """Wraps a description or epilog written as one paragraph to the terminal; keeps one written with
    line breaks (an exit-code table, a list of phases) as its author laid it out."""

    def _fill_text(self, text, width, indent):
        if "\n" in text.strip("\n"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


#: The exit code of a command whose reader went away (a shell's 128 + SIGPIPE).
CLOSED_PIPE_EXIT = 141


def quiet_on_closed_pipe(main):
    """Wrap a command's ``main`` so that a reader that went away (``... | head``) ends it with
    :data:`CLOSED_PIPE_EXIT` and no traceback.

    Python ignores SIGPIPE, so the write raises BrokenPipeError; stdout is
    then pointed at /dev/null, else the interpreter's last flush at exit
    raises again ("Exception ignored ... BrokenPipeError").
    """
    import functools
    import sys

    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except BrokenPipeError:
            for stream in (sys.stdout, sys.stderr):
                silence(stream)
            return CLOSED_PIPE_EXIT

    return run


def silence(stream) -> None:
    """Point ``stream``'s file descriptor at /dev/null (its reader went away), so that what is still
    buffered, and the interpreter's flush at exit, go nowhere instead of raising BrokenPipeError again.
    A stream without a descriptor (a test's StringIO) is left alone."""
    import os

    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):
        return
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), fd)
