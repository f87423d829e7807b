"""The service on a PostgreSQL store: a whole lease through the real commands, and a database it cannot use.

Everything here runs against the session's real PostgreSQL server (``postgres_server``: Debian's binaries,
a cluster of the test session's own on 127.0.0.1, password authentication). The store's own behaviour is
tested on both backends by the store tests (``store_location``); this is what a site sees of the choice.
"""

from __future__ import annotations

import json

import pytest

from tests.support.channels import Channel
from tests.support.pool import pool_pages
from tests.support.ports import free_port
from tests.support.postgres import PostgresServer, rows_elsewhere, stored_seqs
from tests.support.site import CLI, Site, reserve_then_kill_serve, serving


def test_a_lease_on_a_postgresql_store_survives_the_service_and_ends_through_the_next(
        tmp_path, hugepages, postgres_server):
    """Reserve, SIGKILL serve while the lease is ready, a new serve on the same database ends it; the usage and
    the history are in the database, and no line of the service's shows the password."""
    url = postgres_server.new_database()
    site = Site(tmp_path, store=url)
    lease_id = reserve_then_kill_serve(site, hugepages)
    with serving(site):
        assert json.loads(site.cli("show", lease_id, "--json").stdout)["state"] == "ready"
        released = site.cli("release", lease_id, "--wait", "--json")
        assert released.returncode == 0, released.stderr + released.stdout
        assert json.loads(released.stdout)["state"] == "released"
        assert pool_pages() == hugepages
        used = json.loads(site.cli("usage", "--json").stdout)
        assert used["leases"] == 1 and used["node_seconds"] > 0
    states = [state for (state,) in rows_elsewhere(
        url, f"SELECT new_state FROM lease_events WHERE lease_id = '{lease_id}' ORDER BY seq")]
    assert states[0] == "pending" and "ready" in states and states[-1] == "released"
    hosts = rows_elsewhere(url, f"SELECT host, ended_by FROM usage WHERE lease_id = '{lease_id}' ORDER BY host")
    assert [host for host, _ in hosts] == ["local-node1", "local-node2"]
    assert postgres_server.password not in site.log_file.read_text()


def serve_once(site: Site):
    """``workspace-lease serve`` that is expected to stop at once; (exit code, its stderr's lines)."""
    import subprocess

    result = subprocess.run([*CLI, "serve", "--config", site.config], capture_output=True, text=True, timeout=60)
    return result.returncode, result.stderr.strip().splitlines()


@pytest.mark.parametrize("fault", ["no server", "wrong password", "no such database"])
def test_a_database_serve_cannot_use_is_one_line_and_exit_3(tmp_path, postgres_server, fault):
    url = {
        "no server": lambda: postgres_server.url("postgres").replace(f":{postgres_server.port}/",
                                                                     f":{free_port()}/"),
        "wrong password": lambda: postgres_server.url("postgres", password="not-the-password"),
        "no such database": lambda: postgres_server.url("t_never_made"),
    }[fault]()
    site = Site(tmp_path, store=url)
    code, lines = serve_once(site)
    assert code == 3 and len(lines) == 1, lines
    assert lines[0].startswith(f"workspace-lease: cannot serve: {site.config}: [service] store "
                               f"{site.store_shown}: cannot open the PostgreSQL store"), lines
    assert {"no server": "Connection refused", "wrong password": "password authentication failed",
            "no such database": 'database "t_never_made" does not exist'}[fault] in lines[0]
    assert postgres_server.password not in lines[0] and "not-the-password" not in lines[0]


