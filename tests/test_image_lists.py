"""Signed image lists and the site's approvals, through the real HTTP API: the HEPiX rule holds.

A VM may start from a named image only if it is on a subscribed list
signed by a trusted key, unexpired, approved and not revoked; anything
else is refused with one line (409, or 422 for a bad list) and the store
and the image store are as they were. Real Ed25519 keys made in the test,
real signatures, a real HTTP server for the endorser's list and images, the
real service app on 127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys

import pytest
import requests

from service_adapter.images.imagelist import key_id

from tests.support.imagesource import Endorser, ImageServer, image_entry, write_file
from tests.support.vmservice import VmService, one_line_error

IMAGE_BYTES = 3 * 1024 * 1024 + 17


@pytest.fixture
def site(tmp_path, store_location):
    """The service with an image catalogue, an endorser it trusts, a real HTTP server publishing two images; on
    each store backend (SQLite, PostgreSQL)."""
    service = VmService(tmp_path, images=True, store_location=store_location)
    published = tmp_path / "published"
    published.mkdir()
    server = ImageServer(str(published))
    endorser = Endorser(str(tmp_path / "endorser"))
    endorser.trust_in(str(tmp_path / "endorsers"))
    write_file(str(published / "el9-worker-1.0.qcow2"), IMAGE_BYTES, seed=1)
    write_file(str(published / "el9-worker-1.1.qcow2"), IMAGE_BYTES, seed=2)

    class Site:
        pass

    s = Site()
    s.svc, s.server, s.endorser, s.published, s.root = service, server, endorser, published, tmp_path
    s.entries = [
        image_entry("el9-worker", "1.0", str(published / "el9-worker-1.0.qcow2"), f"{server.url}/el9-worker-1.0.qcow2",
                    title="EL9 batch worker"),
        image_entry("el9-worker", "1.1", str(published / "el9-worker-1.1.qcow2"), f"{server.url}/el9-worker-1.1.qcow2"),
    ]
    s.list_url = f"{server.url}/hep.list"
    endorser.publish(str(published / "hep.list"), s.entries)
    yield s
    server.close()
    service.close()


def named(name: str = "vm1", image: str = "el9-worker", version: str | None = "1.0", memory_mb: int = 256) -> dict:
    disk = {"image": image, **({"version": version} if version else {})}
    return {"name": name, "memory_mb": memory_mb, "disk": disk}


def stored_files(site) -> list[str]:
    store = site.root / "image-store"
    return sorted(os.listdir(store)) if store.exists() else []


def subscribed(site):
    response = site.svc.api("POST", "/image-lists", json={"source": site.list_url})
    assert response.status_code == 201, response.text
    return response.json()


def approve(site, identifier="el9-worker", version="1.0", **body):
    return site.svc.api("POST", f"/images/{identifier}/approve", json={"version": version, **body})


# -- lists ----------------------------------------------------------------------------------------


def test_a_signed_list_is_subscribed_and_its_images_shown_as_endorsed(site):
    body = subscribed(site)
    assert (body["identifier"], body["version"], body["key"], body["key_id"]) == (
        "hep-worker-images", 1, "hep-images", site.endorser.key_id)
    assert body["expired"] is False and body["source"] == site.list_url
    images = site.svc.api("GET", "/images").json()["images"]
    assert [(i["identifier"], i["version"], i["state"], i["stored"]) for i in images] == [
        ("el9-worker", "1.0", "endorsed", False), ("el9-worker", "1.1", "endorsed", False)]
    assert images[0]["sha256"] == site.entries[0]["sha256"] and images[0]["size"] == IMAGE_BYTES
    assert site.svc.api("GET", "/image-lists").json()["lists"] == [body]
    again = site.svc.api("POST", "/image-lists", json={"source": site.list_url})
    assert again.status_code == 409 and "subscribed already" in one_line_error(again)


def _tampered(envelope: bytes) -> bytes:
    data = json.loads(envelope)
    data["signed"] = data["signed"].replace('"1.0"', '"6.6"')
    return json.dumps(data).encode()


@pytest.mark.parametrize("case,expected", [
    ("tampered", "bad signature"),
    ("stranger", "not a trusted endorser key"),
    ("expired", "expired"),
    ("not-a-list", "not a signed image list"),
    ("bad-entry", "sha256: must be 64 lowercase hex digits"),
])
def test_a_bad_list_is_refused_with_one_line_and_changes_nothing(site, case, expected):
    path = site.published / "bad.list"
    if case == "tampered":
        path.write_bytes(_tampered(site.endorser.publish(str(path), site.entries)))
    elif case == "stranger":
        Endorser(str(site.root / "stranger"), name="stranger").publish(str(path), site.entries)
    elif case == "expired":
        # The endorser's tool signs lists ahead of time without judging the clock: this one ran out 10 s ago.
        site.endorser.publish(str(path), site.entries, expires_in_s=-10, issued_ago_s=3600)
    elif case == "not-a-list":
        path.write_bytes(b"<html>not found</html>")
    else:
        # Signed by hand: the endorser's tool would not sign a malformed list.
        text = json.dumps(site.endorser.payload([dict(site.entries[0], sha256="X" * 64)]))
        envelope = {"signed": text, "signature": base64.b64encode(site.endorser.key.sign(text.encode())).decode(),
                    "key": key_id(site.endorser.key.public_key())}
        path.write_text(json.dumps(envelope))
    before = site.svc.store.snapshot()
    response = site.svc.api("POST", "/image-lists", json={"source": f"{site.server.url}/bad.list"})
    assert response.status_code == 422, response.text
    assert expected in one_line_error(response)
    assert site.svc.store.snapshot() == before


def test_an_unreachable_source_is_502_and_a_relative_path_400(site):
    gone = site.svc.api("POST", "/image-lists", json={"source": f"{site.server.url}/missing.list"})
    assert gone.status_code == 502 and "HTTP 404" in one_line_error(gone)
    relative = site.svc.api("POST", "/image-lists", json={"source": "lists/hep.list"})
    assert relative.status_code == 502 and "absolute path" in one_line_error(relative)
    junk = site.svc.api("POST", "/image-lists", json={"source": 7})
    assert junk.status_code == 400


def test_a_replayed_older_issue_is_refused_and_a_newer_one_replaces_the_images(site):
    subscribed(site)
    assert approve(site, version="1.1").status_code == 200
    # Issue 2 withdraws 1.1: its approval no longer resolves, and it leaves the service's image store.
    site.endorser.publish(str(site.published / "hep.list"), site.entries[:1], version=2)
    result = site.svc.api("POST", "/image-lists/refresh").json()["results"]
    assert [(r["list"], r["ok"], r["version"]) for r in result] == [("hep-worker-images", True, 2)]
    assert [i["version"] for i in site.svc.api("GET", "/images").json()["images"]] == ["1.0"]
    assert stored_files(site) == []
    lease_id, _ = site.svc.ready_lease()
    refused = site.svc.start(lease_id, named(version="1.1"))
    assert refused.status_code == 409 and "has no version 1.1" in one_line_error(refused)
    # Someone replays issue 1 (still validly signed): refused, issue 2 stays, and the refusal is kept.
    site.endorser.publish(str(site.published / "hep.list"), site.entries, version=1)
    before = site.svc.store.snapshot()["list_images"]
    result = site.svc.api("POST", "/image-lists/hep-worker-images/refresh").json()["results"]
    assert result[0]["ok"] is False and "older than the stored issue 2" in result[0]["message"]
    assert site.svc.store.snapshot()["list_images"] == before
    (listed,) = site.svc.api("GET", "/image-lists").json()["lists"]
    assert listed["version"] == 2 and "older than" in listed["last_error"]


# -- approval and the VM start rule ---------------------------------------------------------------------


def test_a_named_image_starts_only_once_endorsed_and_approved_and_the_command_carries_its_content(site):
    lease_id, slot = site.svc.ready_lease()
    unknown = site.svc.start(lease_id, named())
    assert unknown.status_code == 409 and "is on no subscribed image list" in one_line_error(unknown)
    subscribed(site)
    before = site.svc.store.snapshot()
    not_approved = site.svc.start(lease_id, named())
    assert not_approved.status_code == 409
    assert "endorsed but not approved" in one_line_error(not_approved)
    assert site.svc.store.snapshot() == before and site.svc.commands(slot) == []

    approved = approve(site, reason="tested by ops")
    assert approved.status_code == 200, approved.text
    body = approved.json()
    assert (body["state"], body["decided_by"], body["reason"], body["stored"]) == (
        "approved", "alice", "tested by ops", True)
    sha = site.entries[0]["sha256"]
    assert stored_files(site) == [sha]
    with open(site.root / "image-store" / sha, "rb") as handle:
        assert hashlib.sha256(handle.read()).hexdigest() == sha
    assert site.server.gets("el9-worker-1.0.qcow2") == [None]  # fetched once, whole

    started = site.svc.start(lease_id, named(version=None))  # the one approved version
    assert started.status_code == 202, started.text
    (host, op, command) = site.svc.commands(slot)[0]
    assert (host, op) == ("node1", "start-vm")
    assert command["vm"]["disk"] == {"image": "el9-worker", "version": "1.0", "sha256": sha, "size": IMAGE_BYTES}


def test_a_pilots_fetch_progress_is_the_starting_vms_reason_until_it_runs(site):
    subscribed(site)
    assert approve(site).status_code == 200
    lease_id, slot = site.svc.ready_lease()
    assert site.svc.start(lease_id, named()).status_code == 202
    (command,) = site.svc.store.commands(slot)
    site.svc.notify(slot, "node1", "fetching", command=command.id, vms=["vm1"],
                    message="fetching image el9-worker 1.0: 40% (1.2 of 3.0 MiB)")
    vm = site.svc.api("GET", f"/leases/{lease_id}/vms/vm1").json()
    assert (vm["state"], vm["reason"]) == ("starting", "fetching image el9-worker 1.0: 40% (1.2 of 3.0 MiB)")
    site.svc.notify(slot, "node1", "vm-running", command=command.id, vms=["vm1"])
    # A late progress report changes nothing once the start has its outcome.
    site.svc.notify(slot, "node1", "fetching", command=command.id, vms=["vm1"], message="fetching: 99%")
    vm = site.svc.api("GET", f"/leases/{lease_id}/vms/vm1").json()
    assert vm["state"] == "running" and "99%" not in vm["reason"]


def test_a_revoked_image_is_refused_and_leaves_the_image_store(site):
    subscribed(site)
    assert approve(site).status_code == 200
    revoked = site.svc.api("POST", "/images/el9-worker/revoke", json={"version": "1.0", "reason": "CVE-2026-1"})
    assert revoked.status_code == 200
    assert [(i["version"], i["state"]) for i in revoked.json()["images"]] == [("1.0", "revoked")]
    assert stored_files(site) == []
    lease_id, slot = site.svc.ready_lease()
    refused = site.svc.start(lease_id, named())
    assert refused.status_code == 409
    assert one_line_error(refused) == "VM vm1: disk: image el9-worker 1.0 is revoked by alice: CVE-2026-1"
    assert site.svc.commands(slot) == []


def test_a_tampered_image_is_not_approved_and_nothing_is_stored(site):
    subscribed(site)
    site.server.corrupt["el9-worker-1.0.qcow2"] = True
    before = site.svc.store.snapshot()
    response = approve(site)
    assert response.status_code == 502
    assert "sha256" in one_line_error(response) and "the list says" in one_line_error(response)
    assert site.svc.store.snapshot() == before
    assert stored_files(site) == []


def test_a_truncated_download_is_not_approved(site):
    subscribed(site)
    site.server.cut_after["el9-worker-1.0.qcow2"] = 1000
    before = site.svc.store.snapshot()
    response = approve(site)
    assert response.status_code == 502, response.text
    assert site.svc.store.snapshot() == before and stored_files(site) == []


def test_an_endorser_key_no_longer_trusted_stops_new_vms(site):
    subscribed(site)
    assert approve(site).status_code == 200
    os.unlink(site.root / "endorsers" / "hep-images.pem")
    lease_id, _ = site.svc.ready_lease()
    refused = site.svc.start(lease_id, named())
    assert refused.status_code == 409 and "no longer trusted" in one_line_error(refused)


def test_two_approved_versions_need_the_version_named(site):
    subscribed(site)
    assert approve(site, version="1.0").status_code == 200
    assert approve(site, version="1.1").status_code == 200
    lease_id, _ = site.svc.ready_lease()
    refused = site.svc.start(lease_id, named(version=None))
    assert refused.status_code == 409 and 'say which with "version"' in one_line_error(refused)
    assert site.svc.start(lease_id, named(version="1.1")).status_code == 202
    ambiguous = site.svc.api("POST", "/images/el9-worker/approve", json={})
    assert ambiguous.status_code == 409 and "name one with --version" in one_line_error(ambiguous)


# -- the pilots' fetch ----------------------------------------------------------------------------------


def test_a_pilot_holding_the_slot_fetches_an_approved_image_whole_or_from_an_offset(site):
    subscribed(site)
    assert approve(site).status_code == 200
    lease_id, slot = site.svc.ready_lease(("node1",))
    sha = site.entries[0]["sha256"]
    with open(site.root / "image-store" / sha, "rb") as handle:
        content = handle.read()
    url = f"{site.svc.url}/pilot/v2/slots/{slot}/hosts/node1/images/{sha}"
    whole = site.svc.pilot_session("node1").get(url, timeout=10)
    assert whole.status_code == 200 and whole.content == content
    tail = site.svc.pilot_session("node1").get(url, headers={"Range": "bytes=1000000-"}, timeout=10)
    assert tail.status_code == 206 and tail.content == content[1000000:]
    # Another node, for this host's path: 403. Another node for its own path without a slot: 404.
    assert site.svc.pilot_session("node2").get(url, timeout=10).status_code == 403
    other = f"{site.svc.url}/pilot/v2/slots/{slot}/hosts/node2/images/{sha}"
    assert site.svc.pilot_session("node2").get(other, timeout=10).status_code == 404
    # An image that is not approved (1.1), or no image at all: 404. No credentials: 401.
    unapproved = url.replace(sha, site.entries[1]["sha256"])
    assert site.svc.pilot_session("node1").get(unapproved, timeout=10).status_code == 404
    assert site.svc.pilot_session("node1").get(url[:-64] + "x" * 64, timeout=10).status_code == 404
    assert requests.get(url, timeout=10).status_code == 401


# -- the command line -----------------------------------------------------------------------------------


def cli(site, *args: str) -> subprocess.CompletedProcess:
    secret = site.root / "operator.secret"
    secret.write_text("alice-secret-0123\n")
    os.chmod(secret, 0o600)
    return subprocess.run(
        [sys.executable, "-m", "service_adapter", *args, "--url", site.svc.url, "--user", "alice",
         "--secret-file", str(secret)],
        capture_output=True, text=True, timeout=60,
    )


def test_cli_keygen_sign_subscribe_approve_and_a_bad_list_exit_9(site, tmp_path):
    keys = tmp_path / "cli-keys"
    keys.mkdir()
    made = subprocess.run([sys.executable, "-m", "service_adapter", "image", "keygen", "--private",
                           str(keys / "ops.key"), "--public", str(keys / "ops.pem")], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert oct(os.stat(keys / "ops.key").st_mode & 0o777) == "0o600"
    again = subprocess.run([sys.executable, "-m", "service_adapter", "image", "keygen", "--private",
                            str(keys / "ops.key"), "--public", str(keys / "ops2.pem")], capture_output=True, text=True)
    assert again.returncode == 2 and "exists already" in again.stderr
    unsigned = tmp_path / "ops.json"
    unsigned.write_text(json.dumps(site.endorser.payload(site.entries, identifier="ops-images")))
    signed = site.published / "ops.list"
    result = subprocess.run([sys.executable, "-m", "service_adapter", "image", "sign", str(unsigned), "--key",
                             str(keys / "ops.key"), "--output", str(signed)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # Not trusted yet: exit 9, one line, nothing subscribed.
    refused = cli(site, "image", "subscribe", f"{site.server.url}/ops.list")
    assert refused.returncode == 9 and len(refused.stderr.strip().splitlines()) == 1
    assert "not a trusted endorser key" in refused.stderr
    # Trusted (the file appears in the directory; no restart): subscribed, listed, approved.
    (site.root / "endorsers" / "ops.pem").write_bytes((keys / "ops.pem").read_bytes())
    ok = cli(site, "image", "subscribe", f"{site.server.url}/ops.list")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("subscribed ops-images issue 1 by HEP VM images team (key ops)")
    approved = cli(site, "image", "approve", "el9-worker", "--version", "1.0")
    assert approved.returncode == 0, approved.stderr
    listing = cli(site, "image", "list")
    assert "el9-worker  1.0      approved" in listing.stdout and "yes" in listing.stdout
    missing = cli(site, "image", "show", "nothing-here")
    assert missing.returncode == 6
    as_json = json.loads(cli(site, "image", "show", "el9-worker", "--json").stdout)
    assert [v["state"] for v in as_json["versions"]] == ["approved", "endorsed"]


# -- leases that name their images ------------------------------------------------------------------------


def test_a_lease_naming_an_unapproved_image_is_refused_and_nothing_is_submitted(site):
    subscribed(site)
    before = site.svc.store.snapshot()
    response = site.svc.api("POST", "/leases", json={"nodes": 1, "memory_mb": 512, "duration_s": 60,
                                                     "images": [{"image": "el9-worker", "version": "1.0"}]})
    assert response.status_code == 409 and "images[0]: image el9-worker 1.0 is endorsed but not approved" in \
        one_line_error(response)
    assert site.svc.store.snapshot() == before and site.svc.provider.submitted == []
    path_given = site.svc.api("POST", "/leases", json={"nodes": 1, "memory_mb": 512, "duration_s": 60,
                                                       "images": [{"path": "x", "sha256": "a" * 64}]})
    assert path_given.status_code == 400 and "name a listed image" in one_line_error(path_given)


def test_each_host_of_a_lease_with_images_is_told_to_prefetch_them_once_it_has_reserved(site):
    subscribed(site)
    assert approve(site).status_code == 200
    made = site.svc.api("POST", "/leases", json={"nodes": 2, "memory_mb": 512, "duration_s": 60,
                                                 "images": [{"image": "el9-worker"}]})
    assert made.status_code == 201, made.text
    slot = made.json()["slot"]
    assert site.svc.commands(slot) == []
    site.svc.notify(slot, "node1", "reserved", memory_mb=512)
    wanted = {"image": "el9-worker", "version": "1.0", "sha256": site.entries[0]["sha256"], "size": IMAGE_BYTES}
    assert site.svc.commands(slot) == [("node1", "prefetch", {"op": "prefetch", "images": [wanted]})]
    site.svc.notify(slot, "node2", "reserved", memory_mb=512)
    assert [host for host, op, _ in site.svc.commands(slot) if op == "prefetch"] == ["node1", "node2"]


def test_a_pilots_cache_retires_what_the_site_no_longer_approves_at_its_first_use(site, tmp_path):
    from pilot.images.cache import ImageCache
    from pilot.images.fetch import ImageSource, NodeImages
    from workspace_common.protocol import ImageFile

    subscribed(site)
    assert approve(site, version="1.0").status_code == 200
    assert approve(site, version="1.1").status_code == 200
    _, slot = site.svc.ready_lease(("node1",))
    key = site.svc.sign_key(slot, "node1")
    source = ImageSource(site.svc.pilot_session("node1"), site.svc.url, slot, "node1")
    assert source.approved(key) == {e["sha256"] for e in site.entries}
    with pytest.raises(Exception, match="signature is wrong"):
        source.approved("0" * 64)  # an answer not signed with this (slot, host)'s key is ignored
    cache_dir = str(tmp_path / "node-cache")
    old, new = site.entries
    first = NodeImages(ImageCache(cache_dir, 1 << 40), source, key=key)
    first.ensure(ImageFile(None, old["sha256"], "el9-worker", "1.0", old["size"]))
    site.svc.api("POST", "/images/el9-worker/revoke", json={"version": "1.0"})
    # The next pilot on the node: at its first use of the cache, 1.0 goes (1.1, still approved, is fetched).
    second = NodeImages(ImageCache(cache_dir, 1 << 40), source, key=key)
    second.ensure(ImageFile(None, new["sha256"], "el9-worker", "1.1", new["size"]))
    assert sorted(n for n in os.listdir(cache_dir) if len(n) == 64) == [new["sha256"]]
