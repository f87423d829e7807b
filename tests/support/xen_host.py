"""A real Xen 4.17 host for the tests: the hypervisor and a PV dom0 under QEMU's software emulation.

What it boots is built once by ``scripts/build-xen-host.sh`` into
``.cache/xen-host`` (the hypervisor, Debian's kernel, dom0's root with the Xen
tools and python3). At each start this harness appends a second cpio to
dom0's initramfs: this project's code (``pilot``, ``workspace_common``,
``admin_tools``, compiled), the libraries the pilot imports (copied from the
test session's own environment: the same versions the rest of the suite
runs) and the command runner, :mod:`tests.support.dom0agent`, which dom0's
``/init`` starts on its console. The console is QEMU's first serial port,
which Xen shares with dom0 (``console=com1``; dom0's ``hvc0``); it is a unix
socket this harness listens on before QEMU starts, so nothing is missed and
nothing polls. :meth:`XenHost.run` sends one command and waits for its
answer; Xen drops console input dom0 is too busy to take, so the command
goes in short, checked pieces, each acknowledged before the next. dom0 reaches the host at 10.0.2.2 (QEMU's user network: its traffic
goes to the host's 127.0.0.1). QEMU is stopped by its pid.

Software emulation inflates everything in dom0 (Python's start, xl, the
balloon's settling) by an order of magnitude or more: timings here are not
a Xen host's.
"""

from __future__ import annotations

import base64
import compileall
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import zlib

from service_adapter.localvirt import system_command, system_env

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD_DIR = os.path.join(TOP, ".cache", "xen-host")
#: Where the project lives in dom0, and the commands that run it there.
DOM0_HOME = "/opt/workspace-pilot"
DOM0_PYTHONPATH = f"{DOM0_HOME}/src:{DOM0_HOME}/lib"
#: The pilot's libraries, as the session's environment has them (import name -> its files).
LIBRARIES = ("requests", "urllib3", "idna", "certifi", "charset_normalizer", "tenacity", "psutil")
#: dom0's console says this once the agent reads commands.
AGENT_READY = "workspace-pilot xen dom0 agent ready"
#: How dom0's memory is read back: the balloon driver's own count (KiB), not xl's (which asks Xen).
BALLOON_KB = "/sys/devices/system/xen_memory/xen_memory0/info/current_kb"
#: The console's request pieces: short enough for Xen's serial input ring (128 characters) with room to spare.
PIECE = 80
#: How long one piece may go unacknowledged before it is sent again, and how often.
ACK_WAIT_S = 5.0
SEND_TRIES = 20
#: The longest console line kept while waiting for its end (the largest answer, base64, is well below).
MAX_LINE = 1 << 20
#: libvirt's Xen driver in dom0 (started by :meth:`XenHost.start_libvirtd`).
LIBVIRT_URI = "xen:///system"
COMMANDS = {"workspace-pilot": "pilot", "workspace-killall": "admin_tools.killall",
            "workspace-node-status": "admin_tools.nodestatus"}


def _crc(text: str) -> str:
    return f"{zlib.crc32(text.encode()):08x}"


class XenHostError(Exception):
    """The Xen host could not be built, started or reached."""


