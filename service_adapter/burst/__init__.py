"""Bursting by demand: a COBalD pool of leases (docs/bursting.md).

- :mod:`.profile`: what each lease of a pool looks like;
- :mod:`.view`: what the pool holds and how it is used, from the service's listing; which leases to give back;
- :mod:`.waiting`: how much work waits (a Slurm partition's pending jobs, or a site's command);
- :mod:`.pool`: :class:`~.pool.LeasePool`, the pool COBalD's YAML names (needs ``cobald``: the ``cobald`` extra).
"""
