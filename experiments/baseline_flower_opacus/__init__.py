"""The yardstick: Flower + Opacus written by hand the way Flower's Opacus example does it (not fedcrm)."""
