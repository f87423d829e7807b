"""What a pilot proves itself with: its node's key, and the secret of the slot its job runs for.

* The **node key** (``[service] node_key_file``, one per node, root's alone,
  like a host key; ``workspace-lease node-key HOST`` makes it on the
  service's host) is the digest password of the account named after the
  host: with it a node can speak only as itself.
* The **slot secret** comes in the job's environment
  (:data:`workspace_common.protocol.SLOT_SECRET_ENV`), never on the command line; the
  pilot takes it out of its environment at once so nothing it starts
  inherits it.
* Together they make the (slot, host) key that signs the pilot's
  notification bodies and checks the service's command answers
  (:func:`workspace_common.protocol.slot_key`).
"""

from __future__ import annotations

import dataclasses
import os

from workspace_common.protocol import SLOT_SECRET_ENV, is_key, slot_key

#: The placeholder a node key path may hold, for a config shared by several nodes.
HOST_PLACEHOLDER = "{host}"


class CredentialError(Exception):
    """A node key or slot secret that cannot be used; the message is one line saying what to do."""


@dataclasses.dataclass(frozen=True)
class PilotCredentials:
    """The digest account (user = the host, password = the node key) and the (slot, host) signing key."""

    user: str
    password: str = dataclasses.field(repr=False)
    sign_key: str = dataclasses.field(repr=False)
    peer_key: str | None = dataclasses.field(default=None, repr=False)
    """What the nodes of the slot prove membership with to each other's peer servers (from the slot secret)."""


def node_key_path(template: str, host: str) -> str:
    """The node key file for ``host``: ``template`` with ``{host}`` replaced."""
    return template.replace(HOST_PLACEHOLDER, host)


def read_node_key(path: str) -> str:
    """The node key in ``path``; CredentialError unless it is 64 hex digits in a file only its owner can read.

    The owner must be this process's user (root on a node): a key that
    someone else could have written, or that others can read, is refused.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        hint = " (make it on the service's host with: workspace-lease node-key HOST)" \
            if isinstance(exc, FileNotFoundError) else ""
        raise CredentialError(f"node key {path}: {exc.strerror}{hint}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        text = handle.read(4096).decode("ascii", "replace").strip()
    if info.st_uid != os.geteuid():
        raise CredentialError(f"node key {path} belongs to uid {info.st_uid}, not to this pilot's uid {os.geteuid()}")
    if info.st_mode & 0o077:
        raise CredentialError(
            f"node key {path} is open to group or others (mode {info.st_mode & 0o777:04o}): chmod 600 it"
        )
    if not is_key(text):
        raise CredentialError(f"node key {path} does not hold 64 lowercase hex digits")
    return text


def take_slot_secret(environ=None) -> str:
    """Remove the slot secret from the environment and return it; CredentialError if missing or malformed."""
    environ = os.environ if environ is None else environ
    secret = environ.pop(SLOT_SECRET_ENV, None)
    if secret is None:
        raise CredentialError(
            f"no slot secret: ${SLOT_SECRET_ENV} is not set (the service's job script sets it; under sudo, "
            f"the sudoers line must keep it: see workspace-pilot evaluate)"
        )
    if not is_key(secret):
        raise CredentialError(f"${SLOT_SECRET_ENV} does not hold 64 lowercase hex digits")
    return secret


def pilot_credentials(node_key_file: str, host: str, slot: str, slot_secret: str) -> PilotCredentials:
    """Read ``host``'s node key and derive the (slot, host) key; CredentialError as above."""
    from workspace_common.protocol.chunks import peer_key

    key = read_node_key(node_key_path(node_key_file, host))
    return PilotCredentials(host, key, slot_key(key, slot, slot_secret), peer_key(slot_secret, slot))
