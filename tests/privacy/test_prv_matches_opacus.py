"""fedcrm's own PRV accountant against Opacus's ``PRVAccountant``, the one it replaced in 0.2.0: the
same computation, so a ledger's ε must not move (only the pairwise convolution's FFT lengths differ)."""

from __future__ import annotations

import pytest

from fedcrm.privacy.accountant import GaussianRelease, epsilon

DELTA = 1e-5

HISTORIES: dict[str, list[tuple[float, float, int]]] = {
    "one_mechanism": [(1.1, 64 / 3000, 460)],
    "full_batch": [(2.0, 1.0, 10)],
    "three_mechanisms_tree_convolved": [(1.0, 0.01, 500), (1.2, 0.02, 300), (0.9, 0.005, 1000)],
    "high_noise": [(3.0, 0.05, 200)],
}


@pytest.mark.parametrize("name", sorted(HISTORIES))
def test_prv_epsilon_equals_opacus_prv_accountant_within_1e_9(name: str) -> None:
    from opacus.accountants import PRVAccountant

    history = HISTORIES[name]
    reference = PRVAccountant()
    reference.history = list(history)
    ours = epsilon([GaussianRelease(*h) for h in history], delta=DELTA, accountant="prv")
    assert ours == pytest.approx(float(reference.get_epsilon(DELTA)), rel=1e-9)
