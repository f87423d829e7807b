"""The operators' door of a real ``workspace-lease serve``: a listener of its own, and password guessing held back.

The service runs as a real process with ``[operators] listen`` on a
second port (as the packaged config has it); real clients (``requests``
with digest auth from chosen loopback addresses, the real CLI, real
pilots through the ``local`` provider) check what an admin depends on:
the pilots' port does not answer the API, the operators' port does, and a
guesser from one address gets a few tries a minute while an operator
elsewhere is not slowed.
"""

from __future__ import annotations

import json
import time

import pytest
import requests
from requests.auth import HTTPDigestAuth

from tests.support.ports import free_port
from tests.support.rawhttp import HANG_S, log_text, session
from tests.support.site import OPERATOR, OPERATOR_SECRET, Site, serving
from tests.support.rawhttp import guess


def apart(site: Site) -> str:
    """Give ``site``'s config an operators' listener of its own; its base URL."""
    port = free_port()
    with open(site.config, encoding="utf-8") as handle:
        text = handle.read()
    with open(site.config, "w", encoding="utf-8") as handle:
        handle.write(text.replace("[operators]\n", f"[operators]\nlisten = 127.0.0.1:{port}\n", 1))
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def door(tmp_path_factory):
    site = Site(tmp_path_factory.mktemp("door"))
    site.operators_url = apart(site)
    with serving(site):
        yield site


def test_the_api_and_metrics_answer_on_the_operators_listener_only_and_a_lease_runs(tmp_path, hugepages):
    site = Site(tmp_path)
    operators = apart(site)
    auth = HTTPDigestAuth(OPERATOR, OPERATOR_SECRET)
    with serving(site):
        assert requests.get(f"{operators}/api/v1/leases", auth=auth, timeout=HANG_S).status_code == 200
        assert requests.get(f"{operators}/metrics", auth=auth, timeout=HANG_S).status_code == 200
        # The pilots' port: no API and no metrics, whatever the credentials.
        assert requests.get(f"{site.url}/api/v1/leases", auth=auth, timeout=HANG_S).status_code == 404
        assert requests.get(f"{site.url}/metrics", auth=auth, timeout=HANG_S).status_code == 404
        # The operator's commands find the API through the config; the pilots notify the pilots' port.
        reserved = site.cli("reserve", "--nodes", "1", "--memory", "16", "--duration", "60", "--json", "--wait")
        assert reserved.returncode == 0, reserved.stderr
        lease = json.loads(reserved.stdout)
        assert lease["state"] == "ready"
        released = site.cli("release", lease["id"], "--wait")
        assert released.returncode == 0, released.stderr
    assert f"operators' API on http://127.0.0.1:{operators.rsplit(':', 1)[1]}" in log_text(site)


def test_a_password_guesser_is_held_to_one_try_every_2_s_and_an_operator_elsewhere_is_not_slowed(door):
    guesses = []
    url = f"{door.operators_url}/api/v1/leases"
    started = time.monotonic()
    with session("127.0.0.41") as guesser:
        for _ in range(40):  # one guess each: a fresh challenge, then one request with a wrong secret
            guesses.append(guesser.get(url, headers={"Authorization": guess(url, "wrong-guess")}, timeout=HANG_S))
    elapsed = time.monotonic() - started
    statuses = [answer.status_code for answer in guesses]
    assert set(statuses) == {401, 429}, statuses
    # Checked: the first 10, then what the bucket refilled at one every 2 s while the guesses went on.
    assert 10 <= statuses.count(401) <= 10 + int(elapsed / 2) + 1, (statuses, elapsed)
    held = [answer for answer in guesses if answer.status_code == 429]
    assert 1 <= int(held[-1].headers["Retry-After"]) <= 2
    # While held, even the right password from that address is refused unchecked (a guess learns nothing) ...
    with session("127.0.0.41", OPERATOR, OPERATOR_SECRET) as same_address:
        assert same_address.get(f"{door.operators_url}/api/v1/leases", timeout=HANG_S).status_code == 429
        # ... and another address is served at once.
        with session("127.0.0.42", OPERATOR, OPERATOR_SECRET) as elsewhere:
            assert elsewhere.get(f"{door.operators_url}/api/v1/leases", timeout=HANG_S).status_code == 200
        time.sleep(int(held[-1].headers["Retry-After"]) + 0.1)  # what the service asked for
        assert same_address.get(f"{door.operators_url}/api/v1/leases", timeout=HANG_S).status_code == 200
    # The log names the guesser, in a line or two, not one per guess (service_adapter.refusals).
    lines = [line for line in log_text(door).splitlines() if "127.0.0.41" in line]
    assert 1 <= len(lines) <= 2, lines


def test_the_cli_held_back_after_failed_logins_says_so_in_one_line_with_exit_5(tmp_path):
    site = Site(tmp_path)
    operators = apart(site)
    with serving(site):
        url = f"{operators}/api/v1/leases"
        statuses = [requests.get(url, headers={"Authorization": guess(url, "wrong")}, timeout=HANG_S).status_code
                    for _ in range(12)]  # from 127.0.0.1, where the operator's command runs too
        assert statuses[-1] == 429, statuses
        listed = site.cli("list")
    assert listed.returncode == 5, listed.stderr
    line = listed.stderr.strip()
    assert "\n" not in line and "429 too many failed logins from this address" in line and " s)" in line, line
