"""The cloud-init seed as cloud-init finds it: an ISO 9660 volume labelled cidata with meta-data and user-data."""

from __future__ import annotations

import io
import json
import os
import subprocess

import pycdlib
import pytest

from workspace_common.protocol import NetState, Nic, VmContext, mac_for
from pilot.vm.features import LeaseEnd, feature_lines, vm_features
from pilot.vm.seed import agent_boothook, guest_agent, network_config, remove_seeds, seed_files, seed_path, write_seed


def read_iso(path: str) -> tuple[str, dict[str, bytes]]:
    """The volume label and the files (by their Rock Ridge names) of an ISO."""
    iso = pycdlib.PyCdlib()
    iso.open(path)
    try:
        label = iso.pvd.volume_identifier.decode().strip()
        files = {}
        for child in iso.list_children(rr_path="/"):
            name = child.rock_ridge.name().decode() if child.rock_ridge else None
            if name in (None, ".", "..") or child.is_dir():
                continue
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
            files[name] = out.getvalue()
        return label, files
    finally:
        iso.close()


def test_the_seed_is_a_cidata_volume_with_what_the_context_says(tmp_path):
    context = VmContext(hostname="head-node", ssh_authorized_keys=("ssh-ed25519 AAAA alice@ops",),
                        user_data="#cloud-config\nruncmd: [hostname]\n", peers=(("head", "node1"), ("w1", "node2")))
    path = seed_path(str(tmp_path / "seeds"), "wp-12345678-head")
    write_seed(path, seed_files(context, instance_id="slot-head", default_hostname="head"))
    assert os.stat(path).st_mode & 0o777 == 0o600
    label, files = read_iso(path)
    assert label == "cidata"
    assert set(files) == {"meta-data", "user-data", "peers"}
    meta = json.loads(files["meta-data"])
    assert meta == {"instance-id": "slot-head", "local-hostname": "head-node",
                    "public-keys": ["ssh-ed25519 AAAA alice@ops"],
                    "workspace-peers": [{"name": "head", "host": "node1"}, {"name": "w1", "host": "node2"}]}
    assert files["user-data"] == b"#cloud-config\nruncmd: [hostname]\n"
    assert files["peers"] == b"head node1\nw1 node2\n"


def test_a_vm_with_an_address_gets_its_network_config_and_the_leases_hosts(tmp_path):
    net = NetState("l100000", "lease", "10.213.0.0/24", "10.213.0.1", "vm.internal", 3, 100000, 4789,
                   nodes=("192.0.2.1", "192.0.2.2"), hosts=(("head", "10.213.0.2"), ("w1", "10.213.0.3")))
    nic = Nic(mac_for("10.213.0.2"), "10.213.0.2", "head", net, 20000)
    path = seed_path(str(tmp_path), "wp-12345678-head")
    write_seed(path, seed_files(VmContext(), instance_id="s-head", default_hostname="head", nic=nic, mtu=1450))
    _, files = read_iso(path)
    assert json.loads(files["network-config"]) == {"version": 2, "ethernets": {"eth0": {
        "match": {"macaddress": "52:54:0a:d5:00:02"}, "set-name": "eth0", "addresses": ["10.213.0.2/24"],
        "nameservers": {"addresses": ["10.213.0.1"], "search": ["vm.internal"]}, "mtu": 1450}}}
    assert files["hosts"] == b"10.213.0.2 head.vm.internal head\n10.213.0.3 w1.vm.internal w1\n"
    site = NetState("sabcdef12", "site", "198.51.100.0/24", "198.51.100.1", "vm.internal", 1, bridge="br0")
    config = network_config(Nic(mac_for("198.51.100.20"), "198.51.100.20", "a", site), None)
    assert config["ethernets"]["eth0"]["routes"] == [{"to": "default", "via": "198.51.100.1"}]
    assert "nameservers" not in config["ethernets"]["eth0"] and "mtu" not in config["ethernets"]["eth0"]


def test_without_user_data_the_seed_has_an_empty_cloud_config_and_the_vm_name(tmp_path):
    path = seed_path(str(tmp_path), "wp-12345678-vm1")
    write_seed(path, seed_files(VmContext(), instance_id="s-vm1", default_hostname="vm1"))
    _, files = read_iso(path)
    assert files["user-data"] == b"#cloud-config\n{}\n"
    assert json.loads(files["meta-data"])["local-hostname"] == "vm1"


def test_remove_seeds_takes_one_slots_seeds_only(tmp_path):
    for domain in ("wp-aaaaaaaa-vm1", "wp-aaaaaaaa-vm2", "wp-bbbbbbbb-vm1"):
        write_seed(seed_path(str(tmp_path), domain), seed_files(VmContext(), instance_id=domain,
                                                                 default_hostname="x"))
    assert len(remove_seeds(str(tmp_path), "wp-aaaaaaaa-")) == 2
    assert os.listdir(tmp_path) == ["wp-bbbbbbbb-vm1.iso"]


def test_a_vm_with_features_gets_them_the_agent_and_a_boothook_that_installs_and_starts_it(tmp_path):
    features = feature_lines(vm_features(slot="s", name="web", vcpus=1, memory_mb=64, started_at=1_800_000_000,
                                         end=LeaseEnd(1_800_000_600, 30)))
    path = seed_path(str(tmp_path), "wp-12345678-web")
    write_seed(path, seed_files(VmContext(), instance_id="s-web", default_hostname="web", features=features))
    _, files = read_iso(path)
    assert files["features"].decode() == features
    assert files["workspace-pilot-agent"].decode() == guest_agent()
    hook = files["vendor-data"].decode()
    assert hook.startswith("#cloud-boothook\n#!/bin/sh\n")  # cloud-init runs it at every boot, apart from user-data
    body = hook.split("\n", 1)[1]
    assert subprocess.run(["sh", "-n"], input=body, text=True, capture_output=True).returncode == 0
    # Both files go in whole: each heredoc holds exactly what the seed's own copy holds.
    assert f"<<'WORKSPACE_PILOT_EOF'\n{guest_agent()}WORKSPACE_PILOT_EOF\n" in body
    assert f"<<'WORKSPACE_PILOT_EOF'\n{features}WORKSPACE_PILOT_EOF\n" in body
    with pytest.raises(ValueError, match="end marker"):
        agent_boothook("echo\nWORKSPACE_PILOT_EOF\nrm -rf /\n", features)


def test_a_vm_without_features_gets_no_agent(tmp_path):
    path = seed_path(str(tmp_path), "wp-12345678-web")
    write_seed(path, seed_files(VmContext(), instance_id="s-web", default_hostname="web"))
    assert set(read_iso(path)[1]) == {"meta-data", "user-data", "peers"}
