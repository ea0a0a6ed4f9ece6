"""Schema revisions, oldest first; each one upgrades and downgrades."""
