"""The way in to a lease network's VMs: a TCP port of the node's address forwarded to each VM's SSH.

The pilot itself relays the bytes (one event loop thread for all of a
slot's forwards): the node needs no IP forwarding and no NAT, so nothing
node-wide changes, and a forward ends with its VM or with the pilot. The
site chooses the address the forwards listen on (``[networks]
forward_address``, default the node's address). Each forward takes at most
:data:`MAX_CONNECTIONS` at once and relays through bounded buffers: a
client that floods or stalls costs the node a bounded amount.
"""

from __future__ import annotations

import asyncio
import logging
import threading

log = logging.getLogger(__name__)

#: The most connections one forward relays at once (more are closed at once).
MAX_CONNECTIONS = 32
#: How long a connection to the VM may take to open.
CONNECT_TIMEOUT_S = 10.0
CHUNK = 64 * 1024


class ForwardError(Exception):
    """A forward could not be opened (its port is taken on the node, or the address is not the node's)."""


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()  # at most one chunk waits in each direction
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


class _Forward:
    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.server: asyncio.base_events.Server | None = None
        self.tasks: set[asyncio.Task] = set()

    async def relay(self, client_reader, client_writer) -> None:
        if len(self.tasks) >= MAX_CONNECTIONS:
            client_writer.close()
            return
        task = asyncio.current_task()
        self.tasks.add(task)
        try:
            try:
                vm_reader, vm_writer = await asyncio.wait_for(asyncio.open_connection(*self.target),
                                                              CONNECT_TIMEOUT_S)
            except (OSError, asyncio.TimeoutError) as exc:
                log.info("forward to %s:%d: cannot reach the VM (%s)", *self.target, exc.__class__.__name__)
                return
            try:
                await asyncio.gather(_pipe(client_reader, vm_writer), _pipe(vm_reader, client_writer))
            finally:
                vm_writer.close()
        finally:
            client_writer.close()
            self.tasks.discard(task)


class Forwards:
    """The forwards of one slot: ``open(address, port, vm_ip)`` and ``close(port)``; ``close_all()`` at the end."""

    def __init__(self, target_port: int = 22):
        self.target_port = target_port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._forwards: dict[int, _Forward] = {}
        self._lock = threading.Lock()

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="forwards", daemon=True)
            thread.start()
            self._loop, self._thread = loop, thread
        return self._loop

    def open(self, address: str, port: int, vm_ip: str) -> None:
        """Listen on ``address``:``port`` and relay each connection to ``vm_ip``'s SSH; ForwardError if it cannot."""
        with self._lock:
            loop = self._ensure_loop()
            forward = _Forward((vm_ip, self.target_port))

            async def listen():
                forward.server = await asyncio.start_server(forward.relay, address, port, reuse_address=True)

            try:
                asyncio.run_coroutine_threadsafe(listen(), loop).result(10)
            except OSError as exc:
                raise ForwardError(f"cannot forward {address}:{port} to {vm_ip}: {exc.strerror or exc}") from None
            self._forwards[port] = forward
        log.info("forwarding %s:%d to %s:%d", address, port, vm_ip, self.target_port)

    def close(self, port: int) -> None:
        """Stop forwarding ``port`` and end its connections (no-op for a port not forwarded)."""
        with self._lock:
            forward = self._forwards.pop(port, None)
            if forward is None or self._loop is None:
                return

            async def shut():
                forward.server.close()
                for task in list(forward.tasks):
                    task.cancel()
                await forward.server.wait_closed()

            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)

    def ports(self) -> list[int]:
        """The ports forwarded now."""
        with self._lock:
            return sorted(self._forwards)

    def close_all(self) -> None:
        """Close every forward and stop the thread."""
        for port in self.ports():
            self.close(port)
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()
