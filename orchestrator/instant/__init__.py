"""Instant clones: children started from a parent VM's memory instead of booting."""
