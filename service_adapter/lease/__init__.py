"""Leases: N nodes x M MB for D seconds, as one pilot job, watched through the store and the LRM.

- :mod:`.rules`: the states (:data:`LEASE_STATES`) and :func:`decide`, pure;
- :mod:`.views`: :class:`LeaseInfo` and the JSON the API shows;
- :mod:`.manager`: :class:`LeaseManager`, what a service embeds.
"""

from service_adapter.lease.manager import LeaseManager
from service_adapter.lease.rules import (
    LEASE_STATES, TERMINAL_STATES, Decision, ExtensionRefused, InvalidLease, LeaseError, LeaseState, Timing,
    UnknownLease, decide,
)
from service_adapter.lease.views import LeaseInfo, Usage, event_json, vm_json

__all__ = [
    "LEASE_STATES", "TERMINAL_STATES", "Decision", "ExtensionRefused", "InvalidLease", "LeaseError", "LeaseInfo",
    "LeaseManager", "LeaseState", "Timing", "UnknownLease", "Usage", "decide", "event_json", "vm_json",
]