def test_a_database_of_a_newer_schema_is_refused_in_one_line_and_left_as_it_was(tmp_path, postgres_server):
    from service_adapter.store import Store

    url = postgres_server.new_database()
    Store(url).close()
    rows_elsewhere(url, "UPDATE store_meta SET value = '99' WHERE name = 'schema_version'")
    tables = "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1"
    before = rows_elsewhere(url, tables), rows_elsewhere(url, "SELECT * FROM store_meta ORDER BY name")
    site = Site(tmp_path, store=url)
    code, lines = serve_once(site)
    assert code == 3 and len(lines) == 1, lines
    assert lines[0].endswith("has schema version 99, this workspace-pilot reads version 10: run the "
                             "workspace-pilot that made it, or start with an empty database"), lines
    assert (rows_elsewhere(url, tables), rows_elsewhere(url, "SELECT * FROM store_meta ORDER BY name")) == before


# -- the database restarting under a running service -------------------------------------------------


@pytest.fixture
def own_postgres():
    """A PostgreSQL server of this test's own (the test stops and starts it)."""
    server = PostgresServer()
    yield server
    server.close()


def test_a_notification_while_the_database_is_away_is_a_503_and_taken_once_it_is_back(tmp_path, own_postgres):
    channel = Channel(tmp_path, own_postgres.new_database())
    try:
        _, slot = channel.lease(ready=False, hosts=(), nodes=1)
        channel.notify(slot, "node1", "reserved")
        key = channel.key(slot)
        channel.key = lambda *_: key  # the test's own look-up of the key would need the database
        own_postgres.stop()
        away = channel.notify(slot, "node1", "heartbeat", status=503)
        assert away.headers["Retry-After"] == "5" and away.json()["result"] == "store-unavailable"
        assert channel.poll(slot, "node1").status_code == 503  # a poll reads the store too
        own_postgres.start()
        # The pilot's retry of the same notification (its seq 2) is taken; its next goes on from there.
        channel._seq[(slot, "node1")] -= 1
        assert channel.notify(slot, "node1", "heartbeat").json()["result"] == "accepted"
        channel.notify(slot, "node1", "unreserved")
        assert [seq for _, seq, _, _ in channel.store.notifications(slot)] == [1, 2, 3]
    finally:
        channel.close()


def test_a_lease_goes_on_through_a_database_restart_and_nothing_of_it_is_lost(tmp_path, hugepages, own_postgres):
    """Real serve, real pilots: while PostgreSQL is down the API answers 503 (the CLI exit 4, one line); once it
    is back the lease is where it was and ends, every host's notifications stored without a gap."""
    url = own_postgres.new_database()
    site = Site(tmp_path, store=url)
    with serving(site):
        reserved = site.cli("reserve", "--nodes", "2", "--memory", "32", "--duration", "60", "--json", "--wait")
        assert reserved.returncode == 0, reserved.stderr
        lease_id = json.loads(reserved.stdout)["id"]
        own_postgres.stop()
        shown = site.cli("show", lease_id)
        assert shown.returncode == 4 and len(shown.stderr.strip().splitlines()) == 1, shown.stderr
        assert "503 the service's store cannot be reached now: try again" in shown.stderr
        assert site.api("GET", "/leases").status_code == 503
        own_postgres.start()
        assert json.loads(site.cli("show", lease_id, "--json").stdout)["state"] == "ready"
        released = site.cli("release", lease_id, "--wait", "--json")
        assert released.returncode == 0, released.stderr + released.stdout
        assert pool_pages() == hugepages
    for host in ("local-node1", "local-node2"):
        seqs = stored_seqs(url, lease_id, host)
        assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 3, (host, seqs)
    log = site.log_file.read_text()
    assert "the store is away: answering 503" in log and "Traceback" not in log


def test_a_store_url_is_shown_without_its_password_in_either_place():
    from service_adapter.store.postgres import shown

    assert shown("postgresql://wp:s3cret@db:5432/leases") == "postgresql://wp:***@db:5432/leases"
    assert shown("postgres://wp@db/leases?sslmode=require&password=s3cret&x=1") == \
        "postgres://wp@db/leases?sslmode=require&password=***&x=1"
    assert shown("postgresql://db/leases?passfile=/etc/wp/pgpass") == "postgresql://db/leases?passfile=/etc/wp/pgpass"
