"""The service's clients read no answer whole: a proxy or rogue server that floods them costs a bounded read.

``LeaseClient`` (what ``workspace-lease`` and the COBalD pool call the API with) and the pilot's notifier
(root, on every node) both talk HTTP digest through ``requests``, whose digest auth reads a 401's body whole
before it answers the challenge. A real HTTP server on 127.0.0.1 answers every request with an endless body
(up to :data:`OFFERED`, no Content-Length, ended by closing) or a Content-Length far over any bound, and counts
what it got out before the reader hung up: the readers stop within their bounds, with one clear error.
"""

from __future__ import annotations

import socket

import pytest

from pilot.notifier import Outcome
from service_adapter.client import MAX_ANSWER_BYTES, ClientError, LeaseClient
from workspace_common.bounded import CHALLENGE_BODY_BYTES

from tests.support.notifiers import make_notifier
from tests.support.rawserver import RawServer

#: What the server offers per answer: read whole, it would be in the reader's memory at once.
OFFERED = 1024 * 1024 * 1024
#: What a reader that stops at its bound lets the server write: the bound and the sockets' buffers.
SLACK = 16 * 1024 * 1024
CHALLENGE = 'Digest realm="rude", nonce="abc", algorithm=SHA-256, qop="auth"'


class FloodingServer(RawServer):
    """Every answer has ``status`` and an endless body (or a huge declared length)."""

    def __init__(self, status: int, *, declare: int | None = None, challenge: bool = False):
        self.status, self.declare, self.challenge = status, declare, challenge
        self._sent: list[int] = []  # body bytes written per answer, counted when the reader hung up
        super().__init__()

    def answer(self, conn: socket.socket, head: bytes) -> None:
        """Status line, headers, then up to :data:`OFFERED` bytes, until the reader hangs up."""
        lines = [f"HTTP/1.1 {self.status} Rude", "Content-Type: application/json"]
        if self.challenge:
            lines.append(f"WWW-Authenticate: {CHALLENGE}")
        lines.append(f"Content-Length: {self.declare}" if self.declare else "Connection: close")
        piece, sent = b'{"x": "' + b"y" * 65536, 0
        try:
            conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            while sent < OFFERED:
                conn.sendall(piece)
                sent += len(piece)
        except OSError:
            pass
        self._sent.append(sent)

    @property
    def sent(self) -> list[int]:
        """What each answer wrote, once every answer begun has ended (the reader hangs up before it knows)."""
        self.finished()
        return self._sent


@pytest.fixture
def flooding(request):
    servers: list[FloodingServer] = []

    def start(*args, **kwargs) -> FloodingServer:
        servers.append(FloodingServer(*args, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.mark.parametrize("status", [200, 403])
def test_a_client_refuses_an_endless_answer_after_its_bound(flooding, status):
    """A 200 or an error answer that never ends: one line naming the bound; the server wrote little."""
    server = flooding(status)
    with LeaseClient(server.url, "alice", "secret", timeout_s=30) as client:
        with pytest.raises(ClientError) as caught:
            client.list()
    assert f"goes on past the {MAX_ANSWER_BYTES} bytes" in caught.value.message
    assert "is --url the workspace-lease service?" in caught.value.message
    assert len(server.sent) == 1 and server.sent[0] < MAX_ANSWER_BYTES + SLACK, server.sent


def test_a_client_refuses_a_declared_length_over_its_bound_before_reading(flooding):
    server = flooding(200, declare=OFFERED)
    with LeaseClient(server.url, "alice", "secret", timeout_s=30) as client:
        with pytest.raises(ClientError) as caught:
            client.list()
    assert f"declares {OFFERED} bytes, more than the {MAX_ANSWER_BYTES}" in caught.value.message
    assert server.sent and server.sent[0] < SLACK, server.sent


def test_a_digest_challenge_with_an_endless_body_costs_the_client_a_bounded_read(flooding):
    """requests' own digest auth would read all of each challenge (a gigabyte here) before answering it."""
    server = flooding(401, challenge=True)
    with LeaseClient(server.url, "alice", "secret", timeout_s=30) as client:
        with pytest.raises(ClientError) as caught:
            client.list()
    # The challenge answered once; the second 401 is final and read with the answer's own bound.
    assert caught.value.status is None and "goes on past" in caught.value.message
    assert len(server.sent) == 2, server.sent
    assert server.sent[0] < CHALLENGE_BODY_BYTES + SLACK, server.sent
    assert server.sent[1] < MAX_ANSWER_BYTES + SLACK, server.sent


def test_a_pilots_notifier_reads_an_endless_challenge_within_a_bound(flooding):
    """The pilot (root) behind a rude proxy: its notifications are refused, its memory is not filled."""
    server = flooding(401, challenge=True)
    notifier = make_notifier(server.url, None, "slot-x")
    try:
        # The first goes through the standard library's first shot, the second through requests.
        for state in ("reserved", "unreserved"):
            delivery = notifier.notify(state, 64, deliver_within=30)
            assert delivery.wait(60) is Outcome.REFUSED and delivery.status == 401
    finally:
        notifier.close()
    assert len(server.sent) >= 4 and max(server.sent) < 1024 * 1024 + SLACK, server.sent
