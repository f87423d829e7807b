"""A real HTTP/1.1 server on 127.0.0.1 of raw sockets, for answers no well-behaved server would give.

:class:`RawServer` accepts connections and runs :meth:`RawServer.answer` for each in a thread of its
own, with the request's head already read; a subclass writes whatever it likes (far more than asked,
an endless body, a lie about its length). :meth:`RawServer.finished` waits for every answer begun.
"""

from __future__ import annotations

import socket
import threading


class RawServer:
    """Accepts on a free loopback port and answers each request in its own thread (``url`` to reach it)."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self._answers: list[threading.Thread] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def answer(self, conn: socket.socket, head: bytes) -> None:
        """Write the answer to the request whose head is ``head`` (the subclass's)."""
        raise NotImplementedError

    def finished(self, timeout: float = 60) -> None:
        """Return once every answer begun has ended (an answer goes on only while its reader reads)."""
        for answer in list(self._answers):
            answer.join(timeout)

    def close(self) -> None:
        """Stop accepting."""
        self.listener.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            answer = threading.Thread(target=self._answer, args=(conn,), daemon=True)
            self._answers.append(answer)
            answer.start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            self.answer(conn, head)
