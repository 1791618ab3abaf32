"""Erasure by retraining from excluded shards (SISA across the federation)."""
