"""``workspace-pilot evaluate``: check that this node is ready for pilots, change nothing, print the sudoers line.

Each check returns :class:`Check` lines (``ok``, ``warn`` or ``FAIL``); a
printer writes them, a summary, and the sudoers line to install as the very
last line (admins need it most when the privilege check fails).

Changing nothing is the point: evaluate only stats, lists and reads. It
creates no directory, lock, journal entry or log file, never writes a
balloon, opens libvirt read-only, and sends the service one unauthenticated
request, which the service refuses before it stores anything.

Path safety: the pilot runs as root through sudo, so every file it runs,
imports or trusts (the executable, the interpreter, the ``pilot`` package,
the configuration and node key, the journal and log directories) and every
directory above them must be owned by root and not writable by group or
others; otherwise whoever can write there can become root or make the next
pilot "undo" changes it never made. A world-writable directory with the
sticky bit (``/tmp``, ``/var/tmp``) FAILs too, as in OpenSSH's StrictModes:
the sticky bit stops others from replacing *existing* root-owned entries,
but anyone may create a missing one first (a journal or log directory the
first pilot would create), so the pilot's files do not belong below one.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import re
import shutil
import stat
import socket
import subprocess
import sys
from typing import TextIO

from pilot.config import DEFAULT_PATH, ConfigError, PilotConfig, load_config
from pilot.exitcodes import ExitCode
from pilot.protocol import PILOT_ENV

OK = "ok"
WARN = "warn"
FAIL = "FAIL"

SUDO_TIMEOUT_S = 5.0
SUDOERS_FILE = "/etc/sudoers.d/workspace-pilot"
#: The batch job's variables the pilot reads for its deadline (pilot/deadline.py).

# useradd's default NAME_REGEX (plus the trailing $ of machine accounts).
_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}\$?")
# A path that goes into a sudoers line as it is: no white space, no characters sudoers treats specially.
_SUDOERS_PATH_RE = re.compile(r"/[A-Za-z0-9/._+-]*")


@dataclasses.dataclass(frozen=True)
class Check:
    """The outcome of one check: ``status`` is OK, WARN or FAIL; ``detail`` says why and what to do."""

    status: str
    what: str
    detail: str = ""

    def line(self) -> str:
        """The check as one printed line: ``ok   what: detail``."""
        return f"{self.status:<4} {self.what}" + (f": {self.detail}" if self.detail else "")


def evaluate(config_path: str | None, contact: str | None, batch_user: str | None,
             out: TextIO | None = None) -> int:
    """Run every check, print them and the sudoers line on ``out`` (default stdout); return an ExitCode.

    OK when nothing FAILed (warnings allowed), NOT_READY when something did,
    CONFIG (each problem on its own stderr line, nothing else printed) when
    the configuration cannot be loaded. A missing node key or contact is not a
    config error here: the key is a FAIL line, the contact check is skipped.
    """
    out = sys.stdout if out is None else out
    try:
        config = load_config(config_path, require_service=False, contact=contact)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"workspace-pilot: config error: {problem}", file=sys.stderr)
        return ExitCode.CONFIG
    config_file = config_path or (DEFAULT_PATH if os.path.exists(DEFAULT_PATH) else None)
    executable = pilot_executable()
    user = batch_user if batch_user is not None else (os.environ.get("SUDO_USER") or "pilot")
    checks = [
        *check_privilege(executable, user),
        *check_config(config, config_file),
        *check_paths(config, config_file, executable),
        *check_backend(config),
        *check_journal(config),
        *check_libvirt(config),
        *check_contact(config),
        *check_batch_user(user, batch_user is not None),
    ]
    return report(checks, executable, user, out)


def report(checks: list[Check], executable: str | None, batch_user: str, out: TextIO) -> int:
    """Print ``checks``, the summary, a blank line and the sudoers line (last); return the ExitCode."""
    for check in checks:
        print(check.line(), file=out)
    failed = sum(check.status == FAIL for check in checks)
    if failed:
        print(f"NOT READY: {failed} {_plural(failed, 'check')} failed (see FAIL lines)", file=out)
    else:
        passed = sum(check.status == OK for check in checks)
        warned = sum(check.status == WARN for check in checks)
        print(f"ready: {passed} {_plural(passed, 'check')} ok, {warned} {_plural(warned, 'warning')}", file=out)
    print(file=out)
    line = sudoers_line(batch_user, executable)
    if line is None:
        print("# no sudoers line: fix the FAIL lines about the batch user or the executable first", file=out)
    else:
        print(f"# install with visudo -f {SUDOERS_FILE} (both lines; the first lets the job's", file=out)
        print("# walltime and node name through sudo's env_reset, so the pilot can end before the batch system kills it):", file=out)
        print(f'Defaults!{executable} env_keep += "{" ".join(PILOT_ENV)}"', file=out)
        print(line, file=out)
    out.flush()
    return ExitCode.NOT_READY if failed else ExitCode.OK


def sudoers_line(batch_user: str, executable: str | None) -> str | None:
    """The sudoers rule that lets ``batch_user`` run ``executable reserve ...`` as root; None if unsafe to write."""
    if not valid_user(batch_user) or executable is None or not _SUDOERS_PATH_RE.fullmatch(executable):
        return None
    return f"{batch_user} ALL=(root) NOPASSWD: {executable} reserve *"


def valid_user(name: str) -> bool:
    """Whether ``name`` is a sane unix user name (what useradd accepts by default)."""
    return bool(_USER_RE.fullmatch(name))


def pilot_executable() -> str | None:
    """The absolute, symlink-free path of the ``workspace-pilot`` command that sudo should run; None if not found.

    The running script when this is it; else the one beside the interpreter
    (a virtualenv's ``bin``, or ``/usr/bin`` for a system install: the one that
    runs this very package, also under ``python -m pilot``); else ``$PATH``'s.
    """
    candidates = []
    if os.path.basename(sys.argv[0] or "") == "workspace-pilot":
        candidates.append(sys.argv[0])
    candidates.append(os.path.join(os.path.dirname(sys.executable), "workspace-pilot"))
    found = shutil.which("workspace-pilot")
    if found:
        candidates.append(found)
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.realpath(candidate)
    return None


# -- 1. privilege -------------------------------------------------------------


def check_privilege(executable: str | None, batch_user: str, euid: int | None = None) -> list[Check]:
    """Root, or a sudo rule for ``executable reserve``.

    As root (``euid`` 0) this is ok, and the batch user's rule is looked up
    with ``sudo -l -U`` as a warning only (pilots may also start as root).
    Otherwise ``sudo -n -l`` must allow this user the command, without a password.
    """
    euid = os.geteuid() if euid is None else euid
    # sudoers matches "reserve *" against the arguments with fnmatch: plain
    # "reserve" would not match it, so ask about a real argument list.
    command = [executable or "workspace-pilot", "reserve", "--help"]
    if euid == 0:
        checks = [Check(OK, "privilege", "running as root (uid 0)")]
        if executable and valid_user(batch_user):
            allowed, why = _sudo_allows(["-U", batch_user], command)
            if allowed:
                checks.append(Check(OK, f"sudo rule for {batch_user}", f"may run {executable} reserve as root"))
            else:
                checks.append(Check(
                    WARN, f"sudo rule for {batch_user}",
                    f"{why}; pilots started as {batch_user} cannot become root: install the sudoers line below",
                ))
        return checks
    if executable is None:
        return [Check(FAIL, "privilege", f"not root (uid {euid}) and no workspace-pilot executable to ask sudo about")]
    # Asked on behalf of another uid (root checking an account): sudo -l -U names it.
    options = [] if os.geteuid() != 0 else ["-U", _user_name(euid)]
    allowed, why = _sudo_allows(options, command)
    if allowed:
        return [Check(OK, "privilege", f"sudo lets uid {euid} run {executable} reserve as root without a password")]
    return [Check(FAIL, "privilege", f"not root (uid {euid}) and {why}: install the sudoers line below")]


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"#{uid}"  # sudo's spelling of a uid without a name


def _sudo_allows(options: list[str], command: list[str]) -> tuple[bool, str]:
    """Whether ``sudo -n -l [options] command`` allows it; else why not (one line)."""
    sudo = shutil.which("sudo")
    if sudo is None:
        return False, "sudo is not installed"
    argv = [sudo, "-n", "-l", *options, *command]
    try:
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=SUDO_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return False, f"sudo -l did not answer within {SUDO_TIMEOUT_S:g} s"
    except OSError as exc:
        return False, f"cannot run {sudo}: {exc.strerror or exc}"
    if done.returncode == 0:
        return True, ""
    said = " ".join((done.stderr.strip().splitlines() or [""])[-1:]).strip()
    return False, f"sudo does not allow {' '.join(command[:2])}" + (f" ({said})" if said else "")


# -- configuration -----------------------------------------------------------


def check_config(config: PilotConfig, config_file: str | None) -> list[Check]:
    """The configuration file in use, and this node's key (a pilot without one cannot report)."""
    from pilot.credentials import CredentialError, read_node_key

    if config_file is None:
        checks = [Check(WARN, "config", f"no file ({DEFAULT_PATH} does not exist): built-in defaults; pass --config FILE")]
    else:
        checks = [Check(OK, "config", f"{config_file} loads")]
    path = _node_key_file(config)
    host = os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]
    try:
        read_node_key(path)
    except CredentialError as exc:
        checks.append(Check(FAIL, "node key", f"{exc}: pilots on {host} cannot authenticate to the service"))
    else:
        checks.append(Check(OK, "node key", f"{path} holds {host}'s key, readable by its owner only"))
    return checks


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
    elif not _SUDOERS_PATH_RE.fullmatch(executable):
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
    if os.path.exists(_node_key_file(config)):
        checks.append(check_path("path node key", _node_key_file(config), secret=True))
    if config.backend == "xl":
        checks.append(check_path("path xl command", config.xl_command))
    checks.append(check_path("path journal dir", config.journal_dir, create_mode=0o700))
    checks.append(check_path("path log dir", config.log_dir, create_mode=0o755))
    if config.vm_uri:
        # QEMU reads the images as root: nobody else may plant or swap one between the hash and the boot.
        checks.append(check_path("path image dir", config.image_dir))
        checks.append(check_path("path console dir", config.console_dir, create_mode=0o700))
    return checks


