"""Every byte from the network is read with a bound known beforehand: rude mirrors, peers and services.

A real HTTP server on 127.0.0.1 (``RudeServer``) answers every request for an image, a chunk or a manifest
with far more than was asked: 50 times the declared length with no Content-Length (the body ends when it
closes), or a chunked body that never ends. A well-behaved real server stands for the service. The fetch
runs in its own process (tests/support/bounded_fetch.py, as a pilot is), whose address space is capped, and which
reports its peak resident set: it stays under :data:`PEAK_RSS_MB` while the rude server offers gigabytes,
and the image still arrives whole, from the other source.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys

import pytest

from tests.support.imagesource import ImageServer, write_file
from tests.support.rawserver import RawServer

SIZE = 32 * 1024 * 1024
CHUNK = 4 * 1024 * 1024
#: The bound the fetching process stays under (its peak RSS, MiB), whatever a source sends: the interpreter with
#: requests (~28 MiB here) plus at most one 4 MiB chunk held twice while it is joined and checked (37 MiB seen).
PEAK_RSS_MB = 64


class RudeServer(RawServer):
    """A real HTTP/1.1 server that answers every GET with ``times`` x what was asked (``times=None``: forever)."""

    def __init__(self, size: int, times: int | None):
        self.size, self.times = size, times
        self.sent: list[tuple[int, int]] = []  # (bytes asked for, bytes of body offered) per answer, at hang-up
        super().__init__()

    def answer(self, conn: socket.socket, head: bytes) -> None:
        """The asked range's headers, then far more body than they say (or no end of it)."""
        wanted = re.search(rb"(?i)\r\nrange: bytes=(\d+)-(\d*)", head)
        start = int(wanted.group(1)) if wanted else 0
        end = int(wanted.group(2)) if wanted and wanted.group(2) else self.size - 1
        asked = end - start + 1
        status = b"206 Partial Content" if wanted else b"200 OK"
        headers = b"HTTP/1.1 " + status + b"\r\nContent-Type: application/octet-stream\r\n"
        if wanted:
            headers += f"Content-Range: bytes {start}-{end}/{self.size}\r\n".encode()
        block = b"\xa5" * 65536
        offered = 0
        try:
            if self.times is None:  # chunked, and it never ends
                conn.sendall(headers + b"Transfer-Encoding: chunked\r\n\r\n")
                while True:
                    conn.sendall(b"10000\r\n" + block + b"\r\n")
                    offered += len(block)
            else:  # no length: the body ends when the connection closes, 50x later than it should
                conn.sendall(headers + b"Connection: close\r\n\r\n")
                while offered < self.times * asked:
                    conn.sendall(block)
                    offered += len(block)
        except OSError:
            pass  # the client hung up: what it should do
        self.sent.append((asked, offered))


@pytest.fixture
def service(tmp_path):
    """The well-behaved source: a real HTTP server with the image under every path that ends in its sha256."""
    directory = tmp_path / "service"
    directory.mkdir()
    server = ImageServer(str(directory), by_basename=True)
    yield server
    server.close()


@pytest.mark.parametrize("times", [50, None], ids=["50x", "endless"])
def test_a_source_that_sends_more_than_declared_costs_a_bounded_memory_and_the_image_comes_from_another(
        tmp_path, service, times):
    sha = write_file(os.path.join(service.directory, "incoming"), SIZE, seed=7)
    os.replace(os.path.join(service.directory, "incoming"), os.path.join(service.directory, sha))
    rude = RudeServer(SIZE, times)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tests.support.bounded_fetch", str(tmp_path / "cache"), service.url, rude.url, sha,
             str(SIZE), str(CHUNK)],
            capture_output=True, text=True, timeout=120,
        )
    finally:
        rude.close()
    assert done.returncode == 0, done.stdout + done.stderr
    said = json.loads(done.stdout)
    # The whole image, right, from the service once the mirror went on past the size: the mirror is dropped.
    with open(said["whole"], "rb") as handle:
        assert hashlib.sha256(handle.read()).hexdigest() == sha
    assert said["dropped"] == [rude.url]
    # One chunk by Range: the mirror's overlong answer is dropped, the service's is taken.
    with open(said["whole"], "rb") as handle:
        handle.seek(CHUNK)
        assert said["chunk"] == [CHUNK, handle.read(16).hex()]
    # A peer and a service (the signed manifest) that go on: dropped, in one line that says so.
    assert re.fullmatch(rf"error: peer {re.escape(rude.url[7:])}: the answer goes on past the {CHUNK} bytes "
                        r"expected: dropped", said["peer"])
    assert "the answer goes on past the" in said["manifest"] and said["manifest"].endswith(": dropped")
    # Every rude answer was hung up on before its end (it had none, or 50x the size asked), and the process
    # never held more than the bound.
    assert len(rude.sent) == 4 and all(offered < 50 * asked for asked, offered in rude.sent), rude.sent
    assert said["maxrss_kb"] < PEAK_RSS_MB * 1024, said
