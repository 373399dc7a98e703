"""Secure sums over Flower messages: the server learns the survivors' total, never one site's vector.

One function, `secure_sum`, drives the five stages of the protocol (`common/secagg`); its first stage
rides on the message that makes each site compute its vector (train, or the last evaluation), so a
secure sum adds four short round trips, not a second training. Training sums each site's self-weighted
delta, its weight and its scores of the adapter it was sent (`common/secagg/scores.py`), so one sum
per round carries both; the run's last evaluation sums the scores alone. Any reply that is missing, malformed,
oversize or inconsistent drops that one site from the sum with a short reason; the round goes on
while at least the threshold remains, and otherwise ends without an update, never the run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fedtune.common.adapter import AdapterState, num_parameters, unflatten
from fedtune.common.config import FederationSpec
from fedtune.common.secagg import scores
from fedtune.common.secagg.errors import SecAggError, short_reason
from fedtune.common.secagg.messages import (
    EncryptedShares,
    KeyAdvert,
    MaskedInput,
    RoundTag,
    SurvivorSignature,
    UnmaskShares,
)
from fedtune.common.secagg.protocol import SecAggServer, threshold_above
from fedtune.common.secagg.quantize import QuantSpec
from fedtune.common.secagg.weighting import unpack
from fedtune.server.aggregation import RoundUpdate, site_train_metrics
from fedtune.server.messaging import StageResult, exchange
from fedtune.server.scores import roster_name, secure_totals, site_evals

log = logging.getLogger(__name__)

SHARE, MASK, CONSISTENCY, UNMASK = (
    "train.secagg_share",
    "train.secagg_mask",
    "train.secagg_consistency",
    "train.secagg_unmask",
)


def threshold_for(spec: FederationSpec, n: int) -> int:
    return threshold_above(spec.secagg.threshold_fraction, n)


@dataclass
class SecureSum:
    """What one secure sum gave the server: the total (None if the sum failed) and who is in it."""

    total: np.ndarray | None = None
    contributors: tuple[int, ...] = ()
    first_replies: dict[int, RecordDict] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)
    error: str | None = None

    def _add(self, stage: StageResult) -> None:
        for node, b in stage.bytes_down.items():
            self.bytes_down[node] = self.bytes_down.get(node, 0) + b
        for node, b in stage.bytes_up.items():
            self.bytes_up[node] = self.bytes_up.get(node, 0) + b
        self.failed.update(stage.failed)


def _parsed(server: SecAggServer, stage: StageResult, parse: Callable[[RecordDict], object]) -> list:
    """Each reply through `parse`; a reply that does not parse drops its site, with the reason.

    `stage.replies` is keyed by the node that sent each reply, as Flower authenticated it (the SuperLink only
    accepts a reply from the node the message went to), whereas a message's own `node_id` is whatever the site
    wrote. A message naming another node is therefore the sender's fault: the sender is dropped, and the message
    counts for no one, so no site can get another blamed, dropped or impersonated.
    """
    out = []
    for node, reply in stage.replies.items():
        try:
            msg = parse(reply)
        except Exception as exc:  # any malformed reply: that site is out of this sum, the sum goes on
            server.reject(node, f"malformed reply: {short_reason(exc)}")
            continue
        claimed = getattr(msg, "node_id", None)
        if claimed != node:
            server.reject(node, f"its reply names node {short_reason(claimed)}, not the node that sent it")
            continue
        out.append(msg)
    return out


def secure_sum(
    grid: Grid,
    spec: FederationSpec,
    first: RecordDict,
    first_type: str,
    participants: list[tuple[int, str]],
    *,
    round_: int,
    group: str,
    quant: QuantSpec,
    length: int,
    first_timeout: float,
) -> SecureSum:
    """Run one secure sum of `length`-long vectors among `participants` (node id, site name)."""
    result = SecureSum()
    tag = RoundTag.new(grid.run.run_id, round_)
    try:
        server = SecAggServer(tag, participants, threshold_for(spec, len(participants)), quant, vector_length=length)
    except SecAggError as exc:  # e.g. two nodes registered under one site name: this round fails, not the run
        result.error = f"secure aggregation not started: {short_reason(exc)}"
        return result
    timeout = spec.secagg.stage_timeout_s
    config = first["config"]  # every stage names run, round and federation for the site
    try:
        req = RecordDict({**first, "secagg": ConfigRecord(server.advertise_request().to_dict())})
        everyone = dict.fromkeys([n for n, _ in participants], req)
        s1 = exchange(grid, everyone, first_type, group=group, timeout=first_timeout)
        result._add(s1)
        result.first_replies = dict(s1.replies)
        with_keys = StageResult(replies={n: r for n, r in s1.replies.items() if "keys" in r})
        server.receive_adverts(_parsed(server, with_keys, lambda r: KeyAdvert.from_dict(dict(r["keys"]))))

        req = RecordDict({"secagg": ConfigRecord(server.share_request().to_dict()), "config": config})
        s2 = exchange(grid, dict.fromkeys(server.u0, req), SHARE, group=group, timeout=timeout)
        result._add(s2)
        server.receive_shares(_parsed(server, s2, lambda r: EncryptedShares.from_dict(dict(r["shares"]))))

        requests = {
            node: RecordDict({"secagg": ConfigRecord(server.masked_input_request(node).to_dict()), "config": config})
            for node in server.u1
        }
        s3 = exchange(grid, requests, MASK, group=group, timeout=timeout)
        result._add(s3)
        server.receive_masked_inputs(
            _parsed(server, s3, lambda r: MaskedInput.from_dict(dict(r["header"]), r["masked"]["y"].numpy()))
        )

        req = RecordDict({"secagg": ConfigRecord(server.consistency_request().to_dict()), "config": config})
        s4 = exchange(grid, dict.fromkeys(server.survivors, req), CONSISTENCY, group=group, timeout=timeout)
        result._add(s4)
        server.receive_consistency(_parsed(server, s4, lambda r: SurvivorSignature.from_dict(dict(r["signature"]))))

        req = RecordDict({"secagg": ConfigRecord(server.unmask_request().to_dict()), "config": config})
        s5 = exchange(grid, dict.fromkeys(server.signers, req), UNMASK, group=group, timeout=timeout)
        result._add(s5)
        server.receive_unmask(_parsed(server, s5, lambda r: UnmaskShares.from_dict(dict(r["unmask"]))))
        result.total = server.aggregate()
        result.contributors = server.survivors
    except SecAggError as exc:
        result.error = f"secure aggregation aborted: {short_reason(exc)}"
    finally:
        for node, reason in server.rejected.items():
            result.failed.setdefault(node, reason)
    log.info("round %d: secure sum of %d site(s); %s", round_, len(result.contributors), result.error or "ok")
    return result


def secure_round(
    grid: Grid,
    spec: FederationSpec,
    content: RecordDict,
    nodes: list[int],
    *,
    names: dict[int, str],
    round_: int,
    group: str,
    template: AdapterState,
) -> RoundUpdate:
    """One training round: each site scores the adapter it was sent, trains, weighs its own delta; the server gets
    only the weighted mean and the score totals."""
    participants = [(n, names[n]) for n in nodes if n in names]
    update = RoundUpdate(mean_delta=None)
    if len(participants) < max(2, spec.training.min_sites):
        update.error = f"secure aggregation needs at least 2 known sites, {len(participants)} available"
        return update
    clip = spec.secagg.clip_range
    quant = QuantSpec(clip, len(participants))
    summed = secure_sum(
        grid,
        spec,
        content,
        "train",
        participants,
        round_=round_,
        group=group,
        quant=quant,
        length=num_parameters(template) + 1 + scores.LENGTH,  # then the site's own weight, then its scores
        first_timeout=spec.training.round_timeout_s,
    )
    update.bytes_down = summed.bytes_down
    update.failed = summed.failed
    update.evals = site_evals(summed.first_replies, update.failed, names)
    for node, reply in summed.first_replies.items():
        try:
            update.sites[node] = site_train_metrics(reply, summed.bytes_up.get(node, 0), roster_name(names, node))
        except Exception as exc:  # a reply without metrics still may have been summed; it just shows less
            update.failed.setdefault(node, f"malformed reply: {short_reason(exc)}")
    if summed.total is None:
        update.error = f"{summed.error}; global adapter unchanged"
        return update
    update.totals = secure_totals(spec, summed.total, len(summed.contributors))
    try:
        mean, _ = unpack(summed.total[: -scores.LENGTH], quant, len(summed.contributors))
    except SecAggError as exc:
        update.error = f"{short_reason(exc)}; global adapter unchanged"
        return update
    update.mean_delta = unflatten(mean, template)
    return update