def _node_key_file(config: PilotConfig) -> str:
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


# -- 3. memory backend ---------------------------------------------------------


def check_backend(config: PilotConfig) -> list[Check]:
    """The configured backend can be built and read, and the host is not already below ``minmem``."""
    from pilot.node.backends import BackendError, backend_from_config

    what = "memory backend"
    try:
        backend = backend_from_config(config)
    except BackendError as exc:
        return [Check(FAIL, what, f"[memory] backend = {config.backend}: {exc}")]
    try:
        level = backend.read()
        host_mb = backend.host_mb(level)
    except (BackendError, OSError) as exc:
        return [Check(FAIL, what, f"{backend.describe()}: {exc}")]
    finally:
        backend.close()
    room = max(host_mb - config.minmem_mb, 0)
    summary = (
        f"{backend.describe()}: level {level} {backend.unit}, host {host_mb} MB, minmem {config.minmem_mb} MB, "
        f"room for leases {room} MB"
    )
    if host_mb < config.minmem_mb:
        return [Check(
            FAIL, what,
            f"{summary}: the host is already below minmem; give it memory back (workspace-killall if pilots "
            "left it shrunk) or lower [memory] minmem",
        )]
    if config.backend == "none":
        return [Check(
            WARN, what,
            f"{summary}: backend none sets NO memory aside: the host may use what leased VMs were promised; "
            "choose hugepages, cgroup, xen or xl unless the site keeps that memory free by other means",
        )]
    return [Check(OK, what, summary)]


