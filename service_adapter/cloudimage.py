"""The cloud image of ``scripts/build-cloud-image.sh`` as a site meets it: endorsed, approved, and a VM spec of it.

Used by ``workspace-lease demo --vm``, its test, the cloud-image tests and
``bench/bench_cloud_path.py``, so all of them take the same path a site
takes: an endorser's key signs a list of the image's files, the site
trusts the key, subscribes to the list and approves each file (fetched from
``url_for(name)``, ``file://`` by default, into the site's image store).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import shutil

#: (list identifier, file in the image directory)
IMAGE_FILES = (("debian12-cloud", "disk.qcow2"), ("debian12-cloud-kernel", "vmlinuz"),
               ("debian12-cloud-initrd", "initrd.img"))
#: The image's root is the whole disk (no partition table); a panic ends the domain.
CMDLINE = "root=/dev/vda rw console=ttyS0 panic=-1"
USER = "debian"  # the image's user: cloud-init puts the owner's key there
LIST_ID = "debian12-cloud-images"


def _entry(identifier: str, path: str, url: str) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return {"identifier": identifier, "version": "1", "sha256": digest.hexdigest(), "size": os.path.getsize(path),
            "urls": [url]}


def endorse_cloud_image(catalog, image_dir: str, endorser_dir: str, by: str, url_for=None) -> str:
    """Sign a list of the image's files with a new key in ``endorser_dir``, trust it, subscribe, approve; the key's id.

    ``catalog`` is the site's :class:`~service_adapter.images.catalog.ImageCatalog`; raises its ImageRefused when
    the site refuses the list or a file.
    """
    from service_adapter.images.imagelist import FORMAT, generate_key, load_private_key, sign_list

    image_dir = os.path.abspath(image_dir)
    url_for = url_for or (lambda name: f"file://{os.path.join(image_dir, name)}")
    os.makedirs(endorser_dir, mode=0o700, exist_ok=True)
    private, public = os.path.join(endorser_dir, "cloud-images.key"), os.path.join(endorser_dir, "cloud-images.pem")
    kid = generate_key(private, public)
    os.makedirs(catalog.keys_dir, exist_ok=True)
    shutil.copyfile(public, os.path.join(catalog.keys_dir, "cloud-images.pem"))
    now = datetime.datetime.now(datetime.timezone.utc)
    stamp = lambda moment: moment.strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: E731
    payload = {"format": FORMAT, "identifier": LIST_ID, "endorser": "this project's build-cloud-image.sh",
               "version": 1, "issued": stamp(now - datetime.timedelta(minutes=1)),
               "expires": stamp(now + datetime.timedelta(days=1)),
               "images": [_entry(identifier, os.path.join(image_dir, name), url_for(name))
                          for identifier, name in IMAGE_FILES]}
    list_path = os.path.join(endorser_dir, f"{LIST_ID}.list")
    with open(list_path, "wb") as handle:
        handle.write(sign_list(payload, load_private_key(private)))
    catalog.subscribe(list_path, by)
    for identifier, _ in IMAGE_FILES:
        catalog.approve(identifier, "1", by)
    return kid


def cloud_vm_spec(name: str, host: str, memory_mb: int, key: str, user_data: str | None = None) -> dict:
    """A VM of the approved image on ``host``: host name ``name``, the owner's public ``key``, ``user_data``."""
    listed = lambda identifier: {"image": identifier, "version": "1"}  # noqa: E731
    context = {"hostname": name, "ssh_authorized_keys": [key]}
    if user_data is not None:
        context["user_data"] = user_data
    return {"name": name, "memory_mb": memory_mb, "host": host, "disk": listed("debian12-cloud"),
            "boot": {"kernel": listed("debian12-cloud-kernel"), "initrd": listed("debian12-cloud-initrd"),
                     "cmdline": CMDLINE},
            "console_log": f"{name}.log", "context": context}
