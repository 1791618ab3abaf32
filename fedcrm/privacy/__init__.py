"""Differential privacy: the accounting maths, the durable per-region ledger and the DP-SGD wiring."""
