"""The service's log file: one line per record, private to its group, and reopened after logrotate.

- :class:`SafeFormatter` escapes what is not printable in each message
  (:func:`service_adapter.safetext.printable`), so text that a client
  sent (a notification's ``message``, a field name with ``\\n``) cannot
  forge a line or reach a terminal as an escape sequence.
- :class:`LogFile` is a ``WatchedFileHandler``: when logrotate moves the
  file away, the next record goes to a new file at the old path (no
  ``copytruncate``, no signal needed). It creates the file mode 0640
  whatever the umask, and takes away group-write and all "other" bits
  from a file that has them.
"""

from __future__ import annotations

import logging
import logging.handlers
import os

from service_adapter.safetext import printable

LOG_FILE_MODE = 0o640
LINE_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


class SafeFormatter(logging.Formatter):
    """A Formatter whose message part is always one printable line (a traceback still follows on its own lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The line, with the record's message escaped by :func:`printable`."""
        record.message = printable(record.message)
        return super().formatMessage(record)


class LogFile(logging.handlers.WatchedFileHandler):
    """Append to ``path`` (mode 0640), reopening it when it was moved or removed (logrotate)."""

    def __init__(self, path: str):
        super().__init__(path, encoding="utf-8", errors="backslashreplace")

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, LOG_FILE_MODE)
        try:
            info = os.fstat(fd)
            if info.st_size == 0 and info.st_mode & 0o777 != LOG_FILE_MODE:
                os.fchmod(fd, LOG_FILE_MODE)  # new: exactly 0640, whatever the umask took away or left
            elif info.st_mode & 0o777 & ~LOG_FILE_MODE:
                os.fchmod(fd, info.st_mode & 0o777 & LOG_FILE_MODE)
            return os.fdopen(fd, self.mode, encoding=self.encoding, errors=self.errors)
        except BaseException:
            os.close(fd)
            raise
