"""Talking with a slot's guests over their lease channels: the warning before the end, the Machine/Job Features,
and whether each guest is busy or idle.

:class:`VmGuestTalk` is that half of :class:`pilot.vm.host.VmHost` (it uses
the host's lock, books, slot and ``lease_end``; never used alone). All of
it runs on the VM worker's thread, so a VM's channel is used by one thread
at a time; each VM is a courtesy: one whose channel cannot be reached is
logged and skipped, and reached again at the next look.
"""

from __future__ import annotations

import logging
import time

from pilot.vm import leasechannel
from pilot.vm.features import feature_lines, vm_features
from pilot.vm.usage import VmUsage, drain
from workspace_common.errors import one_line

log = logging.getLogger("pilot.vm.host")


class VmGuestTalk:
    """The lease-channel half of a :class:`pilot.vm.host.VmHost` (a base class of it; no state of its own)."""

    def warn(self, line: str) -> list[str]:
        """Write ``line`` (one line of text) to the lease channel of each VM this host runs, then the features as
        they are now (the end may have come closer); the names reached.

        The channel is a virtio-serial port named :data:`LEASE_CHANNEL`
        (``/dev/virtio-ports/org.workspace-pilot.lease.0`` in a guest with
        udev); libvirt gives it a unix socket, which this pilot connects to
        when it starts the VM and keeps open for the VM's life (a guest
        reading the port while no one is connected reads end-of-file; what
        is written before the guest opens it waits for it). A VM whose channel cannot be reached is
        logged and skipped: the warning is a courtesy, the stop comes anyway.
        """
        data = (line.rstrip("\n") + "\n").encode()
        warning = leasechannel.warning_of(line)
        reached = []
        for name, vm in self._booked():
            if vm.told == warning:
                # Started between the warning and this broadcast: it was told at its start, once is enough.
                reached.append(name)
                continue
            channel = self._channel(name, vm)
            if channel is None or not self._send(name, vm, data + self._features_of(vm)):
                continue
            vm.told = warning
            reached.append(name)
        return reached

    def tell_features(self) -> list[str]:
        """Send every VM its features as they are now (after the end moved); the names reached."""
        reached = []
        for name, vm in self._booked():
            features = self._features_of(vm)
            channel = self._channel(name, vm)
            if features and channel is not None and self._send(name, vm, features):
                reached.append(name)
        return reached

    def usage(self, busy_cpu_percent: int) -> dict[str, VmUsage]:
        """Look at each running VM: read what its agent said (answering a ``hello`` with the features) and its CPU
        counter; busy or idle, by name (:mod:`pilot.vm.usage`). A paused VM is idle and uses no CPU."""
        libvirt = self._libvirt_module()
        looks: dict[str, VmUsage] = {}
        for name, vm in self._booked():
            now = time.monotonic()
            channel = self._channel(name, vm)
            if channel is not None:
                data, closed = drain(channel)
                vm.usage.hear(data, now)
                if closed:
                    self._drop_channel(vm)
                elif vm.usage.hello:
                    vm.usage.hello = False
                    self._send(name, vm, self._features_of(vm))
            try:
                state, _, _, vcpus, cpu_ns = vm.domain.info()
            except Exception as exc:  # libvirtError: gone meanwhile; the gone check reports it
                log.debug("VM %s: no CPU counter: %s", name, one_line(exc))
                continue
            read_at = time.monotonic()  # with the counter: the share is its growth over this clock's
            if libvirt is not None and state == libvirt.VIR_DOMAIN_PAUSED:
                vm.usage.cpu_ns = None
                looks[name] = VmUsage(False, 0, "paused")
                continue
            looks[name] = vm.usage.judge(vm.usage.cpu_percent(cpu_ns, vcpus, read_at), busy_cpu_percent, now)
        return looks

    # -- helpers -------------------------------------------------------------------------------

    def _booked(self) -> list:
        with self._lock:
            return list(self._vms.items())

    def _features_of(self, vm) -> bytes:
        """The VM's ``mjf`` lines as of now (empty when the pilot gives no features)."""
        return self._features_text(vm.spec, vm.started_at).encode()

    def _features_text(self, spec, started_at: float) -> str:
        """The ``mjf`` lines of a VM of ``spec`` started at ``started_at`` as of now (the seed's ``features`` at its
        start); "" when the pilot gives no features (then no agent either)."""
        end = self.lease_end()
        if end is None:
            return ""
        return feature_lines(vm_features(slot=self.slot, name=spec.name, vcpus=spec.vcpus, memory_mb=spec.memory_mb,
                                         started_at=started_at, end=end))

    def _channel(self, name: str, vm):
        """The VM's connected channel, connecting (and sending the features) if it has none; None if unreachable
        (a domain without one, such as a Xen guest's, is not asked again)."""
        if vm.channel is not None or vm.no_channel:
            return vm.channel
        try:
            vm.channel = leasechannel.open_channel(vm.domain)
        except ValueError as exc:
            vm.no_channel = True
            log.info("VM %s has no lease channel (%s): it gets no warning or features, its CPU tells its use",
                     name, exc)
            return None
        except OSError as exc:
            log.warning("could not reach VM %s's lease channel: %s", name, exc)
            return None
        except Exception as exc:  # libvirtError reading the live XML
            log.warning("could not find VM %s's lease channel: %s", name, one_line(exc))
            return None
        features = self._features_of(vm)
        if features and not self._send(name, vm, features):
            return None
        return vm.channel

    def _send(self, name: str, vm, data: bytes) -> bool:
        try:
            vm.channel.sendall(data)
            return True
        except OSError as exc:
            log.warning("could not write to VM %s's lease channel: %s", name, exc)
            self._drop_channel(vm)
            return False

    @staticmethod
    def _drop_channel(vm) -> None:
        channel, vm.channel = vm.channel, None
        if channel is not None:
            channel.close()

    @staticmethod
    def _libvirt_module():
        from pilot.vm.domains import import_libvirt

        return import_libvirt()[0]
