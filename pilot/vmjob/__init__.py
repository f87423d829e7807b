"""VM jobs: one batch job's command run inside a fresh VM of an approved image, on the node the batch system chose.

The other model of the field beside leasing nodes (DESY's Grid Engine
prologue, KIT's ViBatch, pcocc): the user keeps the job script, the site
gets isolation and per-community operating systems. ``workspace-vmjob run``
(:mod:`pilot.vmjob.cli`) does it inside the job, through one sudo rule; the
Slurm job-submit filter and epilog in ``packaging/slurm/`` do it for jobs
that only ask for an image (docs/vmjobs.md).

It stands on the pilot's node-side parts: the node journal and lock, the
memory backends, the VM checks, tags and domain XML. Its modules:
:mod:`~pilot.vmjob.catalog` (the node's approved images),
:mod:`~pilot.vmjob.allocation` (which job, how many cores and MB),
:mod:`~pilot.vmjob.rundir` (control files and sockets),
:mod:`~pilot.vmjob.virtiofs` (the shares' daemons, as the job's user),
:mod:`~pilot.vmjob.output` (the guest's output back to the batch system),
:mod:`~pilot.vmjob.runner` (the order of it all, journal first).
"""
