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


def test_scores_ride_in_the_quantisers_range_and_sum_to_the_federations_totals() -> None:
    """Held-out scores of three sites, encoded in [0, clip], quantised, summed and decoded: the totals are the
    row-weighted accuracy and loss; a site past the row cap counts as cap rows, a site with no rows as nothing."""
    from fedtune.common.secagg import scores

    clip, cap = 0.5, 1000
    sites = [(200, 1.5, 0.75), (5000, 0.5, 0.9), (0, 0.0, None)]  # (rows, mean loss, accuracy)
    encoded = [scores.encode(rows, loss, acc, clip, cap) for rows, loss, acc in sites]
    assert all(((v >= 0) & (v <= clip)).all() for v in encoded)
    quant = QuantSpec(clip, len(sites))
    total = quant.dequantize_sum(sum(quant.quantize(v).astype(np.uint64) for v in encoded) % 2**32, len(sites))
    got = scores.decode(total, clip, cap, classification=True)
    assert got is not None and got.rows == pytest.approx(1200, abs=0.01)  # 200 + the 1000-row cap
    assert got.accuracy == pytest.approx((200 * 0.75 + 1000 * 0.9) / 1200, abs=1e-5)
    assert got.loss == pytest.approx((200 * 1.5 + 1000 * 0.5) / 1200, abs=1e-4)
    assert scores.decode(np.zeros(scores.LENGTH), clip, cap, classification=True) is None
    huge = scores.encode(10, 1e6, 0.0, clip, cap)
    assert huge[2] == pytest.approx(huge[1])  # a loss past LOSS_CAP counts as LOSS_CAP per row
