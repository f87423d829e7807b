"""What the image tests stand on: an endorser with a real Ed25519 key, and a real HTTP server for lists and images.

:class:`Endorser` writes and signs image lists with the project's own
signing code (the same that ``workspace-lease image sign`` runs).
:class:`ImageServer` is a real HTTP/1.1 server on 127.0.0.1 in a thread,
serving the files of a directory with Range requests, that records every
request and can be told to misbehave the way real servers do: cut a
transfer short, or serve other bytes than the file's.
"""

from __future__ import annotations

import datetime
import hashlib
import http.server
import os
import re
import threading

from service_adapter.images.imagelist import FORMAT, generate_key, load_private_key, sign_list


def utc(offset_s: float) -> str:
    """A list time ``offset_s`` from now."""
    moment = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=offset_s)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class Endorser:
    """An endorser: a key pair in ``directory`` and the lists it signs."""

    def __init__(self, directory: str, name: str = "hep-images"):
        os.makedirs(directory, exist_ok=True)
        self.name = name
        self.private = os.path.join(directory, f"{name}.key")
        self.public = os.path.join(directory, f"{name}.pem")
        self.key_id = generate_key(self.private, self.public)
        self.key = load_private_key(self.private)

    def trust_in(self, keys_dir: str) -> None:
        """Put the public key where a site trusts it (``[images] endorser_keys``)."""
        os.makedirs(keys_dir, exist_ok=True)
        with open(self.public, "rb") as src, open(os.path.join(keys_dir, f"{self.name}.pem"), "wb") as dst:
            dst.write(src.read())

    def payload(self, images: list[dict], *, identifier: str = "hep-worker-images", version: int = 1,
                expires_in_s: float = 86400, issued_ago_s: float = 60) -> dict:
        """A list as the endorser writes it (unsigned)."""
        return {"format": FORMAT, "identifier": identifier, "endorser": "HEP VM images team", "version": version,
                "issued": utc(-issued_ago_s), "expires": utc(expires_in_s), "images": images}

    def publish(self, path: str, images: list[dict], **fields) -> bytes:
        """Sign a list and write it to ``path``; the envelope's bytes."""
        envelope = sign_list(self.payload(images, **fields), self.key)
        with open(path, "wb") as handle:
            handle.write(envelope)
        return envelope


def image_entry(identifier: str, version: str, path: str, url: str, **extra) -> dict:
    """A list entry for the file at ``path``, fetched from ``url``."""
    with open(path, "rb") as handle:
        data = handle.read()
    return {"identifier": identifier, "version": version, "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data), "urls": [url], **extra}


class ImageServer:
    """A real HTTP server on 127.0.0.1 serving ``directory``; ``requests`` logs (path, Range header or None).

    ``pause_after[name] = N`` sends N bytes of the next answer for ``/name``,
    sets ``paused`` and holds the rest until ``resume`` is set.
    ``cut_after[name] = N`` makes the next answer for ``/name`` stop after N
    bytes of body (the connection closed mid-transfer, the headers having
    promised the whole); ``corrupt[name] = True`` serves other bytes of the
    same length. ``by_basename`` serves a file under every path that ends in its name.
    """

    def __init__(self, directory: str, *, by_basename: bool = False):
        self.directory = directory
        self.requests: list[tuple[str, str | None]] = []
        self.cut_after: dict[str, int] = {}
        self.corrupt: dict[str, bool] = {}
        #: pause_after[name] = N: send N bytes of the body, then wait until ``resume`` is set.
        self.pause_after: dict[str, int] = {}
        self.paused = threading.Event()
        self.resume = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # the test's output stays readable
                pass

            def do_GET(self):
                # by_basename: /any/prefix/NAME serves NAME (an image endpoint's path, as the service has it).
                name = self.path.rsplit("/", 1)[-1] if by_basename else self.path.lstrip("/")
                server.requests.append((self.path, self.headers.get("Range")))
                path = os.path.join(server.directory, name)
                if "/" in name or not os.path.isfile(path):
                    self.send_error(404)
                    return
                with open(path, "rb") as handle:
                    data = handle.read()
                if server.corrupt.get(name):
                    data = bytes(b ^ 0x5A for b in data)
                start, end, status = 0, len(data) - 1, 200
                wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
                if wanted and int(wanted.group(1)) < len(data):
                    start, status = int(wanted.group(1)), 206
                    end = min(int(wanted.group(2) or end), end)
                body = data[start:end + 1]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.end_headers()
                pause = server.pause_after.pop(name, None)
                if pause is not None:
                    self.wfile.write(body[:pause])
                    self.wfile.flush()
                    server.paused.set()
                    server.resume.wait(60)
                    body = body[pause:]
                cut = server.cut_after.pop(name, None)
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="image-server", daemon=True)
        self._thread.start()

    def gets(self, name: str) -> list[str | None]:
        """The Range header of every GET of ``/name`` so far (None: the whole file)."""
        return [rng for path, rng in self.requests if path == f"/{name}"]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def write_file(path: str, size: int, seed: int = 1) -> str:
    """A file of ``size`` bytes of deterministic, incompressible-looking content; its sha256."""
    digest = hashlib.sha256()
    block = hashlib.sha256(str(seed).encode()).digest() * 32768  # 1 MiB
    with open(path, "wb") as handle:
        left = size
        while left:
            chunk = block[:min(left, len(block))]
            handle.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()

