"""A VM request from the command line: one VM from options, or the VMs of a spec file, checked before anything is sent."""

from __future__ import annotations

import json
import sys

from service_adapter.cli.parser import HOST_RE

#: Which option sets which field of a VM spec (to name the option in a refusal).
_VM_OPTIONS = {
    "vm.name": "--name", "vm.memory_mb": "--memory", "vm.vcpus": "--vcpus",
    "vm.disk.path": "--image", "vm.disk.sha256": "--image-sha256", "vm.disk.readonly": "--readonly",
    "vm.disk.image": "--image-name", "vm.disk.version": "--image-version",
    "vm.disk": "--image", "vm.boot.kernel.path": "--kernel", "vm.boot.kernel.sha256": "--kernel-sha256",
    "vm.boot.kernel": "--kernel", "vm.boot.initrd.path": "--initrd", "vm.boot.initrd.sha256": "--initrd-sha256",
    "vm.boot.initrd": "--initrd", "vm.boot.cmdline": "--cmdline", "vm.network": "--network",
    "vm.console_log": "--console-log", "vm.context.hostname": "--hostname",
    "vm.context.ssh_authorized_keys[]": "--ssh-key", "vm.context.ssh_authorized_keys": "--ssh-key",
    "vm.context.user_data": "--user-data", "vm": "the VM",
}
_SPEC_OPTIONS = ("name", "memory", "vcpus", "image", "image_sha256", "image_name", "image_version", "readonly", "kernel", "kernel_sha256",
                 "initrd", "initrd_sha256", "cmdline", "network", "console_log", "hostname", "ssh_keys", "user_data", "host")


class BadSpec(Exception):
    """A VM request that is malformed as given; nothing is sent."""


def vm_request(args) -> list[dict]:
    """The VM specs (each with its optional "host") that ``vm start`` sends; BadSpec says what is wrong."""
    from service_adapter.vms import MAX_VMS_PER_REQUEST, VmRequestError, parse_vm_request

    given = [f"--{name.replace('_', '-')}" for name in _SPEC_OPTIONS if getattr(args, name) not in (None, False)]
    if args.spec is not None:
        if given:
            raise BadSpec(f"--spec and {', '.join(given)} exclude each other: give the VMs in the file, or one VM "
                           "with the options")
        items, where = _read_spec_file(args.spec), args.spec
    else:
        items, where = [_spec_from_options(args)], None
    if len(items) > MAX_VMS_PER_REQUEST:
        raise BadSpec(f"{where}: {len(items)} VMs, at most {MAX_VMS_PER_REQUEST} per request: split the file")
    specs, names = [], set()
    for index, item in enumerate(items):
        try:
            spec, host = parse_vm_request(item)
        except VmRequestError as exc:
            message = str(exc).splitlines()[0] if str(exc) else "invalid"
            if where is None:
                raise BadSpec(_name_option(message)) from None
            name = item.get("name") if isinstance(item, dict) else None
            label = f"vms[{index}]" + (f" ({name})" if isinstance(name, str) and name.isprintable() else "")
            raise BadSpec(f"{where}: {label[:100]}: {message}") from None
        if host is not None and not HOST_RE.fullmatch(host):
            raise BadSpec(f"{where}: vms[{index}] ({spec.name}): host {host[:80]!r} is not a host name")
        if spec.name in names:
            raise BadSpec(f"{where}: VM name {spec.name} is given twice: names must differ")
        names.add(spec.name)
        specs.append(dict(spec.to_dict(), **({"host": host} if host is not None else {})))
    return specs


def _name_option(message: str) -> str:
    """A spec refusal for a VM given by options: name the option, not the JSON field."""
    for field in sorted(_VM_OPTIONS, key=len, reverse=True):
        if message.startswith(field + ":"):
            return f"{_VM_OPTIONS[field]}{message[len(field):]}"
    return message


