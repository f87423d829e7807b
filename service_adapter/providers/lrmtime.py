"""How job scripts and the batch systems' commands write times: a walltime, a job's begin time.

Begin times are this host's local time, as ``sbatch --begin`` and ``qsub -a``
read them (the service runs where it submits).
"""

from __future__ import annotations

import math
import time


def format_walltime(seconds: int) -> str:
    """``HH:MM:SS`` (hours may exceed 99), the form both sbatch and PBS read."""
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}"


def slurm_time(epoch: float) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` in this host's local time, as sbatch's ``--begin`` reads it; rounded up to the
    second (a job never begins before it was asked to)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(math.ceil(epoch)))


def pbs_time(epoch: float) -> str:
    """``CCYYMMDDhhmm.SS`` in this host's local time, as ``qsub -a`` of Torque, PBS Pro and Grid Engine reads it;
    rounded up to the second."""
    return time.strftime("%Y%m%d%H%M.%S", time.localtime(math.ceil(epoch)))
