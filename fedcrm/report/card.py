"""The model card: intended use, model, data, the privacy guarantee in plain words, metrics and known limits."""

from __future__ import annotations

import math

from fedcrm.privacy.client_dp import AGAINST_SERVER
from fedcrm.report.reading import RunView


def _plain_epsilon(eps: float, delta: float) -> str:
    odds = math.exp(eps)
    return (
        f"ε = {eps:.2f}, δ = {delta:.0e}: for any one customer, anything computed from this model is at most "
        f"e^ε ≈ {odds:.1f}× more (or less) likely with their record in the training data than without it, "
        f"except with probability δ. An observer who thought it 50–50 that the customer was included can "
        f"be at most about {odds / (1 + odds):.0%} sure after seeing the model (δ aside)."
    )


def model_card(view: RunView) -> str:
    s, cfg = view.summary, view.config
    task = s.task
    purpose = {
        "churn": "rank existing customers by their risk of leaving, to prioritise retention offers",
        "propensity": "rank customers by their propensity to take up an offer, to prioritise outreach",
    }.get(task, task)
    m = s.final_metrics
    by_region = s.final_metrics_by_region or {}
    lines = [
        f"# Model card: {s.name}",
        "",
        "## Intended use",
        "",
        f"Task: **{task}**. Use: {purpose}. The output is a score in [0, 1] for ranking; it is not calibrated "
        "for individual decisions with legal or similarly significant effects, and must not be used for "
        "them without human review.",
        "",
    ]
    if view.is_centralised:
        lines += [
            "**This is a centralised baseline**: every region's data was pooled in one place and no "
            "differential privacy was applied. It exists only to measure the cost of federation and "
            "privacy and must not be deployed.",
            "",
        ]
    model = cfg.get("model", {})
    training = cfg.get("training", {})
    lines += [
        "## Model",
        "",
        f"{model.get('kind', '?')}"
        + (f" (hidden layers {model.get('hidden')})" if model.get("kind") == "mlp" else "")
        + f", trained for "
        f"{training.get('rounds')} federated rounds × {training.get('local_epochs')} local epoch(s), "
        f"{(cfg.get('federation') or {}).get('strategy', 'fedavg')}, "
        f"{s.shards or 1} SISA shard(s) (served model = mean of the constituents' probabilities).",
        "",
        "## Data",
        "",
        "| region | customers in table | excluded (no consent) | forgotten | training | hold-out | "
        "hold-out label rate |",
        "|---|---|---|---|---|---|---|",
    ]
    for r, d in s.regions.items():
        rate = by_region.get(r, {}).get("positive_rate")
        lines.append(
            f"| {r} | {int(d.get('customers_in_table', 0))} | {int(d.get('excluded_no_consent', 0))} | "
            f"{int(d.get('forgotten', 0))} | {int(d.get('train', 0))} | {int(d.get('holdout', 0))} | "
            + ("—" if rate is None else f"{rate:.3f}")
            + " |"
        )
    lines += [
        "",
        "Customers without consent for this purpose and customers who asked to be forgotten "
        "(tombstoned) were excluded before training. Each region's data stayed in the region; only model "
        "weights and aggregate metrics left it. Label rates are of the hold-out, reported only where the "
        "hold-out has at least the policy's minimum of customers.",
        "",
        "## Privacy guarantee",
        "",
    ]
    mode = s.privacy_mode
    priv = s.privacy
    if mode == "sample_dp" and priv:
        worst = max(
            (p for p in priv.values() if p.get("epsilon") is not None), key=lambda p: p["epsilon"], default=None
        )
        lines += [
            "Sample-level differential privacy (DP-SGD at every region, every customer's gradient clipped "
            "and noised). The guarantee is per customer and covers the model and every update sent "
            "during training, against anyone, the server included."
        ]
        if worst is not None:
            lines += [
                "",
                _plain_epsilon(float(worst["epsilon"]), float(worst["delta"]))
                + " This is the largest ε spent by any region; per region below.",
            ]
        lines += ["", "| region | ε spent | δ | budget |", "|---|---|---|---|"]
        lines += [
            f"| {r} | {p.get('epsilon') if p.get('epsilon') is None else round(p['epsilon'], 3)} | "
            f"{p.get('delta'):.0e} | {p.get('budget')} |"
            for r, p in priv.items()
        ]
        lines += [
            "",
            "This is sample-level, not client-level, privacy: it protects each customer's record, not "
            "whether a whole region took part; it does not hide facts true of many customers at once (a "
            "region's churn rate), and a customer with several records (e.g. in two regions) is protected "
            "per record.",
        ]
    elif mode == "client_dp":
        lines += [
            "Client-level differential privacy (DP-FedAvg): each region clips its whole update and the "
            "server adds noise to their average. The regions' ledgers charge each customer at noise "
            "multiplier σ/2 (removing one customer moves their region's clipped update by up to 2C), and "
            "that ε holds against those who see only the noised aggregate: other regions and the model's "
            "users. The server sees each region's clipped update before the noise is added, so against the "
            f"server this is ε = {AGAINST_SERVER}; with few regions this mode protects little.",
            "",
            "| region | ε (model's users) | against the server |",
            "|---|---|---|",
        ]
        lines += [f"| {r} | {p.get('epsilon')} | {p.get('against_server', AGAINST_SERVER)} |" for r, p in priv.items()]
    else:
        lines += [
            "**No differential privacy.** The model and the updates sent during training can reveal "
            "whether a given customer was in the training data (membership inference)."
        ]
    lines += [
        "",
        "## Metrics",
        "",
        "Pooled hold-out (each region's hold-out, chosen by a seeded hash of the customer id, scored at "
        "the region and combined from aggregate histograms):",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.4f} |" if k != "customers" else f"| {k} | {int(v)} |" for k, v in m.items()]
    if by_region:
        lines += ["", "| region | AUC | log-loss | customers |", "|---|---|---|---|"]
        lines += [
            f"| {r} | {d.get('auc', math.nan):.4f} | {d.get('log_loss', math.nan):.4f} | {int(d.get('customers', 0))} |"
            for r, d in by_region.items()
        ]
    lines += [
        "",
        "## Known limits",
        "",
        "- AUC is computed from score histograms of 2,000 bins (ties within a bin count one half); it may "
        "differ slightly from the exact AUC.",
        "- The hold-out comes from the same regions and period as the training data: drift over time and "
        "new regions are not measured.",
        "- Per-group fairness is not part of this card; check it before any use that affects customers.",
        *[f"- {w}" for w in s.warnings],
        "",
        f"Code version {s.code_version}, config sha256 {s.config_sha256}.",
        "",
    ]
    return "\n".join(lines)
