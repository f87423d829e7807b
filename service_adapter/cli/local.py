"""The commands that run here rather than against the API: ``serve``, ``demo``, ``site-key`` and ``node-key``."""

from __future__ import annotations

import logging

from service_adapter.cli.common import (
    EXIT_CONFIG, EXIT_CONFLICT, EXIT_ENVIRONMENT, EXIT_FAILED, EXIT_OK, EXIT_USAGE, say,
)

# -- demo -------------------------------------------------------------------------------------


def run_demo(args) -> int:
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from service_adapter.demo import DemoArgumentError, DemoError, run_demo

    try:
        return run_demo(
            args.nodes, args.memory, args.duration, args.grace, args.release_after, args.workdir,
            journal_dir=args.journal_dir, vm_image=args.vm_image if args.vm else None,
        )
    except DemoArgumentError as exc:
        say(str(exc))
        return EXIT_USAGE
    except DemoError as exc:
        say(str(exc))
        return EXIT_ENVIRONMENT


# -- serve ------------------------------------------------------------------------------------


def run_serve(args) -> int:
    from service_adapter.config import DEFAULT_PATH, ConfigError, load_config
    from service_adapter.server import ServeError, serve

    path = args.config or DEFAULT_PATH
    try:
        config = load_config(path, serve=True)
    except ConfigError as exc:
        for problem in exc.problems:
            say(f"config error: {problem}")
        return EXIT_CONFIG
    try:
        return serve(config)
    except ServeError as exc:
        say(f"cannot serve: {path}: {exc}")
        return EXIT_CONFIG


# -- keys -------------------------------------------------------------------------------------


def _write_key(path: str, key: str, exists: str, done: str) -> int:
    """Create ``path`` (0600, never replacing a file) holding ``key``; say ``exists`` or ``done``."""
    from service_adapter.nodekeys import write_key_file

    try:
        write_key_file(path, key)
    except FileExistsError:
        say(f"{path} exists: {exists}")
        return EXIT_CONFLICT
    except OSError as exc:
        say(f"cannot write {path}: {exc.strerror}")
        return EXIT_FAILED
    say(done)
    return EXIT_OK


def make_site_key(args) -> int:
    from service_adapter.nodekeys import new_site_key

    return _write_key(
        args.output, new_site_key(), "a site key is never replaced (every node's key derives from it)",
        f"wrote a new site key to {args.output} (mode 0600); set [pilots] site_key_file = {args.output}",
    )


def print_node_key(args) -> int:
    from service_adapter.config import DEFAULT_PATH, ConfigError, load_config
    from service_adapter.secretfiles import read_site_key
    from service_adapter.nodekeys import NodeAccounts

    path = args.site_key_file
    if path is None:
        try:
            path = load_config(args.config or DEFAULT_PATH).site_key_file
        except ConfigError as exc:
            for problem in exc.problems:
                say(f"config error: {problem}")
            return EXIT_CONFIG
    try:
        key = NodeAccounts(read_site_key(path), "unused").node_key(args.host)
    except ValueError as exc:
        say(f"config error: site key {path}: {exc}")
        return EXIT_CONFIG
    if args.output is None:
        print(key)
        return EXIT_OK
    return _write_key(args.output, key, f"remove it first to write {args.host}'s key there",
                      f"wrote {args.host}'s node key to {args.output} (mode 0600)")


