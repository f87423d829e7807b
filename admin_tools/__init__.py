"""workspace-pilot admin tools (kill-all, node status, lease-bench) live here as they are built."""
