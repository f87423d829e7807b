"""What root's batch-system commands run with, and which job variables root takes from its caller.

The pilot and ``workspace-vmjob`` run as root through sudo for callers we do
not trust (the pilot's service account, an ordinary batch user). The batch
systems' client commands read their config, plug-in directory and cell from
the environment (``SLURM_CONF`` names a slurm.conf whose ``PluginDir`` says
where ``squeue`` loads ``auth_*.so`` from; ``SGE_ROOT``/``SGE_CELL`` name the
tree ``qstat`` reads its bootstrap and master from; ``PATH`` says which
``squeue`` runs at all). So none of these comes from the caller:
:class:`BatchClient` builds the whole environment of every such command from
root-owned configuration (``[batch]`` in pilot.conf), and
:func:`job_variables` lets only the job's identity through from the caller
(job ids, the Slurm node name, walltime numbers), each checked against its
batch system's format before it reaches an argument.

Standard library only: on the pilot's start path.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

#: Where root finds the batch system's commands unless ``[batch] path`` says otherwise (sudo's secure_path).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: The job variables root takes from its caller, each with the form it must have. Only these cross sudo
#: (the shipped sudoers' env_keep and the job script's --preserve-env name the same list,
#: :data:`workspace_common.protocol.BATCH_ENV`); the batch system's own config locations are not among them.
_JOB_VARIABLE_FORMS = {
    "SLURM_JOB_ID": re.compile(r"[0-9]{1,12}"),
    "SLURM_JOB_END_TIME": re.compile(r"[0-9]{1,12}"),
    "SLURMD_NODENAME": re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,62}[A-Za-z0-9])?"),
    # Torque/PBS Pro: 123, 123.server.domain, array jobs 123[4].server or 123[].server.
    "PBS_JOBID": re.compile(r"[0-9]{1,12}(\[[0-9]{0,9}\])?(\.[A-Za-z0-9][A-Za-z0-9.-]{0,252})?"),
    "PBS_WALLTIME": re.compile(r"[0-9]{1,12}(:[0-9]{1,2}){0,2}"),
    "JOB_ID": re.compile(r"[0-9]{1,12}"),
}


class JobVariableError(ValueError):
    """A job variable from the caller's environment that does not have its batch system's form; one line."""


def job_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """The job variables present in ``environ``, each checked; nothing else from it.

    Raises :class:`JobVariableError` naming the first variable whose value is
    not of its batch system's form (a job id that is not a job id could be an
    option to ``squeue`` or ``qstat``, or a path).
    """
    found = {}
    for name, form in _JOB_VARIABLE_FORMS.items():
        value = environ.get(name)
        if value is None:
            continue
        if not form.fullmatch(value):
            shown = value if len(value) <= 40 and value.isprintable() else repr(value[:40]) + "..."
            raise JobVariableError(f"${name} is {shown!r}, not a {name.replace('_', ' ').lower()} of the batch "
                                   "system's form; the pilot changes nothing")
        found[name] = value
    return found


@dataclasses.dataclass(frozen=True)
class BatchClient:
    """Where root finds the batch system's commands and which configuration they read.

    Every field comes from root-owned configuration (pilot.conf's ``[batch]``),
    never from the caller. :meth:`environment` is the whole environment such a
    command runs with; :meth:`which` finds a command only on :attr:`path`.
    """

    path: str = DEFAULT_PATH
    slurm_conf: str | None = None
    sge_root: str | None = None
    sge_cell: str = "default"
    sge_qmaster_port: int | None = None

    def environment(self) -> dict[str, str]:
        """A fresh environment for one batch-system command: PATH, the C locale, Slurm's standard time format,
        and the configured Slurm and Grid Engine locations."""
        env = {"PATH": self.path, "LC_ALL": "C", "SLURM_TIME_FORMAT": "standard"}
        if self.slurm_conf:
            env["SLURM_CONF"] = self.slurm_conf
        if self.sge_root:
            env["SGE_ROOT"] = self.sge_root
            env["SGE_CELL"] = self.sge_cell
            if self.sge_qmaster_port is not None:
                env["SGE_QMASTER_PORT"] = str(self.sge_qmaster_port)
        return env

    def which(self, name: str) -> str | None:
        """The first executable ``name`` in :attr:`path`'s directories, or None (never the caller's PATH)."""
        for directory in self.path.split(":"):
            candidate = os.path.join(directory, name)
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
        return None
