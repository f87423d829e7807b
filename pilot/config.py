"""The pilot's configuration: one INI file, checked whole at start.

Every option has a type and a default (``packaging/pilot.conf.example``
documents each). :func:`load_config` reports every problem at once, one line
each, as a :class:`ConfigError`; nothing on the node is touched before the
configuration is known to be good.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
from urllib.parse import urlsplit

DEFAULT_PATH = "/etc/workspace-pilot/pilot.conf"


class ConfigError(Exception):
    """A configuration that cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclasses.dataclass(frozen=True)
class PilotConfig:
    """Every setting the pilot runs with (file values, then command-line overrides)."""

    contact: str | None = None
    user: str = "pilot"
    secret: str | None = None
    realm: str = "workspace-pilot"
    request_timeout_s: float = 5.0
    reserved_timeout_s: float = 30.0
    verify_tls: bool = True
    lock_dir: str = "/run/workspace-pilot"
    lock_timeout_s: float = 30.0
    backend: str = "hugepages"
    hugepages_dir: str = "/sys/kernel/mm/hugepages/hugepages-2048kB"
    log_dir: str = "/var/log/workspace-pilot"
    log_level: str = "info"


# section -> option -> (field name, parser)
def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be a number above 0")
    return value


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise ValueError("must be yes or no")


def _url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    return text.rstrip("/")


def _abs_path(text: str) -> str:
    if not os.path.isabs(text):
        raise ValueError("must be an absolute path")
    return text


def _choice(*allowed: str):
    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return text

    return parse


def _text(text: str) -> str:
    if not text:
        raise ValueError("must not be empty")
    return text


SCHEMA = {
    "service": {
        "contact": ("contact", _url),
        "user": ("user", _text),
        "secret": ("secret", _text),
        "secret_file": (None, _abs_path),
        "realm": ("realm", _text),
        "request_timeout": ("request_timeout_s", _positive_float),
        "reserved_timeout": ("reserved_timeout_s", _positive_float),
        "verify_tls": ("verify_tls", _bool),
    },
    "node": {
        "lock_dir": ("lock_dir", _abs_path),
        "lock_timeout": ("lock_timeout_s", _positive_float),
    },
    "memory": {
        "backend": ("backend", _choice("hugepages")),
        "hugepages_dir": ("hugepages_dir", _abs_path),
    },
    "logging": {
        "dir": ("log_dir", _abs_path),
        "level": ("log_level", _choice("debug", "info", "warning", "error")),
    },
}


def load_config(path: str | None, **overrides) -> PilotConfig:
    """Read ``path`` (or the default file if it exists), apply non-None ``overrides``, validate.

    ``path=None`` means the default path, and its absence is not an error.
    Raises :class:`ConfigError` listing every problem found.
    """
    problems: list[str] = []
    values: dict[str, object] = {}
    explicit = path is not None
    path = path or DEFAULT_PATH
    if explicit or os.path.exists(path):
        parser = configparser.ConfigParser(interpolation=None)
        try:
            with open(path, encoding="utf-8") as handle:
                parser.read_file(handle)
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
        except configparser.Error as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError([f"{path}: not a valid INI file: {first}"]) from None
        _read_sections(parser, path, values, problems)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("secret") is None and not problems:
        problems.append(
            f"{path}: [service] needs 'secret' or 'secret_file' (the pilot account's digest secret)"
        )
    if values.get("contact") is None and not problems:
        problems.append("no service contact: pass --contact URL or set [service] contact")
    if problems:
        raise ConfigError(problems)
    return PilotConfig(**values)


def _read_sections(parser, path: str, values: dict, problems: list[str]) -> None:
    for section in parser.sections():
        options = SCHEMA.get(section)
        if options is None:
            problems.append(f"{path}: unknown section [{section}]; known: {', '.join(SCHEMA)}")
            continue
        for option, text in parser.items(section):
            if option not in options:
                problems.append(f"{path}: [{section}] unknown option '{option}'")
                continue
            field, parse = options[option]
            try:
                value = parse(text.strip())
            except ValueError as exc:
                problems.append(f"{path}: [{section}] {option} = {text!r}: {exc}")
                continue
            if option == "secret_file":
                try:
                    with open(value, encoding="utf-8") as handle:
                        values["secret"] = handle.read().strip()
                except OSError as exc:
                    problems.append(f"{path}: [service] secret_file {value}: {exc.strerror}")
            else:
                values[field] = value
