"""The digest verifier against real clients (requests, curl --digest) on a real receiver."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid

import pytest
import requests

from workspace_common.protocol import SIGNATURE_HEADER, digest_ha1, sign
from service_adapter.digest import DigestVerifier, parse_params, response_digest
from tests.support.service import REALM, Service, notification

USER = "node1"  # a node's account is its host name

PATH = "/pilot/v2/notifications"


class Clock:
    """A clock the test moves by hand, so nonce expiry needs no waiting."""

    def __init__(self):
        import time

        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def svc(tmp_path, clock):
    service = Service(str(tmp_path), verifier_options={"clock": clock, "nonce_lifetime": 60})
    yield service
    service.close()


def fresh_nonce(svc: Service) -> str:
    """Ask the receiver for a challenge (an unauthenticated POST) and return its nonce."""
    response = requests.post(svc.notifications_url, data=b"{}", timeout=10)
    assert response.status_code == 401
    challenge = response.raw.headers.getlist("WWW-Authenticate")[0]  # the first, SHA-256
    assert challenge.startswith("Digest ")
    return parse_params(challenge[7:])["nonce"]


def authorization(nonce: str, *, secret: str, realm: str = REALM, nc: int = 1,
                  algorithm: str = "SHA-256", user: str = USER, uri: str = PATH) -> str:
    """An Authorization header built by hand, for the cases the real clients will not produce."""
    cnonce = uuid.uuid4().hex
    ha1 = digest_ha1(user, realm, secret, algorithm)
    nc_text = f"{nc:08x}"
    response = response_digest(algorithm, ha1, nonce, nc_text, cnonce, "POST", uri)
    return (
        f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
        f'response="{response}", qop=auth, nc={nc_text}, cnonce="{cnonce}", algorithm={algorithm}'
    )


def signed_post(svc: Service, auth_header: str, body: bytes) -> requests.Response:
    import json

    key = svc.sign_key(json.loads(body)["slot"], USER)
    headers = {"Authorization": auth_header, SIGNATURE_HEADER: sign(key, body)}
    return requests.post(svc.notifications_url, data=body, headers=headers, timeout=10)


def test_response_digest_matches_rfc7616_examples():
    nonce = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v"
    cnonce = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"
    for algorithm, expected in [
        ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
        ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
    ]:
        ha1 = digest_ha1("Mufasa", "http-auth@example.org", "Circle of Life", algorithm)
        assert response_digest(algorithm, ha1, nonce, "00000001", cnonce, "GET", "/dir/index.html") == expected


def test_challenge_offers_sha256_with_qop_auth(svc):
    response = requests.post(svc.notifications_url, data=b"{}", timeout=10)
    assert response.status_code == 401
    params = parse_params(response.headers["WWW-Authenticate"][7:])
    assert params["algorithm"] == "SHA-256"
    assert params["qop"] == "auth"
    assert params["realm"] == REALM
    assert "stale" not in params


# -- requests' HTTPDigestAuth ------------------------------------------------------------


def test_requests_with_right_password_is_accepted(svc):
    slot = svc.add_slot()
    session = svc.session()
    for seq in (1, 2, 3):  # the 2nd and 3rd reuse the nonce with a higher nc
        response = svc.post(session, notification(slot, seq=seq).to_json())
        assert response.status_code == 200, response.text
    assert [row[1] for row in svc.store.notifications(slot)] == [1, 2, 3]


def test_requests_with_wrong_password_is_refused(svc):
    slot = svc.add_slot()
    response = svc.post(svc.session(key="0" * 64), notification(slot).to_json())
    assert response.status_code == 401
    assert svc.store.notifications(slot) == []


def test_requests_recovers_from_an_expired_nonce_via_stale(svc, clock):
    slot = svc.add_slot()
    session = svc.session()
    assert svc.post(session, notification(slot, seq=1).to_json()).status_code == 200
    clock.now += 61  # the cached nonce is now expired
    response = svc.post(session, notification(slot, seq=2).to_json())
    assert response.status_code == 200
    stale_answer = response.history[-1]
    assert stale_answer.status_code == 401
    assert "stale=true" in stale_answer.headers["WWW-Authenticate"]


# -- curl --digest ----------------------------------------------------------------------------


def curl(svc: Service, body: bytes, password: str, tmp_path) -> int:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (scripts/bootstrap.sh installs it)")
    body_file = tmp_path / "body.json"
    body_file.write_bytes(body)
    result = subprocess.run(
        ["curl", "--silent", "--show-error", "--digest", "--user", f"{USER}:{password}",
         "--header", "Content-Type: application/json",
         "--header", f"{SIGNATURE_HEADER}: {sign(svc.sign_key(json.loads(body)['slot'], USER), body)}",
         "--data-binary", f"@{body_file}", "--output", os.devnull, "--write-out", "%{http_code}",
         svc.notifications_url],
        capture_output=True, text=True, timeout=30, check=True,
    )
    return int(result.stdout)


def test_curl_with_right_password_is_accepted(svc, tmp_path):
    slot = svc.add_slot()
    assert curl(svc, notification(slot).to_json(), svc.node_key(), tmp_path) == 200
    assert len(svc.store.notifications(slot)) == 1


def test_curl_with_wrong_password_is_refused(svc, tmp_path):
    slot = svc.add_slot()
    assert curl(svc, notification(slot).to_json(), "not-the-secret", tmp_path) == 401
    assert svc.store.notifications(slot) == []


# -- hand-built headers for what real clients will not send --------------------------------------


def test_hand_built_header_is_accepted_when_right(svc):
    slot = svc.add_slot()
    header = authorization(fresh_nonce(svc), secret=svc.node_key())
    assert signed_post(svc, header, notification(slot).to_json()).status_code == 200


def test_wrong_realm_is_refused(svc):
    slot = svc.add_slot()
    header = authorization(fresh_nonce(svc), secret=svc.node_key(), realm="other-realm")
    assert signed_post(svc, header, notification(slot).to_json()).status_code == 401
    assert svc.store.notifications(slot) == []


def test_replayed_nonce_count_is_refused(svc):
    slot = svc.add_slot()
    nonce = fresh_nonce(svc)
    assert signed_post(svc, authorization(nonce, secret=svc.node_key(), nc=5),
                       notification(slot, seq=1).to_json()).status_code == 200
    for nc in (5, 4):  # the same count again, and a smaller one
        answer = signed_post(svc, authorization(nonce, secret=svc.node_key(), nc=nc), notification(slot, seq=2).to_json())
        assert answer.status_code == 401
    assert [row[1] for row in svc.store.notifications(slot)] == [1]


def test_expired_nonce_is_refused_as_stale(svc, clock):
    slot = svc.add_slot()
    nonce = fresh_nonce(svc)
    clock.now += 61
    answer = signed_post(svc, authorization(nonce, secret=svc.node_key()), notification(slot).to_json())
    assert answer.status_code == 401
    assert "stale=true" in answer.headers["WWW-Authenticate"]
    assert svc.store.notifications(slot) == []


def test_expired_nonce_with_wrong_password_is_not_called_stale(svc, clock):
    nonce = fresh_nonce(svc)
    clock.now += 61
    answer = signed_post(svc, authorization(nonce, secret="wrong"), notification(svc.add_slot()).to_json())
    assert answer.status_code == 401
    assert "stale" not in answer.headers["WWW-Authenticate"]


def test_forged_nonce_is_refused(svc):
    forged = fresh_nonce(svc)[:-4] + "AAAA"
    answer = signed_post(svc, authorization(forged, secret=svc.node_key()), notification(svc.add_slot()).to_json())
    assert answer.status_code == 401


def test_md5_is_refused_when_not_configured(svc):
    slot = svc.add_slot()
    header = authorization(fresh_nonce(svc), secret=svc.node_key(), algorithm="MD5")
    assert signed_post(svc, header, notification(slot).to_json()).status_code == 401
    assert svc.store.notifications(slot) == []


def test_md5_is_accepted_when_configured(tmp_path):
    svc = Service(str(tmp_path), verifier_options={"allow_md5": True})
    try:
        challenges = requests.post(svc.notifications_url, data=b"{}", timeout=10).headers["WWW-Authenticate"]
        assert "algorithm=SHA-256" in challenges and "algorithm=MD5" in challenges
        slot = svc.add_slot()
        header = authorization(fresh_nonce(svc), secret=svc.node_key(), algorithm="MD5")
        assert signed_post(svc, header, notification(slot).to_json()).status_code == 200
    finally:
        svc.close()


def test_uri_of_another_resource_is_refused(svc):
    header = authorization(fresh_nonce(svc), secret=svc.node_key(), uri="/elsewhere")
    assert signed_post(svc, header, notification(svc.add_slot()).to_json()).status_code == 401


def test_unknown_user_is_refused(svc):
    header = authorization(fresh_nonce(svc), secret=svc.node_key(), user="intruder")
    assert signed_post(svc, header, notification(svc.add_slot()).to_json()).status_code == 401


# -- the verifier on its own ------------------------------------------------------------------


def test_verifier_keeps_no_password():
    from service_adapter.digest import Account

    account = Account.from_secret(USER, REALM, "hunter2")
    verifier = DigestVerifier(REALM, {USER: account})
    assert "hunter2" not in repr(verifier.__dict__) + repr(account)


@pytest.mark.parametrize(
    "header",
    [None, "", "Basic cGlsb3Q6cw==", "Digest ", 'Digest username="a", username="b"', "Digest garbage"],
)
def test_malformed_headers_are_refused(header):
    verifier = DigestVerifier(REALM, {})
    assert not verifier.verify("POST", PATH, header).ok


def test_parse_params_unescapes_quoted_values():
    assert parse_params(r'a="x\"y", b=token, c=""') == {"a": 'x"y', "b": "token", "c": ""}
    assert re.fullmatch(r"[A-Za-z0-9_-]+", DigestVerifier(REALM, {}).new_nonce())


@pytest.mark.parametrize("text, expected", [
    (r'a="x\\", b="y\\\"z"', {"a": "x\\", "b": 'y\\"z'}),  # escaped backslashes, then an escaped quote
    (r'a="a\"b\"c",b=1', {"a": 'a"b"c', "b": "1"}),
    (' a = "q" ,b=', {"a": "q", "b": ""}),
    ("x=1,", {"x": "1"}),
    ("", {}),
    ("a=1,, b=2", None),  # an empty element
    ("a=1 b=2", None),  # no comma between
    ("a=1, A=2", None),  # a name twice, whatever its case
    ("a", None),
])
def test_parse_params_reads_each_element_or_refuses_the_header(text, expected):
    assert parse_params(text) == expected
