"""Code shared by every process: settings, domain actions, Redis keys and transport, auth."""
