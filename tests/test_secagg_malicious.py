"""A malicious server, played with the protocol's own classes: what it tries, and what it gets.

It chooses the threshold, the survivor views each site sees, the weights and the round tag. Each
attack is either refused by the sites or yields nothing beyond the sum: what the server can compute
from everything it was sent stays uniform and uncorrelated with any one site's input.
"""

from __future__ import annotations

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
    QuantSpec,
    RoundTag,
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
    # Signatures from the other view do not count: they do not verify on this site's view.
    with pytest.raises(SecAggIntegrityError, match=r"does not verify|not a survivor|below the threshold"):
        sites[told_dropped[-1]].unmask(UnmaskRequest(server.tag, view_out.survivors, (target,), sig_in | sig_out))
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
    fed.site(fed.ids[0], claim_tag=used.claim).advertise(req)
    again = fed.site(fed.ids[0], claim_tag=secure_site.UsedTags(tmp_path / "secagg-tags.log").claim)
    with pytest.raises(SecAggIntegrityError, match="already used on this site"):
        again.advertise(req)
    fresh = dataclasses.replace(req, tag=RoundTag.new(req.tag.run_id, req.tag.round))
    fed.site(fed.ids[0], claim_tag=used.claim).advertise(fresh)  # a new attempt, with a new tag, is fine


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
