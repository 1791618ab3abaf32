"""fedcrm: federated, differentially private customer models without moving customer data."""

__version__ = "0.1.0"
