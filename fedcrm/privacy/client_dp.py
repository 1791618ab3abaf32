"""Client-level DP (DP-FedAvg) as the ledger charges it, and what it guarantees against whom.

Each region clips its whole update to the C-ball; the server averages m clipped updates uniformly and
adds Gaussian noise of standard deviation σ·C/m (:class:`fedcrm.fl.strategy.NoiseForAggregated`).
The unit fedcrm protects is one *customer*, and removing one customer can move their region's clipped
update from one point of the C-ball to the opposite one: the average moves by up to 2C/m, not C/m. A
customer therefore sees the Gaussian mechanism at noise multiplier (σ·C/m) / (2C/m) = σ/2, and the
ledger charges that. (Charging σ, as fedcrm did before 0.2.0, takes C as the sensitivity: that holds
for adding or removing a whole region, not for changing one customer in it. At σ = 3, 10 rounds,
δ = 1e-6 it reads ε 5.54 where the customer's true ε is 12.45.)

Against the server the noise protects nothing: without secure aggregation the server receives each
region's clipped update before it adds the noise, so client-level DP is ε = ∞ against the server and
its operator. The ledger's finite figure holds against everyone who sees only the noised aggregate
(other regions and the model's users); every place that shows it says so.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedcrm.privacy.accountant import GaussianRelease, NonPrivateRelease, Release
from fedcrm.privacy.ledger_store import MECHANISM_NON_PRIVATE, LedgerEvent

# Removing one customer moves their region's clipped update across the C-ball: 2C.
CUSTOMER_SENSITIVITY_IN_CLIPS = 2.0
# What a region's training release records as its note (fedcrm.region writes ``mode <privacy.mode>``).
CLIENT_DP_NOTE = "mode client_dp"
AGAINST_SERVER = "∞ (client-level DP without secure aggregation)"
AGAINST_SERVER_WHY = (
    "the server receives each region's clipped update before it adds the noise; the finite ε holds only "
    "against those who see the noised aggregate (other regions, the model's users)"
)


def charged_noise_multiplier(server_noise_multiplier: float) -> float:
    """The noise multiplier one customer sees: the server's σ over the customer's sensitivity 2C (in C)."""
    return server_noise_multiplier / CUSTOMER_SENSITIVITY_IN_CLIPS


def client_dp_release(*, server_noise_multiplier: float, rounds: int = 1) -> Release:
    """What ``rounds`` rounds of client-level DP at the server's σ cost each customer (q = 1: every round
    reads every customer of a region that trains); no noise at all is a release without DP."""
    if server_noise_multiplier <= 0:
        return NonPrivateRelease()
    return GaussianRelease(charged_noise_multiplier(server_noise_multiplier), 1.0, rounds)


def is_client_dp(event: LedgerEvent) -> bool:
    """Whether a ledger event is a client-level DP round (its update reached the server un-noised)."""
    return event.note == CLIENT_DP_NOTE and event.mechanism != MECHANISM_NON_PRIVATE


def epsilon_against_server(events: Iterable[LedgerEvent], *, epsilon: float) -> float:
    """The region's ε against the server: ∞ once any of its releases was client-level DP, else the ledger's."""
    return float("inf") if any(is_client_dp(e) for e in events) else epsilon
