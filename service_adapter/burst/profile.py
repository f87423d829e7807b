"""A pool's lease profile: what every lease it reserves looks like (nodes, memory, duration, images, the VM on
each node), checked when COBalD loads the pool; the service's own check comes after (:mod:`.pool`)."""

from __future__ import annotations

import dataclasses
import math

#: How much shorter than the profile's duration a lease may be made, so that leases reserved together do not all
#: end together (their ends spread over this share of the duration).
DEFAULT_STAGGER = 0.2
#: The golden ratio's fractional part: successive leases' shares spread evenly over the stagger, never repeating.
_SPREAD = (math.sqrt(5) - 1) / 2


class ProfileError(ValueError):
    """A profile COBalD's configuration gave that cannot be used; ``str()`` names the option."""


@dataclasses.dataclass(frozen=True)
class LeaseProfile:
    """One kind of lease: ``nodes`` per lease of ``memory_mb`` each for ``duration_s`` (shortened by up to
    ``stagger`` of it, lease by lease), ``vm`` (a VM spec, as ``workspace-lease vm start --spec`` takes; started
    once on each node, named ``<name>-<host>``), ``images`` the hosts prefetch, ``release_when_idle_s`` (the
    lease's own idle release, a backstop for a pool that is gone)."""

    nodes: int
    memory_mb: int
    duration_s: float
    vm: dict | None = None
    images: tuple[dict, ...] = ()
    stagger: float = DEFAULT_STAGGER
    release_when_idle_s: float | None = None

    def duration_of(self, serial: int) -> float:
        """The duration of the pool's ``serial``-th lease: the profile's, less a share of the stagger that differs
        from lease to lease (whole seconds)."""
        share = (serial * _SPREAD) % 1.0
        return float(max(1, math.floor(self.duration_s * (1.0 - self.stagger * share))))

    def vm_for(self, host: str, lease_id: str) -> dict | None:
        """The VM spec to start on ``host`` for lease ``lease_id``: pinned there, named ``<name>-<host>``, and
        its console log (if it asks for one) named after the VM and the lease, so two leases' VMs on one node
        never share it; None without a VM."""
        if self.vm is None:
            return None
        name = f"{self.vm.get('name', 'vm')}-{host}"[:64]
        spec = {**self.vm, "name": name, "host": host}
        if "console_log" in spec:
            spec["console_log"] = f"{name}-{lease_id[:8]}.log"
        return spec


def parse_profile(*, nodes=1, memory_mb=None, duration_s=None, vm=None, images=(), stagger=DEFAULT_STAGGER,
                  release_when_idle_s=None) -> LeaseProfile:
    """A :class:`LeaseProfile` from COBalD's YAML values; :class:`ProfileError` naming the first bad one."""
    def whole(name, value, low=1):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ProfileError(f"{name} must be a whole number from {low}, got {value!r}")
        return value

    def seconds(name, value):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise ProfileError(f"{name} must be a number of seconds above 0, got {value!r}")
        return float(value)

    if memory_mb is None or duration_s is None:
        raise ProfileError("memory_mb and duration_s are required: the size and length of each lease")
    if vm is not None and (not isinstance(vm, dict) or not isinstance(vm.get("name", "vm"), str)):
        raise ProfileError("vm must be a VM spec (a mapping, as workspace-lease vm start --spec takes)")
    if vm is not None and "host" in vm:
        raise ProfileError("vm: leave out 'host': the pool starts one on each node of a lease")
    if not isinstance(images, (list, tuple)) or not all(isinstance(item, dict) for item in images):
        raise ProfileError("images must be a list of {image, version} mappings")
    if not isinstance(stagger, (int, float)) or isinstance(stagger, bool) or not 0 <= stagger < 1:
        raise ProfileError(f"stagger must be a share of the duration from 0 to below 1, got {stagger!r}")
    return LeaseProfile(
        nodes=whole("nodes", nodes), memory_mb=whole("memory_mb", memory_mb), duration_s=seconds("duration_s", duration_s),
        vm=dict(vm) if vm is not None else None, images=tuple(dict(item) for item in images), stagger=float(stagger),
        release_when_idle_s=None if release_when_idle_s is None else seconds("release_when_idle_s", release_when_idle_s),
    )
