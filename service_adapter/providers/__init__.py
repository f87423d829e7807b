"""LRM providers: how pilot jobs are submitted, cancelled and watched."""

from service_adapter.providers.base import JobState, PilotJob, Provider

__all__ = ["JobState", "PilotJob", "Provider"]
