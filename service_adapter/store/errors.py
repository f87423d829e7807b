"""The store's failures: a file it cannot use, a database away for now, and a write after it was closed."""

from __future__ import annotations


class StoreError(Exception):
    """The store file cannot be used (e.g. written by another schema version); the message says what to do."""


class StoreClosed(RuntimeError):
    """Raised for writes submitted after :meth:`Store.close`."""


class StoreUnavailable(StoreError):
    """The store's database cannot be reached now (a PostgreSQL server restarting, a network away): nothing of
    the request was stored; it may be tried again (the receivers answer 503 with Retry-After)."""
