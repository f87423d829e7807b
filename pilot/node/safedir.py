"""Is a directory safe for root's own files (the journal, the node lock)?"""

from __future__ import annotations

import os
import stat


def directory_problem(path: str) -> str | None:
    """What makes ``path`` unsafe, as text that follows its name, or None when it is safe.

    Safe means: a real directory (not a symlink), owned by this process's
    user, not writable by group or others — otherwise anyone could plant or
    swap the files that root trusts there.
    """
    try:
        info = os.lstat(path)
    except OSError as exc:
        return f": {exc.strerror}"
    if not stat.S_ISDIR(info.st_mode):
        return " is not a directory"
    if info.st_uid != os.geteuid():
        return f" belongs to uid {info.st_uid}, not {os.geteuid()}; chown it to the pilot's user"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return " is writable by group or others; chmod go-w it"
    return None
