"""The Flower adapter: the only package that imports ``flwr``."""
