"""The whole wire vocabulary: every key a message between server and regions may carry.

Both sides import these names, and the outgoing check at the regions (``allowed_reply``) refuses any
reply whose records or keys are not listed here, so what can leave a region is visible in one place.
"""

from __future__ import annotations

from typing import Final

# Records in a message's content.
ARRAYS: Final = "arrays"  # model weights (the only arrays that ever cross the wire)
CONFIG: Final = "config"  # server -> region: what to do
METRICS: Final = "metrics"  # region -> server: aggregate numbers only
STATUS: Final = "status"  # region -> server: region name, outcome, reason for a refusal

# CONFIG keys (server -> region). The server never sends a path.
ACTION: Final = "action"
ROUND: Final = "server-round"  # Flower's own strategies inject this key
RUN_ID: Final = "run-id"
SHARD: Final = "shard"
ROUND_OFFSET: Final = "round-offset"  # rounds completed before a resume: ledger and seeds use the true round
EXPERIMENT: Final = "experiment"  # the run's config as JSON, region paths blanked
SCHEMA: Final = "schema"  # the run's schema as YAML: a request, checked against the region's own (REFUSED_SCHEMA)

ACTION_DESCRIBE: Final = "describe"
ACTION_EVALUATE_SERVED: Final = "evaluate-served"
ACTIONS: Final = frozenset({ACTION_DESCRIBE, ACTION_EVALUATE_SERVED})
# Everything a message from the server may carry: its records, and the keys of its CONFIG record. A region
# refuses any other (fedcrm.fl.client.check_incoming) before it reads a row; README's "What the server
# sends" names what bounds each of them.
REQUEST_RECORDS: Final = frozenset({CONFIG, ARRAYS})
# Flower's client-side clipping wrapper (client-level DP) adds its clipping norm to every training config;
# a region clips with the plan's privacy.clipping_norm and never reads this key.
FLOWER_CLIPPING_NORM: Final = "clipping_norm"
PLAN_KEYS: Final = frozenset({ACTION, ROUND, RUN_ID, SHARD, ROUND_OFFSET, EXPERIMENT, SCHEMA, FLOWER_CLIPPING_NORM})
RUN_ID_MAX_CHARS: Final = 128  # a label in the ledger: printable, short
PLAN_TEXT_MAX_CHARS: Final = 1_000_000  # the experiment and the schema, each

# STATUS keys (region -> server).
REGION: Final = "region"
OUTCOME: Final = "outcome"
REASON: Final = "reason"
KIND: Final = "kind"
OUTCOME_OK: Final = "ok"
OUTCOME_REFUSED: Final = "refused"
OUTCOME_FAILED: Final = "failed"
# REASON of any unexpected failure while a region serves a message: one fixed code. Which exception it
# was could depend on the data (a path only some rows take); the region's own log has it, and a training
# release's ledger event records why it was not sent.
FAILED_IN_REGION: Final = "region-failed"

# REASON of a refusal: one of these fixed codes, never the region's own words. The words name exact
# counts ("shard 0 has 17 training customers"), and a count below the policy's minimum is precisely what
# must not leave; the full reason stays in the region's audit log and its own log.
REFUSED_PURPOSE: Final = "purpose-not-allowed"
REFUSED_COLUMN: Final = "column-not-allowed"
REFUSED_PRIVACY_MODE: Final = "privacy-mode-not-allowed"
REFUSED_NOISE: Final = "noise-below-policy-floor"
REFUSED_SHARD_SIZE: Final = "below-minimum-shard-size"
REFUSED_BUDGET: Final = "budget-exhausted"
REFUSED_BY_POLICY: Final = "refused-by-policy"  # any other policy refusal
# The run's schema is not the region's own (fedcrm.data.schema_match): it differs on a field that decides
# who a customer is or how a row is encoded, names a column the owner did not declare, or the region has
# no schema of its own. Refused before a row is read.
REFUSED_SCHEMA: Final = "schema-not-the-regions"
REFUSED_SHARDS: Final = "shard-count-not-allowed"  # unlearning.shards outside the policy's allowed_shards
# Any failure to read or check the region's table, whichever check failed: which one would be a bit of data.
REFUSED_DATA_UNUSABLE: Final = "region-data-unusable"
REFUSED_MESSAGE: Final = "message-not-in-vocabulary"  # a record, key or value outside PLAN_KEYS' shapes
# The model the server sends, refused before a customer row is read: a spec above the policy's size bound,
# or weights that do not fit the spec, are not finite, or exceed the policy's bound on |w|.
REFUSED_MODEL_SIZE: Final = "model-too-large"
REFUSED_WEIGHTS: Final = "weights-not-accepted"
REFUSAL_CODES: Final = frozenset(
    {
        REFUSED_PURPOSE,
        REFUSED_COLUMN,
        REFUSED_PRIVACY_MODE,
        REFUSED_NOISE,
        REFUSED_SHARD_SIZE,
        REFUSED_BUDGET,
        REFUSED_BY_POLICY,
        REFUSED_SCHEMA,
        REFUSED_SHARDS,
        REFUSED_DATA_UNUSABLE,
        REFUSED_MESSAGE,
        REFUSED_MODEL_SIZE,
        REFUSED_WEIGHTS,
    }
)

