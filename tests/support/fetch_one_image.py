"""Run as a separate process, as a pilot is: have one image in a node image cache, fetched from a mirror.

``python -m tests.support.fetch_one_image CACHE_DIR MIRROR_URL SHA256 SIZE`` prints the cached file's path,
or ``error: ...`` and exits 1. The service's endpoint behind the mirror is unreachable (port 9).
"""

from __future__ import annotations

import sys

import requests

from pilot.images.cache import CacheError, ImageCache
from pilot.images.fetch import ImageSource, NodeImages
from workspace_common.protocol import ImageFile


def main(cache_dir: str, mirror: str, sha256: str, size: str) -> int:
    source = ImageSource(requests.Session(), "http://127.0.0.1:9", "slot-a", "node1", mirror=mirror, timeout_s=30)
    images = NodeImages(ImageCache(cache_dir, 1 << 40), source)
    try:
        print(images.ensure(ImageFile(None, sha256, "img", "1", int(size))), flush=True)
    except CacheError as exc:
        print(f"error: {exc}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