class XenHost:
    """One Xen host under QEMU: :meth:`start` boots it (about 30 s), :meth:`run` runs a command in dom0.

    ``dom0_mb`` is dom0's memory at boot (``dom0_mem``), ``dom0_max_mb`` the
    most its balloon may grow to; QEMU gets ``memory_mb`` (Xen scrubs what
    it does not give dom0: less costs less). The console's whole output is
    kept in ``<workdir>/console.log``.
    """

    def __init__(self, workdir: str, *, dom0_mb: int = 1024, dom0_max_mb: int = 1536, memory_mb: int = 2048,
                 cpu: str = "Westmere"):
        self.workdir = workdir
        self.dom0_mb, self.dom0_max_mb, self.memory_mb, self.cpu = dom0_mb, dom0_max_mb, memory_mb, cpu
        self.console_log = os.path.join(workdir, "console.log")
        self.process: subprocess.Popen | None = None
        self._conn: socket.socket | None = None
        self._answers: dict[str, dict] = {}
        self._events: set[tuple] = set()  # the agent's acknowledgements, refusals and damaged answers not yet seen
        self._ready = False
        self._closed = False
        self._lock = threading.Condition()
        self._next = 0
        self._reader: threading.Thread | None = None
        self._libvirtd = False

    # -- start and stop ------------------------------------------------------------------------

    def start(self, timeout: float = 240.0) -> None:
        """Boot the host and wait until dom0's agent answers; XenHostError (with the console's end) if not."""
        for name in ("xen", "vmlinuz", "dom0.cpio"):
            if not os.path.exists(os.path.join(BUILD_DIR, name)):
                raise XenHostError(f"{BUILD_DIR}/{name} is missing: run scripts/build-xen-host.sh")
        initrd = self._initrd()
        console = os.path.join(self.workdir, "console.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(console)
        listener.listen(1)
        argv = [
            system_command("qemu-system-x86_64"), "-machine", "q35", "-accel", "tcg", "-cpu", self.cpu, "-smp", "2",
            "-m", str(self.memory_mb), "-nographic", "-no-reboot", "-monitor", "none",
            "-chardev", f"socket,id=console,path={console},server=off", "-serial", "chardev:console",
            "-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0",
            "-kernel", os.path.join(BUILD_DIR, "xen"),
            "-append", (f"dom0_mem={self.dom0_mb}M,max:{self.dom0_max_mb}M dom0_max_vcpus=2 console=com1 "
                        "com1=115200,8n1 loglvl=warning guest_loglvl=warning"),
            "-initrd", f"{os.path.join(BUILD_DIR, 'vmlinuz')} console=hvc0 rdinit=/init quiet,{initrd}",
        ]
        with open(os.path.join(self.workdir, "qemu.err"), "wb") as errors:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors,
                                            env=system_env())
        listener.settimeout(30)
        try:
            self._conn, _ = listener.accept()  # QEMU connects as it starts
        except OSError as exc:
            self.stop()
            raise XenHostError(f"QEMU did not connect its console: {exc}; {self._qemu_error()}") from None
        finally:
            listener.close()
        self._reader = threading.Thread(target=self._read, name="xen-console", daemon=True)
        self._reader.start()
        with self._lock:
            came_up = self._lock.wait_for(lambda: self._ready or self._closed, timeout) and self._ready
        if not came_up:
            ended = self.process.poll() is not None
            self.stop()  # not under the lock: the console's reader takes it on its way out
            why = f"QEMU ended before dom0 came up: {self._qemu_error()}" if ended else \
                f"dom0 did not come up in {timeout:g} s"
            raise XenHostError(f"{why}; the console ends: {self.console_tail()}")

    def stop(self) -> None:
        """End QEMU by its pid (SIGTERM, then SIGKILL) and close the console."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._reader is not None:
            self._reader.join(timeout=5)

    # -- commands ------------------------------------------------------------------------------

    def run(self, command: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run ``command`` (shell text) in dom0 as root; its exit status and output.

        The request goes in short pieces, each acknowledged (sent again when
        the console lost part of it: see :mod:`tests.support.dom0agent`). The
        exit status is -9 when it ran past ``timeout`` in dom0 (its process
        group was killed there); XenHostError when dom0 stops answering.
        """
        with self._lock:
            self._next += 1
            ident = str(self._next)
        text = base64.b64encode(json.dumps({"command": command, "timeout": timeout}).encode()).decode()
        pieces = [text[at:at + PIECE] for at in range(0, len(text), PIECE)]
        for n, piece in enumerate(pieces):
            self._send_until(f"P {ident} {n} {_crc(piece)} {piece}", ("ACK", ident, str(n)), ("NAK", ident, str(n)))
        self._send_until(f"E {ident} {len(pieces)} {_crc(text)}", ("GOT", ident), ("NAK", ident, "E"))
        deadline = time.monotonic() + timeout + 30
        with self._lock:
            while ident not in self._answers:
                if self._closed:
                    raise XenHostError(f"the console closed while dom0 ran {command!r}: {self.console_tail()}")
                if ("BAD", ident) in self._events:  # the answer arrived damaged: ask for it again
                    self._events.discard(("BAD", ident))
                    self._conn.sendall(f"AGAIN {ident}\n".encode())
                left = deadline - time.monotonic()
                if left <= 0:
                    raise XenHostError(f"dom0 did not answer {command!r} in {timeout + 30:g} s")
                self._lock.wait(left)
            answer = self._answers.pop(ident)
        return subprocess.CompletedProcess(command, answer["rc"], answer["stdout"], answer["stderr"])

    def _send_until(self, line: str, ok: tuple, refused: tuple) -> None:
        """Send one line until dom0's agent acknowledges it (``ok``); again after ``refused`` or silence."""
        for _ in range(SEND_TRIES):
            with self._lock:
                self._events.discard(ok)
                self._events.discard(refused)
            self._conn.sendall(line.encode() + b"\n")
            with self._lock:
                self._lock.wait_for(lambda: ok in self._events or refused in self._events or self._closed, ACK_WAIT_S)
                if ok in self._events:
                    self._events.discard(ok)
                    return
                if self._closed:
                    raise XenHostError(f"the console closed: {self.console_tail()}")
            # Lost or damaged: end whatever half-line dom0 holds, then send it again.
            self._conn.sendall(b"\n")
        raise XenHostError(f"dom0 did not take {line[:60]!r}... in {SEND_TRIES} tries: {self.console_tail()}")

    def check(self, command: str, timeout: float = 120.0) -> str:
        """Run ``command`` in dom0; its stdout, or XenHostError saying how it failed."""
        done = self.run(command, timeout)
        if done.returncode != 0:
            raise XenHostError(f"{command!r} in dom0 exited {done.returncode}: {done.stderr.strip()[-800:]}")
        return done.stdout

    def write_file(self, path: str, text: str, mode: int = 0o600) -> None:
        """Write ``text`` to ``path`` in dom0 (its directory made), in pieces the console carries."""
        data = base64.b64encode(text.encode()).decode()
        self.check(f"mkdir -p {os.path.dirname(path)} && : > {path}.part && chmod {mode:o} {path}.part")
        for at in range(0, len(data), 2400):
            self.check(f"echo {data[at:at + 2400]} >> {path}.b64")
        self.check(f"base64 -d {path}.b64 > {path}.part && rm {path}.b64 && mv {path}.part {path}")

    def start_libvirtd(self) -> None:
        """Start virtlogd and libvirtd (its Xen driver only) in dom0, once; XenHostError if libvirt does not answer.

        ``libvirtd -d`` returns once the daemon is set up, so the first
        ``virsh`` after it answers or libvirtd failed.
        """
        if self._libvirtd:
            return
        self.check("mkdir -p /var/log/libvirt && virtlogd -d -p /run/virtlogd.pid && "
                   "libvirtd -d --pid-file=/run/libvirtd.pid")
        answer = self.run(f"virsh -c {LIBVIRT_URI} version", timeout=60)
        if answer.returncode != 0:
            log = self.run("tail -5 /var/log/libvirt/libvirtd.log").stdout
            raise XenHostError(f"libvirtd in dom0 does not answer: {answer.stderr.strip()}; its log ends: {log}")
        self._libvirtd = True

    def domains(self) -> list[str]:
        """The names of the domains Xen runs, Domain-0 first (``xl list``: Xen's own count, not libvirt's)."""
        lines = self.check("xl list").splitlines()[1:]
        return [line.split()[0] for line in lines if line.strip()]

    def balloon_mb(self) -> int:
        """dom0's memory now, as its balloon driver counts it (MB)."""
        return int(self.check(f"cat {BALLOON_KB}")) // 1024

    def console_tail(self, lines: int = 15) -> str:
        """The console's last lines, on one line (for failure messages)."""
        try:
            with open(self.console_log, "rb") as handle:
                handle.seek(max(0, os.fstat(handle.fileno()).st_size - 4000))
                text = handle.read().decode(errors="replace")
        except OSError:
            return "(no console log)"
        return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())

    # -- inside --------------------------------------------------------------------------------

    def _read(self) -> None:
        """Keep the console in the log; hand out the agent's answers; note when it is ready."""
        buffered = b""
        with open(self.console_log, "ab") as log:
            while True:
                try:
                    chunk = self._conn.recv(65536) if self._conn is not None else b""
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                buffered += chunk
                *lines, buffered = buffered.split(b"\n")
                buffered = buffered[-MAX_LINE:]  # an answer is far shorter; a line without end is noise
                for raw in lines:
                    self._heard(raw.decode(errors="replace").strip("\r"))
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def _heard(self, line: str) -> None:
        """One console line: an answer or acknowledgement of the agent's, its ready line, or anything else."""
        at = line.find("@@")
        if at < 0:
            if AGENT_READY in line:
                with self._lock:
                    self._ready = True
                    self._lock.notify_all()
            return
        words = line[at + 2:].split(" ")
        with self._lock:
            if words[0] == "WP" and len(words) == 4:
                try:
                    if _crc(words[3]) != words[2]:
                        raise ValueError("damaged")
                    self._answers[words[1]] = json.loads(base64.b64decode(words[3]))
                except ValueError:
                    self._events.add(("BAD", words[1]))
            elif words[0] in ("ACK", "NAK", "GOT"):
                self._events.add(tuple(words))
            self._lock.notify_all()

    def _initrd(self) -> str:
        """dom0's initramfs for this boot: the cached root, then this project and its libraries."""
        stage = os.path.join(self.workdir, "project")
        home = os.path.join(stage, DOM0_HOME.lstrip("/"))
        for package in ("pilot", "workspace_common", "admin_tools"):
            shutil.copytree(os.path.join(TOP, package), os.path.join(home, "src", package),
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for name in LIBRARIES:
            spec = importlib.util.find_spec(name)
            if spec is None or not spec.submodule_search_locations:
                raise XenHostError(f"the test environment has no {name} to give dom0")
            source = list(spec.submodule_search_locations)[0]
            shutil.copytree(source, os.path.join(home, "lib", name),
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            # charset_normalizer's compiled parts sit beside it, at the top of site-packages.
            site = os.path.dirname(source)
            for extra in os.listdir(site):
                if extra.endswith(".so") and "mypyc" in extra:
                    shutil.copy2(os.path.join(site, extra), os.path.join(home, "lib", extra))
        shutil.copy2(os.path.join(TOP, "tests", "support", "dom0agent.py"), os.path.join(home, "dom0agent.py"))
        # Compiled here (the same CPython minor version as dom0's): dom0 under emulation would spend seconds on it.
        compileall.compile_dir(home, quiet=1, workers=2)
        bindir = os.path.join(stage, "usr", "local", "bin")
        os.makedirs(bindir)
        for command, module in COMMANDS.items():
            path = os.path.join(bindir, command)
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(f'#!/bin/sh\nPYTHONPATH={DOM0_PYTHONPATH} exec /usr/bin/python3 -m {module} "$@"\n')
            os.chmod(path, 0o755)
        project = os.path.join(self.workdir, "project.cpio")
        names = sorted(os.path.relpath(os.path.join(directory, name), stage)
                       for directory, dirs, files in os.walk(stage) for name in dirs + files)
        with open(project, "wb") as out:
            subprocess.run([system_command("busybox"), "cpio", "-o", "-H", "newc"], cwd=stage,
                           input="\n".join(names).encode() + b"\n", stdout=out, stderr=subprocess.DEVNULL,
                           check=True, env=system_env())
        initrd = os.path.join(self.workdir, "dom0-initrd.cpio")
        with open(initrd, "wb") as out:
            for part in (os.path.join(BUILD_DIR, "dom0.cpio"), project):
                with open(part, "rb") as handle:
                    shutil.copyfileobj(handle, out, 1 << 20)
        return initrd

    def _qemu_error(self) -> str:
        try:
            with open(os.path.join(self.workdir, "qemu.err"), encoding="utf-8", errors="replace") as handle:
                return handle.read().strip()[-400:] or "(QEMU said nothing)"
        except OSError:
            return "(no QEMU error file)"
