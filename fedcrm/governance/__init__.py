"""Governance: the audit log, consent per purpose, customer export and erasure requests."""
