"""A pilot's notifier pointed at a test service."""

from __future__ import annotations

from pilot.credentials import PilotCredentials
from pilot.notifier import Notifier


def make_notifier(url: str, service, slot: str, **options) -> Notifier:
    """A notifier for (slot, node1) with that node's real credentials (made-up ones without a service)."""
    if service is None:
        credentials = PilotCredentials("node1", "0" * 64, "0" * 64)
    else:
        sign_key = service.sign_key(slot, "node1") if slot in service.slot_secrets else "0" * 64
        credentials = PilotCredentials("node1", service.node_key("node1"), sign_key)
    return Notifier(url, credentials, slot, "node1", **options)
