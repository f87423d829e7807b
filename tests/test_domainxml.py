"""The domain XML the pilot renders (pilot.vm.domainxml), parsed back; and created on libvirt's test driver."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from pilot.vm import tag as vmtag
from pilot.vm.domainxml import choose_virt_type, render_domain
from workspace_common.protocol import ImageFile, VmSpec
from pilot.vm.check import CheckedVm, VmRefused
from pilot.vm.tag import VmTag

TAG = VmTag("3f2a9c1e-aaaa-bbbb-cccc-000000000001", "lease-7", 4242)
DIGEST = "0" * 64
NASTY_CMDLINE = """console=ttyS0 init=/bin/sh -c "echo <&'>" </dev/null"""


def checked(*, readonly=False, kernel=True, disk=True, console="/var/log/wp/vm1.log", network="default", fmt="raw"):
    spec = VmSpec(
        "vm1", 512, vcpus=2,
        disk=ImageFile("disk.img", DIGEST) if disk else None, disk_readonly=readonly,
        kernel=ImageFile("vmlinuz", DIGEST) if kernel else None,
        initrd=ImageFile("initrd.img", DIGEST) if kernel else None,
        cmdline=NASTY_CMDLINE if kernel else None,
        network=network, console_log="vm1.log" if console else None,
    )
    return CheckedVm(
        spec,
        disk="/srv/images/disk.img" if disk else None, disk_format=fmt if disk else None,
        kernel="/srv/images/vmlinuz" if kernel else None, initrd="/srv/images/initrd.img" if kernel else None,
        console=console, overlay=None if readonly or not disk else "/var/lib/wp/vm-files/wp-3f2a9c1e-vm1.qcow2",
    )


def render(vm=None, virt_type="qemu", **kwargs) -> ET.Element:
    xml = render_domain(vm or checked(), domain_name="wp-3f2a9c1e-vm1", virt_type=virt_type, tag=TAG, **kwargs)
    return ET.fromstring(xml)


def test_domain_basics_memory_and_lifecycle():
    root = render(virt_type="kvm")
    assert root.tag == "domain" and root.get("type") == "kvm"
    assert root.findtext("name") == "wp-3f2a9c1e-vm1"
    assert root.find("memory").get("unit") == "KiB" and root.findtext("memory") == str(512 * 1024)
    assert root.find("currentMemory").get("unit") == "KiB" and root.findtext("currentMemory") == str(512 * 1024)
    assert root.findtext("vcpu") == "2"
    # Every way the guest ends destroys it: nothing restarts behind the pilot's back.
    assert [root.findtext(e) for e in ("on_poweroff", "on_reboot", "on_crash")] == ["destroy"] * 3
    assert root.find("features/acpi") is not None
    assert root.find("memoryBacking") is None


def test_direct_boot_and_the_cmdline_survive_special_characters():
    root = render()
    os_element = root.find("os")
    assert os_element.findtext("type") == "hvm"
    assert os_element.findtext("kernel") == "/srv/images/vmlinuz"
    assert os_element.findtext("initrd") == "/srv/images/initrd.img"
    assert os_element.findtext("cmdline") == NASTY_CMDLINE
    assert os_element.find("boot").get("dev") == "hd"
    assert len(root.findall(".//cmdline")) == 1  # the value did not add elements


def test_a_writable_disk_writes_to_the_pilots_overlay_over_the_image_and_a_readonly_one_is_readonly():
    disk = render(checked(readonly=False)).find("devices/disk")
    assert disk.get("type") == "file" and disk.get("device") == "disk"
    # The guest's writes go to the overlay; the image is its backing store, named here (nothing is probed).
    assert disk.find("source").get("file") == "/var/lib/wp/vm-files/wp-3f2a9c1e-vm1.qcow2"
    assert disk.find("driver").attrib == {"name": "qemu", "type": "qcow2"}
    backing = disk.find("backingStore")
    assert backing.get("type") == "file" and backing.find("source").get("file") == "/srv/images/disk.img"
    assert backing.find("format").get("type") == "raw"
    assert list(backing.find("backingStore")) == []  # the chain ends there
    assert disk.find("target").attrib == {"dev": "vda", "bus": "virtio"}
    assert disk.find("readonly") is None and disk.find("transient") is None
    readonly = render(checked(readonly=True)).find("devices/disk")
    assert readonly.find("source").get("file") == "/srv/images/disk.img"
    assert readonly.find("readonly") is not None and readonly.find("backingStore") is None


def test_a_writable_disk_without_an_overlay_is_refused():
    import dataclasses

    with pytest.raises(VmRefused, match="needs an overlay"):
        render(dataclasses.replace(checked(readonly=False), overlay=None))


def test_the_disk_format_is_the_checked_one():
    assert render(checked(fmt="qcow2", readonly=True)).find("devices/disk/driver").attrib == {"name": "qemu", "type": "qcow2"}
    assert render(checked(fmt="raw", readonly=True)).find("devices/disk/driver").get("type") == "raw"
    assert render(checked(fmt="qcow2")).find("devices/disk/backingStore/format").get("type") == "qcow2"


def test_a_disk_only_vm_boots_from_its_disk():
    os_element = render(checked(kernel=False)).find("os")
    assert os_element.find("kernel") is None and os_element.find("cmdline") is None
    assert os_element.find("boot").get("dev") == "hd"


def test_network_console_and_balloon_devices():
    devices = render().find("devices")
    interface = devices.find("interface")
    assert interface.get("type") == "network"
    assert interface.find("source").get("network") == "default"
    assert interface.find("model").get("type") == "virtio"
    serial, console = devices.find("serial"), devices.find("console")
    # Under QEMU the console log goes through virtlogd, which caps it: the guest cannot fill the disk.
    assert serial.get("type") == "pty" and serial.find("source") is None
    assert serial.find("log").attrib == {"file": "/var/log/wp/vm1.log", "append": "on"}
    assert console.get("type") == "pty" and console.find("log") is None  # the same device, logged once
    assert console.find("target").attrib == {"type": "serial", "port": "0"}
    assert devices.find("memballoon").get("model") == "virtio"


def test_a_xen_hvm_console_log_is_a_file_chardev():
    devices = render(checked(kernel=False, readonly=True), virt_type="xen").find("devices")
    serial, console = devices.find("serial"), devices.find("console")
    assert serial.get("type") == "file" and console.get("type") == "file"
    assert serial.find("source").attrib == {"path": "/var/log/wp/vm1.log", "append": "on"}
    assert console.find("source").get("path") == "/var/log/wp/vm1.log"


def test_no_network_no_interface_and_no_console_log_a_pty():
    devices = render(checked(network=None, console=None)).find("devices")
    assert devices.find("interface") is None
    assert devices.find("serial").get("type") == "pty" and devices.find("serial/source") is None
    assert devices.find("console").get("type") == "pty"


def test_hugepage_backing():
    page = render(hugepage_kb=2048).find("memoryBacking/hugepages/page")
    assert page.attrib == {"size": "2048", "unit": "KiB"}


def test_without_shares_there_is_no_filesystem_and_no_shared_memory():
    root = render()
    assert root.find("devices/filesystem") is None and root.find("memoryBacking") is None


def test_shares_are_virtiofs_over_the_callers_sockets_with_the_memory_shared():
    shares = (("control", "/run/wp/job1/sock/control.sock"), ("workdir", "/run/wp/job1/sock/workdir.sock"))
    root = render(shares=shares)
    found = [(fs.find("driver").get("type"), fs.find("source").attrib, fs.find("target").get("dir"))
             for fs in root.findall("devices/filesystem")]
    assert found == [("virtiofs", {"socket": path}, tag) for tag, path in shares]
    assert root.find("devices/filesystem/binary") is None  # libvirt starts no daemon of its own (as root)
    backing = root.find("memoryBacking")
    assert backing.find("source").get("type") == "memfd" and backing.find("access").get("mode") == "shared"
    hugepages = render(shares=shares, hugepage_kb=2048).find("memoryBacking")
    assert hugepages.find("hugepages/page") is not None and hugepages.find("source") is None
    assert hugepages.find("access").get("mode") == "shared"
    with pytest.raises(VmRefused, match="^shared directories need QEMU"):
        render(checked(readonly=True, console=None), virt_type="xen", shares=shares)


def test_the_tag_is_in_metadata_in_the_project_namespace():
    metadata = render().find("metadata")
    (element,) = list(metadata)
    assert element.tag == f"{{{vmtag.NAMESPACE}}}{vmtag.ELEMENT}"
    assert vmtag.parse_tag(ET.tostring(element, encoding="unicode")) == TAG


def test_xen_pv_gets_xen_devices_and_refuses_what_xen_cannot_do():
    root = render(checked(readonly=True, console=None), virt_type="xen")
    assert root.get("type") == "xen" and root.findtext("os/type") == "xen"
    assert root.find("os/boot") is None and root.find("features") is None
    assert root.find("devices/disk/target").attrib == {"dev": "xvda", "bus": "xen"}
    assert root.find("devices/interface/model") is None
    assert root.find("devices/console/target").attrib == {"type": "xen", "port": "0"}
    with pytest.raises(VmRefused, match="^disk: on Xen a writable disk would write to the image itself"):
        render(checked(readonly=False, console=None), virt_type="xen")
    with pytest.raises(VmRefused, match="^console_log: a Xen PV guest's console cannot go to a file"):
        render(checked(readonly=True), virt_type="xen")


def test_xen_without_a_kernel_is_hvm():
    root = render(checked(kernel=False, readonly=True), virt_type="xen")
    assert root.findtext("os/type") == "hvm" and root.find("devices/serial").get("type") == "file"


# -- choose_virt_type ----------------------------------------------------------------------------


@pytest.fixture
def fake_node(tmp_path):
    dev_kvm, sys_module = tmp_path / "kvm", tmp_path / "module"
    sys_module.mkdir()
    (sys_module / "kvm").mkdir()
    return dev_kvm, sys_module


def test_auto_picks_kvm_only_where_kvm_really_works(fake_node):
    dev_kvm, sys_module = fake_node

    def pick():
        return choose_virt_type("QEMU", "auto", dev_kvm=str(dev_kvm), sys_module=str(sys_module))

    assert pick() == "qemu"  # no /dev/kvm
    dev_kvm.write_text("")
    (sys_module / "kvm_pvm").mkdir()
    assert pick() == "qemu"  # /dev/kvm of a paravirtual module: guests hang; TCG instead
    (sys_module / "kvm_amd").mkdir()
    assert pick() == "kvm"


def test_auto_for_the_test_driver_and_xen_and_configured_types_as_is():
    assert choose_virt_type("TEST", "auto") == "test"
    assert choose_virt_type("Xen", "auto") == "xen"
    for configured in ("kvm", "qemu", "xen"):
        assert choose_virt_type("QEMU", configured) == configured
    with pytest.raises(ValueError, match="cannot pick a domain type for a libvirt 'LXC' connection"):
        choose_virt_type("LXC", "auto")
    with pytest.raises(ValueError, match="virt type 'vmware' is not one of auto"):
        choose_virt_type("QEMU", "vmware")


# -- on libvirt's test driver ---------------------------------------------------------------------


def test_the_test_driver_creates_the_domain_and_read_tag_finds_the_tag():
    libvirt = pytest.importorskip("libvirt")
    conn = libvirt.open("test:///default")
    try:
        xml = render_domain(checked(), domain_name="wp-3f2a9c1e-xmltest", virt_type="test", tag=TAG, hugepage_kb=2048)
        domain = conn.createXML(xml, 0)
        try:
            assert domain.isActive() and not domain.isPersistent()
            assert vmtag.read_tag(domain) == TAG
            assert domain.info()[1] == 512 * 1024  # max memory, KiB
            assert any(d.name() == domain.name() and t == TAG for d, t in vmtag.tagged_domains(conn))
        finally:
            domain.destroy()
    finally:
        conn.close()


@pytest.mark.parametrize("virt_type,target,bus", [("qemu", "vdz", "virtio"), ("xen", "xvdz", "xen")])
def test_a_seed_is_one_more_read_only_disk_and_without_one_there_is_none(virt_type, target, bus):
    import dataclasses

    with_seed = dataclasses.replace(checked(readonly=True, console=None),
                                    seed="/var/lib/workspace-pilot/seeds/wp-3f2a9c1e-vm1.iso")
    disks = render(with_seed, virt_type=virt_type).findall("devices/disk")
    seed = [d for d in disks if d.find("source").get("file").endswith(".iso")]
    assert len(disks) == 2 and len(seed) == 1
    (seed,) = seed
    assert seed.find("target").attrib == {"dev": target, "bus": bus}
    assert seed.find("readonly") is not None and seed.find("transient") is None
    assert [d.find("source").get("file") for d in render(checked(readonly=True, console=None),
                                                          virt_type=virt_type).findall("devices/disk")] == [
        "/srv/images/disk.img"]
