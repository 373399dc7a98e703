"""End-to-end SecAgg protocol: correctness, dropouts, privacy of single inputs, attack detection."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest
from scipy import stats

from fedtune.common.secagg import (
    THRESHOLD_FRACTION,
    AdvertiseRequest,
    ConsistencyRequest,
    EncryptedShares,
    KeyAdvert,
    MaskedInput,
    MaskedInputRequest,
    QuantSpec,
    RoundTag,
    SecAggAbort,
    SecAggIntegrityError,
    SecAggServer,
    SecAggSite,
    ShareRequest,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskShares,
    keys,
    run_in_process,
    run_in_process_detailed,
    threshold_above,
)
from fedtune.common.secagg.protocol import _self_mask

LENGTH = 10_000
SIGMA = 1e-3


@dataclass
class Fed:
    ids: list[int]
    names: dict[int, str]
    idkeys: dict[int, keys.Ed25519PrivateKey]
    vectors: dict[int, np.ndarray]

    @property
    def pinned(self) -> dict[str, bytes]:
        return {self.names[n]: keys.public_key_bytes(self.idkeys[n]) for n in self.ids}

    def site(self, n: int, **kw: object) -> SecAggSite:
        return SecAggSite(n, self.names[n], self.idkeys[n], self.pinned, **kw)


def make_fed(n: int, seed: int = 0) -> Fed:
    rng = np.random.default_rng(seed)
    # Flower node ids are large unsigned 64-bit ints; use some above 2**63 too.
    ids = sorted(int(x) for x in rng.integers(1, 2**63, size=n))
    ids[-1] += 2**63
    names = {nid: f"site-{i}" for i, nid in enumerate(ids)}
    idkeys = {nid: keys.generate_identity_key() for nid in ids}
    vectors = {nid: rng.normal(0.0, SIGMA, LENGTH) for nid in ids}
    return Fed(ids, names, idkeys, vectors)


def start(fed: Fed, t: int, quant: QuantSpec, round_num: int = 1):
    tag = RoundTag.new(7, round_num)
    server = SecAggServer(tag, [(n, fed.names[n]) for n in fed.ids], t, quant)
    sites = {n: fed.site(n, expected_run_id=7, expected_round=round_num) for n in fed.ids}
    return server, sites


def run_to_stage3(server: SecAggServer, sites: dict[int, SecAggSite]) -> None:
    req1 = server.advertise_request()
    server.receive_adverts([s.advertise(req1) for s in sites.values()])
    req2 = server.share_request()
    server.receive_shares([sites[n].share(req2) for n in server.u0])


@pytest.mark.parametrize(("n", "clip"), [(3, 0.5), (5, 0.5), (10, 0.25)])
def test_full_round_sum_matches(n: int, clip: float) -> None:
    fed = make_fed(n, seed=n)
    quant = QuantSpec(clip, n)
    agg = run_in_process(fed.vectors, fed.names, fed.idkeys, threshold_above(THRESHOLD_FRACTION, n), quant)
    ref = np.sum(list(fed.vectors.values()), axis=0)
    assert agg.dtype == np.float64
    assert np.abs(agg - ref).max() <= quant.error_bound(n)
    rel = np.linalg.norm(agg - ref) / np.linalg.norm(ref)
    assert rel <= 1e-6


def test_clipping_is_reported_on_the_site_only(caplog: pytest.LogCaptureFixture) -> None:
    fed = make_fed(3, seed=5)
    outlier = next(iter(fed.ids))
    fed.vectors[outlier][:7] = 2.0  # beyond clip_range 0.5
    with caplog.at_level("WARNING", logger="fedtune.common.secagg.protocol"):
        res = run_in_process_detailed(fed.vectors, fed.names, fed.idkeys, 3, QuantSpec(0.5, 3))
    warnings = [r.getMessage() for r in caplog.records if "clip_range" in r.getMessage()]
    assert warnings == [
        f"7 of {LENGTH} values of this site's weighted update exceed secagg.clip_range=0.5 "
        "and were clipped; the aggregate is biased. Ask the operator to raise secagg.clip_range."
    ]
    # What left the site is still only the masked vector; the aggregate carries the clipped values (0.5, not 2.0).
    sent = next(m for m in res.transcript["masked"] if m.node_id == outlier)
    assert {f.name for f in dataclasses.fields(sent)} == {"tag", "node_id", "vector"}
    others = sum(v[:7] for n, v in fed.vectors.items() if n != outlier)
    assert np.allclose(res.aggregate[:7], others + 0.5, atol=1e-6)


def test_masked_vector_is_uniform_and_uncorrelated() -> None:
    fed = make_fed(3, seed=11)
    res = run_in_process_detailed(fed.vectors, fed.names, fed.idkeys, 3, QuantSpec(0.5, 3))
    for msg in res.transcript["masked"]:
        y = msg.vector
        counts = np.bincount(y >> 24, minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-4
        assert stats.kstest(y / 2.0**32, "uniform").pvalue > 1e-4
        r = np.corrcoef(y.astype(np.float64), fed.vectors[msg.node_id])[0, 1]
        assert abs(r) < 0.05


@pytest.mark.parametrize("stage", [0, 1, 2, 3, 4])
def test_one_site_drops_and_is_recovered(stage: int) -> None:
    fed = make_fed(5, seed=20 + stage)
    quant = QuantSpec(0.5, 5)
    gone = fed.ids[2]
    res = run_in_process_detailed(fed.vectors, fed.names, fed.idkeys, 4, quant, {gone: stage})
    # drop at stage 3 or 4: its masked input arrived, a later reply is missing -> it is still in the sum
    contributors = [n for n in fed.ids if n != gone or stage >= 3]
    assert list(res.server.survivors) == contributors
    if stage == 2:
        assert res.server.dropped == (gone,)
    ref = np.sum([fed.vectors[n] for n in contributors], axis=0)
    assert np.abs(res.aggregate - ref).max() <= quant.error_bound(len(contributors))


def test_two_sites_drop_after_shares_at_ten() -> None:
    fed = make_fed(10, seed=31)
    quant = QuantSpec(0.25, 10)
    gone = {fed.ids[0]: 2, fed.ids[7]: 2}
    agg = run_in_process(fed.vectors, fed.names, fed.idkeys, 7, quant, gone)
    ref = np.sum([fed.vectors[n] for n in fed.ids if n not in gone], axis=0)
    assert np.abs(agg - ref).max() <= quant.error_bound(8)


@pytest.mark.parametrize("stage", [0, 1, 2, 3, 4])
def test_too_many_dropouts_abort(stage: int) -> None:
    fed = make_fed(5, seed=40)
    drops = {n: stage for n in fed.ids[:2]}  # 3 remain, threshold 4
    with pytest.raises(SecAggAbort, match=r"only 3 of 5 sites survived .*threshold 4"):
        run_in_process(fed.vectors, fed.names, fed.idkeys, 4, QuantSpec(0.5, 5), drops)


def test_server_accepts_explicit_timeouts() -> None:
    fed = make_fed(4, seed=41)
    quant = QuantSpec(0.5, 4)
    server, sites = start(fed, 3, quant)
    late = fed.ids[1]
    req1 = server.advertise_request()
    adverts = [s.advertise(req1) for s in sites.values()]
    server.receive_adverts(adverts, dropped=[late])  # its advert arrived after the deadline
    assert late not in server.u0
    req2 = server.share_request()
    server.receive_shares([sites[n].share(req2) for n in server.u0])
    masked = [sites[n].masked_input(server.masked_input_request(n), fed.vectors[n]) for n in server.u1]
    server.receive_masked_inputs(masked)
    req4 = server.consistency_request()
    server.receive_consistency([sites[n].consistency(req4) for n in server.survivors])
    req5 = server.unmask_request()
    server.receive_unmask([sites[n].unmask(req5) for n in server.signers])
    ref = np.sum([fed.vectors[n] for n in fed.ids if n != late], axis=0)
    assert np.abs(server.aggregate() - ref).max() <= quant.error_bound(3)


def test_tampered_share_ciphertext_detected() -> None:
    fed = make_fed(4, seed=50)
    server, sites = start(fed, 3, QuantSpec(0.5, 4))
    run_to_stage3(server, sites)
    victim, sender = fed.ids[0], fed.ids[2]
    req = server.masked_input_request(victim)
    blobs = dict(req.blobs)
    bad = bytearray(blobs[sender])
    bad[20] ^= 0x01
    blobs[sender] = bytes(bad)
    with pytest.raises(SecAggIntegrityError, match=fed.names[sender]):
        sites[victim].masked_input(dataclasses.replace(req, blobs=blobs), fed.vectors[victim])


def test_misrouted_share_detected() -> None:
    # A blob addressed to another site (AAD binds sender and receiver) is refused too.
    fed = make_fed(4, seed=51)
    server, sites = start(fed, 3, QuantSpec(0.5, 4))
    run_to_stage3(server, sites)
    a, b, c = fed.ids[:3]
    req = server.masked_input_request(a)
    other = server.masked_input_request(b)
    blobs = dict(req.blobs)
    blobs[c] = other.blobs[c]
    with pytest.raises(SecAggIntegrityError):
        sites[a].masked_input(dataclasses.replace(req, blobs=blobs), fed.vectors[a])


def _stage2_with(fed: Fed, mutate) -> None:
    server, sites = start(fed, 3, QuantSpec(0.5, 4))
    req1 = server.advertise_request()
    server.receive_adverts([s.advertise(req1) for s in sites.values()])
    req2 = mutate(server.share_request())
    sites[fed.ids[0]].share(req2)


def test_server_swapping_c_pk_detected() -> None:
    fed = make_fed(4, seed=60)
    target = fed.ids[1]
    _, fake_pk = keys.generate_x25519()

    def swap(req: ShareRequest) -> ShareRequest:
        adv = tuple(dataclasses.replace(a, c_pk=fake_pk) if a.node_id == target else a for a in req.adverts)
        return dataclasses.replace(req, adverts=adv)

    with pytest.raises(SecAggIntegrityError, match="does not verify"):
        _stage2_with(fed, swap)


def test_server_resigning_with_other_identity_detected() -> None:
    fed = make_fed(4, seed=61)
    target = fed.ids[1]
    rogue = keys.generate_identity_key()

    def resign(req: ShareRequest) -> ShareRequest:
        out = []
        for a in req.adverts:
            if a.node_id == target:
                _, c_pk = keys.generate_x25519()
                _, s_pk = keys.generate_x25519()
                # The server knows the whole advertise request, so it can build the exact payload.
                a = dataclasses.replace(a, c_pk=c_pk, s_pk=s_pk)
                digest = sites[target]._signed_digest(server_req)  # all the server could know, and more
                payload = KeyAdvert.signed_payload(a.tag, a.node_id, a.site_name, a.c_pk, a.s_pk, a.site_nonce, digest)
                a = dataclasses.replace(a, signature=rogue.sign(payload))
            out.append(a)
        return dataclasses.replace(req, adverts=tuple(out))

    server, sites = start(fed, 3, QuantSpec(0.5, 4))
    server_req = server.advertise_request()
    server.receive_adverts([s.advertise(server_req) for s in sites.values()])
    with pytest.raises(SecAggIntegrityError, match="pinned identity key"):
        sites[fed.ids[0]].share(resign(server.share_request()))


def test_missing_pinned_key_and_duplicate_advert_refused() -> None:
    fed = make_fed(4, seed=62)
    server, sites = start(fed, 3, QuantSpec(0.5, 4))
    req1 = server.advertise_request()
    server.receive_adverts([s.advertise(req1) for s in sites.values()])
    req2 = server.share_request()
    pinned = fed.pinned
    del pinned[fed.names[fed.ids[3]]]
    lonely = SecAggSite(fed.ids[0], fed.names[fed.ids[0]], fed.idkeys[fed.ids[0]], pinned)
    lonely.advertise(req1)
    with pytest.raises(SecAggIntegrityError, match="No pinned identity key"):
        lonely.share(req2)
    dup = dataclasses.replace(req2, adverts=(*req2.adverts, req2.adverts[1]))
    with pytest.raises(SecAggIntegrityError, match="Duplicate"):
        sites[fed.ids[0]].share(dup)


def test_different_threshold_given_to_one_site_detected() -> None:
    # The advert signature covers a digest of the advertise request, so a server that gives one site a
    # lower threshold (or other participants) is caught by everyone else.
    fed = make_fed(4, seed=63)
    server, sites = start(fed, 3, QuantSpec(0.5, 4))
    req1 = server.advertise_request()
    adverts = [sites[n].advertise(dataclasses.replace(req1, threshold=4) if n == fed.ids[3] else req1) for n in fed.ids]
    server.receive_adverts(adverts)
    with pytest.raises(SecAggIntegrityError, match="does not verify"):
        sites[fed.ids[0]].share(server.share_request())


def test_previous_round_messages_refused() -> None:
    fed = make_fed(3, seed=70)
    quant = QuantSpec(0.5, 3)
    a = fed.ids[0]
    old_server, old_sites = start(fed, 3, quant, round_num=1)
    old_req1 = old_server.advertise_request()
    old_server.receive_adverts([s.advertise(old_req1) for s in old_sites.values()])
    old_req2 = old_server.share_request()
    old_server.receive_shares([old_sites[n].share(old_req2) for n in old_server.u0])
    old_req3 = old_server.masked_input_request(a)

    server, sites = start(fed, 3, quant, round_num=2)
    # A stale advertise request (round 1) is refused by a site that expects round 2.
    with pytest.raises(SecAggIntegrityError, match="expects round 2"):
        fed.site(a, expected_round=2).advertise(old_req1)
    req1 = server.advertise_request()
    server.receive_adverts([s.advertise(req1) for s in sites.values()])
    req2 = server.share_request()

    # Last round's share request, or one old advert spliced into this round's, is refused.
    probe = fed.site(a, expected_round=2)
    probe.advertise(req1)
    with pytest.raises(SecAggIntegrityError, match="round tag"):
        probe.share(old_req2)
    probe = fed.site(a, expected_round=2)
    probe.advertise(req1)
    mixed = dataclasses.replace(req2, adverts=(req2.adverts[0], old_req2.adverts[1], req2.adverts[2]))
    with pytest.raises(SecAggIntegrityError, match="round tag"):
        probe.share(mixed)
    # ... even if the server rewrites the old advert's tag: its signature covers the old tag.
    relabelled = dataclasses.replace(old_req2.adverts[1], tag=req2.tag)
    probe = fed.site(a, expected_round=2)
    probe.advertise(req1)
    with pytest.raises(SecAggIntegrityError, match="does not verify"):
        probe.share(dataclasses.replace(req2, adverts=(req2.adverts[0], relabelled, req2.adverts[2])))

    # Old share blobs replayed into this round fail AES-GCM (key and AAD are bound to the tag).
    server.receive_shares([sites[n].share(req2) for n in server.u0])
    forged = dataclasses.replace(server.masked_input_request(a), blobs=dict(old_req3.blobs))
    with pytest.raises(SecAggIntegrityError, match="integrity check"):
        sites[a].masked_input(forged, fed.vectors[a])
    # A masked-input request carrying the old tag is refused outright.
    with pytest.raises(SecAggIntegrityError, match="round tag"):
        sites[fed.ids[1]].masked_input(old_req3, fed.vectors[fed.ids[1]])
    # The server drops a site whose reply carries an old tag (here: too few left, so the round aborts).
    with pytest.raises(SecAggAbort, match="threshold 3"):
        server.receive_masked_inputs([MaskedInput(old_req2.tag, fed.ids[1], np.zeros(LENGTH, dtype=np.uint32))])
    assert server.rejected == {fed.ids[1]: "masked input carries another round's tag"}


def _signed(fed: Fed, t: int = 3):
    """Four sites, all through the consistency stage; returns the server, sites and everyone's signature."""
    server, sites = start(fed, t, QuantSpec(0.5, 4))
    run_to_stage3(server, sites)
    server.receive_masked_inputs(
        [sites[n].masked_input(server.masked_input_request(n), fed.vectors[n]) for n in server.u1]
    )
    req4 = server.consistency_request()
    server.receive_consistency([sites[n].consistency(req4) for n in server.survivors])
    return server, sites, server.unmask_request()


