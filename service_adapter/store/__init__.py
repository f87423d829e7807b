"""The service's durable state in SQLite: leases, slots, pilots, every accepted notification, usage, VMs, commands.

- :mod:`.engine`: :class:`Store`, the one writer thread (group commit), the
  readers, and the waits for commits;
- :mod:`.schema`: the tables, their version and the upgrades of older files;
- :mod:`.rows`: the rows as Python sees them, and the notification verdicts;
- :mod:`.leases`, :mod:`.notifications`, :mod:`.vms`, :mod:`.history`: what is
  written and read, as functions over a connection.
"""

from service_adapter.store.engine import ACCESS_CACHE_SIZE, Store
from service_adapter.store.errors import StoreClosed, StoreError
from service_adapter.store.rows import (
    ENDING, HOLD_ENDED, LeaseEvent, LeaseRow, PilotRow, SlotAccess, UsageRow, Verdict,
)
from service_adapter.store.schema import SCHEMA_VERSION, STORE_FILE_MODE

__all__ = [
    "ACCESS_CACHE_SIZE", "ENDING", "HOLD_ENDED", "SCHEMA_VERSION", "STORE_FILE_MODE", "LeaseEvent", "LeaseRow",
    "PilotRow", "SlotAccess", "Store", "StoreClosed", "StoreError", "UsageRow", "Verdict",
]
