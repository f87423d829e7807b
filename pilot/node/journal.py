"""The write-ahead node journal: what each pilot is about to change on the node and how to undo it.

One JSON file per pilot in a root-owned directory (default
``/var/lib/workspace-pilot``), written before every change to the node and
replaced atomically (temporary file, fsync, rename, fsync of the
directory), so after a crash or a power cut a reader finds either the old
record or the new one, never half of one. The directory also holds the
node lock (``node.lock``) that serialises every change.

Who undoes what: a pilot removes its own entry once the node is restored.
An entry whose owner is dead (pid gone, or reused: see
:mod:`pilot.node.owner`) is undone by the next holder of the node lock — the next
pilot, or ``workspace-killall`` — before it changes anything itself
(:mod:`pilot.node.memory`).
"""

from __future__ import annotations

import dataclasses
import json
import os

from pilot.node.lock import NodeLock
from pilot.node.owner import Owner
from pilot.node.safedir import directory_problem

JOURNAL_VERSION = 1

#: Phases of a memory record. ``taking``: the change may be under way; undo
#: by returning the level to ``before`` (no one else can have changed it: the
#: taker held the node lock, and the next holder replays first). ``held``:
#: ``units`` are taken; undo relative to whatever the level is then, so
#: other pilots' changes stay. ``restoring``: the give-back may be under way;
#: finish it by setting the level to ``target``.
PHASES = ("taking", "held", "restoring")


class JournalError(Exception):
    """The journal directory is unsafe or unusable, or an entry cannot be written or read."""


@dataclasses.dataclass(frozen=True)
class MemoryRecord:
    """One pilot's change to the host's memory through one backend, and where it stands."""

    backend: str
    params: dict
    phase: str
    units: int
    memory_mb: int
    before: int | None = None
    target: int | None = None

    def to_dict(self) -> dict:
        """A JSON-able record."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MemoryRecord":
        """Rebuild from :meth:`to_dict`; ValueError if it is not a valid record."""
        record = cls(**data)
        if record.phase not in PHASES or not isinstance(record.units, int) or not isinstance(record.params, dict):
            raise ValueError(f"not a memory record: {data!r}")
        if record.phase != "held" and not (isinstance(record.before, int) and isinstance(record.target, int)):
            raise ValueError(f"memory record in phase {record.phase} without before/target levels")
        return record


@dataclasses.dataclass(frozen=True)
class Entry:
    """Everything one pilot has changed on this node, keyed by slot, host and owner pid."""

    slot: str
    host: str
    owner: Owner
    contact: str | None = None
    memory: MemoryRecord | None = None
    vm_uri: str | None = None
    """Set before this pilot creates its first VM: the libvirt URI where domains tagged with its slot may run."""
    sign_key: str | None = dataclasses.field(default=None, repr=False)
    """The key of this (slot, host)'s notifications, so that workspace-killall can tell the service
    'killed' (the journal directory is root's alone, like the node key)."""
    fetching: tuple[str, ...] = ()
    """The images (sha256) this pilot is downloading into the node's image cache, set before the first
    byte: workspace-killall removes the partial downloads a dead pilot left (the next pilot resumes them)."""
    run_dir: str | None = None
    """A VM job's run directory (its control files and virtiofs sockets, see :mod:`pilot.vmjob`), set before
    it is made: whoever undoes the entry removes it, after the job's VM is destroyed."""

    job_limit: tuple[str, int] | None = None
    """A VM job's batch job's memory cgroup and its limit in bytes before the wrapper lowered it by the VM's
    memory (:mod:`pilot.vmjob.jobshare`), set before the change: whoever undoes the entry puts it back."""

    nets: tuple[str, ...] = ()
    """The lease networks this pilot may have made on the node (:mod:`pilot.net`), each set before its first
    device: whoever undoes the entry removes their bridges, tunnels, filters and DHCP servers, after the VMs."""
    net_root: str | None = None
    """Where those networks' DHCP servers keep their files (``[networks] run_dir``), set with ``nets``."""

    @property
    def filename(self) -> str:
        """The entry's file name in the journal directory."""
        return f"{self.slot}.{self.host}.{self.owner.pid}.json"

    def with_memory(self, memory: MemoryRecord | None) -> "Entry":
        """This entry with its memory record replaced."""
        return dataclasses.replace(self, memory=memory)

    @property
    def empty(self) -> bool:
        """Whether nothing of this pilot's is left on the node (no memory taken, no VMs possible)."""
        return (self.memory is None and self.vm_uri is None and not self.fetching and self.run_dir is None
                and self.job_limit is None and not self.nets)

    def to_json(self) -> bytes:
        """The entry as the bytes stored on disk."""
        data = {
            "version": JOURNAL_VERSION,
            "slot": self.slot,
            "host": self.host,
            "owner": self.owner.to_dict(),
            "contact": self.contact,
            "memory": self.memory.to_dict() if self.memory else None,
            "vm_uri": self.vm_uri,
            "sign_key": self.sign_key,
            "fetching": list(self.fetching),
            "run_dir": self.run_dir,
            "job_limit": list(self.job_limit) if self.job_limit else None,
            "nets": list(self.nets),
            "net_root": self.net_root,
        }
        return json.dumps(data, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> "Entry":
        """Parse an entry; ValueError if it is not a valid version-1 entry."""
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("version") != JOURNAL_VERSION:
            raise ValueError("not a version-1 journal entry")
        memory = data.get("memory")
        return cls(
            slot=str(data["slot"]),
            host=str(data["host"]),
            owner=Owner.from_dict(data["owner"]),
            contact=data.get("contact"),
            memory=MemoryRecord.from_dict(memory) if memory else None,
            vm_uri=data.get("vm_uri") or None,
            sign_key=data.get("sign_key") or None,
            fetching=_sha256s(data.get("fetching") or ()),
            run_dir=_absolute(data.get("run_dir")),
            job_limit=_job_limit(data.get("job_limit")),
            nets=_net_names(data.get("nets") or ()),
            net_root=_net_root(_net_names(data.get("nets") or ()), data.get("net_root")),
        )


def _sha256s(value) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v) for v in value):
        raise ValueError("fetching must be a list of sha256s")
    return tuple(value)


