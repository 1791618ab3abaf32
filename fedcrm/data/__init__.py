"""Customer tables: declared schemas, loading and validation, encoding, region splits, synthetic data."""