def test_unmask_refusals() -> None:
    fed = make_fed(4, seed=80)
    server, sites, req = _signed(fed)
    a, b, c, d = fed.ids
    tag = server.tag
    with pytest.raises(SecAggIntegrityError, match="both"):
        sites[a].unmask(dataclasses.replace(req, dropped=(d,)))
    # A refused stage leaves the site unusable for this round (it must abort); the next checks use others.
    with pytest.raises(SecAggIntegrityError, match="in order"):
        sites[a].unmask(req)
    with pytest.raises(SecAggIntegrityError, match="as dropped"):
        sites[b].unmask(UnmaskRequest(tag, (a, c, d), (b,), req.signatures))
    with pytest.raises(SecAggIntegrityError, match="view this site signed"):
        sites[c].unmask(UnmaskRequest(tag, (a, b, c), (d,), req.signatures))
    _, fresh, fresh_req = _signed(fed)
    with pytest.raises(SecAggIntegrityError, match="partition"):
        fresh[c].unmask(dataclasses.replace(fresh_req, survivors=(c, d), dropped=()))
    with pytest.raises(SecAggIntegrityError, match="below the threshold 3"):
        fresh[d].unmask(dataclasses.replace(fresh_req, signatures={n: fresh_req.signatures[n] for n in (c, d)}))
    # Only one unmask answer per round: a second request cannot obtain the complementary shares.
    ok = sites[d].unmask(req)
    assert set(ok.b_shares) == {a, b, c, d} and set(ok.sk_shares) == set()
    with pytest.raises(SecAggIntegrityError, match="in order"):
        sites[d].unmask(dataclasses.replace(req, survivors=(a, b, d), dropped=(c,)))


