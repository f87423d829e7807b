"""Opening libvirt, one way for the whole node side.

The module is imported on first use, never at pilot start (it costs
milliseconds and most pilots never touch it), and its default error handler,
which prints every error to stderr, expected ones too (a domain already
gone), is turned off: each error reaches the caller as an exception.
"""

from __future__ import annotations


def libvirt_module():
    """The ``libvirt`` module with its stderr printing off; ImportError if libvirt-python is missing."""
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def open_connection(uri: str, *, read_only: bool = False):
    """A connection to ``uri`` (read-only when only looking); ``libvirt.libvirtError`` or ImportError as raised."""
    libvirt = libvirt_module()
    conn = libvirt.openReadOnly(uri) if read_only else libvirt.open(uri)
    if conn is None:  # very old bindings return None instead of raising
        raise libvirt.libvirtError(f"cannot connect to {uri}")
    return conn
