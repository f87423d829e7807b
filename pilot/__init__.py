"""workspace-pilot: the node side. A pilot reserves this node's memory for leased VMs and always gives it back."""

from workspace_common import __version__  # noqa: F401 (the version lives in the shared floor)
