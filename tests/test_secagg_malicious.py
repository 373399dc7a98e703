"""A malicious server, played with the protocol's own classes: what it tries, and what it gets.

It chooses the threshold, the survivor views each site sees, the weights and the round tag. Each
attack is either refused by the sites or yields nothing beyond the sum: what the server can compute
from everything it was sent stays uniform and uncorrelated with any one site's input.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from scipy import stats
from test_secagg_protocol import LENGTH, Fed, make_fed, run_to_stage3, start

from fedtune.client import secure_site
from fedtune.common.config import DataSpec, SiteSpec
from fedtune.common.secagg import (
    ConsistencyRequest,
    EncryptedShares,
    QuantSpec,
    RoundTag,
    SecAggAbort,
    SecAggConfigError,
    SecAggIntegrityError,
    SecAggServer,
    SecAggSite,
    UnmaskRequest,
    keys,
    shamir,
    threshold_above,
)
from fedtune.common.secagg.messages import MaskedInput, MaskedInputRequest
from fedtune.common.secagg.protocol import _pair_mask, _self_mask
from fedtune.common.secagg.weighting import pack, site_weight, unpack


def _masked(server: SecAggServer, sites: dict[int, SecAggSite], fed: Fed) -> list[MaskedInput]:
    run_to_stage3(server, sites)
    masked = [sites[n].masked_input(server.masked_input_request(n), fed.vectors[n]) for n in server.u1]
    server.receive_masked_inputs(masked)
    return masked


def _try_unmask(site: SecAggSite, req: UnmaskRequest) -> dict | None:
    try:
        return site.unmask(req)
    except SecAggIntegrityError:
        return None


def _looks_random(vector: np.ndarray, truth: np.ndarray) -> None:
    """What the server holds of one site: uniform over uint32 and uncorrelated with that site's input."""
    counts = np.bincount(vector >> 24, minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-4
    assert abs(np.corrcoef(vector.astype(np.float64), truth)[0, 1]) < 0.05


@pytest.mark.parametrize(("n", "split"), [(4, 0), (4, 1), (4, 2), (10, 2), (10, 5), (10, 6), (10, 8)])
def test_split_survivor_views_yield_nothing_beyond_the_sum(n: int, split: int) -> None:
    """The attack that recovered a site's delta before: tell some sites the target survived (to get its
    self-mask seed) and the others that it dropped (to get its pairwise key). Each site now reveals shares
    only against t signatures on the very view it signed, so at most one of the two views can succeed."""
    fed = make_fed(n, seed=200 + n + split)
    t = threshold_above(2 / 3, n)
    server, sites = start(fed, t, QuantSpec(0.5, n))
    masked = {m.node_id: m for m in _masked(server, sites, fed)}
    target, others = fed.ids[0], fed.ids[1:]
    told_survived, told_dropped = [target, *others[:split]], others[split:]
    everyone = tuple(fed.ids)
    view_in = ConsistencyRequest(server.tag, everyone, everyone)
    view_out = ConsistencyRequest(server.tag, everyone, tuple(x for x in everyone if x != target))
    sig_in = {x: sites[x].consistency(view_in).signature for x in told_survived}
    sig_out = {x: sites[x].consistency(view_out).signature for x in told_dropped}

    b_shares = [
        r.b_shares[target]
        for x in told_survived
        if (r := _try_unmask(sites[x], UnmaskRequest(server.tag, everyone, (), sig_in)))
    ]
    sk_shares = []
    for x in told_dropped[:-1]:
        if reply := _try_unmask(sites[x], UnmaskRequest(server.tag, view_out.survivors, (target,), sig_out)):
            sk_shares.append(reply.sk_shares[target])
    # Signatures from the other view do not count: they do not verify on this site's view, and are skipped.
    with pytest.raises(SecAggIntegrityError, match=r"below the threshold"):
        sites[told_dropped[-1]].unmask(UnmaskRequest(server.tag, view_out.survivors, (target,), sig_in))
    assert min(len(b_shares), len(sk_shares)) < t  # never both secrets of the target
    assert len(sk_shares) < t or len(b_shares) < t
    if len(sk_shares) < t:
        with pytest.raises(SecAggIntegrityError):
            shamir.combine([shamir.Share.from_bytes(x) for x in sk_shares], t)

    # Even granting the server the target's self-mask seed, its vector keeps its pairwise masks.
    b = sites[target]._b if sites[target]._b is not None else None
    seed_shares = [shamir.Share.from_bytes(sh) for sh in b_shares] if len(b_shares) >= t else None
    if seed_shares:
        b = shamir.combine(seed_shares, t)
    if b is not None:
        partial = masked[target].vector - _self_mask(b, target, server.tag, LENGTH)
        _looks_random(partial, fed.vectors[target])


def test_honest_views_still_sum_after_a_refused_split() -> None:
    """The defence costs nothing when the server is honest: every view signed alike, the sum comes out."""
    fed = make_fed(4, seed=210)
    server, sites = start(fed, 3, QuantSpec(0.5, 4))
    _masked(server, sites, fed)
    req = server.consistency_request()
    server.receive_consistency([sites[x].consistency(req) for x in server.survivors])
    unmask = server.unmask_request()
    server.receive_unmask([sites[x].unmask(unmask) for x in server.signers])
    ref = np.sum(list(fed.vectors.values()), axis=0)
    assert np.abs(server.aggregate() - ref).max() <= QuantSpec(0.5, 4).error_bound(4)


@pytest.mark.parametrize(("n", "low"), [(4, 2), (10, 6)])
def test_a_low_threshold_is_refused_by_every_site(n: int, low: int) -> None:
    fed = make_fed(n, seed=220 + n)
    server, sites = start(fed, low, QuantSpec(0.5, n))
    req = server.advertise_request()
    for site in sites.values():
        with pytest.raises(SecAggConfigError, match=r"requires t > 0.667 x n"):
            site.advertise(req)
    # The floor is the site's own: one that accepts an honest majority (1/2) takes 3 of 4, never 2.
    assert threshold_above(0.5, 4) == 3
    relaxed = fed.site(fed.ids[0], threshold_fraction=0.5)
    relaxed.advertise(dataclasses.replace(req, threshold=threshold_above(0.5, n)))


def test_a_reused_round_tag_is_refused_even_by_a_fresh_process(tmp_path: Path) -> None:
    fed = make_fed(4, seed=230)
    used = secure_site.UsedTags(tmp_path / "secagg-tags.log")
    server, _ = start(fed, 3, QuantSpec(0.5, 4))
    req = server.advertise_request()
    fed.site(fed.ids[0], claim=used.claim).advertise(req)
    again = fed.site(fed.ids[0], claim=secure_site.UsedTags(tmp_path / "secagg-tags.log").claim)
    with pytest.raises(SecAggIntegrityError, match="already used on this site"):
        again.advertise(req)
    fresh = dataclasses.replace(req, tag=RoundTag.new(req.tag.run_id, req.tag.round))
    fed.site(fed.ids[0], claim=used.claim).advertise(fresh)  # a new attempt, with a new tag, is fine


def test_adverts_of_an_earlier_attempt_cannot_be_mixed_in() -> None:
    """Sites without a tag record (defence in depth): the server re-uses a tag and shows one site an advert
    from the earlier attempt. Signatures check out, but the advert transcript is bound into every share's
    AAD, so the sites that saw different adverts cannot open each other's shares: the round stops."""
    fed = make_fed(4, seed=240)
    a, b, c, d = fed.ids
    server, first_sites = start(fed, 3, QuantSpec(0.5, 4))
    req = server.advertise_request()
    stale = {x.node_id: x for x in (s.advertise(req) for s in first_sites.values())}
    sites = {n: fed.site(n, expected_run_id=7, expected_round=1) for n in fed.ids}
    server = SecAggServer(req.tag, req.participants, 3, QuantSpec(0.5, 4))
    server.receive_adverts([sites[n].advertise(req) for n in fed.ids])
    honest = server.share_request()
    mixed = dataclasses.replace(honest, adverts=tuple(stale[c] if x.node_id == c else x for x in honest.adverts))
    shares = {n: sites[n].share(mixed if n == b else honest) for n in (a, b, c, d)}
    blobs = {src: shares[src].blobs[a] for src in (b, c, d)}
    with pytest.raises(SecAggIntegrityError, match="different adverts"):
        sites[a].masked_input(MaskedInputRequest(server.tag, tuple(fed.ids), blobs), fed.vectors[a])


# -- weights: chosen by each site, inside the masked vector


def _site_spec(tmp_path: Path, name: str, key: keys.Ed25519PrivateKey, peers: dict[str, str]) -> SiteSpec:
    state = tmp_path / name
    keys.save_identity_key(key, state / "identity.pem")
    return SiteSpec(name=name, data=DataSpec(train=tmp_path / "unused.csv"), state_dir=state, peers=peers)


def test_the_server_cannot_choose_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server asks for weight 1 for one site and 1e-9 for the rest (the isolation attack); sites ignore
    any weight it sends and use their own row counts, so the unmasked result is the true weighted mean."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)  # the server's node, as a Grid would set it
    fed = make_fed(3, seed=250)
    rows = dict(zip(fed.ids, (300, 1200, 2500), strict=True))
    peers = {fed.names[n]: keys.public_key_to_hex(fed.idkeys[n]) for n in fed.ids}
    specs = {n: _site_spec(tmp_path, fed.names[n], fed.idkeys[n], peers) for n in fed.ids}
    contexts = {n: Context(7, n, {}, RecordDict(), {}) for n in fed.ids}
    clip = 0.5
    server = SecAggServer(RoundTag.new(7, 1), [(n, fed.names[n]) for n in fed.ids], 3, QuantSpec(clip, 3))
    config = ConfigRecord({"round": 1})

    def msg(node: int, record: ConfigRecord, **extra: ConfigRecord) -> Message:
        return Message(
            RecordDict({"secagg": record, "config": config, **extra}), dst_node_id=node, message_type="train"
        )

    adverts = []
    for n in fed.ids:
        vector = pack(fed.vectors[n], site_weight("examples", rows[n], 100_000), clip)
        adverts.append(
            secure_site.start(msg(n, ConfigRecord(server.advertise_request().to_dict())), contexts[n], specs[n], vector)
        )
    server.receive_adverts(adverts)
    share = ConfigRecord(server.share_request().to_dict())
    server.receive_shares([secure_site.share(msg(n, share), contexts[n], specs[n]) for n in fed.ids])
    target = fed.ids[0]
    masked = []
    for n in fed.ids:
        weight = ConfigRecord({"weight": 1.0 if n == target else 1e-9})  # what the old protocol obeyed
        req = ConfigRecord(server.masked_input_request(n).to_dict())
        masked.append(secure_site.mask(msg(n, req, weight=weight), contexts[n], specs[n]))
    server.receive_masked_inputs(masked)
    cons = ConfigRecord(server.consistency_request().to_dict())
    server.receive_consistency([secure_site.consistency(msg(n, cons), contexts[n], specs[n]) for n in fed.ids])
    unmask = ConfigRecord(server.unmask_request().to_dict())
    server.receive_unmask([secure_site.unmask(msg(n, unmask), contexts[n], specs[n]) for n in fed.ids])
    mean, total_weight = unpack(server.aggregate(), QuantSpec(clip, 3), 3)

    expected = sum(rows[n] * fed.vectors[n] for n in fed.ids) / sum(rows.values())
    assert np.abs(mean - expected).max() < 1e-6
    assert total_weight == pytest.approx(sum(rows.values()) / 100_000, abs=1e-6)  # the total only
    # What the server computes is the mean, not the target: correlation with its input is that of a mean.
    r = np.corrcoef(mean, fed.vectors[target])[0, 1]
    assert r < 0.2
    # Every masked vector it received is uniform and uncorrelated with the sender's weighted update.
    for m in masked:
        _looks_random(m.vector[:-1], fed.vectors[m.node_id])
    # And the secrets of the round are gone from every site's context.
    assert all(len(c.state) == 0 for c in contexts.values())


def test_pairwise_masks_are_not_removable_without_a_key() -> None:
    """Sanity for the tests above: with all self-mask seeds but no pairwise key, a single vector stays masked."""
    fed = make_fed(3, seed=260)
    server, sites = start(fed, 3, QuantSpec(0.5, 3))
    masked = {m.node_id: m for m in _masked(server, sites, fed)}
    a, b = fed.ids[0], fed.ids[1]
    seeds = {x: sites[x]._b for x in fed.ids}
    partial = masked[a].vector - _self_mask(seeds[a], a, server.tag, LENGTH)
    _looks_random(partial, fed.vectors[a])
    # With a's pairwise key (which no honest view reveals for a survivor) it would come out: shows the test bites.
    for x in fed.ids[1:]:
        m = _pair_mask(sites[a]._s_sk, sites[x]._s_pk, a, x, server.tag, LENGTH)
        partial = partial - m if a < x else partial + m
    q = QuantSpec(0.5, 3)
    assert np.abs(q.dequantize_sum(partial, 1) - fed.vectors[a]).max() <= q.error_bound(1)
    assert b in fed.ids


# -- a corrupt unmask share (attack 7b): every secret the server reconstructs is verified before it is used


def _forged(share: bytes, subset_xs: list[int], shift: int) -> bytes:
    """A share forged so that the t shares at `subset_xs` reconstruct the owner's secret + `shift`: still a
    32-byte value, so without a check the server cannot tell it from the real secret."""
    s = shamir.Share.from_bytes(share)
    lam_num = lam_den = 1
    for xj in subset_xs:
        if xj != s.x:
            lam_num, lam_den = lam_num * -xj % shamir.PRIME, lam_den * (s.x - xj) % shamir.PRIME
    lam = lam_num * pow(lam_den, -1, shamir.PRIME) % shamir.PRIME
    return shamir.Share(s.x, (s.y + shift * pow(lam, -1, shamir.PRIME)) % shamir.PRIME).to_bytes()


def _to_unmask(fed: Fed, t: int, *, drop: int | None = None, silent: int | None = None):
    """A round run honestly to the unmask stage: `drop` sends shares but no masked input, `silent` signs but
    never answers the unmask request. Returns the server and the unmask replies it is about to receive."""
    server, sites = start(fed, t, QuantSpec(0.5, len(fed.ids)))
    run_to_stage3(server, sites)
    server.receive_masked_inputs(
        [sites[x].masked_input(server.masked_input_request(x), fed.vectors[x]) for x in server.u1 if x != drop]
    )
    req4 = server.consistency_request()
    server.receive_consistency([sites[x].consistency(req4) for x in server.survivors])
    req5 = server.unmask_request()
    return server, {x: sites[x].unmask(req5) for x in server.signers if x != silent}


def _corrupt(fed: Fed, replies: dict, attackers: list[int], owner: int, field_name: str, t: int) -> None:
    """Each attacker forges its share of `owner`'s secret against the first t responders the server combines
    (or the last t, if it is not among the first): the strongest single-share attack, it stays in range."""
    xs = sorted(fed.ids.index(r) + 1 for r in replies)
    for a in attackers:
        mine = fed.ids.index(a) + 1
        subset = xs[:t] if mine in xs[:t] else xs[-t:]
        forged = _forged(getattr(replies[a], field_name)[owner], subset, shift=1)
        replies[a] = dataclasses.replace(replies[a], **{field_name: {**getattr(replies[a], field_name), owner: forged}})


@pytest.mark.parametrize("field_name", ["b_shares", "sk_shares"])
def test_a_corrupt_share_among_exactly_t_is_refused_not_summed(field_name: str) -> None:
    """The reported attack: exactly t sites answer the unmask stage and one forges its share, so the t shares
    combine to a wrong but well-formed secret. Unchecked, that secret unmasks the sum into noise (the review saw a
    mean of 0.54 for a true 0.0016). The server now checks b against the owner's stage-2 commitment and s_sk
    against its advertised s_pk: with no spare share to fall back on, it refuses the aggregate, naming the owner."""
    fed = make_fed(4, seed=270)
    a, b, _, d = fed.ids
    if field_name == "b_shares":  # d signs, then goes silent: three unmask replies, threshold 3
        server, replies = _to_unmask(fed, 3, silent=d)
        owner = b
    else:  # d drops after sending shares: its key is reconstructed from the three survivors' shares
        server, replies = _to_unmask(fed, 3, drop=d)
        owner = d
    _corrupt(fed, replies, [a], owner, field_name, 3)
    forged = [shamir.Share.from_bytes(getattr(r, field_name)[owner]) for r in replies.values()]
    assert len(shamir.combine(forged, 3)) == 32  # the forgery reconstructs without complaint
    server.receive_unmask(list(replies.values()))

    unchecked = copy.deepcopy(server)  # what the server computed before the check: garbage, taken as the sum
    unchecked._verifier = lambda owner, field_name: lambda secret: True
    truth = np.sum([fed.vectors[x] for x in server.survivors], axis=0)
    assert np.abs(unchecked.aggregate() - truth).max() > 1.0

    with pytest.raises(SecAggAbort, match=rf"node {owner} \({fed.names[owner]!r}\)'s"):
        server.aggregate()


@pytest.mark.parametrize(
    ("n", "t", "attackers", "field_name"),
    [
        (7, 5, [0], "b_shares"),  # among the first t responders the server combines
        (7, 5, [6], "b_shares"),  # only in the last t: caught by the redundancy check, not the first combine
        (7, 5, [2], "sk_shares"),
        (10, 7, [1, 8], "b_shares"),  # two forgers: a subset search finds the 7 good shares among 10
    ],
)
def test_corrupt_shares_with_spares_are_outvoted_and_their_senders_dropped(
    n: int, t: int, attackers: list[int], field_name: str
) -> None:
    """With more than t unmask replies, the server finds a t-subset whose secret verifies, sums exactly, and
    drops the responders whose share is in no verifying subset: the honest ones are never blamed."""
    fed = make_fed(n, seed=280 + n + len(attackers))
    dropped = fed.ids[3]
    server, replies = _to_unmask(fed, t, drop=dropped)
    forgers = [x for x in (fed.ids[i] for i in attackers) if x != dropped]
    owner = fed.ids[5] if field_name == "b_shares" else dropped
    _corrupt(fed, replies, forgers, owner, field_name, t)
    server.receive_unmask(list(replies.values()))
    quant = QuantSpec(0.5, n)
    truth = np.sum([fed.vectors[x] for x in server.survivors], axis=0)
    assert np.abs(server.aggregate() - truth).max() <= quant.error_bound(len(server.survivors))
    assert set(server.rejected) == set(forgers)
    assert all(f"node {owner} " in reason and "corrupt" in reason for reason in server.rejected.values())


def test_a_missing_or_malformed_b_commitment_drops_its_sender() -> None:
    """The commitment is part of the stage-2 reply: one without it (or of the wrong length) is refused at parse
    time, and a reply built around the parser loses its sender its place in the round, nobody else's."""
    fed = make_fed(4, seed=290)
    server, sites = start(fed, 3, QuantSpec(0.5, 4))
    req1 = server.advertise_request()
    server.receive_adverts([s.advertise(req1) for s in sites.values()])
    req2 = server.share_request()
    shares = [sites[x].share(req2) for x in server.u0]
    d = shares[0].to_dict()
    assert EncryptedShares.from_dict(d) == shares[0]
    with pytest.raises(SecAggIntegrityError, match="missing field 'b_commitment'"):
        EncryptedShares.from_dict({k: v for k, v in d.items() if k != "b_commitment"})
    with pytest.raises(SecAggIntegrityError, match="b_commitment has 31 bytes"):
        EncryptedShares.from_dict({**d, "b_commitment": d["b_commitment"][:-1]})
    bad = dataclasses.replace(shares[1], b_commitment=b"")
    server.receive_shares([shares[0], bad, *shares[2:]])
    assert server.u1 == tuple(sorted(x.node_id for x in shares if x.node_id != bad.node_id))
    assert set(server.rejected) == {bad.node_id}


@pytest.mark.parametrize("junk", ["copied", "short"])
def test_a_misplaced_or_malformed_unmask_share_drops_only_its_sender(junk: str) -> None:
    """A responder that sends another responder's share (a duplicate x) or a truncated one is dropped before any
    combination is tried; the spare shares still give the exact sum."""
    fed = make_fed(5, seed=300)
    server, replies = _to_unmask(fed, 4)
    a, b, *_ = fed.ids
    owner = fed.ids[2]
    share = replies[b].b_shares[owner] if junk == "copied" else replies[a].b_shares[owner][:-1]
    replies[a] = dataclasses.replace(replies[a], b_shares={**replies[a].b_shares, owner: share})
    server.receive_unmask(list(replies.values()))
    truth = np.sum([fed.vectors[x] for x in server.survivors], axis=0)
    assert np.abs(server.aggregate() - truth).max() <= QuantSpec(0.5, 5).error_bound(5)
    assert list(server.rejected) == [a]
    assert ("not at its own x" if junk == "copied" else "malformed") in server.rejected[a]
