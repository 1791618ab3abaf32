"""CLI commands grouped by topic; each module has register(app)."""
