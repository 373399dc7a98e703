"""One training round under secure aggregation: the server learns only the weighted sum.

Stage 1 rides on the train message (sites train, then advertise signed keys),
so secure aggregation adds three short round trips, not a second training.
Weights are the sites' example counts, which they report in plaintext anyway;
each site multiplies its own delta by its weight before masking, so the
unmasked sum divided by the survivors' total weight is exactly FedAvg.
"""

from __future__ import annotations

import logging
import math

from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fedtune.common.adapter import AdapterState, num_parameters, unflatten
from fedtune.common.config import FederationSpec
from fedtune.common.secagg.errors import SecAggError
from fedtune.common.secagg.messages import (
    EncryptedShares,
    KeyAdvert,
    MaskedInput,
    RoundTag,
    UnmaskShares,
)
from fedtune.common.secagg.protocol import SecAggServer
from fedtune.common.secagg.quantize import QuantSpec
from fedtune.server.aggregation import RoundUpdate, site_train_metrics
from fedtune.server.messaging import StageResult, exchange

log = logging.getLogger(__name__)

SHARE, MASK, UNMASK = "train.secagg_share", "train.secagg_mask", "train.secagg_unmask"


def threshold_for(spec: FederationSpec, n: int) -> int:
    return min(n, max(2, math.ceil(spec.secagg.threshold_fraction * n)))


def _add_bytes(update: RoundUpdate, stage: StageResult) -> None:
    for node, b in stage.bytes_down.items():
        update.bytes_down[node] = update.bytes_down.get(node, 0) + b
    for node, b in stage.bytes_up.items():
        if node in update.sites:
            update.sites[node].bytes_up += b


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
    participants = [(n, names[n]) for n in nodes if n in names]
    update = RoundUpdate(mean_delta=None)
    if len(participants) < max(2, spec.training.min_sites):
        update.error = f"secure aggregation needs at least 2 known sites, {len(participants)} available"
        return update
    n = len(participants)
    tag = RoundTag.new(grid.run.run_id, round_)
    server = SecAggServer(tag, participants, threshold_for(spec, n), QuantSpec(spec.secagg.clip_range, n))
    timeout = spec.secagg.stage_timeout_s
    try:
        # Stage 1: train + advertise keys.
        stage1 = RecordDict({**content, "secagg": ConfigRecord(server.advertise_request().to_dict())})
        s1 = exchange(
            grid,
            dict.fromkeys([p for p, _ in participants], stage1),
            "train",
            group=group,
            timeout=spec.training.round_timeout_s,
        )
        update.bytes_down = dict(s1.bytes_down)
        update.failed.update(s1.failed)
        adverts = []
        for node, reply in s1.replies.items():
            update.sites[node] = site_train_metrics(reply, s1.bytes_up[node])
            if "keys" in reply:
                adverts.append(KeyAdvert.from_dict(dict(reply["keys"])))
        u0 = server.receive_adverts(adverts)
        weights = {node: float(update.sites[node].num_examples) for node in u0}
        total = sum(weights.values())

        # Stage 2: encrypted Shamir shares, relayed.
        config = content["config"]  # every stage names run, round and federation for the site
        share_req = RecordDict({"secagg": ConfigRecord(server.share_request().to_dict()), "config": config})
        s2 = exchange(grid, dict.fromkeys(u0, share_req), SHARE, group=group, timeout=timeout)
        _add_bytes(update, s2)
        update.failed.update(s2.failed)
        server.receive_shares([EncryptedShares.from_dict(dict(r["shares"])) for r in s2.replies.values()])

        # Stage 3: masked, weighted deltas.
        s3_out = {
            node: RecordDict(
                {
                    "secagg": ConfigRecord(server.masked_input_request(node).to_dict()),
                    "weight": ConfigRecord({"weight": weights[node] / total}),
                    "config": config,
                }
            )
            for node in server.u1
        }
        s3 = exchange(grid, s3_out, MASK, group=group, timeout=timeout)
        _add_bytes(update, s3)
        update.failed.update(s3.failed)
        masked = [MaskedInput.from_dict(dict(r["header"]), r["masked"]["y"].numpy()) for r in s3.replies.values()]
        server.receive_masked_inputs(masked)

        # Stage 4: shares that remove the masks of survivors (self) and of dropped sites (pairwise).
        unmask_req = RecordDict({"secagg": ConfigRecord(server.unmask_request().to_dict()), "config": config})
        s4 = exchange(grid, dict.fromkeys(server.survivors, unmask_req), UNMASK, group=group, timeout=timeout)
        _add_bytes(update, s4)
        update.failed.update(s4.failed)
        server.receive_unmask([UnmaskShares.from_dict(dict(r["unmask"])) for r in s4.replies.values()])
        weighted_sum = server.aggregate()
    except SecAggError as exc:
        update.error = f"secure aggregation aborted, global adapter unchanged: {exc}"
        return update
    survivors_weight = sum(weights[node] for node in server.survivors) / total
    if weighted_sum.size != num_parameters(template):
        update.error = f"aggregate has {weighted_sum.size} values, adapter needs {num_parameters(template)}"
        return update
    update.mean_delta = unflatten(weighted_sum / survivors_weight, template)
    log.info("round %d: secure aggregate of %d site(s), %d dropped", round_, len(server.survivors), len(server.dropped))
    return update
