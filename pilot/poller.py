"""The pilot's side of the command channel: one thread that long-polls the service for its commands.

``GET {contact}/pilot/v2/slots/{slot}/hosts/{host}/commands?after=N&wait=S``
on the notifier's HTTP session (same digest account, same connections).
An answer counts only if its ``X-Pilot-Signature`` (HMAC over the request
target and the body, keyed by the account's HA1) is right: the pilot acts
as root on what it is told. Commands above the cursor are handed on in id
order and the cursor moves past them, so a repeated answer (a retry after
a lost response) never runs a command twice.

The poll is also the pilot's heartbeat: the service gives a host up as
lost when it stops polling. A 404 means the service no longer holds this
slot for this host: the pilot gives the node back. Network trouble and 5xx
answers back off (0.1 s doubling to 5 s) and try again until stopped.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from typing import Callable

import requests

from pilot.bounded import IDENTITY, AnswerTooLong, read_at_most
from workspace_common.protocol import (
    MAX_COMMANDS_ANSWER_BYTES,
    SIGNATURE_HEADER,
    Command,
    ProtocolError,
    commands_path,
    parse_commands,
    sign_commands,
)
from pilot.reach import ServiceReach
from pilot.retryafter import retry_after_s
from workspace_common.errors import failure_words

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0


class CommandPoller:
    """Long-polls for this (slot, host)'s commands until :meth:`stop`; hands each new one to ``on_commands``.

    ``on_commands(list[Command])`` runs on the poller thread and must be
    quick (queue the work). ``on_gone(reason)`` is called once when the
    service answers 404 for this slot; the poller then ends.
    """

    def __init__(
        self,
        session: requests.Session,
        contact: str,
        key: str,
        slot: str,
        host: str,
        *,
        on_commands: Callable[[list[Command]], None],
        on_gone: Callable[[str], None],
        wait_s: float = 30.0,
        request_timeout_s: float = 5.0,
        reach: ServiceReach | None = None,
    ):
        self.session = session
        self.base = contact.rstrip("/")
        self.path = commands_path(slot, host)
        self.key = key
        self.on_commands = on_commands
        self.on_gone = on_gone
        self.wait_s = wait_s
        self.request_timeout_s = request_timeout_s
        #: Told whether each poll got an answer (shared with the notifier).
        self.reach = reach or ServiceReach()
        self.cursor = 0
        self.polls = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start polling in a daemon thread (it never keeps the process alive)."""
        self._thread = threading.Thread(target=self._run, name="command-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling; a poll on the wire is abandoned, not awaited (the service times it out)."""
        self._stopping.set()

    @property
    def running(self) -> bool:
        """Whether the thread still polls."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    def _run(self) -> None:
        backoff = BACKOFF_FIRST_S
        while not self._stopping.is_set():
            try:
                ok = self._poll_once()
            except Exception:  # the heartbeat must outlive any one bad answer
                log.exception("command poll failed unexpectedly")
                ok = False
            if ok is None:
                return
            if ok:
                backoff = BACKOFF_FIRST_S
                continue
            self._stopping.wait(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _poll_once(self) -> bool | None:
        """One poll: True on a good answer, False to back off, None when the slot is gone."""
        target = f"{self.path}?after={self.cursor}&wait={self.wait_s:g}"
        sent_at = time.monotonic()
        try:
            # verify given per request: requests lets $REQUESTS_CA_BUNDLE override a session's CA file.
            response = self.session.get(self.base + target, timeout=self.wait_s + self.request_timeout_s,
                                        verify=self.session.verify, stream=True, headers=IDENTITY)
            # Read with the protocol's bound on a poll answer: a longer one is never all in memory.
            content = read_at_most(response, MAX_COMMANDS_ANSWER_BYTES)
        except AnswerTooLong as exc:
            log.error("command poll: %s: ignored", exc)
            return False
        except requests.RequestException as exc:
            if isinstance(exc, requests.ConnectionError):
                self.reach.unanswered()
            if not self._stopping.is_set():
                log.warning("command poll: %s: %s", type(exc).__name__, failure_words(exc))
            return False
        self.reach.answered(sent_at)
        self.polls += 1
        if response.status_code == 404:
            reason = "the service no longer holds this slot for this host (HTTP 404 on the command poll)"
            log.error("%s", reason)
            if not self._stopping.is_set():
                self.on_gone(reason)
            return None
        if response.status_code != 200:
            log.warning("command poll: HTTP %d %s", response.status_code, content[:200].decode("utf-8", "replace"))
            asked = retry_after_s(response.status_code, response.headers)
            if asked is not None:
                self._stopping.wait(asked)  # the service asked for this much quiet (429: over this node's share)
            return False
        expected = sign_commands(self.key, target, content)
        got = response.headers.get(SIGNATURE_HEADER, "").strip()
        if not hmac.compare_digest(got.encode(), expected.encode()):
            log.error("command poll: the answer's %s is missing or wrong: ignored", SIGNATURE_HEADER)
            return False
        try:
            commands = parse_commands(content)
        except ProtocolError as exc:
            log.error("command poll: a malformed answer was ignored: %s", exc)
            return False
        fresh = [c for c in commands if c.id > self.cursor]
        if fresh:
            self.cursor = fresh[-1].id
            log.info("received command(s) %s", ", ".join(f"{c.id} {c.op} {c.vm_name or ''}".strip() for c in fresh))
            self.on_commands(fresh)
        return True
