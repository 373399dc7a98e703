"""A malicious server against the site's secure-aggregation code: what it sends each site, and what it gets.

Every value that changes what a site sends is either the site's own or signed by every site in the round:
sites shown different federation specs or adapters cannot complete a round together, a sum of too few sites is
refused, one bad signature does not end a round, a site signs one survivor view per round whatever state it is
run from, and the colluder bound README states (2t - n) is exact: one colluder fewer recovers nothing.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
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
    UnmaskRequest,
    keys,
    shamir,
)
from fedtune.common.secagg.messages import ROLE_SCORES, ROLE_UPDATE, ShareRequest, SurvivorSignature
from fedtune.common.secagg.protocol import _pair_mask, _self_mask

RUN = 7


@pytest.fixture
def flower_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps messages with the task's identity; a Grid would have set it."""
    for attr, value in (("_run_id", RUN), ("_task_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def _specs(tmp_path: Path, fed: Fed, **site: object) -> dict[int, SiteSpec]:
    peers = {fed.names[n]: keys.public_key_to_hex(fed.idkeys[n]) for n in fed.ids}
    out = {}
    for n in fed.ids:
        state = tmp_path / fed.names[n]
        keys.save_identity_key(fed.idkeys[n], state / "identity.pem")
        out[n] = SiteSpec(
            name=fed.names[n], data=DataSpec(train=tmp_path / "unused.csv"), state_dir=state, peers=peers, **site
        )
    return out


def _first_message(node: int, server: SecAggServer, federation: str, adapter: np.ndarray) -> Message:
    config = ConfigRecord({"federation": federation, "run": "r1", "round": 1, "rounds": 5})
    content = RecordDict(
        {
            "global": ArrayRecord({"values": Array(adapter.astype(np.float32))}),
            "config": config,
            "secagg": ConfigRecord(server.advertise_request().to_dict()),
        }
    )
    return Message(content, dst_node_id=node, message_type="train")


def _stage(node: int, request: object, kind: str) -> Message:
    content = RecordDict({"secagg": ConfigRecord(request.to_dict()), "config": ConfigRecord({"round": 1})})
    return Message(content, dst_node_id=node, message_type=kind)


def _through_shares(
    tmp_path: Path, n: int, *, seed: int
) -> tuple[Fed, dict[int, SiteSpec], dict[int, Context], SecAggServer]:
    """A round of the real site code (t = 3) up to and with the encrypted shares, every site sent one message."""
    fed = make_fed(n, seed=seed)
    specs = _specs(tmp_path, fed)
    contexts = {node: Context(RUN, node, {}, RecordDict(), {}) for node in fed.ids}
    server = SecAggServer(RoundTag.new(RUN, 1), [(node, fed.names[node]) for node in fed.ids], 3, QuantSpec(0.5, n))
    adapter = np.linspace(-1, 1, 16)
    server.receive_adverts(
        [
            secure_site.start(
                _first_message(node, server, "{}", adapter), contexts[node], specs[node], fed.vectors[node]
            )
            for node in fed.ids
        ]
    )
    share = server.share_request()
    server.receive_shares(
        [secure_site.share(_stage(node, share, "train.secagg_share"), contexts[node], specs[node]) for node in fed.ids]
    )
    return fed, specs, contexts, server


@pytest.mark.parametrize("differs", ["federation", "adapter"])
def test_sites_shown_different_specs_or_adapters_cannot_complete_a_round(
    tmp_path: Path, flower_task: None, differs: str
) -> None:
    """The isolation attack of the review: every site but the victim is sent a spec that makes it decline (or a
    huge weight cap), so the sum would be the victim's vector. Each site signs a digest of what it was sent, so
    the victim refuses its peers' adverts before it deals a share or masks anything."""
    fed = make_fed(3, seed=301)
    specs = _specs(tmp_path, fed)
    contexts = {n: Context(RUN, n, {}, RecordDict(), {}) for n in fed.ids}
    server = SecAggServer(RoundTag.new(RUN, 1), [(n, fed.names[n]) for n in fed.ids], 3, QuantSpec(0.5, 3))
    victim = fed.ids[0]
    adapter = np.linspace(-1, 1, 16)
    honest_spec = '{"secagg": {"weight_cap": 100000}, "privacy": {"target_delta": 1e-05}}'
    forged_spec = '{"secagg": {"weight_cap": 1e15}, "privacy": {"target_delta": 1e-30}}'
    adverts = []
    for n in fed.ids:
        federation = honest_spec if n == victim or differs != "federation" else forged_spec
        sent = adapter if n == victim or differs != "adapter" else adapter + 1e-3
        msg = _first_message(n, server, federation, sent)
        adverts.append(secure_site.start(msg, contexts[n], specs[n], fed.vectors[n]))
    server.receive_adverts(adverts)  # the server itself cannot tell: it only relays
    share = server.share_request()
    with pytest.raises(SecAggIntegrityError, match="different federation spec, adapter"):
        secure_site.share(_stage(victim, share, "train.secagg_share"), contexts[victim], specs[victim])
    assert len(contexts[victim].state) == 0  # the refusal ends the victim's round: its secrets are gone


def test_identical_messages_still_complete_the_round(tmp_path: Path, flower_task: None) -> None:
    """The control for the test above: the same spec and adapter at every site, and the sum comes out."""
    fed, specs, contexts, server = _through_shares(tmp_path, 3, seed=302)
    quant = server.quant
    server.receive_masked_inputs(
        [
            secure_site.mask(_stage(n, server.masked_input_request(n), "train.secagg_mask"), contexts[n], specs[n])
            for n in fed.ids
        ]
    )
    cons = server.consistency_request()
    server.receive_consistency(
        [secure_site.consistency(_stage(n, cons, "train.secagg_consistency"), contexts[n], specs[n]) for n in fed.ids]
    )
    unmask = server.unmask_request()
    server.receive_unmask(
        [secure_site.unmask(_stage(n, unmask, "train.secagg_unmask"), contexts[n], specs[n]) for n in fed.ids]
    )
    total = server.aggregate()
    assert np.abs(total - sum(fed.vectors.values())).max() <= quant.error_bound(3)


def test_a_site_refuses_sums_of_fewer_sites_than_its_own_minimum() -> None:
    """A two-site round {victim, colluder} passes any threshold floor (t = n = 2), and the colluder subtracts its
    own input from the sum. A site refuses it unless its own file allows sums of two (min_round_sites)."""
    fed = make_fed(2, seed=303)
    server, _ = start(fed, 2, QuantSpec(0.5, 2))
    victim = fed.site(fed.ids[0], expected_run_id=7, expected_round=1, min_sites=3)
    with pytest.raises(SecAggConfigError, match="at least 3 sites"):
        victim.advertise(server.advertise_request())
    # A site that knowingly joins a two-site federation still can.
    fed.site(fed.ids[0], expected_run_id=7, expected_round=1, min_sites=2).advertise(server.advertise_request())


def test_a_site_refuses_to_mask_when_the_server_shows_it_fewer_adverts_than_its_minimum() -> None:
    """The participant list may be long, but what protects a site is how many others actually mask with it."""
    fed = make_fed(4, seed=304)
    server, _ = start(fed, 2 + 1, QuantSpec(0.5, 4))  # t = 3 of 4
    sites = {n: fed.site(n, expected_run_id=7, expected_round=1, min_sites=4) for n in fed.ids}
    req = server.advertise_request()
    server.receive_adverts([sites[n].advertise(req) for n in fed.ids[:3]])  # the fourth never advertises
    with pytest.raises(SecAggConfigError, match="Only 3 sites advertised"):
        sites[fed.ids[0]].share(server.share_request())


def test_one_junk_consistency_signature_does_not_end_the_round() -> None:
    """A site (or the server) relays a junk signature: honest sites skip it and unmask on the t valid ones, so the
    round completes and nobody is blamed."""
    fed = make_fed(4, seed=305)
    quant = QuantSpec(0.5, 4)
    server, sites = start(fed, 3, quant)
    run_to_stage3(server, sites)
    server.receive_masked_inputs(
        [sites[n].masked_input(server.masked_input_request(n), fed.vectors[n]) for n in fed.ids]
    )
    cons = server.consistency_request()
    signatures = [sites[n].consistency(cons) for n in fed.ids]
    junk = fed.ids[1]
    signatures = [s if s.node_id != junk else SurvivorSignature(s.tag, junk, bytes(64)) for s in signatures]
    server.receive_consistency(signatures)
    req = server.unmask_request()
    server.receive_unmask([sites[n].unmask(req) for n in server.signers])
    assert not server.rejected
    assert np.abs(server.aggregate() - sum(fed.vectors.values())).max() <= quant.error_bound(4)


def test_a_site_signs_one_survivor_view_per_round_even_from_a_saved_state(tmp_path: Path, flower_task: None) -> None:
    """Two consistency requests answered from copies of one saved site state would give two signatures on two
    views (plain Flower may run a node's messages concurrently). The site records that it signed, durably, before
    the signature leaves, so the second copy refuses."""
    fed, specs, contexts, server = _through_shares(tmp_path, 3, seed=306)
    for n in fed.ids:
        secure_site.mask(_stage(n, server.masked_input_request(n), "train.secagg_mask"), contexts[n], specs[n])
    victim = fed.ids[0]
    saved = copy.deepcopy(contexts[victim])
    u1 = tuple(fed.ids)
    first = ConsistencyRequest(server.tag, u1, u1)
    secure_site.consistency(_stage(victim, first, "train.secagg_consistency"), contexts[victim], specs[victim])
    second = ConsistencyRequest(server.tag, u1, u1)
    with pytest.raises(SecAggIntegrityError, match="consistency signature"):
        secure_site.consistency(_stage(victim, second, "train.secagg_consistency"), saved, specs[victim])


def test_a_site_masks_once_per_round_even_from_a_saved_state(tmp_path: Path, flower_task: None) -> None:
    """The third review's attack, with no colluder: two masked inputs of one round from two copies of the saved
    site state, for U1 and for U1 without one peer, differ by exactly that peer's pairwise mask; peeling each
    pairwise mask off that way, and the self mask through the honest end of the round, gives the site's input.
    The site records durably that it masked for the tag before the vector exists, so the second copy refuses."""
    fed, specs, contexts, server = _through_shares(tmp_path, 4, seed=307)
    victim, dropped = fed.ids[0], fed.ids[-1]
    saved = copy.deepcopy(contexts[victim])
    full = server.masked_input_request(victim)
    secure_site.mask(_stage(victim, full, "train.secagg_mask"), contexts[victim], specs[victim])
    fewer = dataclasses.replace(
        full,
        u1=tuple(n for n in full.u1 if n != dropped),
        blobs={k: v for k, v in full.blobs.items() if k != dropped},
    )
    with pytest.raises(SecAggIntegrityError, match="masked input"):
        secure_site.mask(_stage(victim, fewer, "train.secagg_mask"), saved, specs[victim])


# -- the colluder bound: 2t - n


def _split_view_attack(n: int, t: int, colluders: int, view_b_honest: int, seed: int) -> np.ndarray | None:
    """The server shows the victim and some honest sites view A (everyone survived: it gets the victim's self-mask
    shares) and the other honest sites view B (the victim dropped: it gets its key shares); the colluding sites
    sign both views and hand over every share they hold. Returns the victim's input if the server recovers it."""
    fed = make_fed(n, seed=seed)
    quant = QuantSpec(0.5, n)
    server, sites = start(fed, t, quant)
    run_to_stage3(server, sites)
    masked = {n_: sites[n_].masked_input(server.masked_input_request(n_), fed.vectors[n_]) for n_ in fed.ids}
    victim, rest = fed.ids[0], fed.ids[1:]
    bad, honest = rest[:colluders], rest[colluders:]
    in_b = honest[:view_b_honest]
    u1 = tuple(fed.ids)
    view_a, view_b = u1, tuple(x for x in u1 if x != victim)

    def signatures(view: tuple[int, ...], signers: list[int]) -> dict[int, bytes]:
        out = {}
        for s in signers:
            if s in bad:  # the attacker holds colluders' keys: they sign anything
                digest = sites[s]._signed_digest(sites[s]._req)
                out[s] = fed.idkeys[s].sign(ConsistencyRequest.signed_payload(server.tag, u1, view, digest))
            else:
                out[s] = sites[s].consistency(ConsistencyRequest(server.tag, u1, view)).signature
        return out

    sig_a = signatures(view_a, [victim, *[h for h in honest if h not in in_b], *bad])
    sig_b = signatures(view_b, [*in_b, *bad])
    b_shares = [sites[c]._received[victim][0] for c in bad]
    sk_shares = [sites[c]._received[victim][1] for c in bad]
    for s in [victim, *[h for h in honest if h not in in_b]]:
        try:
            reply = sites[s].unmask(UnmaskRequest(server.tag, view_a, (), sig_a))
        except SecAggIntegrityError:
            continue
        b_shares.append(shamir.Share.from_bytes(reply.b_shares[victim]))
    for s in in_b:
        try:
            reply = sites[s].unmask(UnmaskRequest(server.tag, view_b, (victim,), sig_b))
        except SecAggIntegrityError:
            continue
        sk_shares.append(shamir.Share.from_bytes(reply.sk_shares[victim]))
    if len(b_shares) < t or len(sk_shares) < t:
        return None
    b = shamir.combine(b_shares, t)
    sk = keys.x25519_from_private_bytes(shamir.combine(sk_shares, t))
    y = masked[victim].vector - _self_mask(b, victim, server.tag, LENGTH)
    for other in rest:
        m = _pair_mask(sk, sites[other]._s_pk, victim, other, server.tag, LENGTH)
        y = y - m if victim < other else y + m
    return quant.dequantize_sum(y, 1)


@pytest.mark.parametrize(("n", "t"), [(4, 3), (5, 4), (7, 5), (10, 7)])
def test_the_colluder_bound_is_exactly_2t_minus_n(n: int, t: int) -> None:
    """README's bound, measured: with 2t - n colluding sites the split-view attack recovers one site's input
    (correlation 1), and with one colluder fewer it recovers nothing under any split of the honest sites."""
    bound = 2 * t - n
    honest = n - 1 - bound
    recovered = _split_view_attack(n, t, bound, view_b_honest=t - bound, seed=n * 10 + t)
    assert recovered is not None
    fed = make_fed(n, seed=n * 10 + t)
    assert np.corrcoef(recovered, fed.vectors[fed.ids[0]])[0, 1] > 0.999
    for split in range(honest + 2):
        assert _split_view_attack(n, t, bound - 1, view_b_honest=split, seed=n * 10 + t) is None


# -- who brings what: zeros count for nobody


def _roles_round(roles: list[int], t: int, seed: int, scores_length: int = 0):
    fed = make_fed(len(roles), seed=seed)
    quant = QuantSpec(0.5, len(roles))
    server, _ = start(fed, t, quant)
    sites = {
        n: fed.site(n, expected_run_id=7, expected_round=1, min_sites=3, role=r, scores_length=scores_length)
        for n, r in zip(fed.ids, roles, strict=True)
    }
    return fed, quant, server, sites


def _complete(server: SecAggServer, sites: dict, vectors: dict[int, np.ndarray]) -> np.ndarray:
    """Every stage after the adverts, every site honest: the aggregate."""
    run_to_stage3(server, sites)
    server.receive_masked_inputs([sites[n].masked_input(server.masked_input_request(n), vectors[n]) for n in sites])
    cons = server.consistency_request()
    server.receive_consistency([sites[n].consistency(cons) for n in sites])
    req = server.unmask_request()
    server.receive_unmask([sites[n].unmask(req) for n in sites])
    return server.aggregate()


def test_a_site_refuses_a_sum_in_which_the_others_only_decline() -> None:
    """The review's zero-colluder isolation: the server replays a round to everyone but the victim, so that the
    others decline it (already trained) and send zeros; all n survive and every threshold holds, but the sum is the
    victim's vector. Adverts carry a signed role, and a site that brings an update refuses a sum with fewer than
    max(t, min_round_sites) sites that bring one."""
    fed, _, server, sites = _roles_round([ROLE_UPDATE, 0, 0, 0], t=3, seed=310)
    victim = fed.ids[0]
    req = server.advertise_request()
    server.receive_adverts([sites[n].advertise(req) for n in fed.ids])
    relayed = ShareRequest.from_dict(server.share_request().to_dict())  # roles travel with the adverts
    assert [a.role for a in relayed.adverts] == [ROLE_UPDATE, 0, 0, 0]
    with pytest.raises(SecAggConfigError, match="Only 1 sites bring an update"):
        sites[victim].share(relayed)
    # A forged role (the server relabels the decliners as contributors) breaks their signatures instead.
    fresh_fed, _, fresh_server, fresh_sites = _roles_round([ROLE_UPDATE, 0, 0, 0], t=3, seed=310)
    fresh_req = fresh_server.advertise_request()
    fresh_server.receive_adverts([fresh_sites[n].advertise(fresh_req) for n in fresh_fed.ids])
    honest = fresh_server.share_request()
    forged = dataclasses.replace(
        honest, adverts=tuple(dataclasses.replace(a, role=ROLE_UPDATE) for a in honest.adverts)
    )
    with pytest.raises(SecAggIntegrityError, match="does not verify"):
        fresh_sites[fresh_fed.ids[0]].share(forged)


def test_one_decliner_among_enough_contributors_still_completes_the_round() -> None:
    fed, quant, server, sites = _roles_round([ROLE_UPDATE, ROLE_UPDATE, ROLE_UPDATE, 0], t=3, seed=311)
    vectors = dict(fed.vectors)
    vectors[fed.ids[3]] = np.zeros(LENGTH)
    assert np.abs(_complete(server, sites, vectors) - sum(vectors.values())).max() <= quant.error_bound(4)


def test_held_out_figures_are_withheld_where_too_few_sites_release_theirs() -> None:
    """A site that opts into secure scores among sites that do not would be alone in the score coordinates: it
    sends zeros there instead, and its update still goes into the sum."""
    tail = 3
    fed, quant, server, sites = _roles_round(
        [ROLE_UPDATE | ROLE_SCORES, ROLE_UPDATE, ROLE_UPDATE], t=3, seed=312, scores_length=tail
    )
    vectors = {n: v.copy() for n, v in fed.vectors.items()}
    for n in fed.ids[1:]:
        vectors[n][-tail:] = 0.0  # the others release no scores
    vectors[fed.ids[0]][-tail:] = [0.3, 0.2, 0.1]
    total = _complete(server, sites, vectors)
    assert np.abs(total[-tail:]).max() <= quant.error_bound(3)  # nothing of the lone site's scores
    expected = sum(v[:-tail] for v in vectors.values())
    assert np.abs(total[:-tail] - expected).max() <= quant.error_bound(3)  # its update is there


def test_two_adapters_never_share_a_round_digest_by_moving_bytes_between_arrays() -> None:
    """Review round 6: the digest hashed each array's bytes back to back, and decoding ignores an array's trailing
    bytes, so bytes moved from the end of one array to the start of the next (across the next one's header) gave
    two different adapters one digest, and two sites signed one round while loading different models."""
    meta = repr(("values", "float32", (3,), "numpy.ndarray")).encode()
    head, moved, tail = b"layout-bytes", b"site-a-values", b"site-b-values"

    def record(layout: bytes, values: bytes) -> ArrayRecord:
        arrays = {"layout": Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=layout)}
        arrays["values"] = Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=values)
        return ArrayRecord(arrays)

    config = ConfigRecord({"run": "r1", "round": 1})
    a = record(head + meta + moved, tail)
    b = record(head, moved + meta + tail)
    assert secure_site.round_digest(config, a) != secure_site.round_digest(config, b)
    assert secure_site.round_digest(config, a) == secure_site.round_digest(config, record(head + meta + moved, tail))
