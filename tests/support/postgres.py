"""A real PostgreSQL server for the tests: Debian's binaries, a cluster made in a temporary directory.

:class:`PostgresServer` runs ``initdb`` (as the ``postgres`` account: the
server refuses root) with password authentication (SCRAM) for a test
superuser, starts ``postgres`` on a free port of 127.0.0.1 with its socket
in that directory, and stops it by its pid. Each test gets a database of
its own (:meth:`PostgresServer.new_database`) and a URL for it with the
password in it.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time

from tests.support.ports import free_port

USER = "wptest"


def bin_dir() -> str | None:
    """The newest installed server's binaries (Debian's /usr/lib/postgresql/<version>/bin), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    return os.path.dirname(found[-1]) if found else None


class PostgresServer:
    """A PostgreSQL server of the test session's own, on 127.0.0.1 (stop it with :meth:`stop`)."""

    def __init__(self):
        self.bin = bin_dir()
        if self.bin is None:
            raise RuntimeError("no PostgreSQL server installed (Debian's postgresql package; scripts/bootstrap.sh "
                               "--test installs it)")
        account = pwd.getpwnam("postgres")
        self.root = tempfile.mkdtemp(prefix="wp-pg-")
        os.chown(self.root, account.pw_uid, account.pw_gid)
        self.data = os.path.join(self.root, "data")
        self.password = secrets.token_hex(16)
        self.port = free_port()
        self._run_as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        password_file = os.path.join(self.root, "password")
        with open(os.open(password_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as out:
            out.write(self.password + "\n")
        os.chown(password_file, account.pw_uid, account.pw_gid)
        subprocess.run(
            [os.path.join(self.bin, "initdb"), "-D", self.data, "-U", USER, f"--pwfile={password_file}",
             "--auth=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"],
            check=True, capture_output=True, timeout=120, cwd=self.root, **self._run_as,
        )
        os.unlink(password_file)
        self.log_path = os.path.join(self.root, "server.log")
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        """Start the server (again) on its port; returns once it takes connections."""
        log = open(self.log_path, "ab")
        # fsync off: a test server's data need not survive the machine; everything else as a site runs it.
        self.process = subprocess.Popen(
            [os.path.join(self.bin, "postgres"), "-D", self.data, "-h", "127.0.0.1", "-p", str(self.port),
             "-k", self.root, "-c", "fsync=off", "-c", "max_connections=200"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=self.root, **self._run_as,
        )
        log.close()
        ready = os.path.join(self.bin, "pg_isready")
        deadline = time.monotonic() + 60  # a hang detector: the server is up in well under a second here
        while subprocess.run([ready, "-q", "-h", "127.0.0.1", "-p", str(self.port)]).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start: {self.log_tail()}")
            time.sleep(0.05)

    def stop(self, how: int = signal.SIGINT) -> None:
        """Stop the server by its pid (SIGINT: fast shutdown; SIGKILL: as if its host died)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(how)
            self.process.wait(timeout=60)
        self.process = None

    def url(self, database: str = "postgres", *, password: str | None = None) -> str:
        """The URL of ``database`` as the test superuser (with ``password`` instead of the right one, if given)."""
        return f"postgresql://{USER}:{password or self.password}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = "t_" + secrets.token_hex(6)
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Remove the database of ``url`` (made by :meth:`new_database`), whoever is still connected to it."""
        import psycopg

        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def log_tail(self) -> str:
        """The server log's last lines (for a failure's message)."""
        try:
            with open(self.log_path, errors="replace") as log:
                return "".join(log.readlines()[-20:])
        except OSError:
            return ""

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def rows_elsewhere(location: str, sql: str) -> list[tuple]:
    """``sql``'s rows (none for a statement that returns none) read through a connection of its own to the store at ``location`` (a SQLite file or a
    PostgreSQL URL): what another process would see, not the store's own connections."""
    if location.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(location) as conn:
            cursor = conn.execute(sql)
            return cursor.fetchall() if cursor.description else []
    import sqlite3

    with sqlite3.connect(location) as conn:
        return conn.execute(sql).fetchall()


def stored_seqs(url: str, lease_id: str, host: str) -> list[int]:
    """The sequence numbers of ``host``'s notifications for ``lease_id`` in the PostgreSQL store at ``url``."""
    return [seq for (seq,) in rows_elsewhere(
        url, "SELECT n.seq FROM notifications n JOIN slots s ON s.id = n.slot_id"
             f" WHERE s.lease_id = '{lease_id}' AND n.host = '{host}' ORDER BY n.seq")]
