"""Self-weighted updates inside the masked sum: exact FedAvg, declines that keep the threshold, no count leaks."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.common.secagg import QuantSpec, SecAggIntegrityError, keys, run_in_process
from fedtune.common.secagg.weighting import pack, site_weight, unpack


def _fed(n: int) -> tuple[dict[int, str], dict[int, keys.Ed25519PrivateKey]]:
    return {i: f"site-{i}" for i in range(1, n + 1)}, {i: keys.generate_identity_key() for i in range(1, n + 1)}


def test_mean_is_the_row_weighted_fedavg_and_a_decline_keeps_the_round() -> None:
    rng = np.random.default_rng(0)
    names, idkeys = _fed(3)
    updates = {i: rng.normal(0, 0.01, 500) for i in names}
    rows = {1: 2946, 2: 2256}  # site 3 declines (budget spent): it sends zeros with weight 0
    quant = QuantSpec(0.5, 3)
    vectors = {i: pack(updates[i], site_weight("examples", rows[i], 100_000), 0.5) for i in rows}
    vectors[3] = np.zeros(501)
    mean, weight = unpack(run_in_process(vectors, names, idkeys, 3, quant), quant, 3)
    expected = (rows[1] * updates[1] + rows[2] * updates[2]) / (rows[1] + rows[2])
    assert np.abs(mean - expected).max() < 1e-7
    assert weight == pytest.approx((rows[1] + rows[2]) / 100_000, abs=1e-8)


def test_uniform_policy_and_cap() -> None:
    assert site_weight("uniform", 10, 100) == site_weight("uniform", 10_000, 100) == 1.0
    assert site_weight("examples", 250, 100) == 1.0  # capped: a huge site weighs no more than the cap
    assert site_weight("examples", 25, 100) == 0.25
    with pytest.raises(SecAggIntegrityError, match="no training rows"):
        site_weight("examples", 0, 100)
    with pytest.raises(SecAggIntegrityError, match="outside"):
        pack(np.ones(3), 0.0, 0.5)


def test_a_round_where_everyone_declined_has_no_mean() -> None:
    names, idkeys = _fed(3)
    quant = QuantSpec(0.5, 3)
    total = run_in_process({i: np.zeros(11) for i in names}, names, idkeys, 3, quant)
    with pytest.raises(SecAggIntegrityError, match="every survivor declined"):
        unpack(total, quant, 3)
