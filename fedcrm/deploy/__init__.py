"""Deployment helpers: certificates and keys for a real Flower SuperLink/SuperNode federation.

The apps in ``server/`` and ``clients/`` run unchanged in simulation and in deployment; this package
holds only what a deployment needs on top (TLS material for the SuperLink, one authentication key
pair per region's SuperNode). See ``docs/deployment-notes.md`` for the commands.
"""
