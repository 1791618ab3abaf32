"""fedcrm: federated, differentially private customer models without moving customer data.

From Python: ``fedcrm.run``, ``fedcrm.load_model``, ``fedcrm.budget`` (see :mod:`fedcrm.api`). They are
imported on first use, so ``import fedcrm`` loads neither torch nor Flower.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"
__all__ = ["Run", "budget", "load_model", "run", "__version__"]

if TYPE_CHECKING:
    from fedcrm.api import Run, budget, load_model, run


def __getattr__(name: str) -> Any:
    if name in ("Run", "budget", "load_model", "run"):
        from fedcrm import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedcrm' has no attribute {name!r}")
