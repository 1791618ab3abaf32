"""Reports that an ML engineer can read and share: a self-contained HTML page and a Markdown twin.

``write_report(RUN_DIR)`` covers one run: utility per round, ε spent per round per region against the
budget, config and provenance; it also writes the run's ``model_card.md``. ``write_report(SWEEP_DIR)``
covers a sweep: the privacy–utility curve with error bars across seeds, the cost of privacy in AUC
points next to the non-private federated and centralised baselines, and a model card per cell.

Plot functions return matplotlib Figures (Agg backend, nothing shown) so tests can inspect them: axes
labelled, one line per series. The HTML embeds every plot as a base64 PNG; the Markdown links PNG files
written next to it.

One module per concern: :mod:`.reading` (a run folder), :mod:`.tables`, :mod:`.plots`, :mod:`.html`
(the documents, ``write_report``) and :mod:`.card` (the model card).
"""

from __future__ import annotations

from fedcrm.report.card import model_card
from fedcrm.report.html import (
    PRIVACY_MODES_TEXT,
    Section,
    render,
    run_sections,
    write_report,
    write_run_report,
    write_sweep_report,
)
from fedcrm.report.plots import (
    figure_png,
    plot_by_parameter,
    plot_epsilon_per_round,
    plot_privacy_utility,
    plot_utility_per_round,
    series_lines,
)
from fedcrm.report.reading import RunView, provenance, sha256_of
from fedcrm.report.tables import (
    EPSILON_KEY,
    baselines,
    markdown_table,
    other_grid_keys,
    parameter_table,
    privacy_utility_table,
)

__all__ = [
    "EPSILON_KEY",
    "PRIVACY_MODES_TEXT",
    "RunView",
    "Section",
    "baselines",
    "figure_png",
    "markdown_table",
    "model_card",
    "other_grid_keys",
    "parameter_table",
    "plot_by_parameter",
    "plot_epsilon_per_round",
    "plot_privacy_utility",
    "plot_utility_per_round",
    "privacy_utility_table",
    "provenance",
    "render",
    "run_sections",
    "series_lines",
    "sha256_of",
    "write_report",
    "write_run_report",
    "write_sweep_report",
]
