"""The node's own log files: readable by root and its group only (0640), whoever may list their directory.

A pilot's or VM job's log names slots, leases, hosts and contacts, and may
quote what a guest or a service said: no business of the node's other
users. Every log file the node side writes is opened through here, so an
existing file made wider by hand, or by an earlier version, is narrowed too.
"""

from __future__ import annotations

import logging
import os

#: The mode of every node log file.
LOG_MODE = 0o640


def open_log(path: str) -> int:
    """A descriptor of ``path`` opened for appending, created 0640 (and made 0640 if it was wider)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, LOG_MODE)
    os.fchmod(fd, LOG_MODE)
    return fd


def log_handler(path: str) -> logging.FileHandler:
    """A logging handler that appends to ``path``, a file of mode 0640."""
    os.close(open_log(path))
    return logging.FileHandler(path)
