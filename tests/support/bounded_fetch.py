"""Run as a separate process, as a pilot is: fetch one image past rude sources, then print the peak RSS.

``python -m tests.support.bounded_fetch CACHE_DIR GOOD_URL RUDE_URL SHA256 SIZE CHUNK`` asks for the image with the
rude server as its mirror and the good one as the service (the whole-file path, then one chunk by Range),
one chunk from the rude server as a peer, and the signed manifest from the rude server as the service. It
prints one JSON line: what each step gave, and ``maxrss_kb`` (this process's peak resident set, VmHWM). Its address space is capped at 2 GiB, so code that reads a rude answer whole fails here with
MemoryError instead of filling the machine.
"""

from __future__ import annotations

import json
import resource
import sys

import requests

from pilot.images.cache import CacheError, ImageCache
from pilot.images.fetch import ImageSource, NodeImages
from workspace_common.protocol import ImageFile

ADDRESS_SPACE = 2 << 30


def peak_rss_kb() -> int:
    """This process's peak resident set since its exec, in KiB (VmHWM: getrusage's maxrss would also count
    the peak of the process it was forked from)."""
    with open("/proc/self/status", encoding="ascii") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:"))


def main(cache_dir: str, good: str, rude: str, sha256: str, size: str, chunk: str) -> int:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    size_b, chunk_b = int(size), int(chunk)
    said = {}
    source = ImageSource(requests.Session(), good, "slot-a", "node1", mirror=rude, timeout_s=30, peer_key="0" * 64)
    images = NodeImages(ImageCache(cache_dir, 1 << 40), source)
    try:
        said["whole"] = images.ensure(ImageFile(None, sha256, "img", "1", size_b))
    except CacheError as exc:
        said["whole"] = f"error: {exc}"
    said["dropped"] = sorted(source.bad_sources)
    # A second source object, its mirror not yet known to be bad: the chunk path meets it afresh.
    chunks = ImageSource(requests.Session(), good, "slot-a", "node1", mirror=rude, timeout_s=30, peer_key="0" * 64)
    try:
        data = chunks.chunk_from_service(sha256, chunk_b, chunk_b)
        said["chunk"] = [len(data), data[:16].hex()]
    except CacheError as exc:
        said["chunk"] = f"error: {exc}"
    try:
        chunks.chunk_from_peer(rude.split("//", 1)[1], sha256, 0, chunk_b)
        said["peer"] = "accepted"
    except CacheError as exc:
        said["peer"] = f"error: {exc}"
    signed = ImageSource(requests.Session(), rude, "slot-a", "node1", timeout_s=30)
    try:
        signed.manifest(sha256, "0" * 64, size_b)
        said["manifest"] = "accepted"
    except CacheError as exc:
        said["manifest"] = f"error: {exc}"
    said["maxrss_kb"] = peak_rss_kb()
    print(json.dumps(said), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