# -- 4. journal ------------------------------------------------------------------


def check_journal(config: PilotConfig) -> list[Check]:
    """The journal directory is safe, and no entry of a dead pilot or unreadable entry waits in it."""
    from pilot.node.journal import Entry, Journal, JournalError

    directory = config.journal_dir
    what = f"journal {directory}"
    journal = Journal(directory)
    cannot_list = Check(WARN, what, f"cannot list it as uid {os.geteuid()}: run evaluate as root to see its entries")
    try:
        os.lstat(directory)  # not os.path.lexists: that says "missing" when a parent only hides it
    except FileNotFoundError:
        return [Check(OK, what, "no entries (the directory is not there yet)")]
    except PermissionError:
        return [cannot_list]
    except OSError as exc:
        return [Check(FAIL, what, f"{exc.strerror or exc}: make it a directory only root can write")]
    if os.geteuid() == 0:
        # Journal.check compares with the caller's uid: only meaningful when that is the pilot's (root).
        try:
            journal.check()
        except JournalError as exc:
            return [Check(FAIL, what, str(exc))]
    elif not os.access(directory, os.R_OK | os.X_OK):
        return [cannot_list]
    try:
        entries = journal.entries()
    except JournalError as exc:
        return [Check(FAIL, what, str(exc))]
    live, dead, unreadable = [], [], []
    for entry in entries:
        if not isinstance(entry, Entry):
            unreadable.append(entry)
        elif entry.owner.alive():
            live.append(entry)
        else:
            dead.append(entry)
    checks = []
    if dead:
        checks.append(Check(
            FAIL, what,
            f"{len(dead)} {_plural(len(dead), 'entry', 'entries')} of ended pilots ({_names(dead)}): "
            "their changes may still be on the node: run workspace-killall",
        ))
    if unreadable:
        shown = ", ".join(f"{item.filename}: {item.reason}" for item in unreadable[:3])
        checks.append(Check(
            FAIL, what,
            f"{len(unreadable)} unreadable {_plural(len(unreadable), 'entry', 'entries')} ({shown}): "
            "look at them, then run workspace-killall",
        ))
    if live:
        checks.append(Check(WARN, what, f"{len(live)} pilot(s) hold slots now ({_names(live)})"))
    if not checks:
        checks.append(Check(OK, what, "no entries"))
    return checks


