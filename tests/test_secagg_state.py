"""A site's round secrets survive being serialised between stages (a new process per message)."""

import numpy as np
import pytest

from fedtune.common.secagg import keys
from fedtune.common.secagg.protocol import SecAggSite, run_in_process_detailed
from fedtune.common.secagg.quantize import QuantSpec


@pytest.mark.parametrize("drop", [None, {2: 2}])
def test_round_with_state_round_trips_matches_plain_sum(drop):
    rng = np.random.default_rng(0)
    ids = [11, 22, 33, 44]
    vectors = {n: rng.normal(0, 1e-3, 5000) for n in ids}
    names = {n: f"site-{n}" for n in ids}
    idents = {n: keys.generate_identity_key() for n in ids}
    result = run_in_process_detailed(
        vectors,
        names,
        idents,
        threshold=3,
        quant=QuantSpec(0.5, 4),
        drop_after_stage=drop,
        persist_between_stages=True,
    )
    survivors = [n for n in ids if not drop or n not in drop]
    expected = np.sum([vectors[n] for n in survivors], axis=0)
    rel = np.linalg.norm(result.aggregate - expected) / np.linalg.norm(expected)
    assert rel < 1e-6


def test_state_holds_no_identity_key_and_restore_needs_matching_pins():
    ident = keys.generate_identity_key()
    other = keys.generate_identity_key()
    site = SecAggSite(1, "bank", ident, {"bank": keys.public_key_bytes(ident)})
    blob = site.to_state()
    raw_identity = ident.private_bytes_raw()
    assert raw_identity.hex() not in blob.decode()
    with pytest.raises(Exception, match="does not match its identity key"):
        SecAggSite.from_state(blob, other, {"bank": keys.public_key_bytes(ident)})
