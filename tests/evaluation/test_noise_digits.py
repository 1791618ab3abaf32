"""A number shown with its noise carries only the digits the noise supports."""

from __future__ import annotations

import math

import pytest

from fedcrm.evaluation.metrics import with_noise


@pytest.mark.parametrize(
    ("value", "sd", "shown"),
    [
        (0.6897, 0.042, "0.69 ± 0.04"),  # the demo's served model: four decimals were three too many
        (0.8549, 0.0049, "0.855 ± 0.005"),
        (0.8704, 0.0096, "0.87 ± 0.01"),  # the sd rounds up to the next decade: one decimal fewer
        (0.71, 0.32, "0.7 ± 0.3"),  # a tiny hold-out at evaluation_noise 3 (a deployment test's)
        (12.345, 2.4, "12 ± 2"),
    ],
)
def test_a_noisy_figure_keeps_the_digits_its_noise_supports(value: float, sd: float, shown: str) -> None:
    assert with_noise(value, sd) == shown


@pytest.mark.parametrize("sd", [None, 0.0, math.nan])
def test_an_exact_figure_keeps_four_decimals(sd: float | None) -> None:
    assert with_noise(0.83456, sd) == "0.8346"