def _names(entries) -> str:
    """Up to three entries as ``slot S on H, pid P``."""
    shown = "; ".join(f"slot {e.slot} on {e.host}, pid {e.owner.pid}" for e in entries[:3])
    return shown + (f"; and {len(entries) - 3} more" if len(entries) > 3 else "")


# -- 5. libvirt ------------------------------------------------------------------


def check_libvirt(config: PilotConfig) -> list[Check]:
    """The leased VMs' libvirt URI answers a read-only connection (an empty URI: VMs disabled, a warning)."""
    uri = config.vm_uri
    if not uri:
        return [Check(WARN, "libvirt", "[libvirt] uri is empty: VMs are disabled, pilots only set memory aside")]
    what = f"libvirt {uri}"
    try:
        import libvirt
    except ImportError as exc:
        return [Check(FAIL, what, f"libvirt-python is missing in {sys.executable} ({exc}): pip install libvirt-python")]
    # libvirt prints every error on stderr by default; each one becomes a FAIL line here instead.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.openReadOnly(uri)
    except libvirt.libvirtError as exc:
        return [Check(FAIL, what, f"cannot connect: {_one_line(exc)}; is libvirtd running?")]
    if conn is None:  # very old bindings return None instead of raising
        return [Check(FAIL, what, "cannot connect; is libvirtd running?")]
    try:
        version = conn.getVersion()
        hostname = conn.getHostname()
    except libvirt.libvirtError as exc:
        return [Check(FAIL, what, f"connected, but it does not answer: {_one_line(exc)}")]
    finally:
        conn.close()
    shown = f"{version // 1000000}.{version // 1000 % 1000}.{version % 1000}"
    return [Check(OK, what, f"{conn_type(uri)} {shown} on {hostname}")]


