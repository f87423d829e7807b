"""Path safety: everything the root pilot runs, imports or trusts, and every directory above it, must be root's
and not writable by group or others (see :mod:`pilot.evaluate`)."""

from __future__ import annotations

import os
import socket
import stat
import sys

from pilot.config import PilotConfig
from pilot.evaluate.check import FAIL, OK, SUDOERS_PATH_RE, WARN, Check


# -- 2. paths ------------------------------------------------------------------


def check_paths(config: PilotConfig, config_file: str | None, executable: str | None) -> list[Check]:
    """Every path the root pilot trusts, and all directories above them: root-owned, not group/other-writable."""
    import pilot

    checks = []
    if executable is None:
        checks.append(Check(
            FAIL, "path workspace-pilot",
            "no workspace-pilot executable (not argv[0], not beside the interpreter, not on PATH): install the package",
        ))
    elif not SUDOERS_PATH_RE.fullmatch(executable):
        checks.append(Check(
            FAIL, "path workspace-pilot",
            f"{executable!r} has characters a sudoers line cannot take as they are: install it under a plain path",
        ))
    else:
        checks.append(check_path("path workspace-pilot", executable))
    checks.append(check_path("path python", sys.executable))
    checks.append(check_path("path pilot package", os.path.dirname(os.path.abspath(pilot.__file__)), tree=True))
    if config_file is not None:
        checks.append(check_path("path config", config_file))  # no secret in it since node keys
    if os.path.exists(node_key_file(config)):
        checks.append(check_path("path node key", node_key_file(config), secret=True))
    if config.backend == "xl":
        checks.append(check_path("path xl command", config.xl_command))
    checks.append(check_path("path journal dir", config.journal_dir, create_mode=0o700))
    checks.append(check_path("path log dir", config.log_dir, create_mode=0o755))
    if config.vm_uri:
        # QEMU reads the images as root: nobody else may plant or swap one between the hash and the boot.
        checks.append(check_path("path image dir", config.image_dir))
        checks.append(check_path("path console dir", config.console_dir, create_mode=0o700))
    return checks


def node_key_file(config: PilotConfig) -> str:
    """This node's key file (the config's node_key_file, ``{host}`` filled in as the pilot would)."""
    from pilot.credentials import node_key_path

    host = os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]
    return node_key_path(config.node_key_file, host)


def check_path(what: str, path: str, *, secret: bool = False, create_mode: int | None = None,
               tree: bool = False) -> Check:
    """One path: it and everything it resolves through must be root-owned and not group/other-writable.

    ``secret``: the file itself must not be readable by group or others
    either. ``create_mode``: a missing path is a warning (a pilot creates it
    with that mode) provided its nearest existing parent is safe; otherwise
    a missing path FAILs. ``tree``: everything below the directory too.
    """
    try:
        chain, exists = resolve_chain(path)
        for real in chain:
            problem = path_problem(real, os.lstat(real))
            if problem:
                return Check(FAIL, what, problem)
        if exists and tree:
            problem = _tree_problem(chain[-1])
            if problem:
                return Check(FAIL, what, problem)
    except PermissionError as exc:
        # Only when not root: a root-only directory is exactly what it should be, but it hides the rest.
        return Check(WARN, what, f"{path}: cannot look at {exc.filename or path} as uid {os.geteuid()}: run evaluate as root")
    except OSError as exc:
        return Check(FAIL, what, f"{path}: {exc.strerror or exc} at {exc.filename or path}")
    if not exists:
        if create_mode is None:
            return Check(FAIL, what, f"{path} does not exist")
        return Check(
            WARN, what,
            f"{path} does not exist; the first pilot creates it (mode {create_mode:04o}) in {chain[-1]}, which is safe",
        )
    real = chain[-1]
    shown = path if real == os.path.abspath(path) else f"{path} -> {real}"
    if secret:
        mode = stat.S_IMODE(os.stat(real).st_mode)
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            return Check(
                FAIL, what,
                f"{shown} is readable by group or others (mode {mode:04o}) and holds a secret: chmod 0600 {real}",
            )
    return Check(OK, what, f"{shown}: root-owned, not writable by group or others")


def resolve_chain(path: str) -> tuple[list[str], bool]:
    """Every real directory and file ``path`` resolves through, from ``/`` down, and whether it exists.

    Symlinks are followed hop by hop like the kernel does, so the directory
    of each link and each link's target are in the list (a link itself is
    not: it cannot be changed without write access to its directory, which
    is checked). When the path does not exist the list ends at its nearest
    existing parent. Raises OSError for anything but a missing component.
    """
    pending = [part for part in os.path.abspath(path).split("/") if part]
    current = "/"
    chain = ["/"]
    hops = 0
    while pending:
        name = pending.pop(0)
        if name == ".":
            continue
        if name == "..":
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, name)
        try:
            info = os.lstat(candidate)
        except FileNotFoundError:
            return chain, False
        if stat.S_ISLNK(info.st_mode):
            hops += 1
            if hops > 40:
                raise OSError(40, "too many levels of symbolic links", path)
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = "/"
            pending[:0] = [part for part in target.split("/") if part]
            continue
        if pending and not stat.S_ISDIR(info.st_mode):
            raise NotADirectoryError(20, "not a directory", candidate)
        current = candidate
        if candidate not in chain:
            chain.append(candidate)
    return chain, True


def path_problem(path: str, info: os.stat_result) -> str | None:
    """What makes ``path`` (lstat ``info``) unsafe for root to trust, with the fix; None if it is fine."""
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid != 0:
        return f"{path} belongs to uid {info.st_uid} (mode {mode:04o}), not root: chown root {path}"
    if mode & stat.S_IWOTH and mode & stat.S_ISVTX and stat.S_ISDIR(info.st_mode):
        return (
            f"{path} is a shared directory (owner uid 0, mode {mode:04o}: anyone may create entries in it): "
            "move the pilot's files under a directory only root can write"
        )
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "group and others" if mode & stat.S_IWGRP and mode & stat.S_IWOTH else (
            "group" if mode & stat.S_IWGRP else "others")
        return f"{path} is writable by {who} (owner uid 0, mode {mode:04o}): chmod go-w {path}"
    return None


def _tree_problem(top: str) -> str | None:
    """The first unsafe file or directory below ``top`` (root imports every module there), or None."""
    for directory, dirs, files in os.walk(top):
        dirs.sort()
        for name in sorted(dirs) + sorted(files):
            path = os.path.join(directory, name)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                chain, _ = resolve_chain(path)
                for real in chain:
                    problem = path_problem(real, os.lstat(real))
                    if problem:
                        return problem
                continue
            problem = path_problem(path, info)
            if problem:
                return problem
    return None


