"""workspace-pilot: the service side. Submit and cancel pilot jobs, receive their notifications, keep lease state."""
