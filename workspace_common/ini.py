"""Reading an INI configuration file whole, one line per problem: the loader both configs share.

Standard library only, importable on its own, so that the service may
import it as it imports :mod:`workspace_common.protocol` (the layering rule in
docs/architecture.md). Each config module keeps its own schema (section -> option ->
(field, parser)) and its own value parsers; the generic ones are here.
"""

from __future__ import annotations

import configparser
import os
import re
from collections.abc import Callable

Parser = Callable[[str], object]
Schema = dict[str, dict[str, tuple[str, Parser]]]


class ConfigError(Exception):
    """A configuration that cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def read_ini(path: str, *, line_comments_only: bool = False) -> configparser.ConfigParser:
    """Parse the file at ``path``; ConfigError (one line) if it cannot be read or is not INI.

    ``line_comments_only``: only lines starting with ``#`` or ``;`` in their
    first column are comments, so an indented ``#SBATCH ...`` can be part of
    a multi-line value.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not a UTF-8 text file"]) from None
    if line_comments_only:
        parser = configparser.ConfigParser(interpolation=None, comment_prefixes=(), empty_lines_in_values=False)
        text = re.sub(r"(?m)^[#;].*$", "", text)
    else:
        parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text, source=path)
    except configparser.Error as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError([f"{path}: not a valid INI file: {first}"]) from None
    return parser


def read_sections(parser: configparser.ConfigParser, path: str, schema: Schema, retired: dict[tuple[str, str], str],
                  values: dict, problems: list[str]) -> None:
    """Parse every option of every section into ``values`` (by field name); one line in ``problems`` for each
    unknown section or option, retired option (saying what replaced it) and bad value."""
    for section in parser.sections():
        options = schema.get(section)
        if options is None:
            problems.append(f"{path}: unknown section [{section}]: known are {', '.join(f'[{s}]' for s in schema)}")
            continue
        for option, text in parser.items(section):
            if (section, option) in retired:
                problems.append(f"{path}: [{section}] {option} is gone: {retired[section, option]}")
                continue
            if option not in options:
                problems.append(f"{path}: [{section}] unknown option '{option}': known are {', '.join(options)}")
                continue
            field, parse = options[option]
            try:
                values[field] = parse(text.strip())
            except ValueError as exc:
                problems.append(f"{path}: [{section}] {option} = {text.strip()!r}: {exc}")


# -- value parsers: each raises ValueError("what is wrong, what to do") ----------------------------


def boolean(text: str) -> bool:
    """yes/no, true/false, on/off, 1/0 (any case)."""
    lowered = text.strip().lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise ValueError("must be yes or no")


def abs_path(text: str) -> str:
    """An absolute path, as given."""
    if not os.path.isabs(text):
        raise ValueError("must be an absolute path")
    return text


def choice(*allowed: str) -> Parser:
    """A parser that takes exactly one of ``allowed``."""

    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return text

    return parse


def number(low: float, high: float, message: str, *, above_low: bool = False) -> Parser:
    """A parser of numbers from ``low`` (or above it) to ``high``; anything else is ValueError(``message``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(message) from None
        if not (low < value if above_low else low <= value) or not value <= high:
            raise ValueError(message)
        return value

    return parse


def whole(low: int, high: int, message: str) -> Parser:
    """A parser of whole numbers from ``low`` to ``high``; anything else is ValueError(``message``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(message) from None
        if not low <= value <= high:
            raise ValueError(message)
        return value

    return parse
