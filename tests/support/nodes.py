"""A node's state for kill-all and node-status tests: pilot configs, journal entries that hold memory, the pool's size, a tagged VM."""

from __future__ import annotations

import pytest

from pilot.node.journal import Entry, MemoryRecord
from pilot.node.owner import Owner

from tests.support.pilots import pilot_config
from tests.support.service import throwaway_node_keys


libvirt = pytest.importorskip("libvirt")


def set_pool(pages: int) -> None:
    with open("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages", "w", encoding="ascii") as handle:
        handle.write(str(pages))


def config_for(tmp_path, service=None, **memory) -> str:
    sections = {"libvirt": {"uri": "test:///default"}, "memory": {"minmem": 0, **memory}}
    if service is None:
        return pilot_config(tmp_path, "http://127.0.0.1:9", throwaway_node_keys(tmp_path), sections=sections)
    return pilot_config(tmp_path, service.url, service.node_key_file(), sections=sections)


def held_entry(slot: str, pages: int, owner: Owner, contact: str | None = None, sign_key: str | None = None) -> Entry:
    record = MemoryRecord("hugepages", {"page_kb": 2048}, "held", pages, pages * 2)
    return Entry(slot, "node1", owner, contact=contact, memory=record, sign_key=sign_key)


def start_vm(conn, name: str, slot: str | None):
    from pilot.vm.tag import VmTag, set_tag

    xml = f"<domain type='test'><name>{name}</name><memory unit='MiB'>64</memory><os><type>hvm</type></os></domain>"
    domain = conn.createXML(xml, 0)
    if slot:
        set_tag(domain, VmTag(slot, "lease-1", 4242), flags=libvirt.VIR_DOMAIN_AFFECT_LIVE)
    return domain
