"""LRM providers: how pilot jobs are submitted, cancelled and watched.

:class:`ProviderSettings` is what a service config's ``[provider]`` section
holds (same field names); :func:`make_provider` builds the provider it names.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from service_adapter.providers.base import JobState, PilotJob, Provider, ProviderError
from service_adapter.providers.jobscript import JobTemplate, ScriptDialect
from service_adapter.providers.pbsscript import PBS_SCRIPT
from service_adapter.providers.sgescript import SGE_SCRIPT
from service_adapter.providers.slurmscript import SLURM_SCRIPT

__all__ = ["JobState", "PilotJob", "Provider", "ProviderError", "ProviderSettings", "make_provider", "PROVIDER_NAMES"]

PROVIDER_NAMES = ("local", "pbs", "sge", "slurm")
#: The job script of each provider that writes one.
SCRIPT_DIALECTS: dict[str, ScriptDialect] = {"pbs": PBS_SCRIPT, "sge": SGE_SCRIPT, "slurm": SLURM_SCRIPT}
QSTAT_HISTORY = ("auto", "yes", "no")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclasses.dataclass(frozen=True)
class ProviderSettings:
    """Which provider, and how it runs; constructing one validates every field (ValueError, one line).

    ``template`` shapes the pbs, sge and slurm job scripts; ``command_timeout_s``
    bounds each LRM command; ``env`` is added to the environment of every
    LRM command (e.g. ``{"SLURM_CONF": ...}``); ``use_pbs_python`` and
    ``qstat_history`` are for pbs; ``state_dir`` is the local provider's
    directory (pilot output and its ``jobs.json``).
    """

    name: str = "local"
    template: JobTemplate = JobTemplate()
    command_timeout_s: float = 30.0
    use_pbs_python: bool = False
    qstat_history: str = "auto"
    env: dict | None = None
    state_dir: str = "/var/lib/workspace-pilot-service/local"

    def __post_init__(self):
        if self.name not in PROVIDER_NAMES:
            raise ValueError(f"unknown provider {self.name!r}: use one of {', '.join(PROVIDER_NAMES)}")
        if not isinstance(self.template, JobTemplate):
            raise ValueError(f"template must be a JobTemplate, not {type(self.template).__name__}")
        timeout = self.command_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
                or timeout <= 0:
            raise ValueError(f"command_timeout_s must be a number of seconds above 0, not {timeout!r}")
        if not isinstance(self.use_pbs_python, bool):
            raise ValueError(f"use_pbs_python must be True or False, not {self.use_pbs_python!r}")
        if self.qstat_history not in QSTAT_HISTORY:
            raise ValueError(f"qstat_history must be one of {', '.join(QSTAT_HISTORY)}, not {self.qstat_history!r}")
        if self.env is not None:
            if not isinstance(self.env, dict):
                raise ValueError(f"env must be a mapping of variable names to values, not {self.env!r}")
            for key, value in self.env.items():
                if not isinstance(key, str) or not _ENV_NAME_RE.fullmatch(key) or not isinstance(value, str) \
                        or "\x00" in value:
                    raise ValueError(f"env entry {key!r}={value!r} is not NAME=text")
            object.__setattr__(self, "env", dict(self.env))  # a copy: the settings stay what they were built as
        if not isinstance(self.state_dir, str) or not os.path.isabs(self.state_dir):
            raise ValueError(f"state_dir must be an absolute path, not {self.state_dir!r}")


def make_provider(settings: ProviderSettings) -> Provider:
    """The provider ``settings`` names, ready to submit (ValueError for a name or template it cannot use)."""
    if settings.name == "local":
        from service_adapter.providers.local import LocalProvider

        return LocalProvider(settings.state_dir)
    if settings.name == "slurm":
        from service_adapter.providers.slurm import SlurmProvider

        return SlurmProvider(settings.template, command_timeout_s=settings.command_timeout_s, env=settings.env)
    if settings.name == "sge":
        from service_adapter.providers.sge import SgeProvider

        return SgeProvider(settings.template, command_timeout_s=settings.command_timeout_s, env=settings.env)
    if settings.name == "pbs":
        from service_adapter.providers.pbs import PbsProvider

        return PbsProvider(
            settings.template, command_timeout_s=settings.command_timeout_s, env=settings.env,
            use_pbs_python=settings.use_pbs_python, qstat_history=settings.qstat_history,
        )
    raise ValueError(f"unknown provider {settings.name!r}: use one of {', '.join(PROVIDER_NAMES)}")
