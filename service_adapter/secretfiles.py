"""The service's secret files: one-line secrets, the site key and the operators' accounts, each readable by its
owner only; a file that is not is refused with one line saying what to do."""

from __future__ import annotations

import os
import re
import stat

from workspace_common.protocol import is_key
from service_adapter.digest import Account


def user_name(text: str) -> str:
    """An operator's user name (the value, or ValueError saying what one is)."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}", text):
        raise ValueError("must be a user name (letters, digits, _ . @ -; at most 64)")
    return text


def check_private_file(path: str) -> os.stat_result:
    """Raise ValueError unless ``path`` is a regular file only its owner (this user or root) can read."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise ValueError(f"{exc.strerror}: create it (mode 0600)") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError("is not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise ValueError(f"mode {mode:04o} lets group or others at it: chmod 600 {path}")
    if info.st_uid not in (0, os.geteuid()):
        raise ValueError(f"is owned by uid {info.st_uid}, not by this user or root: chown it")
    return info


def read_private_text(path: str) -> str:
    """The text of a file only its owner may read (:func:`check_private_file`); ValueError says what is wrong."""
    check_private_file(path)
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError as exc:
        raise ValueError(f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8 text") from None


def read_secret_file(path: str) -> str:
    """The secret in ``path`` (surrounding white space dropped); ValueError says what is wrong."""
    secret = read_private_text(path).strip()
    if not secret:
        raise ValueError("is empty: put the secret in it")
    if "\n" in secret:
        raise ValueError("holds more than one line: put only the secret in it")
    return secret


def read_site_key(path: str) -> str:
    """The site key in ``path`` (64 hex digits, a file of mode 0600); ValueError says what is wrong."""
    key = read_secret_file(path)
    if not is_key(key):
        raise ValueError("does not hold a site key (64 lowercase hex digits): make one with "
                         "workspace-lease site-key --output FILE")
    return key


def read_accounts_file(path: str, realm: str) -> dict[str, Account]:
    """Operator accounts from an htdigest-style file of ``user:realm:HA1`` lines (SHA-256 HA1).

    HA1 is ``sha256("user:realm:secret")`` in lowercase hex (for example
    ``printf '%s' "alice:workspace-lease:$SECRET" | sha256sum``). Blank
    lines and lines starting with ``#`` are skipped. Raises ValueError with
    one line naming the first bad line.
    """
    lines = read_private_text(path).splitlines()
    accounts: dict[str, Account] = {}
    for line_no, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) != 3:
            raise ValueError(f"line {line_no}: not user:realm:HA1")
        user, line_realm, ha1 = parts
        try:
            user_name(user)
        except ValueError as exc:
            raise ValueError(f"line {line_no}: user {user!r} {exc}") from None
        if line_realm != realm:
            raise ValueError(
                f"line {line_no}: realm {line_realm!r} is not the operator realm {realm!r}: "
                "compute the HA1 with the operator realm"
            )
        if not re.fullmatch(r"[0-9a-fA-F]{64}", ha1):
            raise ValueError(f"line {line_no}: HA1 must be 64 hex digits (sha256 of user:realm:secret)")
        if user in accounts:
            raise ValueError(f"line {line_no}: user {user!r} appears twice")
        accounts[user] = Account(user, ha1.lower())
    if not accounts:
        raise ValueError("holds no account: add a user:realm:HA1 line")
    return accounts
