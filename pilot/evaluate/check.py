"""One check's outcome, and the three statuses."""

from __future__ import annotations

import dataclasses
import re

OK = "ok"
WARN = "warn"
FAIL = "FAIL"


@dataclasses.dataclass(frozen=True)
class Check:
    """The outcome of one check: ``status`` is OK, WARN or FAIL; ``detail`` says why and what to do."""

    status: str
    what: str
    detail: str = ""

    def line(self) -> str:
        """The check as one printed line: ``ok   what: detail``."""
        return f"{self.status:<4} {self.what}" + (f": {self.detail}" if self.detail else "")


SUDO_TIMEOUT_S = 5.0
SUDOERS_FILE = "/etc/sudoers.d/workspace-pilot"
# useradd's default NAME_REGEX (plus the trailing $ of machine accounts).
USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}\$?")
# A path that goes into a sudoers line as it is: no white space, no characters sudoers treats specially.
SUDOERS_PATH_RE = re.compile(r"/[A-Za-z0-9/._+-]*")


def valid_user(name: str) -> bool:
    """Whether ``name`` is a sane unix user name (what useradd accepts by default)."""
    return bool(USER_RE.fullmatch(name))


def plural(count: int, word: str, plural: str | None = None) -> str:
    return word if count == 1 else (plural or word + "s")
