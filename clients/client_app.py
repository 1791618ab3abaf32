"""fedcrm's Flower ClientApp: one per region, run next to the region's data.

The data owner sets the region's name, data file, state folder and (optionally) policy file on their
SuperNode: ``flower-supernode --node-config 'region="eu" data-path="/data/eu.csv"
state-dir="/var/lib/fedcrm/eu" policy-path="/etc/fedcrm/eu-policy.yaml"'``.

This file is all of the region's code that travels in the app bundle: the policy, ledger, wire check
and data loading are the fedcrm installed on the region's host (checked below, before any is used).
"""

from pathlib import Path

from fedcrm.deploy.approval import check_installed_fedcrm

check_installed_fedcrm(app_dir=Path(__file__).resolve().parents[1])

from fedcrm.fl.client import build_client_app  # noqa: E402 - only once the installed fedcrm is confirmed

app = build_client_app()
