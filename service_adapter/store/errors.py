"""The store's two failures: a file it cannot use, and a write after it was closed."""

from __future__ import annotations


class StoreError(Exception):
    """The store file cannot be used (e.g. written by another schema version); the message says what to do."""


class StoreClosed(RuntimeError):
    """Raised for writes submitted after :meth:`Store.close`."""
