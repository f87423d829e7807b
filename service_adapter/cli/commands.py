"""The operators' commands against the service's HTTP API: reserve, release, extend, list, show, events, usage,
vm start|stop|suspend|resume|list."""

from __future__ import annotations

import json
import os
import time

from service_adapter.cli.common import (
    EXIT_CONFIG, EXIT_CONFLICT, EXIT_FAILED, EXIT_NOT_FOUND, EXIT_OK, EXIT_REFUSED, EXIT_TIMEOUT, EXIT_UNREACHABLE,
    EXIT_UNTRUSTED, EXIT_USAGE, FAILED_STATES, UP_STATES, Exit, say,
)
from service_adapter.cli.images import image_command
from service_adapter.cli.render import event_line, lease_table, lease_text, reason_suffix, vm_table, vm_text

VM_ENDED = ("stopped", "failed", "lost")
STOP_FAILED = "stop failed"  # how the service's reason starts when a pilot reported that a stop-vm failed


# -- the operator commands --------------------------------------------------------------------


def client_command(args) -> int:
    from service_adapter.client import ClientError, LeaseClient

    try:
        url, user, secret, timeout_s, verify = _client_settings(args)
    except Exit as exc:
        return exc.code
    client = LeaseClient(url, user, secret, timeout_s=timeout_s, verify_tls=verify)
    try:
        return _COMMANDS[args.command](client, args)
    except ClientError as exc:
        say(exc.message)
        return _exit_for_status(exc.status)
    except KeyboardInterrupt:
        say("interrupted")
        return EXIT_FAILED
    finally:
        client.close()


def _exit_for_status(status: int | None) -> int:
    if status is None or status == 503:  # 503: the service is up but cannot serve now (its store is away)
        return EXIT_UNREACHABLE
    if status in (401, 403, 429):
        return EXIT_REFUSED
    if status == 404:
        return EXIT_NOT_FOUND
    if status == 409:
        return EXIT_CONFLICT
    if status == 422:
        return EXIT_UNTRUSTED  # only the image lists answer 422 to an operator
    if status in (400, 405, 413):
        return EXIT_USAGE
    return EXIT_FAILED


def _client_settings(args) -> tuple[str, str, str, float, bool | str]:
    """URL, user, secret, request timeout and TLS check ([client] ca_file, else the system's CAs):
    command line, then environment, then [client]."""
    from service_adapter.config import SECRET_FILE_ENV, ConfigError, load_config
    from service_adapter.secretfiles import read_secret_file

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            say(f"config error: {problem}")
        raise Exit(EXIT_CONFIG) from None
    url = args.url or config.service_url
    user = args.user or config.client_user
    secret_file = args.secret_file or os.environ.get(SECRET_FILE_ENV) or config.client_secret_file
    problems = []
    if not user:
        problems.append("no operator user: pass --user or set [client] user in the config file")
    if not secret_file:
        problems.append(
            f"no secret file: pass --secret-file, set ${SECRET_FILE_ENV}, "
            "or set [client] secret_file in the config file"
        )
    secret = None
    if secret_file:
        try:
            secret = read_secret_file(os.path.abspath(secret_file))
        except ValueError as exc:
            problems.append(f"secret file {secret_file}: {exc}")
    if problems:
        for problem in problems:
            say(f"config error: {problem}")
        raise Exit(EXIT_CONFIG)
    return url, user, secret, args.timeout or config.client_timeout_s, config.client_ca_file or True


def _shown(args, body: dict, text: str, failure: str | bool) -> int:
    """Print ``body`` (--json) or ``text``; then ``failure``, if any, as the error line: EXIT_FAILED, else EXIT_OK."""
    if args.json:
        _print_json(body)
    else:
        print(text)
    if failure:
        say(failure)
        return EXIT_FAILED
    return EXIT_OK


def _print_json(body: dict) -> None:
    print(json.dumps(body, indent=2, sort_keys=True))


