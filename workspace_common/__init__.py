"""The shared floor: what the node side (``pilot``) and the service side (``service_adapter``) both use.

Standard library only, and nothing of either side: :mod:`.protocol` (the
wire contract, digest arithmetic, commands, chunk manifests, lease
networks), :mod:`.ini` (reading both configuration files), :mod:`.errors`,
:mod:`.cli` (the commands' shared parser pieces), :mod:`.qstat` (PBS's
``qstat -f``, read by the pilot's deadline and the pbs provider) and
:mod:`.nodenames` (the names of what a pilot makes on a node, derived from
what the service chose) and :mod:`.bounded` (HTTP answers read within a
bound). ``tests/test_layers.py`` holds these rules.
"""

#: The project's version, in this one place (setup.cfg reads it; the packages' builds too).
__version__ = "0.1.0"
