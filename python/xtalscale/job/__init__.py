"""Scaling jobs: orchestrate data, models, fit, statistics and reports (used by the CLI)."""
