"""The batch keyed tokens that scoring and training compare against the tombstones are RFC 2104 HMACs."""

from __future__ import annotations

import hashlib
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


def test_with_both_lists_in_use_each_id_of_a_chunk_is_keyed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keyed hash is the largest cost of scoring once anyone was forgotten: a customer who is neither
    forgotten nor withdrawn is hashed once for both lists (it used to be once for each)."""
    from conftest import REPO

    from fedcrm.data.io import load_table
    from fedcrm.data.schema import load_schema
    from fedcrm.data.synthetic import generate
    from fedcrm.governance.consent import ConsentWithdrawals
    from fedcrm.governance.eligibility import usable_for
    from fedcrm.unlearning import tombstones as module

    generate(regions=["eu"], customers=[300], seed=0, out_dir=tmp_path / "data")
    table = load_table(tmp_path / "data" / "eu.csv", load_schema(REPO / "configs" / "schemas" / "synthetic_crm.yaml"))
    consenting = table.ids[table.consent["churn"].to_numpy(dtype=bool)]
    stones, withdrawals = Tombstones(tmp_path / "state"), ConsentWithdrawals(tmp_path / "state")
    stones.add([consenting[0], table.ids[-1]])
    withdrawals.add(consenting[1], purpose="churn")

    hashed: list[int] = []  # ids keyed per call, whichever batch function the lists use

    def counting(real):  # noqa: ANN001, ANN202
        def keyed(ids: np.ndarray, *, secret: str):  # noqa: ANN202
            hashed.append(len(ids))
            return real(ids, secret=secret)

        return keyed

    for name in ("id_tokens", "id_digests"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, counting(getattr(module, name)))
    usable, counts = usable_for(table, purpose="churn", tombstones=stones, withdrawals=withdrawals)
    assert sum(hashed) == len(table)  # one pass over the ids, not one per list
    assert counts["forgotten"] == 2
    assert counts["excluded_no_consent"] == len(table) - len(consenting) + 1 - (table.ids[-1] not in consenting)
    expected = [i for i in consenting if i not in {consenting[0], consenting[1], table.ids[-1]}]
    assert usable.ids.tolist() == expected


def test_the_openssl_fallback_keys_ids_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where CPython is built without its own SHA-256, hashlib's (OpenSSL's) makes the same tokens."""
    from fedcrm.unlearning import tombstones as module

    ids = np.asarray(["eu-0000001", "", "ü-42", "x" * 200], dtype=object)
    built_in = id_tokens(ids, secret="k")
    monkeypatch.setattr(module, "_COPYABLE_SHA256", hashlib.sha256)
    assert id_tokens(ids, secret="k") == built_in == [id_token(str(i), secret="k") for i in ids]