# METRICS keys (region -> server): public figures (declared in the region's policy) and aggregates over
# at least the policy's minimum of customers. No training loss: computed on customers from weights the
# server chose, it would be an un-noised statistic of the data.
NUM_EXAMPLES: Final = "num-examples"  # Flower's FedAvg weights updates by this key: the declared size
NOISE_MULTIPLIER: Final = "noise-multiplier"
EPSILON: Final = "epsilon"
BUDGET: Final = "budget"
DELTA: Final = "delta"  # the region's δ, fixed by its policy
ANSWER_NOISE_STD: Final = "answer-noise-std"  # std of the noise on each count of a DP answer (public)
RUN_RELEASES: Final = "run-releases"  # ledger events of this run at the region (a resumed round counts twice)
HIST_POS: Final = "hist-pos"
HIST_NEG: Final = "hist-neg"
SUM_LOG_LOSS: Final = "sum-log-loss"
SUM_BRIER: Final = "sum-brier"
CORRECT: Final = "correct"
# The pre-flight's public figures of a region (fedcrm.region.RegionProfile), with BUDGET, DELTA and EPSILON.
DECLARED_TRAIN: Final = "train"  # training customers, as the region's policy declares them
SMALLEST_SHARD: Final = "smallest-shard"
MIN_CUSTOMERS: Final = "min-customers"
N_FEATURES: Final = "n-features"
DESCRIBE_KEYS: Final = (DECLARED_TRAIN, SMALLEST_SHARD, MIN_CUSTOMERS, N_FEATURES)

# Trust metrics of the served model (fedcrm.evaluation.trust): per-group hold-out histograms of every
# sensitive attribute, flattened in the schema's attribute and group order (groups below the policy's
# minimum sent as zeros and flagged), and per source column the summed |contribution| to the scores.
FAIR_HIST_POS: Final = "fair-hist-pos"
FAIR_HIST_NEG: Final = "fair-hist-neg"
FAIR_SUM_SCORE: Final = "fair-sum-score"
FAIR_SUPPRESSED: Final = "fair-suppressed"
IMPORTANCE_SUM: Final = "importance-sum"
IMPORTANCE_CUSTOMERS: Final = "importance-customers"
TRUST_KEYS: Final = (
    FAIR_HIST_POS,
    FAIR_HIST_NEG,
    FAIR_SUM_SCORE,
    FAIR_SUPPRESSED,
    IMPORTANCE_SUM,
    IMPORTANCE_CUSTOMERS,
)

METRIC_KEYS: Final = frozenset(
    {
        NUM_EXAMPLES,
        NOISE_MULTIPLIER,
        EPSILON,
        BUDGET,
        DELTA,
        ANSWER_NOISE_STD,
        RUN_RELEASES,
        HIST_POS,
        HIST_NEG,
        SUM_LOG_LOSS,
        SUM_BRIER,
        CORRECT,
        *DESCRIBE_KEYS,
        *TRUST_KEYS,
    }
)
STATUS_KEYS: Final = frozenset({REGION, OUTCOME, REASON, KIND})
REPLY_RECORDS: Final = frozenset({ARRAYS, METRICS, STATUS})


def constituent_key(k: int, name: str) -> str:
    """Array key of parameter ``name`` of constituent ``k`` in a served (sharded) model."""
    return f"c{k}/{name}"