def test_server_cannot_recover_a_single_input() -> None:
    fed = make_fed(4, seed=90)
    quant = QuantSpec(0.5, 4)
    gone = fed.ids[3]
    res = run_in_process_detailed(fed.vectors, fed.names, fed.idkeys, 3, quant, {gone: 2})
    server = res.server
    ref = np.sum([fed.vectors[n] for n in fed.ids if n != gone], axis=0)
    assert np.abs(res.aggregate - ref).max() <= quant.error_bound(3)

    # 1. For no site does the server hold both a b-share and an s_sk-share.
    b_owners = {o for m in res.transcript["unmask"] for o in m.b_shares}
    sk_owners = {o for m in res.transcript["unmask"] for o in m.sk_shares}
    assert b_owners == set(server.survivors) and sk_owners == {gone}
    assert not b_owners & sk_owners

    # 2. Even after removing the self-mask it legitimately reconstructs, each survivor's vector still
    #    carries pairwise masks: uniform and uncorrelated with the site's true (quantised) input.
    for msg in res.transcript["masked"]:
        b = server._reconstruct(msg.node_id, "b_shares")
        partial = msg.vector - _self_mask(b, msg.node_id, server.tag, LENGTH)
        counts = np.bincount(partial >> 24, minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-4
        assert abs(np.corrcoef(partial.astype(np.float64), fed.vectors[msg.node_id])[0, 1]) < 0.05
        dq = quant.dequantize_sum(partial, 1)
        assert np.linalg.norm(dq - fed.vectors[msg.node_id]) > 100 * np.linalg.norm(fed.vectors[msg.node_id])


def test_messages_fit_flower_config_record() -> None:
    from flwr.app import ConfigRecord
    from flwr.common.serde import config_record_from_proto, config_record_to_proto

    fed = make_fed(4, seed=100)
    res = run_in_process_detailed(fed.vectors, fed.names, fed.idkeys, 3, QuantSpec(0.5, 4), {fed.ids[2]: 2})
    tr = res.transcript
    allowed = (int, float, str, bytes, list)
    kinds = {
        "advertise": AdvertiseRequest,
        "adverts": KeyAdvert,
        "share": ShareRequest,
        "shares": EncryptedShares,
        "masked_req": MaskedInputRequest,
        "consistency_req": ConsistencyRequest,
        "signatures": SurvivorSignature,
        "unmask_req": UnmaskRequest,
        "unmask": UnmaskShares,
    }
    for key, cls in kinds.items():
        for msg in tr[key]:
            d = msg.to_dict()
            assert all(isinstance(v, allowed) for v in d.values())
            back = dict(config_record_from_proto(config_record_to_proto(ConfigRecord(d))))
            assert cls.from_dict(back) == msg
    for msg in tr["masked"]:
        back = dict(config_record_from_proto(config_record_to_proto(ConfigRecord(msg.to_dict()))))
        again = MaskedInput.from_dict(back, msg.vector)
        assert again == msg and again.vector is msg.vector
        with pytest.raises(SecAggIntegrityError, match="truncated"):
            MaskedInput.from_dict(back, msg.vector[:-1])
    with pytest.raises(SecAggIntegrityError, match="missing field"):
        KeyAdvert.from_dict({"kind": KeyAdvert.KIND, "run_id": 1})
    with pytest.raises(SecAggIntegrityError, match="out of order"):
        ShareRequest.from_dict(tr["advertise"][0].to_dict())
