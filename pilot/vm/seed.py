"""A VM's cloud-init NoCloud seed: a small ISO 9660 image labelled ``cidata`` that the guest reads at boot.

Files on it (Rock Ridge and Joliet names, so any guest sees them as written):

- ``meta-data``: ``instance-id``, ``local-hostname``, ``public-keys`` (the
  operator's SSH keys) and ``workspace-peers`` (the lease's VMs: name and
  node), as JSON, which is YAML to cloud-init;
- ``user-data``: the operator's user-data as given (an empty
  ``#cloud-config`` when none was);
- ``peers``: the same peers as ``meta-data``, one ``NAME NODE`` per line,
  for guests without cloud-init;
- ``features``: the VM's HEPiX Machine/Job Features as it starts
  (:mod:`pilot.vm.features`), one ``mjf DIR KEY VALUE`` per line;
- ``workspace-pilot-agent``: the guest agent (``guestagent.sh``), which
  writes those into ``$MACHINEFEATURES`` and ``$JOBFEATURES``, keeps them
  current from the lease channel and says whether the guest is busy; a
  guest without cloud-init runs ``sh workspace-pilot-agent features``;
- ``vendor-data``: a cloud-init boothook that installs the agent and starts
  it at every boot (vendor-data, so the owner's user-data is untouched; a
  user-data of ``vendor_data: {enabled: false}`` turns it off);
- with an address from the service (a ``nic``): ``network-config``
  (cloud-init's version 2: the address, found by MAC; the lease network's
  name server, or the site's gateway) and ``hosts`` (the lease's VMs known
  when it started, ``ADDRESS NAME.DOMAIN NAME`` per line; later ones are
  answered by the node's DNS).

Made with pycdlib (no external tool, no root, no loop device), imported
only when a VM asks for a seed. Seeds live in the journal directory's
``seeds/``, named after the domain; the pilot removes a VM's seed when the
VM is gone, and whoever undoes a dead pilot's entry removes its slot's.
"""

from __future__ import annotations

import glob
import io
import json
import os

from workspace_common.protocol import Nic, VmContext
from pilot.vm.vmfiles import remove_paths

SEED_LABEL = "cidata"


def seed_dir_of(journal_dir: str) -> str:
    """Where the seeds of a node's VMs are: ``seeds/`` in the journal directory (root's alone)."""
    return os.path.join(journal_dir, "seeds")


def seed_path(seed_dir: str, domain_name: str) -> str:
    """Where the seed of the domain ``domain_name`` is written."""
    return os.path.join(seed_dir, f"{domain_name}.iso")


def seed_files(context: VmContext, *, instance_id: str, default_hostname: str, nic: Nic | None = None,
               mtu: int | None = None, features: str = "") -> dict[str, bytes]:
    """The seed's files (name -> content); with ``nic`` (the address the service allocated) also its
    ``network-config`` and the lease's ``hosts``; ``features`` (:func:`pilot.vm.features.feature_lines`)
    comes with the guest agent that applies them."""
    meta: dict = {"instance-id": instance_id, "local-hostname": context.hostname or default_hostname}
    if context.ssh_authorized_keys:
        meta["public-keys"] = list(context.ssh_authorized_keys)
    peers = [{"name": name, "host": host} for name, host in context.peers]
    meta["workspace-peers"] = peers
    user_data = context.user_data if context.user_data is not None else "#cloud-config\n{}\n"
    files = {
        "meta-data": json.dumps(meta, indent=1).encode() + b"\n",
        "user-data": user_data.encode(),
        "peers": "".join(f"{p['name']} {p['host']}\n" for p in peers).encode(),
    }
    if features:
        agent = guest_agent()
        files["features"] = features.encode()
        files["workspace-pilot-agent"] = agent.encode()
        files["vendor-data"] = agent_boothook(agent, features).encode()
    if nic is not None:
        files["network-config"] = json.dumps(network_config(nic, mtu), indent=1).encode() + b"\n"
        domain = nic.net.domain
        files["hosts"] = "".join(f"{ip} {name}.{domain} {name}\n" for name, ip in nic.net.hosts).encode()
    return files


