"""lease-bench: stand leases up and tear them down on a real LRM, phase by phase."""
