"""The service's figures for Prometheus: ``GET /metrics`` in the text exposition format.

Served, as ``[metrics] listen`` says, on the service's own port behind the operators' digest
(``api``, the default), on a separate plain-HTTP listener for a Prometheus on the same host or
network (``HOST:PORT``; nothing secret is in the figures, but bind it to where only the scraper
reaches), or not at all (``off``). Each service has its own registry (``prometheus_client``),
so several services in one process (the tests) keep their figures apart.

What is counted where it happens: every pilot notification with its answer (``result``:
``accepted``, ``repeat``, ``unknown-slot``, ``skew``, ``unauthorized``, ...) and how long the
receiver took; every command's wait from queued to handed to its pilot; every batch-system
command with its duration and outcome; bytes of images served to nodes. What is read when
scraped: leases by state (one GROUP BY on the store) and the hosts with a poll open now.
"""

from __future__ import annotations

import functools
import os
import time

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from service_adapter.routetable import Route, add_routes

#: Seconds: a notification is answered in ms, a command waits up to a poll's renewal (tens of s).
NOTIFICATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
COMMAND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: A failed command's outcome as a label (a command that exited did so with a non-zero code).
_FAILURE = {"exited": "nonzero-exit", "timed out": "timed-out", "not run": "not-run"}
LRM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServiceMetrics:
    """One service's counters and histograms, and the gauges read from its store and board at scrape time."""

    def __init__(self, store=None, board=None):
        self.registry = CollectorRegistry(auto_describe=True)
        self.notifications = Counter(
            "workspace_notifications", "Pilot notifications answered, by answer (accepted, repeat, or why refused)",
            ["result"], registry=self.registry)
        self.notification_seconds = Histogram(
            "workspace_notification_seconds", "Time from a notification's arrival to its answer",
            buckets=NOTIFICATION_BUCKETS, registry=self.registry)
        self.command_wait_seconds = Histogram(
            "workspace_command_wait_seconds", "Time from a command queued to it handed to its pilot's poll",
            ["op"], buckets=COMMAND_BUCKETS, registry=self.registry)
        self.lrm_seconds = Histogram(
            "workspace_lrm_command_seconds", "Batch-system commands (sbatch, squeue, qsub, ...) by command",
            ["command"], buckets=LRM_BUCKETS, registry=self.registry)
        self.lrm_failures = Counter(
            "workspace_lrm_command_failures", "Batch-system commands that failed, timed out or could not run",
            ["command", "outcome"], registry=self.registry)
        self.image_bytes = Counter(
            "workspace_image_bytes_served", "Bytes of approved images sent to nodes", registry=self.registry)
        # A labelled child found once per label value (prometheus_client checks and locks at every .labels()); the
        # values are the service's own words, a few dozen at most.
        self._notifications_by_result = functools.lru_cache(maxsize=64)(self.notifications.labels)
        self._command_wait_by_op = functools.lru_cache(maxsize=64)(self.command_wait_seconds.labels)
        self._store = store
        self._board = board
        if store is not None or board is not None:
            self.registry.register(_ReadAtScrape(self))

    # -- what the service's parts call -----------------------------------------------------------

    def notification(self, result: str, seconds: float) -> None:
        """One notification answered with ``result`` after ``seconds``."""
        self._notifications_by_result(result).inc()
        self.notification_seconds.observe(seconds)

    def commands_handed(self, items: list[tuple[str, float]], now: float | None = None) -> None:
        """Commands (op, queued at, epoch seconds) handed to a poll now."""
        now = time.time() if now is None else now
        for op, queued_at in items:
            self._command_wait_by_op(op).observe(max(0.0, now - queued_at))

    def lrm_command(self, result) -> None:
        """One batch-system command ran (a :class:`service_adapter.providers.commands.CommandResult`)."""
        name = os.path.basename(result.argv[0]) if result.argv else "?"
        self.lrm_seconds.labels(name).observe(result.duration_s)
        if not result.ok:
            self.lrm_failures.labels(name, _FAILURE.get(result.outcome.value, result.outcome.value)).inc()

    def render(self) -> bytes:
        """The text exposition of every figure."""
        return generate_latest(self.registry)


class _ReadAtScrape:
    """Gauges read when scraped: leases by state, hosts with a poll open."""

    def __init__(self, metrics: ServiceMetrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        store, board = self.metrics._store, self.metrics._board
        if store is not None:
            leases = GaugeMetricFamily("workspace_leases", "Leases by state", labels=["state"])
            for state, count in store.lease_counts().items():
                leases.add_metric([state], count)
            yield leases
        if board is not None:
            yield GaugeMetricFamily("workspace_hosts_polling", "Hosts with a command poll open now",
                                    value=board.hosts_polling())


METRICS_KEY = web.AppKey("metrics", ServiceMetrics)


async def handle_metrics(request: web.Request) -> web.Response:
    """GET /metrics: the text exposition (the store is read off the event loop)."""
    import asyncio

    body = await asyncio.to_thread(request.app[METRICS_KEY].render)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


#: The Prometheus exposition (behind the operators' digest, or on a listener of its own: ``[metrics] listen``).
ROUTES = (Route("GET", "/metrics", handle_metrics),)


def add_metrics_route(app: web.Application, metrics: ServiceMetrics) -> None:
    """``/metrics`` on ``app`` (behind whatever authentication its middlewares apply to that path)."""
    app[METRICS_KEY] = metrics
    add_routes(app, ROUTES)


def metrics_app(metrics: ServiceMetrics) -> web.Application:
    """A separate application serving only ``/metrics`` (the ``HOST:PORT`` listener)."""
    app = web.Application(client_max_size=1024)
    add_metrics_route(app, metrics)
    return app
