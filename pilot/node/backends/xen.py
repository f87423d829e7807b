"""The ``xen`` backend: the lease's memory is ballooned out of Domain-0 through libvirt.

libvirt-python is imported on first use, not when this module loads, so a
pilot with another backend never needs it.
"""

from __future__ import annotations

import sys

from pilot.node.backends.base import BackendError, BalloonBackend
from workspace_common.errors import one_line

DEFAULT_URI = "xen:///system"

#: How far (KiB) a read may land from the target and still count as reached:
#: dom0's balloon settles within a page or a few of what was asked, not exactly.
TOLERANCE_KB = 1024

_libvirt = None


def _module():
    """The libvirt module, imported once; BackendError when libvirt-python is missing."""
    global _libvirt
    if _libvirt is None:
        from pilot.libvirtconn import libvirt_module

        try:
            _libvirt = libvirt_module()  # each error reaches the caller as a BackendError, not on stderr
        except ImportError as exc:
            raise BackendError(
                f"xen: libvirt-python is missing in {sys.executable} ({exc}); "
                "run scripts/bootstrap.sh (or pip install libvirt-python==9.0.0)"
            ) from None
    return _libvirt


class XenBackend(BalloonBackend):
    """Domain-0's current memory through libvirt; the level is dom0's memory in KiB.

    Connects on first use. Domain-0 is the domain with id 0, or (where ids
    are not Xen's, as in libvirt's test driver) the one named ``Domain-0``.
    :meth:`write` returns once Xen has the new target; dom0 balloons to it
    afterwards.
    """

    name = "xen"
    unit = "KiB"

    def __init__(self, uri: str = DEFAULT_URI):
        if not isinstance(uri, str) or not uri:
            raise BackendError(f"xen: {uri!r} is not a libvirt URI; set [memory] xen_uri (e.g. {DEFAULT_URI})")
        self.uri = uri
        self._conn = None
        self._dom = None

    def params(self) -> dict:
        """The libvirt URI."""
        return {"uri": self.uri}

    def _domain0(self):
        from pilot.libvirtconn import open_connection

        libvirt = _module()
        if self._conn is None:
            try:
                self._conn = open_connection(self.uri)
            except libvirt.libvirtError as exc:
                raise BackendError(f"xen: cannot connect to {self.uri}: {one_line(exc)}; is libvirtd running?") from None
        if self._dom is None:
            try:
                self._dom = self._conn.lookupByID(0)
            except libvirt.libvirtError:
                try:
                    self._dom = self._conn.lookupByName("Domain-0")
                except libvirt.libvirtError as exc:
                    raise BackendError(
                        f"xen: {self.uri} has no Domain-0 (no domain with id 0 or that name): {one_line(exc)}; "
                        "is this a Xen host?"
                    ) from None
        return self._dom

    def _forget_if_dead(self) -> None:
        # A connection that died (libvirtd restarted) would fail forever; drop
        # it so the next call reconnects. A live one keeps its state (the test
        # driver's domains live in the connection).
        try:
            alive = self._conn is not None and self._conn.isAlive() == 1
        except _module().libvirtError:
            alive = False
        if not alive:
            self.close()

    def read(self) -> int:
        """Domain-0's current memory in KiB."""
        dom = self._domain0()
        try:
            return int(dom.info()[2])
        except _module().libvirtError as exc:
            self._forget_if_dead()
            raise BackendError(f"xen: cannot read Domain-0's memory through {self.uri}: {one_line(exc)}") from None

    def write(self, level: int) -> None:
        """Ask Xen to balloon Domain-0 to ``level`` KiB (live only; it may get there later).

        Raises BackendError when libvirt or Xen refuses (e.g. above dom0's
        maximum); Domain-0 then keeps its memory.
        """
        if not isinstance(level, int) or level <= 0:
            raise BackendError(f"xen: {level!r} is not a memory size in KiB; nothing changed")
        libvirt = _module()
        dom = self._domain0()
        try:
            dom.setMemoryFlags(level, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as exc:
            self._forget_if_dead()
            raise BackendError(
                f"xen: cannot set Domain-0's memory to {level} KiB through {self.uri}: {one_line(exc)}"
            ) from None

    def units_for(self, memory_mb: int) -> int:
        """``memory_mb`` in KiB."""
        return memory_mb * 1024

    def mb_of(self, units: int) -> int:
        """Whole MB in ``units`` KiB."""
        return units // 1024

    def level_after_take(self, level: int, units: int) -> int:
        """Taking memory shrinks Domain-0."""
        return level - units

    def level_after_give(self, level: int, units: int) -> int:
        """Giving back grows Domain-0."""
        return level + units

    def host_mb(self, level: int) -> int:
        """Domain-0's memory in MB."""
        return level // 1024

    def boot_level(self, boot_mb: int | str) -> int:
        """Domain-0's boot memory (``dom0_mem``) of ``boot_mb`` MB, in KiB."""
        if isinstance(boot_mb, int) and not isinstance(boot_mb, bool) and boot_mb > 0:
            return self.units_for(boot_mb)
        raise BackendError(f"xen: boot_mb must be Domain-0's boot memory (dom0_mem) in MB, not {boot_mb!r}")

    def reached(self, level: int, target: int) -> bool:
        """Within :data:`TOLERANCE_KB` of ``target``."""
        return abs(level - target) <= TOLERANCE_KB

    def close(self) -> None:
        """Close the libvirt connection (the next call opens a new one); safe to call twice."""
        conn, self._conn, self._dom = self._conn, None, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - a connection that will not close is gone anyway
                pass
