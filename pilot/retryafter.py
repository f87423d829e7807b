"""What a pilot does with a service that says "not now": 429 (this node is over its share) or 503 with
``Retry-After``. It waits as long as it was told (capped at :data:`MAX_WAIT_S`, whatever the header says)
before it asks again, instead of its own, shorter backoff: a node that hammers a service that asked it to
wait only earns more 429s, and delays the other nodes' pilots.
"""

from __future__ import annotations

#: The longest a pilot waits on one Retry-After (a header is the service's, or a proxy's, word, not an order).
MAX_WAIT_S = 30.0
#: Answers that may carry a Retry-After worth honouring.
WAIT_STATUSES = frozenset({429, 503})


def retry_after_s(status: int | None, headers) -> float | None:
    """The seconds to wait that a ``status`` answer with ``headers`` asks for (whole seconds, at most
    :data:`MAX_WAIT_S`); None when it asks for none (another status, no header, an HTTP date or junk)."""
    if status not in WAIT_STATUSES or headers is None:
        return None
    text = (headers.get("Retry-After") or "").strip()
    if not text.isascii() or not text.isdigit() or len(text) > 6:
        return None
    return min(float(text), MAX_WAIT_S)
