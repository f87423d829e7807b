"""What the node side and the service side share besides the protocol: standard library only.

The service may import these (and :mod:`pilot.protocol`) and nothing else
from ``pilot``: :mod:`.ini` reads both configuration files, :mod:`.qstat`
reads PBS's ``qstat -f`` for the pilot's deadline and the pbs provider.
"""
