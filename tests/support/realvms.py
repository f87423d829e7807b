"""Leases that host real QEMU guests: their sizes, and the check that a node is clean after them."""

from __future__ import annotations

import os

from pilot.vm.tag import tagged_domains

from tests.support.pool import pool_pages


VM_MB = 128
LEASE_MB = VM_MB + 64  # the pilots' default per-VM overhead


def assert_node_clean(site, libvirt_qemu, lease, pool_before: int) -> None:
    conn = libvirt_qemu.connect()
    try:
        assert [d.name() for d, t in tagged_domains(conn) if t.slot == lease.slot] == []
    finally:
        conn.close()
    assert pool_pages() == pool_before
    journal = [n for n in os.listdir(site.journal_dir) if n.endswith(".json")]
    assert journal == []
