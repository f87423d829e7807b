"""The node's checks: privilege, configuration, memory backend, journal, libvirt, service contact, batch user."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import sys

from pilot.config import DEFAULT_PATH, PilotConfig
from pilot.evaluate.check import FAIL, OK, SUDO_TIMEOUT_S, WARN, Check, plural, valid_user
from pilot.evaluate.paths import node_key_file
from workspace_common.errors import one_line


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
    path = node_key_file(config)
    host = os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]
    try:
        read_node_key(path)
    except CredentialError as exc:
        checks.append(Check(FAIL, "node key", f"{exc}: pilots on {host} cannot authenticate to the service"))
    else:
        checks.append(Check(OK, "node key", f"{path} holds {host}'s key, readable by its owner only"))
    return checks


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
            f"{len(dead)} {plural(len(dead), 'entry', 'entries')} of ended pilots ({_names(dead)}): "
            "their changes may still be on the node: run workspace-killall",
        ))
    if unreadable:
        shown = ", ".join(f"{item.filename}: {item.reason}" for item in unreadable[:3])
        checks.append(Check(
            FAIL, what,
            f"{len(unreadable)} unreadable {plural(len(unreadable), 'entry', 'entries')} ({shown}): "
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
    from pilot.libvirtconn import libvirt_module, open_connection

    try:
        libvirt = libvirt_module()  # its errors become FAIL lines here, not stderr noise
    except ImportError as exc:
        return [Check(FAIL, what, f"libvirt-python is missing in {sys.executable} ({exc}): pip install libvirt-python")]
    try:
        conn = open_connection(uri, read_only=True)
    except libvirt.libvirtError as exc:
        return [Check(FAIL, what, f"cannot connect: {one_line(exc)}; is libvirtd running?")]
    try:
        version = conn.getVersion()
        hostname = conn.getHostname()
        capabilities = conn.getCapabilities()
    except libvirt.libvirtError as exc:
        return [Check(FAIL, what, f"connected, but it does not answer: {one_line(exc)}")]
    finally:
        conn.close()
    shown = f"{version // 1000000}.{version // 1000 % 1000}.{version % 1000}"
    return [Check(OK, what, f"{conn_type(uri)} {shown} on {hostname}"),
            *check_guest_user(capabilities, config.image_dir)]


def check_guest_user(capabilities: str, image_dir: str | None = None) -> list[Check]:
    """Whom guests run as, from libvirt's own word (its capabilities' DAC security model): a warning when that is
    root (a guest that escapes its hypervisor is then root on the node), an ok line with the uid otherwise, and a
    warning when that user cannot search ``image_dir`` (the site's images: QEMU opens them as that user);
    nothing where libvirt runs guests under no DAC model (Xen, the test driver)."""
    import xml.etree.ElementTree as ET

    from pilot.vm.guestuser import dac_labels, guest_user, search_problem

    try:
        names = [model.findtext("model", "") for model in ET.fromstring(capabilities).findall("host/secmodel")]
        labels = [label for _, label in dac_labels(capabilities)]
    except ET.ParseError:
        return [Check(WARN, "guests", "libvirt's capabilities are not XML: cannot tell whom guests run as")]
    if not labels:
        return []
    confined = [name for name in names if name not in ("none", "dac")]
    confinement = f", confined by {', '.join(confined)}" if confined else ", with no confinement (security_driver)"
    uids = {label.split(":", 1)[0].lstrip("+") for label in labels}
    if "0" in uids:
        return [Check(WARN, "guests", f"run as root (libvirt's DAC label {labels[0]}){confinement}: a guest that "
                      "escapes QEMU is root on this node; set user and group (e.g. libvirt-qemu) and "
                      "dynamic_ownership = 1 in /etc/libvirt/qemu.conf")]
    checks = [Check(OK, "guests", f"run as uid {', '.join(sorted(uids))} (libvirt's DAC label){confinement}")]
    user = guest_user(capabilities, "")
    if image_dir is not None and os.path.isdir(image_dir):
        problem = search_problem(image_dir, user)
        if problem is not None:
            checks.append(Check(WARN, "guests", f"cannot reach the image directory: {problem}; VMs booting from "
                                f"its images are refused (make it and its images readable by gid {user.gid})"))
    return checks


def conn_type(uri: str) -> str:
    """The driver part of a libvirt URI (``qemu`` of ``qemu+ssh://...``), for the ok line."""
    return uri.split(":", 1)[0].split("+", 1)[0]


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
