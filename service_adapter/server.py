"""``workspace-lease serve``: the service as one process.

One aiohttp application on ``listen_host:port`` holds the pilots'
notification endpoint (digest realm ``[service] realm``) and, unless
``[operators] listen`` gives them a listener of their own, the operators'
API (realm ``[operators] realm``); one lease manager thread watches the
leases through the store and the provider. SIGTERM or SIGINT stops it
cleanly: no new connections, the manager stopped, the store closed. Leases
are NOT cancelled on the way out: their pilot jobs keep running, and a
restarted service (same store) picks them up again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from aiohttp import web

from workspace_common.errors import first_line
from service_adapter.config import ServiceConfig, listen_parts
from service_adapter.connections import GUARD_KEY, ConnectionGuard, raise_file_limit, start_serving
from service_adapter.store.postgres import is_url as store_is_url, shown as store_shown
from service_adapter.storeaway import store_away_middleware

log = logging.getLogger("service_adapter.server")

SHUTDOWN_TIMEOUT_S = 5.0


class ServeError(Exception):
    """The service cannot start here; the message is one line saying why and what to do."""


def setup_logging(config: ServiceConfig) -> None:
    """Log with timestamps to ``[service] log_file`` ("-": stderr) at ``log_level``.

    The file is 0640 and reopened after logrotate moves it
    (:class:`service_adapter.logfile.LogFile`); every message is one
    printable line (:class:`service_adapter.logfile.SafeFormatter`).
    """
    from service_adapter.logfile import LINE_FORMAT, LogFile, SafeFormatter

    if config.log_file == "-":
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
    else:
        try:
            os.makedirs(os.path.dirname(config.log_file), mode=0o755, exist_ok=True)
            handler = LogFile(config.log_file)
        except OSError as exc:
            raise ServeError(f"[service] log_file {config.log_file}: {exc.strerror}") from None
    handler.setFormatter(SafeFormatter(LINE_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(config.log_level.upper())


def build(config: ServiceConfig):
    """The store, provider, lease manager and the aiohttp app (receiver + API) of ``config``.

    ``config`` must have been loaded with ``serve=True`` (it carries the
    secrets). Returns ``(store, provider, manager, app)``; the app also
    holds the VM manager and the command board the long-polls wait on.
    """
    from service_adapter.api import add_api
    from service_adapter.commandboard import CommandBoard
    from service_adapter.vms import VmManager
    from service_adapter.images.catalog import ImageCatalog
    from service_adapter.images.routes import add_image_routes
    from service_adapter.digest import DigestVerifier
    from service_adapter.lease import LeaseManager
    from service_adapter.providers import make_provider
    from service_adapter.allocation import Allocations
    from service_adapter.hostshares import HostShares
    from service_adapter.receiver import make_app
    from service_adapter.store import Store
    from service_adapter.metrics import METRICS_KEY, ServiceMetrics, add_metrics_route

    pilots = DigestVerifier(config.realm, config.node_accounts())
    operators = DigestVerifier(config.operator_realm, config.operator_accounts())
    shown_store = store_shown(config.store)
    try:
        if not store_is_url(config.store):
            os.makedirs(os.path.dirname(config.store), mode=0o700, exist_ok=True)
        store = Store(config.store, host_store_bytes=config.host_store_mb * 1024 * 1024 or None)
    except Exception as exc:  # OSError, sqlite3.Error, StoreError: one line either way (never the password)
        raise ServeError(f"[service] store {shown_store}: {getattr(exc, 'strerror', None) or exc}") from None
    board = CommandBoard()
    try:
        provider = make_provider(config.provider_settings())
        if config.provider == "local":
            # Simulated nodes get their keys from the service itself, where their pilot config
            # must look: <state_dir>/node-keys/{host}.key.
            from service_adapter.nodekeys import provision_node_key

            key_dir = os.path.join(config.state_dir, "node-keys")
            provider.prepare_node = lambda host: provision_node_key(key_dir, config.site_key, host)
        manager = LeaseManager(
            store, provider, contact=config.pilot_contact, pilot_config=config.pilot_config,
            grace_s=config.grace_s, queue_timeout_s=config.queue_timeout_s,
            release_grace_s=config.release_grace_s, status_interval_s=config.status_interval_s,
            board=board, lost_after_s=config.lost_after_s, warn_before_s=config.warn_before_s,
        )
        catalog = ImageCatalog(store, keys_dir=config.endorser_keys, store_dir=config.image_store_dir,
                               timeout_s=config.image_fetch_timeout_s, ca_file=config.image_ca_file)
        vms = VmManager(store, overhead_mb=config.vm_overhead_mb, catalog=catalog,
                        network_plan=config.network_plan())
    except Exception as exc:
        store.close()
        raise ServeError(f"[provider] name = {config.provider}: {first_line(exc)}") from None
    guard = ConnectionGuard(config.max_connections or None, config.request_timeout_s)
    shares = HostShares(config.host_rate, config.host_burst, config.host_requests, config.host_downloads)
    app = make_app(store, pilots, config.max_skew_s, board=board, guard=guard, allocations=Allocations(provider),
                   shares=shares)
    # The operators' door: on the pilots' listener, or on its own ([operators] listen), where the pilots' traffic
    # (and whoever holds a node) cannot reach it and a firewall or the address can keep it to the site's admins.
    if config.operator_listen:
        operator_guard = ConnectionGuard(None, config.request_timeout_s)
        operator_app = web.Application(middlewares=[operator_guard.middleware, store_away_middleware(store)])
        operator_app[GUARD_KEY] = operator_guard
    else:
        operator_app = app
    add_api(operator_app, manager, operators, vms=vms)
    add_image_routes(app, catalog, operators=False)
    add_image_routes(operator_app, catalog, pilots=False)
    if config.metrics_listen != "off":
        metrics = ServiceMetrics(store, board)
        app[METRICS_KEY] = metrics  # the receiver and the image routes count into it
        if hasattr(provider, "observe"):
            provider.observe = metrics.lrm_command
        if config.metrics_listen == "api":
            add_metrics_route(operator_app, metrics)  # behind the operators' digest, as the API
    return store, provider, manager, app, (operator_app if operator_app is not app else None)


def serve(config: ServiceConfig, *, out=None) -> int:
    """Run the service until SIGTERM or SIGINT; returns 0 after a clean stop.

    Prints ``workspace-lease: serving on URL (...)`` to ``out`` (stdout)
    once it listens and the manager runs. Raises :class:`ServeError` when
    it cannot start.
    """
    out = out or sys.stdout
    setup_logging(config)
    raise_file_limit()  # before the store opens: the connection cap is worked out from the limit in force
    from service_adapter.compactor import Compactor

    store, provider, manager, app, operator_app = build(config)
    compactor = Compactor(store, config.retention_s)
    compactor.start()
    poll_news = None
    if store.on_postgres:  # other receivers may share the store: tell them which pilots poll here
        from service_adapter.pollnews import PollNews, interval
        from service_adapter.receiver import BOARD_KEY

        poll_news = PollNews(store, app[BOARD_KEY], interval(config.lost_after_s))
        poll_news.start()
    try:
        asyncio.run(_run(config, app, operator_app, manager, store, out))
    finally:
        try:
            if poll_news is not None:
                poll_news.stop()
            compactor.stop()
            manager.stop()
        finally:
            store.close()
            log.info("stopped; leases and their pilot jobs left running")
    return 0


async def _run(config: ServiceConfig, app: web.Application, operator_app: web.Application | None, manager, store,
               out) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        ssl_context = config.ssl_context()
    except ValueError as exc:
        raise ServeError(str(exc)) from None
    try:
        runner = await start_serving(app, config.listen_host, config.port, ssl_context=ssl_context,
                                     reuse_port=config.reuse_port, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    except OSError as exc:
        raise ServeError(
            f"[service] cannot listen on {config.listen_host}:{config.port}: {exc.strerror or exc}"
        ) from None
    operator_runner = None
    if operator_app is not None:
        try:
            operator_runner = await start_serving(operator_app, *listen_parts(config.operator_listen),
                                                  ssl_context=ssl_context, reuse_port=config.reuse_port,
                                                  shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        except OSError as exc:
            await runner.cleanup()
            raise ServeError(f"[operators] cannot listen on {config.operator_listen}: {exc.strerror or exc}") from None
        log.info("operators' API on %s://%s (apart from the pilots: [operators] listen)", config.scheme,
                 config.operator_listen)
    try:
        metrics_runner = await _serve_metrics(config, app)
    except ServeError:
        if operator_runner is not None:
            await operator_runner.cleanup()
        await runner.cleanup()
        raise
    from service_adapter import collector

    collections = None
    try:
        await asyncio.to_thread(manager.start)
        collector.settle()  # start-up's objects frozen out of every later scan (see the module for why)
        collections = asyncio.create_task(collector.collect_fully_every())
        line = (
            f"workspace-lease: serving on {config.listen_url} (store {store_shown(config.store)}, provider {config.provider}, "
            f"pilots notify {config.pilot_contact})"
        )
        log.info("%s", line.split(": ", 1)[1])
        print(line, file=out, flush=True)
        await stop.wait()
        log.info("stopping (signal): no new connections, then the lease manager and the store")
    finally:
        if collections is not None:
            collections.cancel()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        if operator_runner is not None:
            await operator_runner.cleanup()
        await runner.cleanup()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


async def _serve_metrics(config: ServiceConfig, app: web.Application):
    """The separate /metrics listener when ``[metrics] listen`` is HOST:PORT; its runner, or None."""
    if config.metrics_listen in ("api", "off"):
        return None
    from service_adapter.metrics import METRICS_KEY, metrics_app

    runner = web.AppRunner(metrics_app(app[METRICS_KEY]), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, *listen_parts(config.metrics_listen)).start()
    except OSError as exc:
        await runner.cleanup()
        raise ServeError(f"[metrics] cannot listen on {config.metrics_listen}: {exc.strerror or exc}") from None
    log.info("metrics on http://%s/metrics (no authentication: [metrics] listen)", config.metrics_listen)
    return runner
