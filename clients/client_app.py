"""fedcrm's Flower ClientApp: one per region, run next to the region's data.

The data owner sets the region's name, data file, state folder and (optionally) policy file on their
SuperNode: ``flower-supernode --node-config 'region="eu" data-path="/data/eu.csv"
state-dir="/var/lib/fedcrm/eu" policy-path="/etc/fedcrm/eu-policy.yaml"'``.
"""

from fedcrm.fl.client import build_client_app

app = build_client_app()
