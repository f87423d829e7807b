#!/usr/bin/env python3
"""lease-bench on the real 4-node Slurm of the tests: start the cluster, write its service config, run.

Everything after ``--`` goes to ``lease-bench`` (default: ``--nodes 1 2 4
--rounds 5``). The cluster (slurmctld, 4 slurmd, munged) is this
process's children, stopped by pid at the end; the pilots run through
sbatch, ``srun --ntasks-per-node=1`` and ``sudo``, as on a real site. Run
as root from the repository root::

    .venv/bin/python bench/bench_lease_slurm.py [--launcher srun] -- --rounds 5 --json FILE --plot FILE.png
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from admin_tools.leasebench.cli import main as lease_bench  # noqa: E402
from tests.support.slurm_cluster import PILOT, SUDO, WALLTIME_MARGIN_S, SlurmCluster  # noqa: E402

CONFIG = """[provider]
name = slurm
command_timeout = 20
env =
    SLURM_CONF={slurm_conf}
walltime_padding = 120
output_dir = {jobs}
sudo = {sudo}
pilot_command = {pilot}
launcher = {launcher}
"""


def main(argv=None) -> int:
    """Start the cluster, run lease-bench against it, stop the cluster; lease-bench's exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launcher", default="auto", help="the job scripts' launcher (default auto: srun)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (job output, logs)")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="-- then lease-bench's own arguments")
    args = parser.parse_args(argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    workdir = tempfile.mkdtemp(prefix="bench-lease-slurm-")
    os.chmod(workdir, 0o755)  # munged and the job steps must reach it
    cluster = SlurmCluster(os.path.join(workdir, "slurm"))
    os.makedirs(cluster.workdir)
    try:
        cluster.start()
        config = os.path.join(workdir, "service.conf")
        with open(config, "w", encoding="utf-8") as handle:
            handle.write(CONFIG.format(slurm_conf=cluster.conf, jobs=os.path.join(workdir, "jobs"), sudo=SUDO,
                                       pilot=PILOT, launcher=args.launcher))
        bench_dir = os.path.join(workdir, "bench")
        return lease_bench(["--provider", "slurm", "--config", config, "--workdir", bench_dir,
                            "--pilot-option", f"timing.walltime_margin={WALLTIME_MARGIN_S}",
                            "--pilot-option", f"batch.slurm_conf={cluster.conf}",
                            *(rest or ["--nodes", "1", "2", "4", "--rounds", "5"])])
    finally:
        cluster.stop()
        if args.keep:
            print(f"bench-lease-slurm: kept {workdir} (job output, service and slurm logs)", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
