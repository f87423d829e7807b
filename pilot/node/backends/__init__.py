"""Balloon backends: the ways a pilot takes memory from the host and gives it back.

Each backend lives in its own module and is imported only when used, so
the pilot never loads libvirt unless the ``xen`` backend is configured.
"""

from __future__ import annotations

import importlib

from pilot.node.backends.base import BackendError, BalloonBackend, read_meminfo_kb

# name -> (module, class)
_CLASSES = {
    "hugepages": ("pilot.node.backends.hugepages", "HugepagesBackend"),
    "cgroup": ("pilot.node.backends.cgroup", "CgroupBackend"),
    "xen": ("pilot.node.backends.xen", "XenBackend"),
    "xl": ("pilot.node.backends.xl", "XlBackend"),
    "none": ("pilot.node.backends.none", "NoBackend"),
}


def make_backend(name: str, params: dict) -> BalloonBackend:
    """The backend ``name`` built from ``params`` (as :meth:`BalloonBackend.params` returned them).

    Raises BackendError for an unknown name or parameters the backend refuses.
    """
    try:
        module, cls = _CLASSES[name]
    except KeyError:
        raise BackendError(f"unknown memory backend {name!r}; known: {', '.join(_CLASSES)}") from None
    try:
        return getattr(importlib.import_module(module), cls)(**params)
    except TypeError as exc:
        raise BackendError(f"memory backend {name}: bad parameters {params!r}: {exc}") from None


def backend_params(config) -> dict:
    """The parameters of the backend a :class:`pilot.config.PilotConfig` names."""
    if config.backend == "hugepages":
        return {"page_kb": config.hugepage_kb}
    if config.backend == "cgroup":
        return {"path": config.cgroup}
    if config.backend == "xen":
        return {"uri": config.xen_uri}
    if config.backend == "xl":
        return {"command": config.xl_command, "sudo": config.xl_sudo}
    return {}


def backend_from_config(config) -> BalloonBackend:
    """The backend a :class:`pilot.config.PilotConfig` names, ready to read."""
    return make_backend(config.backend, backend_params(config))


__all__ = ["BalloonBackend", "BackendError", "read_meminfo_kb", "make_backend", "backend_from_config", "backend_params"]
