"""workspace-pilot: the node side. A pilot reserves this node's memory for leased VMs and always gives it back."""