def conn_type(uri: str) -> str:
    """The driver part of a libvirt URI (``qemu`` of ``qemu+ssh://...``), for the ok line."""
    return uri.split(":", 1)[0].split("+", 1)[0]


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# -- 6. service contact ----------------------------------------------------------

_DIGEST_RE = re.compile(r"(?:^|[\s,])digest\s", re.IGNORECASE)
_SHA256_RE = re.compile(r"algorithm\s*=\s*\"?sha-256\"?(?![\w-])", re.IGNORECASE)


def check_contact(config: PilotConfig) -> list[Check]:
    """The service answers an unauthenticated notification with a SHA-256 digest challenge.

    Nothing is stored: the service refuses the request before it reads the
    body. Without a contact the check is skipped (a warning).
    """
    if not config.contact:
        return [Check(
            WARN, "service contact",
            "none given, not checked: pass --contact URL (pilots need it too, or [service] contact)",
        )]
    import requests

    url = f"{config.contact}/pilot/v2/notifications"
    what = f"service contact {config.contact}"
    try:
        response = requests.post(
            url, data=b"", timeout=config.request_timeout_s, verify=config.tls_verify, allow_redirects=False,
        )
    except requests.RequestException as exc:
        return [Check(FAIL, what, f"POST {url}: {_request_reason(exc, config.request_timeout_s)}; "
                                  "check the URL and that the service runs")]
    challenge = response.headers.get("WWW-Authenticate", "")
    status = f"{response.status_code} {response.reason or ''}".strip()
    if response.status_code == 401 and _DIGEST_RE.search(" " + challenge):
        if _SHA256_RE.search(challenge):
            return [Check(OK, what, f"answers {status} with a SHA-256 digest challenge")]
        return [Check(
            WARN, what,
            f"answers {status} with a digest challenge without algorithm=SHA-256: pilots fall back to MD5; "
            "enable SHA-256 on the service",
        )]
    if 300 <= response.status_code < 400:
        where = response.headers.get("Location", "?")
        return [Check(FAIL, what, f"POST {url} answered {status} to {where}: use the final URL as the contact")]
    return [Check(
        FAIL, what,
        f"POST {url} answered {status}, not 401 with a digest challenge: is this the workspace service's URL?",
    )]


def _request_reason(exc: Exception, timeout: float) -> str:
    """A requests error as a short reason ("Connection refused", "no answer within 5 s")."""
    import requests

    if isinstance(exc, requests.Timeout):
        return f"no answer within {timeout:g} s"
    text = str(exc)
    errno_text = re.search(r"\[Errno -?\d+\] ([^'\"()\]]+)", text)
    if errno_text:
        return errno_text.group(1).strip()
    if isinstance(exc, requests.exceptions.SSLError):
        verify = re.search(r"certificate verify failed[^'\")]*", text)
        return "TLS: " + (verify.group(0) if verify else "handshake failed")
    return " ".join(text.split())[:200] or type(exc).__name__


# -- 7. batch user ---------------------------------------------------------------


def check_batch_user(user: str, given: bool = True) -> list[Check]:
    """The batch user of the sudoers line: a sane user name (FAIL), known on this node (else a warning)."""
    what = "batch user"
    if not valid_user(user):
        return [Check(
            FAIL, what,
            f"{user!r} is not a valid user name (lower-case letters, digits, _ and -, at most 32): "
            "pass --batch-user USER, the account the batch jobs run as",
        )]
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        return [Check(
            WARN, what,
            f"{user}: no such user on this node; the sudo rule matches nobody until it exists: check --batch-user",
        )]
    source = "" if given else " (from $SUDO_USER or the default; pass --batch-user USER to choose)"
    return [Check(OK, what, f"{user} (uid {uid}){source}")]


def _plural(count: int, word: str, plural: str | None = None) -> str:
    return word if count == 1 else (plural or word + "s")