def guest_agent() -> str:
    """The guest agent's script (``guestagent.sh`` beside this module)."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "guestagent.sh"), encoding="utf-8") as handle:
        return handle.read()


#: Where the boothook puts the agent and the features it starts with, inside the guest.
AGENT_PATH = "/usr/local/sbin/workspace-pilot-agent"
AGENT_FEATURES = "/run/workspace-pilot/features"


def agent_boothook(agent: str, features: str) -> str:
    """cloud-init vendor-data: a boothook (run early, at every boot) that installs the agent and the features the
    VM started with, then starts the agent (as a systemd unit where there is systemd)."""
    for text in (agent, features):
        if "\nWORKSPACE_PILOT_EOF\n" in "\n" + text:
            raise ValueError("the agent or its features hold the boothook's end marker")
    return (
        "#cloud-boothook\n#!/bin/sh\n"
        "# workspace-pilot: the guest agent (HEPiX Machine/Job Features, busy or idle); docs/hosting-vms.md\n"
        f"mkdir -p {os.path.dirname(AGENT_PATH)} {os.path.dirname(AGENT_FEATURES)}\n"
        f"cat > {AGENT_PATH} <<'WORKSPACE_PILOT_EOF'\n{agent}WORKSPACE_PILOT_EOF\n"
        f"chmod 0755 {AGENT_PATH}\n"
        f"cat > {AGENT_FEATURES} <<'WORKSPACE_PILOT_EOF'\n{features}WORKSPACE_PILOT_EOF\n"
        "if command -v systemd-run >/dev/null 2>&1 && [ -d /run/systemd/system ]; then\n"
        f"  systemd-run --no-block --unit=workspace-pilot-agent --property=Restart=always \\\n"
        f"    --property=RestartSec=5 {AGENT_PATH} {AGENT_FEATURES}\n"
        "else\n"
        f"  nohup {AGENT_PATH} {AGENT_FEATURES} >/var/log/workspace-pilot-agent.log 2>&1 &\n"
        "fi\n"
    )


def network_config(nic: Nic, mtu: int | None) -> dict:
    """cloud-init's network configuration (version 2) for the VM's one interface, found by its MAC: its address,
    the lease network's name server and domain (a lease network: no route out), or the site's gateway."""
    net = nic.net
    ethernet: dict = {"match": {"macaddress": nic.mac}, "set-name": "eth0",
                      "addresses": [f"{nic.ip}/{net.network.prefixlen}"]}
    if net.kind == "lease":
        ethernet["nameservers"] = {"addresses": [net.gateway], "search": [net.domain]}
    else:
        ethernet["routes"] = [{"to": "default", "via": net.gateway}]
    if mtu:
        ethernet["mtu"] = mtu
    return {"version": 2, "ethernets": {"eth0": ethernet}}


def write_seed(path: str, files: dict[str, bytes]) -> None:
    """Write the ISO (0600) atomically: a temporary file renamed into place."""
    import pycdlib

    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=SEED_LABEL)
    try:
        for index, (name, data) in enumerate(sorted(files.items())):
            iso.add_fp(io.BytesIO(data), len(data), f"/F{index}.;1", rr_name=name, joliet_path=f"/{name}")
        temp = f"{path}.tmp-{os.getpid()}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                iso.write_fp(handle)
            os.replace(temp, path)
        except BaseException:
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass
            raise
    finally:
        iso.close()


def remove_seeds(seed_dir: str, domain_prefix: str) -> list[str]:
    """Remove every seed whose domain name starts with ``domain_prefix``; the paths removed."""
    return remove_paths(glob.glob(os.path.join(glob.escape(seed_dir), glob.escape(domain_prefix) + "*.iso")))
