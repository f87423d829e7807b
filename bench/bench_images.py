#!/usr/bin/env python3
"""Images (issue 15): list verification, the pilot's fetch from the service against curl, VM start from the cache.

Three measures, all on this machine, all traffic on 127.0.0.1:

1. **List verification**: an envelope of ``--entries`` images signed with a
   fresh Ed25519 key; ``verify_list`` (JSON, signature, every entry) timed
   ``--rounds`` times in this process; median and best.
2. **Fetch and verify** an image of ``--size-mib`` MiB from the service's
   pilot endpoint: the real service app (``make_app`` + the image routes,
   real store, real digest) in this process; the image subscribed through a
   signed list and approved (which copies it into the service's image
   store); one (slot, host) holds a slot by a real signed ``reserved``. The
   pilot's own code (``NodeImages.ensure``: digest session, 64 KiB reads,
   sha256 while writing, fsync, rename into the cache) runs in a separate
   process; then ``curl --digest`` of the same URL into a file on the same
   file system, the limit, also with ``sync FILE`` after it (the pilot
   fsyncs before it renames an image into place). Each ``--fetch-rounds`` times, alternating, cold
   cache each time; MB/s = 10^6 bytes per second.
3. **VM start**: ``VmHost.start`` on libvirt's test driver (``test:///default``)
   of a VM whose ``--size-mib`` MiB disk is (a) a site-local file in the image
   directory, as before (the first start in a pilot process hashes it), or
   (b) a listed image already in the node cache (verified when it entered
   the cache). Each start is the first in a fresh process, as a pilot's is.

Run from the repository root::

    .venv/bin/python bench/bench_images.py [--entries 1000] [--size-mib 1024] [--json FILE]

Every process started here is waited for by its pid; the temporary
directory is removed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from service_adapter.images.imagelist import generate_key, load_private_key, load_trusted_keys, sign_list, verify_list  # noqa: E402
from tests.support.imagesource import write_file  # noqa: E402  (the image files the tests use: same bytes, same speed)

FORMAT = "workspace-image-list/1"
MB = 1_000_000


def _payload(entries: list[dict], identifier: str = "bench-images") -> dict:
    return {"format": FORMAT, "identifier": identifier, "endorser": "bench", "version": 1,
            "issued": "2026-01-01T00:00:00Z", "expires": "2099-01-01T00:00:00Z", "images": entries}


def bench_verify(workdir: str, entries: int, rounds: int) -> dict:
    keys = os.path.join(workdir, "keys")
    os.makedirs(keys)
    generate_key(os.path.join(workdir, "bench.key"), os.path.join(keys, "bench.pem"))
    items = [{"identifier": f"image-{i:05d}", "version": "1.0", "sha256": hashlib.sha256(str(i).encode()).hexdigest(),
              "size": 1_000_000 + i, "urls": [f"https://images.example.org/image-{i:05d}-1.0.qcow2"],
              "title": f"bench image {i}"} for i in range(entries)]
    envelope = sign_list(_payload(items), load_private_key(os.path.join(workdir, "bench.key")))
    trusted = load_trusted_keys(keys)
    now = time.time()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        verified = verify_list(envelope, trusted, now=now)
        times.append((time.perf_counter() - t0) * 1000)
    assert len(verified.images) == entries
    return {"entries": entries, "bytes": len(envelope), "rounds": rounds, "median_ms": statistics.median(times),
            "best_ms": min(times)}


class ImageService:
    """The service's app (on ``listen``, 127.0.0.1 by default) with one lease whose ``hosts`` have reserved, and
    one approved image."""

    def __init__(self, workdir: str, image: str, sha256: str, size: int, *, hosts=("node1",),
                 listen: tuple[str, int] = ("127.0.0.1", 0)):
        from workspace_common.protocol import NOTIFICATIONS_PATH, SIGNATURE_HEADER, Notification, format_time, sign, utc_now
        from service_adapter.commandboard import CommandBoard
        from service_adapter.digest import DigestVerifier
        from service_adapter.images.catalog import ImageCatalog
        from service_adapter.images.routes import add_image_routes
        from service_adapter.nodekeys import NodeAccounts, new_site_key
        from service_adapter.receiver import ReceiverThread, make_app
        from service_adapter.store import Store
        import requests
        from requests.auth import HTTPDigestAuth

        self.size = size
        self.nodes = NodeAccounts(new_site_key(), "workspace-pilot")
        os.makedirs(workdir, exist_ok=True)
        self.store = Store(os.path.join(workdir, "service.sqlite"))
        keys = os.path.join(workdir, "endorsers")
        os.makedirs(keys)
        generate_key(os.path.join(workdir, "endorser.key"), os.path.join(keys, "endorser.pem"))
        listing = os.path.join(workdir, "images.list")
        with open(listing, "wb") as handle:
            handle.write(sign_list(_payload([{"identifier": "bench-image", "version": "1", "sha256": sha256,
                                              "size": size, "urls": [f"file://{image}"]}]),
                                   load_private_key(os.path.join(workdir, "endorser.key"))))
        self.catalog = ImageCatalog(self.store, keys_dir=keys, store_dir=os.path.join(workdir, "image-store"))
        self.catalog.subscribe(listing, "bench")
        t0 = time.perf_counter()
        self.catalog.approve("bench-image", "1", "bench")
        self.approve_s = time.perf_counter() - t0
        app = make_app(self.store, DigestVerifier("workspace-pilot", self.nodes), board=CommandBoard())
        add_image_routes(app, self.catalog, operators=False)
        self.receiver = ReceiverThread(app, host=listen[0], port=listen[1])
        self.url = self.receiver.start()
        self.slot, self.hosts, self.host = "bench-slot-0001", list(hosts), hosts[0]
        self.store.create_lease("bench-lease", self.slot, owner="bench", nodes=len(self.hosts), memory_mb=1024,
                                duration_s=3600, now=time.time())
        for host in self.hosts:
            key = self.nodes.slot_key(host, self.slot, self.store.slot_secret(self.slot))
            body = Notification(slot=self.slot, host=host, state="reserved", seq=1,
                                sent_at=format_time(utc_now()), memory_mb=1024).to_json()
            with requests.Session() as session:
                session.auth = HTTPDigestAuth(host, self.nodes.node_key(host))
                answer = session.post(self.url + NOTIFICATIONS_PATH, data=body, timeout=10,
                                      headers={SIGNATURE_HEADER: sign(key, body)})
                answer.raise_for_status()

    def handout(self, sha256: str) -> dict:
        """What each simulated node needs (the URL, the slot, its keys, the lease's peer key), as JSON data."""
        from workspace_common.protocol.chunks import peer_key

        secret = self.store.slot_secret(self.slot)
        return {"url": self.url, "slot": self.slot, "sha256": sha256, "size": self.size,
                "peer_key": peer_key(secret, self.slot),
                "nodes": {host: {"node_key": self.nodes.node_key(host),
                                 "sign_key": self.nodes.slot_key(host, self.slot, secret)} for host in self.hosts}}

    @property
    def node_key(self) -> str:
        return self.nodes.node_key(self.host)

    def close(self) -> None:
        self.receiver.stop()
        self.store.close()


_PILOT_FETCH = r"""
import sys, time, requests
from requests.auth import HTTPDigestAuth
from pilot.images.cache import ImageCache
from pilot.images.fetch import ImageSource, NodeImages
from workspace_common.protocol import ImageFile
url, slot, host, key, cache, sha, size = sys.argv[1:]
session = requests.Session()
session.auth = HTTPDigestAuth(host, key)
images = NodeImages(ImageCache(cache, 1 << 42), ImageSource(session, url, slot, host, timeout_s=60))
t0 = time.perf_counter()
images.ensure(ImageFile(None, sha, "bench-image", "1", int(size)))
print(time.perf_counter() - t0)
"""


def bench_fetch(workdir: str, size_mib: int, rounds: int) -> dict:
    size = size_mib * 1024 * 1024
    image = os.path.join(workdir, "source.img")
    sha = write_file(image, size)
    service = ImageService(workdir, image, sha, size)
    from workspace_common.protocol import image_path

    url = service.url + image_path(service.slot, service.host, sha)
    pilot_s, curl_s, curl_sync_s = [], [], []
    try:
        for _ in range(rounds):
            cache = os.path.join(workdir, "cache")
            shutil.rmtree(cache, ignore_errors=True)
            done = subprocess.run([sys.executable, "-c", _PILOT_FETCH, service.url, service.slot, service.host,
                                   service.node_key, cache, sha, str(size)], capture_output=True, text=True,
                                  timeout=600, check=True)
            pilot_s.append(float(done.stdout.strip()))
            shutil.rmtree(cache)
            target = os.path.join(workdir, "curl.out")
            t0 = time.perf_counter()
            subprocess.run(["curl", "--fail", "--silent", "--digest", "-u", f"{service.host}:{service.node_key}",
                            "-o", target, url], check=True, timeout=600)
            curl_s.append(time.perf_counter() - t0)
            # The pilot fsyncs before it renames into place (a cached image is trusted unhashed): the same
            # durability for curl's copy is `sync FILE`.
            subprocess.run(["sync", target], check=True, timeout=600)
            curl_sync_s.append(time.perf_counter() - t0)
            os.unlink(target)
    finally:
        service.close()
    return {"size_mib": size_mib, "rounds": rounds, "approve_s": service.approve_s,
            "pilot_s": pilot_s, "curl_s": curl_s, "curl_sync_s": curl_sync_s,
            "pilot_mb_s": size / MB / statistics.median(pilot_s), "curl_mb_s": size / MB / statistics.median(curl_s),
            "curl_sync_mb_s": size / MB / statistics.median(curl_sync_s)}


_VM_START = r"""
import os, sys, time
from pilot.images.cache import ImageCache
from pilot.images.fetch import ImageSource, NodeImages
from workspace_common.protocol import ImageFile, VmSpec
from pilot.vm.check import VmPolicy
from pilot.vm.host import VmHost
import requests
mode, image_dir, cache_dir, console_dir, sha, size = sys.argv[1:]
policy = VmPolicy(image_dir=image_dir, console_dir=console_dir, image_cache_dir=cache_dir)
def connect():
    import libvirt
    return libvirt.open("test:///default")
images = NodeImages(ImageCache(cache_dir, 1 << 42), ImageSource(requests.Session(), "http://127.0.0.1:9", "s", "h"))
host = VmHost(connect, slot="bench-slot-%d" % os.getpid(), lease="bench", pilot_pid=os.getpid(), policy=policy,
              reserved_mb=4096, images=images)
disk = ImageFile("disk.img", sha) if mode == "image_dir" else ImageFile(None, sha, "bench-image", "1", int(size))
t0 = time.perf_counter()
outcome = host.start(VmSpec("vm1", 256, disk=disk, disk_readonly=True))
took = time.perf_counter() - t0
assert outcome.ok, outcome.reason
host.teardown()
print(took)
"""


def bench_vm_start(workdir: str, size_mib: int, rounds: int) -> dict:
    size = size_mib * 1024 * 1024
    image_dir, cache_dir, console_dir = (os.path.join(workdir, d) for d in ("images", "vmcache", "consoles"))
    for directory in (image_dir, cache_dir):
        os.makedirs(directory, mode=0o700)
    sha = write_file(os.path.join(image_dir, "disk.img"), size)
    cached = os.path.join(cache_dir, sha)
    shutil.copyfile(os.path.join(image_dir, "disk.img"), cached)
    os.chmod(cached, 0o400)
    results: dict[str, list[float]] = {"image_dir": [], "cache": []}
    for _ in range(rounds):
        for mode in results:
            done = subprocess.run([sys.executable, "-c", _VM_START, mode, image_dir, cache_dir, console_dir, sha,
                                   str(size)], capture_output=True, text=True, timeout=600, check=True)
            results[mode].append(float(done.stdout.strip().splitlines()[-1]) * 1000)
    return {"size_mib": size_mib, "rounds": rounds,
            **{f"{mode}_ms": values for mode, values in results.items()},
            **{f"{mode}_median_ms": statistics.median(values) for mode, values in results.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--fetch-rounds", type=int, default=3)
    parser.add_argument("--start-rounds", type=int, default=5)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="bench-images-", dir=os.environ.get("BENCH_TMP", "/var/tmp"))
    os.chmod(workdir, 0o700)
    try:
        verify = bench_verify(workdir, args.entries, args.rounds)
        print(f"list verification, {verify['entries']} entries ({verify['bytes']} bytes): median "
              f"{verify['median_ms']:.1f} ms, best {verify['best_ms']:.1f} ms", flush=True)
        fetch = bench_fetch(workdir, args.size_mib, args.fetch_rounds)
        print(f"fetch {fetch['size_mib']} MiB from the service: pilot {fetch['pilot_mb_s']:.0f} MB/s, curl "
              f"{fetch['curl_mb_s']:.0f} MB/s, curl + sync {fetch['curl_sync_mb_s']:.0f} MB/s "
              f"(medians of {fetch['rounds']}; approve copied it in "
              f"{fetch['approve_s']:.1f} s)", flush=True)
        start = bench_vm_start(workdir, args.size_mib, args.start_rounds)
        print(f"first VM start with a {start['size_mib']} MiB disk: image_dir {start['image_dir_median_ms']:.1f} ms, "
              f"warm cache {start['cache_median_ms']:.1f} ms (medians of {start['rounds']})", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"verify": verify, "fetch": fetch, "vm_start": start}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