def _wait_for(client, lease_id: str, done_states: tuple[str, ...], timeout_s: float) -> dict:
    """Poll ``show`` (short backoff) until the lease is in ``done_states`` or has ended; raises Exit on timeout."""
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    while True:
        lease = client.show(lease_id)
        state = lease.get("state")
        if state in done_states or lease.get("terminal"):  # the service says when a lease has ended
            return lease
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            say(f"lease {lease_id} is still {state} after {timeout_s:g} s; it goes on (see 'show {lease_id}')")
            raise Exit(EXIT_TIMEOUT)
        time.sleep(min(delay, remaining))
        delay = min(delay * 1.5, 1.0)


def _wait_timeout(args) -> float:
    return args.timeout or 600.0


def _cmd_reserve(client, args) -> int:
    lease = client.reserve(args.nodes, args.memory, args.duration, images=args.images, start_at=args.start_at,
                           release_when_idle_s=args.release_when_idle, exclude_nodes=args.exclude_nodes)
    if args.wait:
        try:
            lease = _wait_for(client, lease["id"], UP_STATES, _wait_timeout(args))
        except Exit as exc:
            return exc.code
    failed = args.wait and lease.get("state") not in UP_STATES
    return _shown(args, lease, lease_text(lease), failed and (
        f"lease {lease['id']} ended {lease.get('state')} before it was ready" + reason_suffix(lease)))


def _cmd_release(client, args) -> int:
    lease = client.release(args.lease)
    if args.wait:
        try:
            lease = _wait_for(client, args.lease, (), _wait_timeout(args))
        except Exit as exc:
            return exc.code
    failed = lease.get("state") in FAILED_STATES
    return _shown(args, lease, lease_text(lease),
                  failed and f"lease {args.lease} ended {lease.get('state')}" + reason_suffix(lease))


def _cmd_extend(client, args) -> int:
    return _print_lease(args, client.extend(args.lease, args.by))


def _cmd_events(client, args) -> int:
    """Print the lease's events; with --follow, poll (at most every 0.5 s) until it has ended."""
    deadline = time.monotonic() + _wait_timeout(args)
    after, delay = args.after, 0.1
    while True:
        events = client.events(args.lease, after).get("events", [])
        for event in events:
            print(json.dumps(event, sort_keys=True) if args.json else event_line(event), flush=True)
            after = max(after, int(event.get("seq", after)))
        if not args.follow:
            return EXIT_OK
        lease = client.show(args.lease) if not events else None
        if lease is not None and lease.get("terminal"):
            if client.events(args.lease, after).get("events"):
                continue  # its last events came after the read above: print them first
            return EXIT_FAILED if lease.get("state") in FAILED_STATES else EXIT_OK
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            say(f"lease {args.lease} has not ended after {_wait_timeout(args):g} s; it goes on")
            return EXIT_TIMEOUT
        delay = 0.1 if events else min(delay * 1.5, 0.5)  # soon again after news, else back off
        time.sleep(min(delay, remaining))


def _cmd_list(client, args) -> int:
    states = [s for value in (args.state or []) for s in value.split(",") if s]
    body = client.list(states=states, owner=args.owner)
    if args.json:
        _print_json(body)
    else:
        print(lease_table(body.get("leases", [])))
    return EXIT_OK


def _cmd_show(client, args) -> int:
    return _print_lease(args, client.show(args.lease))


def _print_lease(args, lease: dict) -> int:
    if args.json:
        _print_json(lease)
    else:
        print(lease_text(lease))
    return EXIT_OK


def _cmd_usage(client, args) -> int:
    body = client.usage(owner=args.owner, lease_id=args.lease)
    if args.json:
        _print_json(body)
        return EXIT_OK
    whose = f"operator {args.owner}" if args.owner else "all operators"
    if args.lease:
        whose = f"lease {args.lease}"
    node_s = float(body.get("node_seconds", 0))
    mb_s = float(body.get("mb_seconds", 0))
    print(
        f"{whose}: {body.get('leases', 0)} lease(s), {node_s:.1f} node-seconds ({node_s / 3600:.3f} node-hours), "
        f"{mb_s:.0f} MB-seconds ({mb_s / 3600 / 1024:.3f} GB-hours)"
    )
    return EXIT_OK


def _cmd_vm(client, args) -> int:
    return _VM_COMMANDS[args.vm_command](client, args)


