"""Process-level concerns: the pidfile, and the zero-downtime upgrade (upgrade.py)."""
