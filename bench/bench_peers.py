#!/usr/bin/env python3
"""N nodes fetch one image: from the service alone, and with peers (issue 16). Network namespaces, shaped links.

What runs, for each N in ``--nodes`` and each mode (``server``: peering off,
every node fetches from the service; ``peers``: the lease's nodes share
chunks through the service's tracker):

* **A private network** made here and removed after: a namespace ``wpb-hub``
  holding a bridge, one namespace per node and one for the service, each
  joined to the bridge by a veth pair whose both ends are shaped by ``tc tbf``
  to ``--rate`` (the service's link too). Nothing is added to the root
  namespace; all traffic stays inside this machine.
* **The service** (in its namespace): the real app (store, digest, image
  routes with the manifest and the tracker), a lease of N hosts that have
  reserved, and an approved image of ``--size-mib`` MiB.
* **N nodes** (one process each, in their namespaces): the pilot's own
  ``NodeImages`` (cache, verification, peer server on the node's address).
  They start together on a line from this process; each reports when its
  verified image is in place; the result is the time until the last one.

The limit printed beside it: image size / link rate x ceil(log2(N + 1)), the
time of a binary tree of whole copies. Run as root from the repository root::

    .venv/bin/python bench/bench_peers.py [--nodes 1,2,4,8,16] [--size-mib 512] [--rate-mbit 200] [--json FILE]

Every process started here is stopped by its pid; the namespaces are deleted
at the end even after an error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PREFIX = "wpb"
SUBNET = "10.201.0"
SERVICE_IP = f"{SUBNET}.1"
PORT = 8790


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


class Network:
    """The hub with its bridge, the service's namespace and ``nodes`` node namespaces, links shaped to ``rate``."""

    def __init__(self, nodes: int, rate_mbit: int):
        self.names = [f"{PREFIX}-svc"] + [f"{PREFIX}-n{i}" for i in range(1, nodes + 1)]
        self.hub = f"{PREFIX}-hub"
        self.rate = f"{rate_mbit}mbit"
        self.made: list[str] = []

    def ip_of(self, name: str) -> str:
        return SERVICE_IP if name.endswith("-svc") else f"{SUBNET}.{10 + int(name.rsplit('-n', 1)[1])}"

    def __enter__(self) -> "Network":
        try:
            sh("ip", "netns", "add", self.hub)
            self.made.append(self.hub)
            sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.hub, "link", "set", "br0", "up")
            for index, name in enumerate(self.names):
                sh("ip", "netns", "add", name)
                self.made.append(name)
                port = f"p{index}"
                sh("ip", "-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", name)
                sh("ip", "-n", self.hub, "link", "set", port, "master", "br0", "up")
                sh("ip", "-n", name, "addr", "add", f"{self.ip_of(name)}/24", "dev", "eth0")
                sh("ip", "-n", name, "link", "set", "eth0", "up")
                sh("ip", "-n", name, "link", "set", "lo", "up")
                # Both directions of the link: what leaves the namespace, and what the hub sends into it.
                for ns, dev in ((name, "eth0"), (self.hub, port)):
                    sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rate, "burst", "256kb",
                       "latency", "100ms")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for name in reversed(self.made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self.made.clear()


_SERVICE = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
from bench.bench_images import ImageService
from tests.support.imagesource import write_file
workdir, nodes, size, ip, port = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
os.makedirs(workdir, mode=0o700)
image = os.path.join(workdir, "source.img")
sha = write_file(image, size, seed=3)
service = ImageService(workdir, image, sha, size, hosts=[f"n{i}" for i in range(1, nodes + 1)], listen=(ip, port))
service.catalog.manifest(sha)  # worked out now, not in the first node's request
print(json.dumps(service.handout(sha)), flush=True)
sys.stdin.read()
service.close()
"""

_NODE = r"""
import json, os, sys, threading, time
sys.path.insert(0, sys.argv[1])
import requests
from requests.auth import HTTPDigestAuth
from pilot.images.cache import ImageCache
from pilot.images.fetch import ImageSource, NodeImages
from workspace_common.protocol import ImageFile
info, host, ip, cache, peers = json.loads(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6] == "yes"
node = info["nodes"][host]
session = requests.Session()
session.auth = HTTPDigestAuth(host, node["node_key"])
source = ImageSource(session, info["url"], info["slot"], host, peer_key=info["peer_key"], timeout_s=120)
images = NodeImages(ImageCache(cache, 1 << 42), source, key=node["sign_key"], peers=peers, peer_bind=ip,
                    peer_advertise=ip)
print("ready", flush=True)
sys.stdin.readline()
started = time.time()
images.ensure(ImageFile(None, info["sha256"], "bench-image", "1", info["size"]))
done = time.time()
swarm = images.swarms[0] if images.swarms else None
print(json.dumps({"host": host, "started": started, "done": done,
                  "from_peers": swarm.from_peers if swarm else 0,
                  "from_service": swarm.from_service if swarm else None}), flush=True)
sys.stdin.readline()  # keep serving the others until told to stop
images.close()
"""


def run_one(network: Network, workdir: str, nodes: int, size: int, peers: bool) -> dict:
    service = subprocess.Popen(
        ["ip", "netns", "exec", network.names[0], sys.executable, "-c", _SERVICE, ROOT, os.path.join(workdir, "svc"),
         str(nodes), str(size), SERVICE_IP, str(PORT)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    children = []
    try:
        info = json.loads(service.stdout.readline())
        for index, name in enumerate(network.names[1:], start=1):
            cache = os.path.join(workdir, f"cache-{index}")
            children.append(subprocess.Popen(
                ["ip", "netns", "exec", name, sys.executable, "-c", _NODE, ROOT, json.dumps(info), f"n{index}",
                 network.ip_of(name), cache, "yes" if peers else "no"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for child in children:
            assert child.stdout.readline().strip() == "ready"
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        results = [json.loads(child.stdout.readline()) for child in children]
        for child in children:
            child.stdin.write("stop\n")
            child.stdin.flush()
        for child in children:
            child.wait(60)
    finally:
        for process in children + [service]:
            if process.poll() is None:
                try:
                    process.stdin.close()
                except OSError:
                    pass
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for index in range(1, nodes + 1):
            shutil.rmtree(os.path.join(workdir, f"cache-{index}"), ignore_errors=True)
        shutil.rmtree(os.path.join(workdir, "svc"), ignore_errors=True)
    start = min(r["started"] for r in results)
    return {"nodes": nodes, "mode": "peers" if peers else "server", "last_s": max(r["done"] for r in results) - start,
            "first_s": min(r["done"] for r in results) - start, "results": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="1,2,4,8,16")
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--rate-mbit", type=int, default=200)
    parser.add_argument("--modes", default="server,peers")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_peers: needs root (network namespaces and tc)", file=sys.stderr)
        return 3
    size = args.size_mib * 1024 * 1024
    counts = [int(n) for n in args.nodes.split(",")]
    workdir = tempfile.mkdtemp(prefix="bench-peers-", dir="/var/tmp")
    rows = []
    try:
        for nodes in counts:
            ideal = size * 8 / (args.rate_mbit * 1e6) * math.ceil(math.log2(nodes + 1))
            with Network(nodes, args.rate_mbit) as network:
                for mode in args.modes.split(","):
                    row = run_one(network, workdir, nodes, size, mode == "peers")
                    row["ideal_s"] = ideal
                    rows.append(row)
                    print(f"N={nodes:2d} {row['mode']:6s}: last node {row['last_s']:6.1f} s (first {row['first_s']:5.1f} s;"
                          f" ideal {ideal:5.1f} s)", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"size_mib": args.size_mib, "rate_mbit": args.rate_mbit, "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
