"""The model a region accepts from the server: a spec of bounded size, and weights that fit it and are bounded.

The server chooses the model spec and every weight it asks a region to train or evaluate. Both are
checked here, against the region's policy, *before* a customer row is read: a spec too large to build
(memory exhaustion at a hold-out's size would be a side channel and a denial of service), weights whose
names or shapes do not fit the spec, non-finite weights, and |w| above the policy's bound are refused with
a fixed code (``wire.REFUSED_MODEL_SIZE``, ``wire.REFUSED_WEIGHTS``). The shapes come from the spec and
the schema's width alone, computed without building the model, so a refused spec allocates nothing.

Weights within the bound can still overflow float32 in a deep enough network; that case is the
mechanism's to absorb (:mod:`fedcrm.privacy.clipping`: a non-finite row contributes nothing; evaluation
maps a non-finite score to a constant), so no answer depends on it.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from fedcrm import wire
from fedcrm.config import ModelConfig
from fedcrm.errors import PolicyError
from fedcrm.governance.policy import RegionPolicy

Weights = dict[str, np.ndarray]


def parameter_shapes(spec: ModelConfig, *, n_features: int) -> dict[str, tuple[int, ...]]:
    """The shape of every parameter :func:`fedcrm.models.build_model` makes for ``spec``, by name."""
    widths = [n_features] + ([] if spec.kind == "logistic" else list(spec.hidden))
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (width_in, width_out) in enumerate(zip(widths, widths[1:], strict=False)):
        shapes[f"hidden{i}.weight"] = (width_out, width_in)
        shapes[f"hidden{i}.bias"] = (width_out,)
    shapes["out.weight"] = (1, widths[-1])
    shapes["out.bias"] = (1,)
    return shapes


def parameter_count(spec: ModelConfig, *, n_features: int) -> int:
    return sum(int(np.prod(shape)) for shape in parameter_shapes(spec, n_features=n_features).values())


def check_model_spec(policy: RegionPolicy, *, region: str, spec: ModelConfig, n_features: int) -> None:
    """Refuse a spec that is malformed or larger than the policy's ``max_parameters``."""
    widths = [n_features] + ([] if spec.kind == "logistic" else list(spec.hidden))
    if any(w < 1 for w in widths):
        raise PolicyError(
            f"region {region}: the model spec's layer widths must be >= 1, got {widths} "
            "(input features, then model.hidden)",
            code=wire.REFUSED_MODEL_SIZE,
        )
    count = parameter_count(spec, n_features=n_features)
    if count > policy.max_parameters:
        raise PolicyError(
            f"region {region}: the model spec ({spec.kind}, hidden {list(spec.hidden)}, {n_features} features) "
            f"has {count:,} parameters, above the policy's max_parameters {policy.max_parameters:,}",
            code=wire.REFUSED_MODEL_SIZE,
        )


def check_weights(
    policy: RegionPolicy, *, region: str, spec: ModelConfig, n_features: int, constituents: Iterable[Weights]
) -> None:
    """Refuse weights that do not fit ``spec``, are not real numbers, not finite, or exceed ``max_weight_abs``.

    Checks the spec first (:func:`check_model_spec`). Each constituent of a served model is checked alike.
    """
    check_model_spec(policy, region=region, spec=spec, n_features=n_features)
    expected = parameter_shapes(spec, n_features=n_features)
    for k, weights in enumerate(constituents):
        found = {name: tuple(np.shape(v)) for name, v in weights.items()}
        if found != expected:
            raise PolicyError(
                f"region {region}: the weights of constituent {k} do not fit the model spec: expected "
                f"{expected}, found {found}",
                code=wire.REFUSED_WEIGHTS,
            )
        for name, value in weights.items():
            array = np.asarray(value)
            if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
                raise PolicyError(
                    f"region {region}: weight `{name}` of constituent {k} must be real numbers, "
                    f"got dtype {array.dtype}",
                    code=wire.REFUSED_WEIGHTS,
                )
            if array.size == 0:
                continue
            if not np.all(np.isfinite(array)):
                raise PolicyError(
                    f"region {region}: weight `{name}` of constituent {k} has non-finite entries (inf or nan)",
                    code=wire.REFUSED_WEIGHTS,
                )
            largest = float(np.max(np.abs(array.astype(np.float64))))
            if largest > policy.max_weight_abs:
                raise PolicyError(
                    f"region {region}: weight `{name}` of constituent {k} has |w| = {largest:.3g}, above the "
                    f"policy's max_weight_abs {policy.max_weight_abs:g}",
                    code=wire.REFUSED_WEIGHTS,
                )
