"""Shamir t-of-n sharing over GF(2**521 - 1): round trips, thresholds, subsets, serialisation."""

from __future__ import annotations

import contextlib
import itertools
import os
import random

import pytest

from fedtune.common.secagg import SecAggConfigError, SecAggIntegrityError
from fedtune.common.secagg.shamir import PRIME, SHARE_LEN, Share, combine, split


@pytest.mark.parametrize("trial", range(20))
def test_round_trip_random_t_of_n(trial: int) -> None:
    rnd = random.Random(trial)
    n = rnd.randint(2, 12)
    t = rnd.randint(1, n)
    secret = os.urandom(32)
    shares = split(secret, n, t)
    assert [s.x for s in shares] == list(range(1, n + 1))
    rnd.shuffle(shares)
    assert combine(shares[:t], t) == secret
    assert combine(shares, t) == secret


def test_fewer_than_t_fails() -> None:
    secret = os.urandom(32)
    shares = split(secret, 7, 4)
    with pytest.raises(SecAggIntegrityError, match="at least 4"):
        combine(shares[:3], 4)


def test_t_minus_one_shares_do_not_determine_secret() -> None:
    # Interpolating t-1 shares as if the threshold were t-1 gives an unrelated value.
    secret = os.urandom(32)
    shares = split(secret, 6, 4)
    # Almost always the interpolated value is outside 0..2**256-1 and is reported as inconsistent.
    with contextlib.suppress(SecAggIntegrityError):
        assert combine(shares[:3], 3) != secret


def test_every_t_subset_gives_same_secret() -> None:
    secret = os.urandom(32)
    n, t = 7, 3
    shares = split(secret, n, t)
    results = {combine(list(sub), t) for sub in itertools.combinations(shares, t)}
    assert results == {secret}


def test_duplicate_x_refused() -> None:
    shares = split(os.urandom(32), 5, 3)
    with pytest.raises(SecAggIntegrityError, match="Duplicate"):
        combine([shares[0], shares[0], shares[1]], 3)


def test_bad_parameters() -> None:
    with pytest.raises(SecAggConfigError):
        split(b"short", 3, 2)
    with pytest.raises(SecAggConfigError):
        split(os.urandom(32), 3, 4)
    with pytest.raises(SecAggConfigError):
        split(os.urandom(32), 3, 0)


def test_serialisation_round_trip_and_validation() -> None:
    for s in split(os.urandom(32), 4, 2):
        raw = s.to_bytes()
        assert len(raw) == SHARE_LEN
        assert Share.from_bytes(raw) == s
    with pytest.raises(SecAggIntegrityError):
        Share.from_bytes(b"\x00" * (SHARE_LEN - 1))
    with pytest.raises(SecAggIntegrityError):
        Share.from_bytes((1).to_bytes(4, "big") + PRIME.to_bytes(SHARE_LEN - 4, "big"))
    with pytest.raises(SecAggIntegrityError):
        Share.from_bytes(b"\x00" * SHARE_LEN)  # x = 0 would be the secret itself


def test_corrupt_share_changes_result() -> None:
    secret = os.urandom(32)
    shares = split(secret, 5, 3)
    bad = Share(shares[0].x, (shares[0].y + 1) % PRIME)
    with contextlib.suppress(SecAggIntegrityError):  # an out-of-range result is also a detection
        assert combine([bad, *shares[1:3]], 3) != secret
