"""The node's image cache: one download for many pilots, resume after a break or a crash, verify, evict, retire.

Real files in a real cache directory, a real HTTP server as the mirror
(tests.support.imagesource.ImageServer), separate processes as the pilots that
share the cache, real flock locks (seen in /proc/locks), SIGKILL for the
crash, and workspace-killall on a real journal entry.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from admin_tools import killall
from pilot.images.cache import CacheError, ImageCache
from pilot.images.fetch import CHUNK, ImageSource, NodeImages
from pilot.node.journal import Entry, Journal
from workspace_common.protocol import ImageFile
from tests.support.pilots import pilot_config
from tests.support.service import throwaway_node_keys
from tests.support.imagesource import ImageServer, write_file
from tests.support.owners import dead_owner

SIZE = 4 * 1024 * 1024 + 5
MiB = 1024 * 1024


@pytest.fixture
def mirror(tmp_path):
    directory = tmp_path / "mirror"
    directory.mkdir()
    server = ImageServer(str(directory))
    yield server
    server.resume.set()
    server.close()


def publish(mirror, size: int = SIZE, seed: int = 1) -> str:
    """Put an image of ``size`` bytes on the mirror under its sha256; the sha256."""
    path = os.path.join(mirror.directory, "incoming")
    sha = write_file(path, size, seed)
    os.replace(path, os.path.join(mirror.directory, sha))
    return sha


def node_images(cache_dir: str, mirror, max_bytes: int = 1 << 40, notes: list | None = None) -> NodeImages:
    source = ImageSource(requests.Session(), "http://127.0.0.1:9", "slot-a", "node1", mirror=mirror.url)
    record = (lambda sha256s: notes.append(sha256s)) if notes is not None else (lambda sha256s: None)
    return NodeImages(ImageCache(cache_dir, max_bytes), source, note_fetching=record)


def image(sha: str, size: int = SIZE) -> ImageFile:
    return ImageFile(None, sha, "el9-worker", "1.0", size)


def sha_of(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def fetch_process(cache_dir: str, mirror, sha: str, size: int = SIZE) -> subprocess.Popen:
    """A separate process (as a pilot is) that has the image put in the cache; prints its path."""
    return subprocess.Popen([sys.executable, "-m", "tests.support.fetch_one_image", cache_dir, mirror.url, sha, str(size)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def flock_waiters(path: str) -> int:
    """How many processes wait in flock() for the file at ``path`` (the '->' lines of /proc/locks)."""
    inode = os.stat(path).st_ino
    with open("/proc/locks", encoding="ascii") as handle:
        # e.g. "2: -> FLOCK  ADVISORY  WRITE 4242 00:2f:1234 0 EOF": the device:inode field names the file.
        return sum(1 for line in handle
                   if "->" in line.split() and any(f.count(":") == 2 and f.endswith(f":{inode}") for f in line.split()))


def wait_until(predicate, give_up_s: float = 30.0) -> None:
    """Poll ``predicate`` (a state nothing can wake the test on: /proc/locks, a file's size) until true.

    ``give_up_s`` only keeps a broken run from hanging; no test here asserts how long anything takes.
    """
    give_up = time.monotonic() + give_up_s
    while not predicate():
        if time.monotonic() > give_up:
            pytest.fail(f"still not the case after {give_up_s:g} s (the run would hang): {predicate.__doc__ or ''}")
        time.sleep(0.02)


# -- fetching -------------------------------------------------------------------------------------------


def test_a_fetched_image_is_verified_root_only_and_named_by_its_content(tmp_path, mirror):
    sha = publish(mirror)
    notes: list = []
    cache_dir = str(tmp_path / "cache")
    path = node_images(cache_dir, mirror, notes=notes).ensure(image(sha))
    assert path == os.path.join(cache_dir, sha) and sha_of(path) == sha
    assert os.stat(cache_dir).st_mode & 0o777 == 0o700 and os.stat(path).st_mode & 0o777 == 0o400
    assert sorted(os.listdir(cache_dir)) == [sha, f"{sha}.lock"]  # no partial left
    assert notes == [(sha,), ()]  # journalled before the download, cleared after
    assert mirror.gets(sha) == [None]
    # Warm: no request at all.
    assert node_images(cache_dir, mirror).ensure(image(sha)) == path and mirror.gets(sha) == [None]


def test_two_pilots_asking_for_one_image_at_once_download_it_once(tmp_path, mirror):
    sha = publish(mirror)
    cache_dir = str(tmp_path / "cache")
    mirror.pause_after[sha] = MiB
    first = fetch_process(cache_dir, mirror, sha)
    try:
        assert mirror.paused.wait(30), "the first pilot never started its download"
        second = fetch_process(cache_dir, mirror, sha)
        try:
            # The second pilot waits on the image's lock while the first downloads.
            wait_until(lambda: flock_waiters(os.path.join(cache_dir, f"{sha}.lock")) == 1)
            mirror.resume.set()
            outs = [p.communicate(timeout=60)[0].strip() for p in (first, second)]
        finally:
            second.kill()
    finally:
        first.kill()
    assert outs == [os.path.join(cache_dir, sha)] * 2, outs
    assert mirror.gets(sha) == [None]  # one download
    assert sha_of(os.path.join(cache_dir, sha)) == sha


def test_a_transfer_cut_short_is_resumed_with_a_range_request(tmp_path, mirror):
    sha = publish(mirror)
    mirror.cut_after[sha] = 1_500_000
    path = node_images(str(tmp_path / "cache"), mirror).ensure(image(sha))
    assert sha_of(path) == sha
    first, resumed = mirror.gets(sha)
    offset = int(resumed.removeprefix("bytes=").removesuffix("-"))
    assert first is None and 1_500_000 - CHUNK < offset <= 1_500_000  # at most one read's worth lost


def test_a_pilot_killed_mid_download_leaves_a_partial_that_the_next_one_resumes(tmp_path, mirror):
    sha = publish(mirror)
    cache_dir = str(tmp_path / "cache")
    mirror.pause_after[sha] = 2 * MiB
    victim = fetch_process(cache_dir, mirror, sha)
    try:
        assert mirror.paused.wait(30)
        part = os.path.join(cache_dir, f"{sha}.part")
        wait_until(lambda: os.path.exists(part) and os.path.getsize(part) > 0)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
    finally:
        victim.kill()
    mirror.resume.set()
    assert not os.path.exists(os.path.join(cache_dir, sha))  # never renamed into place unverified
    have = os.path.getsize(part)
    assert 0 < have <= 2 * MiB
    path = node_images(cache_dir, mirror).ensure(image(sha))
    assert sha_of(path) == sha
    assert mirror.gets(sha)[-1] == f"bytes={have}-"  # resumed where the dead pilot's bytes end


@pytest.mark.parametrize("fault", ["tampered", "truncated"])
def test_a_bad_download_is_refused_in_one_line_and_the_cache_stays_as_it_was(tmp_path, mirror, fault):
    sha = publish(mirror)
    cache_dir = str(tmp_path / "cache")
    images = node_images(cache_dir, mirror)
    if fault == "tampered":
        mirror.corrupt[sha] = True
        wanted = image(sha)
        expected = "the bytes received have sha256"
    else:
        wanted = image(sha, SIZE + 1000)  # the mirror's file is 1000 bytes short of what the list says
        expected = f"got {SIZE} bytes, expected {SIZE + 1000}: discarded"
    with pytest.raises(CacheError) as caught:
        images.ensure(wanted)
    assert expected in str(caught.value) and "\n" not in str(caught.value)
    assert sorted(os.listdir(cache_dir)) == [f"{sha}.lock"]


def test_a_source_that_answers_nothing_useful_names_each_url(tmp_path, mirror):
    with pytest.raises(CacheError) as caught:
        node_images(str(tmp_path / "cache"), mirror).ensure(image("ab" * 32))
    message = str(caught.value)
    assert f"{mirror.url}/{'ab' * 32}: HTTP 404" in message and "127.0.0.1:9" in message


# -- eviction and retirement ---------------------------------------------------------------------


def test_eviction_takes_the_least_recently_used_image_but_never_one_a_vm_holds(tmp_path, mirror):
    one, two, three, four = (publish(mirror, 1 * MiB, seed) for seed in (1, 2, 3, 4))
    cache_dir = str(tmp_path / "cache")
    images = node_images(cache_dir, mirror, max_bytes=int(2.5 * MiB))
    for sha in (one, two):
        images.ensure(image(sha, MiB))
    os.utime(os.path.join(cache_dir, one), (1, 1))  # one: used long ago
    held = images.cache.hold(one)  # ...but a VM runs from it
    try:
        images.ensure(image(three, MiB))  # needs room: two goes, not the held one
        assert sorted(sha for sha, _, _ in images.cache.images()) == sorted([one, three])
    finally:
        os.close(held)
    images.ensure(image(four, MiB))  # now one is free and the oldest
    assert sorted(sha for sha, _, _ in images.cache.images()) == sorted([three, four])


def test_retire_removes_images_no_longer_listed_unless_in_use(tmp_path, mirror):
    one, two = publish(mirror, MiB, 1), publish(mirror, MiB, 2)
    images = node_images(str(tmp_path / "cache"), mirror)
    for sha in (one, two):
        images.ensure(image(sha, MiB))
    held = images.cache.hold(two)
    try:
        assert images.cache.retire(keep=set()) == [one]
    finally:
        os.close(held)
    assert images.cache.retire(keep=set()) == [two]


def test_an_unsafe_cache_directory_is_refused(tmp_path, mirror):
    sha = publish(mirror)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o777)
    os.chmod(cache_dir, 0o777)
    with pytest.raises(CacheError, match="image cache .* writable"):
        node_images(str(cache_dir), mirror).ensure(image(sha))
    assert os.listdir(cache_dir) == []


def test_killall_removes_the_partial_download_a_dead_pilot_journalled(tmp_path, mirror):
    config = pilot_config(tmp_path, "http://127.0.0.1:9", throwaway_node_keys(tmp_path),
                          sections={"libvirt": {"uri": ""}, "images": {"cache_dir": str(tmp_path / "cache")}})
    cache = ImageCache(str(tmp_path / "cache"), 0)
    cache.prepare()
    sha = "cd" * 32
    with open(cache.path(sha) + ".part", "wb") as handle:
        handle.write(b"half an image")
    journal = Journal(str(tmp_path / "journal"))
    journal.prepare()
    journal.write(Entry("slot-dead", "node1", dead_owner(), fetching=(sha,)))
    out = io.StringIO()
    code = killall.main(["--config", config, "--no-notify"], out=out)
    assert code == 0, out.getvalue()
    assert f"removed the partial download of image {sha}" in out.getvalue()
    assert sorted(os.listdir(cache.directory)) == [f"{sha}.lock"]
    assert [n for n in os.listdir(journal.directory) if n.endswith(".json")] == []

