"""The libvirt domain XML of a checked VM, rendered by the pilot itself.

Built with ElementTree, never by formatting strings, so no value from a
spec can change the document's structure. The domain is meant to be
created transient (``createXML``): destroying it leaves nothing defined.
Every way it ends (power off, reboot, crash) destroys it, so a VM that
ends is gone rather than restarted behind the pilot's back; its disk never
takes writes (read-only, or the pilot's throw-away overlay); and it carries the
project's tag in ``<metadata>`` from its first moment.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

from pilot.vm.check import CheckedVm, VmRefused
from pilot.vm.tag import VmTag

#: The virtio-serial port over which the pilot tells a VM that its lease ends (docs/leases.md).
LEASE_CHANNEL = "org.workspace-pilot.lease.0"

VIRT_TYPES = ("kvm", "qemu", "xen", "test")
_KVM_MODULES = ("kvm_intel", "kvm_amd")


def choose_virt_type(conn_type: str, configured: str, *, dev_kvm: str = "/dev/kvm", sys_module: str = "/sys/module") -> str:
    """The ``<domain type=...>`` for a libvirt connection of type ``conn_type`` (``conn.getType()``).

    ``configured`` ``"kvm"``, ``"qemu"``, ``"xen"`` or ``"test"`` is taken
    as is. ``"auto"`` picks ``"kvm"`` on a QEMU connection only where KVM
    really works (``/dev/kvm`` and a ``kvm_intel`` or ``kvm_amd`` module:
    a ``/dev/kvm`` of another module may hang guests at boot), else
    ``"qemu"`` (TCG); ``"test"`` for libvirt's test driver; ``"xen"`` for
    Xen (``conn_type`` compared without case). Raises :class:`ValueError` for anything else.
    """
    if configured in VIRT_TYPES:
        return configured
    if configured != "auto":
        raise ValueError(f"virt type {configured!r} is not one of auto, {', '.join(VIRT_TYPES)}")
    # Drivers spell their type differently ("QEMU", "TEST" from the test driver, "Xen").
    kind = conn_type.lower()
    if kind == "qemu":
        kvm = os.path.exists(dev_kvm) and any(os.path.isdir(os.path.join(sys_module, m)) for m in _KVM_MODULES)
        return "kvm" if kvm else "qemu"
    if kind == "test":
        return "test"
    if kind == "xen":
        return "xen"
    raise ValueError(f"cannot pick a domain type for a libvirt {conn_type!r} connection; configure kvm, qemu or xen")


def render_domain(vm: CheckedVm, *, domain_name: str, virt_type: str, tag: VmTag, hugepage_kb: int | None = None,
                  shares: tuple[tuple[str, str], ...] = (), cpuset: str | None = None) -> str:
    """The domain XML for ``vm`` as a string.

    ``shares``: (tag, socket path) of virtiofs file systems whose daemons the
    caller has started and bound to those sockets (libvirt then starts none
    of its own, so the daemon runs as whoever the caller chose); the guest's
    memory is shared with them (memfd, or the hugepages). ``cpuset`` (``0-1,4``): the only CPUs
    its vCPUs and QEMU's own threads may run on. Xen's PV guests (xen with a kernel to boot directly) get ``<type>xen``
    and Xen devices; everything else is an HVM guest with virtio devices.
    Raises :class:`VmRefused` for what the virt type cannot do safely: Xen
    cannot keep a writable disk's writes off the image (libxl has no
    transient disks), and a PV guest's console cannot go to a file.
    """
    spec = vm.spec
    xen = virt_type == "xen"
    qemu = virt_type in ("kvm", "qemu")
    pv = xen and vm.kernel is not None
    if xen and vm.disk is not None and not spec.disk_readonly:
        raise VmRefused("disk: on Xen a writable disk would write to the image itself; ask for readonly: true")
    if vm.disk is not None and not spec.disk_readonly and vm.overlay is None:
        raise VmRefused("disk: a writable disk needs an overlay and this node made none; ask for readonly: true")
    if pv and vm.console is not None:
        raise VmRefused("console_log: a Xen PV guest's console cannot go to a file; leave console_log unset")
    if shares and not qemu:
        raise VmRefused(f"shared directories need QEMU (virtiofs); this node's VMs run on {virt_type}")

    domain = ET.Element("domain", type=virt_type)
    _sub(domain, "name", domain_name)
    ET.SubElement(domain, "metadata").append(tag.to_element())
    kib = str(spec.memory_mb * 1024)
    _sub(domain, "memory", kib, unit="KiB")
    _sub(domain, "currentMemory", kib, unit="KiB")
    if hugepage_kb or shares:
        backing = ET.SubElement(domain, "memoryBacking")
        if hugepage_kb:
            pages = ET.SubElement(backing, "hugepages")
            ET.SubElement(pages, "page", size=str(hugepage_kb), unit="KiB")
        else:
            ET.SubElement(backing, "source", type="memfd")
        if shares:
            # virtiofs: the daemon reads and writes the guest's buffers in its memory directly.
            ET.SubElement(backing, "access", mode="shared")
    vcpu = _sub(domain, "vcpu", str(spec.vcpus))
    if cpuset is not None:
        vcpu.set("cpuset", cpuset)
        if qemu:
            ET.SubElement(ET.SubElement(domain, "cputune"), "emulatorpin", cpuset=cpuset)

    os_element = ET.SubElement(domain, "os")
    _sub(os_element, "type", "xen" if pv else "hvm")
    if vm.kernel is not None:
        _sub(os_element, "kernel", vm.kernel)
        if vm.initrd is not None:
            _sub(os_element, "initrd", vm.initrd)
        if spec.cmdline is not None:
            _sub(os_element, "cmdline", spec.cmdline)
    if vm.disk is not None and not pv:
        ET.SubElement(os_element, "boot", dev="hd")
    if not pv:
        ET.SubElement(ET.SubElement(domain, "features"), "acpi")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _sub(domain, event, "destroy")

    devices = ET.SubElement(domain, "devices")
    if vm.disk is not None:
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        if spec.disk_readonly:
            ET.SubElement(disk, "driver", name="qemu", type=vm.disk_format or "raw")
            _image_source(disk, vm.disk, qemu)
        else:
            # The guest writes to the pilot's overlay (pilot.vm.overlay), never to the image: the image is
            # named as its backing store here, so libvirt and QEMU probe nothing of the chain themselves.
            ET.SubElement(disk, "driver", name="qemu", type="qcow2")
            ET.SubElement(disk, "source", file=vm.overlay)
            backing = ET.SubElement(disk, "backingStore", type="file")
            ET.SubElement(backing, "format", type=vm.disk_format or "raw")
            _image_source(backing, vm.disk, qemu)
            ET.SubElement(backing, "backingStore")
        ET.SubElement(disk, "target", dev="xvda" if xen else "vda", bus="xen" if xen else "virtio")
        if spec.disk_readonly:
            ET.SubElement(disk, "readonly")
    if vm.seed is not None:
        # The cloud-init seed: a read-only disk the guest finds by its label (cidata), whatever it names it.
        seed = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(seed, "driver", name="qemu", type="raw")
        ET.SubElement(seed, "source", file=vm.seed)
        ET.SubElement(seed, "target", dev="xvdz" if xen else "vdz", bus="xen" if xen else "virtio")
        ET.SubElement(seed, "readonly")
    if spec.network is not None:
        interface = ET.SubElement(devices, "interface", type="network")
        ET.SubElement(interface, "source", network=spec.network)
        if not xen:
            ET.SubElement(interface, "model", type="virtio")
    if vm.interface is not None and vm.interface.get("type") == "user":
        # A VM job's image with network = user: QEMU's own NAT, nothing on the node changes (pilot.vmjob.catalog).
        interface = ET.SubElement(devices, "interface", type="user")
        ET.SubElement(interface, "model", type="virtio")
    elif vm.interface is not None:
        # The lease network's bridge, through a tap of a name the pilot's filters already match.
        interface = ET.SubElement(devices, "interface", type="bridge")
        ET.SubElement(interface, "mac", address=vm.interface["mac"])
        ET.SubElement(interface, "source", bridge=vm.interface["bridge"])
        ET.SubElement(interface, "target", dev=vm.interface["tap"])
        if not xen:
            ET.SubElement(interface, "model", type="virtio")
        if vm.interface.get("mtu"):
            ET.SubElement(interface, "mtu", size=str(vm.interface["mtu"]))
    for share_tag, socket_path in shares:
        filesystem = ET.SubElement(devices, "filesystem", type="mount", accessmode="passthrough")
        ET.SubElement(filesystem, "driver", type="virtiofs")
        ET.SubElement(filesystem, "source", socket=socket_path)
        ET.SubElement(filesystem, "target", dir=share_tag)
    _console(devices, vm.console, pv, capped=virt_type in ("kvm", "qemu"))
    if not xen:
        # The lease channel: a virtio-serial port the pilot writes the lease's end to (docs/leases.md). No
        # source path: libvirt makes the unix socket in its own channel directory, where only root reaches it.
        channel = ET.SubElement(devices, "channel", type="unix")
        ET.SubElement(channel, "target", type="virtio", name=LEASE_CHANNEL)
    ET.SubElement(devices, "memballoon", model="xen" if xen else "virtio")
    return ET.tostring(domain, encoding="unicode")


def _image_source(parent: ET.Element, path: str, qemu: bool) -> None:
    source = ET.SubElement(parent, "source", file=path)
    if qemu:
        # The image is shared (the cache's, the site's): libvirt must not hand it to the guest user, who could
        # then make it writable. The guest user reads it through its group (pilot.vm.guestuser).
        ET.SubElement(source, "seclabel", model="dac", relabel="no")


def _sub(parent: ET.Element, tag: str, text: str, **attrib: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrib)
    element.text = text
    return element


def _console(devices: ET.Element, path: str | None, pv: bool, capped: bool) -> None:
    if pv:
        console = ET.SubElement(devices, "console", type="pty")
        ET.SubElement(console, "target", type="xen", port="0")
        return
    if capped and path is not None:
        # The guest writes its serial port as fast as it likes; a file chardev would let it fill the node's
        # disk. A <log> goes through virtlogd (qemu.conf's default stdio_handler = "logd"), which rotates it
        # at max_size with max_backups (2 MiB and 3 by default: at most 8 MiB per VM).
        serial = ET.SubElement(devices, "serial", type="pty")
        ET.SubElement(serial, "log", file=path, append="on")
        ET.SubElement(serial, "target", port="0")
        ET.SubElement(ET.SubElement(devices, "console", type="pty"), "target", type="serial", port="0")
        return
    kind = "pty" if path is None else "file"
    # libvirt makes a serial-type <console> an alias of the first <serial>: one device, one file.
    for tag, target in (("serial", {"port": "0"}), ("console", {"type": "serial", "port": "0"})):
        element = ET.SubElement(devices, tag, type=kind)
        if path is not None:
            ET.SubElement(element, "source", path=path, append="on")
        ET.SubElement(element, "target", target)