def _net_names(value) -> tuple[str, ...]:
    from workspace_common.nodenames import check_net_name

    if not isinstance(value, (list, tuple)):
        raise ValueError("nets must be a list of network names")
    return tuple(check_net_name(name) for name in value)


def _net_root(nets: tuple[str, ...], value) -> str | None:
    root = _absolute(value)
    if nets and root is None:
        raise ValueError("nets need net_root (where their files are)")
    return root


def _job_limit(value) -> tuple[str, int] | None:
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 2 or not isinstance(value[1], int) or value[1] < 0
            or not str(_absolute(value[0])).startswith("/sys/fs/cgroup/")):
        raise ValueError("job_limit must be [a cgroup directory under /sys/fs/cgroup, a limit in bytes]")
    return value[0], value[1]


def _absolute(value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not os.path.isabs(value) or os.path.normpath(value) != value or value == "/":
        raise ValueError("run_dir and net_root must be normalised absolute paths below /")
    return value


@dataclasses.dataclass(frozen=True)
class UnreadableEntry:
    """A file in the journal that is not a valid entry; only an administrator can judge it."""

    filename: str
    reason: str


class Journal:
    """The journal directory: entries, and the node lock that guards every change.

    The directory is created (mode 0700) if missing and must belong to the
    pilot's user (root on a node) and not be writable by group or others:
    otherwise anyone could plant an entry that the next pilot "undoes".
    """

    def __init__(self, directory: str, lock_timeout: float = 30.0):
        self.directory = directory
        self.lock_timeout = lock_timeout

    def prepare(self) -> None:
        """Create the directory if missing and check that it is safe; raises JournalError."""
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise JournalError(f"journal directory {self.directory}: cannot create it: {exc.strerror}") from None
        self.check()
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise JournalError(f"journal directory {self.directory} is not writable by uid {os.geteuid()}")

    def check(self) -> None:
        """Check an existing directory (changing nothing); raises JournalError if it is unsafe."""
        problem = directory_problem(self.directory)
        if problem:
            raise JournalError(f"journal directory {self.directory}{problem}")

    def lock(self) -> NodeLock:
        """The node lock (not yet taken): ``with journal.lock(): ...``."""
        return NodeLock(self.directory, self.lock_timeout)

    def entries(self) -> list[Entry | UnreadableEntry]:
        """Every entry in the directory, oldest file first; unreadable files as :class:`UnreadableEntry`."""
        try:
            names = [name for name in os.listdir(self.directory) if name.endswith(".json")]
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise JournalError(f"journal directory {self.directory}: {exc.strerror}") from None
        found: list[tuple[float, Entry | UnreadableEntry]] = []
        for name in names:
            path = os.path.join(self.directory, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                with os.fdopen(fd, "rb") as handle:
                    mtime = os.fstat(handle.fileno()).st_mtime
                    raw = handle.read(1 << 20)
            except FileNotFoundError:
                continue  # removed by its owner while we listed
            except OSError as exc:
                found.append((0.0, UnreadableEntry(name, exc.strerror or str(exc))))
                continue
            try:
                entry = Entry.from_json(raw)
            except (ValueError, KeyError, TypeError) as exc:
                found.append((mtime, UnreadableEntry(name, f"not a journal entry: {exc}")))
                continue
            if entry.filename != name:
                found.append((mtime, UnreadableEntry(name, f"its content names {entry.filename}")))
                continue
            found.append((mtime, entry))
        found.sort(key=lambda pair: pair[0])
        return [item for _, item in found]

    def holds(self, entry: Entry | UnreadableEntry) -> bool:
        """Whether the entry's file is still in the directory (its owner removes it once the node is restored)."""
        return os.path.lexists(os.path.join(self.directory, entry.filename))

    def write(self, entry: Entry) -> None:
        """Store ``entry`` atomically and durably (replacing its previous version); raises JournalError."""
        path = os.path.join(self.directory, entry.filename)
        temp = os.path.join(self.directory, f".{entry.filename}.tmp")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, entry.to_json())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temp, path)
            self._sync_directory()
        except OSError as exc:
            raise JournalError(f"cannot write journal entry {path}: {exc.strerror}") from None

    def remove(self, entry: Entry | UnreadableEntry) -> None:
        """Delete an entry durably (a missing file is fine); raises JournalError."""
        path = os.path.join(self.directory, entry.filename)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise JournalError(f"cannot remove journal entry {path}: {exc.strerror}") from None
        try:
            self._sync_directory()
        except OSError as exc:
            raise JournalError(f"journal directory {self.directory}: {exc.strerror}") from None

    def _sync_directory(self) -> None:
        # The rename or unlink is durable only once the directory itself is on disk.
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