def _read_spec_file(path: str) -> list:
    from service_adapter.api import MAX_VM_BODY

    try:
        if path == "-":
            raw = sys.stdin.buffer.read(MAX_VM_BODY + 1)
        else:
            with open(path, "rb") as handle:
                raw = handle.read(MAX_VM_BODY + 1)
    except OSError as exc:
        raise BadSpec(f"--spec {path}: cannot read: {exc.strerror}") from None
    if len(raw) > MAX_VM_BODY:
        raise BadSpec(f"--spec {path}: over {MAX_VM_BODY} bytes, the most one request may carry: split the file")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadSpec(f"--spec {path}: not JSON: {str(exc).splitlines()[0]}") from None
    if isinstance(data, dict) and "vms" in data:
        extra = sorted(set(data) - {"vms"})
        if extra:
            raise BadSpec(f'--spec {path}: unknown field(s) {", ".join(map(str, extra))} beside "vms"')
        if not isinstance(data["vms"], list) or not data["vms"]:
            raise BadSpec(f'--spec {path}: "vms" must be a non-empty list of VM specs')
        return data["vms"]
    if isinstance(data, dict):
        return [data]
    raise BadSpec(f'--spec {path}: must hold {{"vms": [spec, ...]}} or one spec object')


def _spec_from_options(args) -> dict:
    def both(path_option: str, path, digest_option: str, digest) -> None:
        if (path is None) != (digest is None):
            missing = digest_option if digest is None else path_option
            present = path_option if digest is None else digest_option
            raise BadSpec(f"{present} needs {missing}")

    if args.name is None or args.memory is None:
        missing = " and ".join(o for o, v in (("--name", args.name), ("--memory", args.memory)) if v is None)
        raise BadSpec(f"{missing} missing: give --spec FILE, or --name and --memory with --image or --kernel")
    if args.image_name is not None and args.image is not None:
        raise BadSpec("--image-name and --image exclude each other: a listed image, or a path on the nodes")
    if args.image_version is not None and args.image_name is None:
        raise BadSpec("--image-version needs --image-name")
    if args.image_name is not None and args.image_sha256 is not None:
        raise BadSpec("--image-sha256 goes with --image: a listed image's sha256 comes from its list")
    both("--image", args.image, "--image-sha256", args.image_sha256)
    both("--kernel", args.kernel, "--kernel-sha256", args.kernel_sha256)
    both("--initrd", args.initrd, "--initrd-sha256", args.initrd_sha256)
    if args.readonly and args.image is None and args.image_name is None:
        raise BadSpec("--readonly needs --image or --image-name")
    for option, value in (("--initrd", args.initrd), ("--cmdline", args.cmdline)):
        if value is not None and args.kernel is None:
            raise BadSpec(f"{option} needs --kernel (direct boot)")
    if args.image is None and args.image_name is None and args.kernel is None:
        raise BadSpec("the VM needs --image (with --image-sha256), --image-name or --kernel (with --kernel-sha256)")
    spec: dict = {"name": args.name, "memory_mb": args.memory}
    if args.vcpus is not None:
        spec["vcpus"] = args.vcpus
    if args.image_name is not None:
        spec["disk"] = {"image": args.image_name}
        if args.image_version is not None:
            spec["disk"]["version"] = args.image_version
    if args.image is not None:
        spec["disk"] = {"path": args.image, "sha256": args.image_sha256}
    if "disk" in spec:
        if args.readonly:
            spec["disk"]["readonly"] = True
    if args.kernel is not None:
        boot: dict = {"kernel": {"path": args.kernel, "sha256": args.kernel_sha256}}
        if args.initrd is not None:
            boot["initrd"] = {"path": args.initrd, "sha256": args.initrd_sha256}
        if args.cmdline is not None:
            boot["cmdline"] = args.cmdline
        spec["boot"] = boot
    if args.network is not None:
        spec["network"] = args.network
    if args.console_log is not None:
        spec["console_log"] = args.console_log
    context = _context_from_options(args)
    if context is not None:
        spec["context"] = context
    if args.host is not None:
        spec["host"] = args.host
    return spec


def _context_from_options(args) -> dict | None:
    """The cloud-init seed's part of a VM given by options, or None when none asks for one."""
    if args.hostname is None and not args.ssh_keys and args.user_data is None:
        return None
    context: dict = {}
    if args.hostname is not None:
        context["hostname"] = args.hostname
    keys = []
    for path in args.ssh_keys or ():
        try:
            with open(path, encoding="utf-8") as handle:
                keys += [line.strip() for line in handle if line.strip() and not line.startswith("#")]
        except (OSError, UnicodeDecodeError) as exc:
            raise BadSpec(f"--ssh-key {path}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    if keys:
        context["ssh_authorized_keys"] = keys
    if args.user_data is not None:
        try:
            with open(args.user_data, encoding="utf-8") as handle:
                context["user_data"] = handle.read(64 * 1024)
        except (OSError, UnicodeDecodeError) as exc:
            raise BadSpec(f"--user-data {args.user_data}: cannot read it: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    return context


