"""``fedcrm budget``: a region's privacy ledger, ε spent over its whole history, and retrains left."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedcrm.commands.common import DEFAULT_STATE, StateOpt, exit_with, out
from fedcrm.errors import FedcrmError


def budget(
    region: Annotated[str, typer.Option(help="Region name.")],
    state: StateOpt = DEFAULT_STATE,
    accountant: Annotated[str | None, typer.Option(help="rdp or prv; default: the policy's.")] = None,
    policy: Annotated[
        Path | None, typer.Option(help="The region's policy file (its budget and δ); default: the default policy.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    accept_seeded: Annotated[
        bool,
        typer.Option(
            "--accept-seeded",
            help="Count the releases migrated from fedcrm 0.1 (noise `seeded`, predictable from their config) at "
            "their recorded σ instead of ε = ∞; recorded in the region's audit log, once, for good.",
        ),
    ] = False,
    operator: Annotated[str | None, typer.Option(help="Who accepts (--accept-seeded); default: the login.")] = None,
) -> None:
    """Show a region's privacy ledger: every release, ε spent over the whole history, budget, remaining.

    ε is per customer, at the δ the region's policy fixes: that of the worst-off customer, composing every
    release whose shard held them, under every shard count (S) the region's runs used.
    """
    from fedcrm.governance.audit_trail import operator_actor
    from fedcrm.governance.policy import load_policy
    from fedcrm.governance.seeded_releases import accept_seeded as accept_seeded_releases
    from fedcrm.privacy.client_dp import AGAINST_SERVER
    from fedcrm.privacy.ledger import PrivacyLedger
    from fedcrm.privacy.ledger_store import SEEDED_MIGRATION_NOTE
    from fedcrm.unlearning.budget import retrain_budgets

    try:
        state_dir = state / region
        if not (state_dir / "privacy_ledger.sqlite").exists():
            raise FedcrmError(f"no privacy ledger for region {region} under {state} (nothing released yet?)")
        if accept_seeded:
            entry = accept_seeded_releases(state_dir=state_dir, region=region, actor=operator_actor(operator))
            if not as_json:  # the JSON's seeded_accepted says it
                out.print(f"seeded releases of region {region} accepted (audit entry {entry.seq}, {entry.hash[:12]})")
        ledger = PrivacyLedger.open(state_dir, region=region)
        rules = load_policy(policy)
        accountant = accountant or rules.accountant  # the ledger composes as the region's policy says
        s = ledger.summary(delta=rules.delta, accountant=accountant, budget=rules.privacy_budget)
        s["retrains_left_by_shard"] = {
            str(k): b.retrains_left
            for k, b in retrain_budgets(ledger, budget=s["budget"], delta=rules.delta, accountant=accountant).items()
        }
    except FedcrmError as e:
        exit_with(e)
    if as_json:
        out.print_json(json.dumps(s, default=str))
        return
    t = Table("id", "time", "run", "round", "shard", "σ", "q", "steps", "noise", "outcome")
    for ev in s["events"]:
        t.add_row(
            str(ev["id"]),
            ev["time"][:19],
            ev["run_id"],
            str(ev["round"]),
            f"{ev['shard']}/{ev['shards'] or '?'}",
            "none (no DP)" if ev["mechanism"] == "non_private" else f"{ev['noise_multiplier']:.3f}",
            f"{ev['sample_rate']:.4f}",
            str(ev["steps"]),
            ev["noise"],
            str(ev["status"]),
        )
    out.print(t)
    out.print(
        f"region [bold]{region}[/]: ε spent {s['epsilon_spent']:.3f} (worst-off customer, δ={rules.delta:g} from "
        f"the policy, {accountant}), budget {s['budget']:g}, remaining {s['remaining']:.3f}"
    )
    if math.isinf(s["epsilon_against_server"]) and not math.isinf(s["epsilon_spent"]):
        out.print(
            f"against the server: {AGAINST_SERVER}; the ε above holds only against those who see the noised "
            "aggregate (other regions, the model's users)"
        )
    for size, per_shard in s["epsilon_by_shard"].items():
        if size != "1":
            out.print(f"shards of S={size}: " + ", ".join(f"{k}: {v:.3f}" for k, v in per_shard.items()))
    out.print("releases by noise: " + (", ".join(f"{k} {v}" for k, v in s["releases_by_noise"].items()) or "-"))
    if s["releases_by_noise"].get("seeded"):
        out.print(
            f"[yellow]warning:[/] accepted: {s['seeded_accepted']}. Releases marked `seeded` count at their σ, "
            "although whoever wrote their config could predict their noise; fedcrm 0.1's evaluation answers, exact "
            "and unrecorded, stay outside every ε."
            if s["seeded_accepted"]
            else f"[yellow]warning:[/] {SEEDED_MIGRATION_NOTE}"
        )
    if s["non_private_releases"]:
        out.print(
            f"[yellow]warning:[/] {s['non_private_releases']} release(s) without DP: ε is infinite for the "
            "customers they read."
        )
    out.print(
        "erasure retrains left (repeating each shard's last run): "
        + ", ".join(f"shard {k}: {v}" for k, v in s["retrains_left_by_shard"].items())
    )


def register(app: typer.Typer) -> None:
    app.command("budget")(budget)
