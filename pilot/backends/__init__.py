"""Balloon backends: the ways a pilot takes memory from the host and gives it back."""

from pilot.backends.base import BalloonBackend, BackendError, Taken


def make_backend(config) -> BalloonBackend:
    """The backend a :class:`pilot.config.PilotConfig` names."""
    if config.backend == "hugepages":
        from pilot.backends.hugepages import HugepagesBackend

        return HugepagesBackend(config.hugepages_dir)
    raise BackendError(f"unknown memory backend {config.backend!r}")


__all__ = ["BalloonBackend", "BackendError", "Taken", "make_backend"]
