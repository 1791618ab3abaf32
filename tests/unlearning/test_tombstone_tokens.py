"""The batch keyed tokens that scoring and training compare against the tombstones are RFC 2104 HMACs."""

from __future__ import annotations

import hmac
from pathlib import Path

import numpy as np
import pytest

from fedcrm.unlearning.tombstones import Tombstones, id_token, id_tokens


@pytest.mark.parametrize("secret", ["", "k", "a" * 64, "b" * 65, "s€cret-" * 20])
def test_batch_tokens_are_the_hmac_of_each_id_for_any_secret_length(secret: str) -> None:
    ids = np.asarray(["eu-0000001", "", "ü-42", "x" * 200, 7], dtype=object)
    expected = [hmac.digest(secret.encode(), str(i).encode("utf-8"), "sha256").hex() for i in ids]
    assert id_tokens(ids, secret=secret) == expected
    assert [id_token(str(i), secret=secret) for i in ids] == expected


def test_the_mask_marks_exactly_the_forgotten_customers(tmp_path: Path) -> None:
    stones = Tombstones(tmp_path)
    stones.add(["c-2", "c-9"])
    ids = np.asarray([f"c-{i}" for i in range(12)], dtype=object)
    assert np.flatnonzero(stones.mask(ids)).tolist() == [2, 9]
