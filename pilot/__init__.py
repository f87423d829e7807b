"""workspace-pilot: the node side. A pilot reserves this node's memory for leased VMs and always gives it back."""

#: The project's version, in this one place (setup.cfg reads it; the packages' builds too).
__version__ = "0.1.0"
