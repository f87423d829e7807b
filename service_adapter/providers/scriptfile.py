"""Writing a rendered job script where the batch system can read it and nobody else can."""

from __future__ import annotations

import os


def write_job_script(path: str, text: str) -> str:
    """Write ``text`` to ``path`` as a 0600 file (its directories created 0700); returns ``path``.

    The script names the pilot's config and contact, so it is root's alone;
    sbatch and qsub read it as the submitting user (root) and copy it to the
    batch server, so no node needs to read this file. An existing directory
    keeps its mode: the site may have opened it for its own log readers.
    """
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an earlier file of the same slot may have had another mode
        data = text.encode("utf-8")
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)
    return path