def _cmd_vm_start(client, args) -> int:
    body = client.start_vms(args.lease, args.vm_specs)
    if args.wait:
        names = [vm.get("name") for vm in body.get("vms", [])]
        try:
            body = {"vms": _wait_for_vms(client, args.lease, names, _started, args.wait, "starting")}
        except Exit as exc:
            return exc.code
    failed = [vm for vm in body["vms"] if vm.get("state") != "running"] if args.wait else []
    return _shown(args, body, vm_table(body.get("vms", [])),
                  "; ".join(f"VM {vm.get('name')} {vm.get('state')}" + reason_suffix(vm) for vm in failed))


def _cmd_vm_stop(client, args) -> int:
    vm = client.stop_vm(args.lease, args.name, force=args.force)
    if args.wait:
        try:
            (vm,) = _wait_for_vms(client, args.lease, [args.name], _stopped, args.wait, "stopping")
        except Exit as exc:
            return exc.code
    failed = args.wait and vm.get("state") != "stopped"
    return _shown(args, vm, vm_table([vm]),
                  failed and f"VM {args.name} of lease {args.lease} is {vm.get('state')}" + reason_suffix(vm))


def _cmd_vm_pause(client, args) -> int:
    resume = args.vm_command == "resume"
    vm = client.pause_vm(args.lease, args.name, resume=resume)
    wanted = "running" if resume else "paused"
    if args.wait:
        def done(found: dict) -> bool:
            return found.get("state") in (wanted, *VM_ENDED) or "failed:" in str(found.get("reason", ""))

        try:
            (vm,) = _wait_for_vms(client, args.lease, [args.name], done, args.wait, "waiting for its " + args.vm_command)
        except Exit as exc:
            return exc.code
    failed = args.wait and vm.get("state") != wanted
    return _shown(args, vm, vm_table([vm]),
                  failed and f"VM {args.name} of lease {args.lease} is {vm.get('state')}" + reason_suffix(vm))


def _cmd_vm_list(client, args) -> int:
    body = client.list_vms(args.lease)
    if args.json:
        _print_json(body)
    else:
        print(vm_table(body.get("vms", [])))
    return EXIT_OK


def _cmd_vm_show(client, args) -> int:
    vm = client.show_vm(args.lease, args.name)
    if args.json:
        _print_json(vm)
    else:
        print(vm_text(vm))
    return EXIT_OK


def _started(vm: dict) -> bool:
    return vm.get("state") == "running" or vm.get("state") in VM_ENDED


def _stopped(vm: dict) -> bool:
    state = vm.get("state")
    return state in VM_ENDED or (state == "running" and str(vm.get("reason", "")).startswith(STOP_FAILED))


def _wait_for_vms(client, lease_id: str, names: list[str], done, timeout_s: float, doing: str) -> list[dict]:
    """Poll the API (short backoff, at most every 0.5 s) until ``done(vm)`` for each VM; raises Exit on timeout.

    The operators' API has no long-poll: a remote client has nothing better to wait on.
    """
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    while True:
        if len(names) == 1:
            found = {names[0]: client.show_vm(lease_id, names[0])}
        else:
            found = {vm.get("name"): vm for vm in client.list_vms(lease_id).get("vms", [])}
        vms = [found.get(name, {"name": name, "state": "unknown"}) for name in names]
        waiting = [vm["name"] for vm in vms if not done(vm)]
        if not waiting:
            return vms
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            say(f"VM(s) {', '.join(waiting)} of lease {lease_id} still {doing} after {timeout_s:g} s; "
                 f"they go on (see 'vm list {lease_id}')")
            raise Exit(EXIT_TIMEOUT)
        time.sleep(min(delay, remaining))
        delay = min(delay * 1.5, 0.5)


_VM_COMMANDS = {"start": _cmd_vm_start, "stop": _cmd_vm_stop, "suspend": _cmd_vm_pause, "resume": _cmd_vm_pause,
                "list": _cmd_vm_list, "show": _cmd_vm_show}

_COMMANDS = {
    "reserve": _cmd_reserve, "release": _cmd_release, "extend": _cmd_extend, "list": _cmd_list, "show": _cmd_show,
    "events": _cmd_events, "usage": _cmd_usage, "vm": _cmd_vm, "image": image_command,
}


