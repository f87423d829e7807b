"""The pilot's first notification, tried once with the standard library before ``requests`` is loaded.

Importing ``requests`` costs about 100 ms of CPU on our nodes (urllib3, charset detection,
cookie jars), against about 25 ms for ``http.client``; on the pilot's start path that import
sat between the memory take and the ``reserved`` send, the one moment the lease waits for
(BENCHMARKS.md, issue 17). So the notifier's thread sends its first notification once through
:class:`FirstShot` (HTTP Digest SHA-256 from :mod:`workspace_common.protocol.digest`, the same signed body)
and only then imports ``requests``, which stays the client for everything after: retries,
later notifications, the command poll, images.

Whatever goes wrong (no connection, a 5xx, an unexpected challenge) is not decided here:
:meth:`FirstShot.post` raises :class:`FirstShotFailed` and the notifier sends the same body again
through ``requests`` with its retries, which the service takes as an exact repeat if the first
did arrive. The first shot is not used where ``requests`` would behave differently: behind a
proxy named in the environment.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.parse

from workspace_common.protocol.digest import parse_params, response_digest
from workspace_common.protocol.keys import digest_ha1

#: Environment variables through which ``requests`` would send via a proxy; if any is set,
#: the first shot stands aside rather than go direct where ``requests`` would not.
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
#: The most of an answer's body that is kept (a refusal's detail); as much again is read and dropped, and an
#: answer longer than that is not read to its end (its connection is closed).
MAX_ANSWER_BYTES = 64 * 1024


class FirstShotFailed(Exception):
    """The first shot got no final answer; the notifier tries again through ``requests``."""


class FirstShot:
    """One digest-authenticated POST over ``http.client``: at most two requests on one connection
    (the challenge, then the answer), no retries.

    ``verify_tls`` means what the notifier's ``requests`` session makes of it: False checks
    nothing, a path is the CA file, True is ``$REQUESTS_CA_BUNDLE``, ``$CURL_CA_BUNDLE`` or
    certifi's bundle, in that order, as ``requests`` does.
    """

    def __init__(self, url: str, user: str, password: str, *, verify_tls: bool | str = True):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port
        self.path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.user = user
        self.password = password
        self.verify_tls = verify_tls
        #: The last answer's Retry-After header (None: none, or no answer yet); the notifier honours it on a 429.
        self.retry_after: str | None = None

    @staticmethod
    def applies(env=os.environ) -> bool:
        """Whether the first shot may be used: no proxy variable set."""
        return not any(env.get(name) for name in PROXY_VARIABLES)

    def post(self, body: bytes, headers: dict[str, str], timeout: float) -> tuple[int, str]:
        """POST ``body``; returns the final (status, detail) of the authenticated request.

        Raises :class:`FirstShotFailed` when there is no final answer: no connection, a timeout,
        a malformed or missing challenge.
        """
        connection = self._connect(timeout)
        try:
            sent = {"Content-Type": "application/json", **headers}
            status, answer, challenge = self._request(connection, body, sent)
            if status == 401:
                sent["Authorization"] = self._authorization(challenge)
                # A second 401 is final, as it is for requests' digest auth: a wrong key or signature.
                status, answer, _ = self._request(connection, body, sent)
            return status, _detail(status, answer)
        except (OSError, http.client.HTTPException) as exc:
            raise FirstShotFailed(f"{type(exc).__name__}: {exc}") from exc
        finally:
            connection.close()

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        if self.scheme == "http":
            return http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        import ssl

        context = ssl.create_default_context(cafile=self._ca_file())
        if self.verify_tls is False:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=context)

    def _ca_file(self) -> str | None:
        if self.verify_tls is False:
            return None
        if isinstance(self.verify_tls, str):
            return self.verify_tls
        found = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        if found:
            return found
        import certifi

        return certifi.where()

    def _request(self, connection, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, str]:
        connection.request("POST", self.path, body=body, headers=headers)
        response = connection.getresponse()
        answer = response.read(MAX_ANSWER_BYTES)
        if not response.isclosed():
            # The rest, up to as much again, so the connection can carry the authenticated request; an answer
            # that goes on is not read: the connection is closed, and http.client opens another for the next.
            response.read(MAX_ANSWER_BYTES)
            if not response.isclosed():
                connection.close()
        self.retry_after = response.getheader("Retry-After")
        return response.status, answer, response.getheader("WWW-Authenticate", "")

    def _authorization(self, challenge: str) -> str:
        # The service offers SHA-256 first; several challenges come in one header joined by ", Digest ".
        for offer in challenge.split(", Digest "):
            offer = offer[7:] if offer.startswith("Digest ") else offer
            params = parse_params(offer)
            if params and params.get("algorithm") == "SHA-256" and "nonce" in params and "realm" in params:
                break
        else:
            raise FirstShotFailed(f"no SHA-256 digest challenge in {challenge[:200]!r}")
        nc, cnonce = "00000001", os.urandom(16).hex()
        ha1 = digest_ha1(self.user, params["realm"], self.password)
        response = response_digest("SHA-256", ha1, params["nonce"], nc, cnonce, "POST", self.path)
        fields = [
            f'username="{self.user}"', f'realm="{params["realm"]}"', f'nonce="{params["nonce"]}"',
            f'uri="{self.path}"', "algorithm=SHA-256", f'response="{response}"', "qop=auth", f"nc={nc}",
            f'cnonce="{cnonce}"',
        ]
        if "opaque" in params:
            fields.append(f'opaque="{params["opaque"]}"')
        return "Digest " + ", ".join(fields)


def _detail(status: int, answer: bytes) -> str:
    """A refusal's detail, as the notifier's requests path reads it: the service's ``detail``, or the text."""
    if status == 200:
        return ""
    try:
        parsed = json.loads(answer)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        return str(parsed.get("detail", ""))
    return answer[:200].decode("utf-8", "replace")
