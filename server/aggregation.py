"""Turning one round's site replies into one mean adapter delta, and the scores of the adapter sent.

`plain_round` sees every site's delta (use it only where the operator is
trusted); `secure_round` (server/secure_round.py) sees only their sum. Both
return the same `RoundUpdate`, so the federation loop does not care which ran.
Each site scores the adapter it was sent before training on it: the update
carries those scores (the previous round's adapter's), per site or as totals.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import RecordDict
from flwr.serverapp import Grid

from fedtune.common.adapter import AdapterError, AdapterState, from_record
from fedtune.common.config import FederationSpec
from fedtune.common.secagg.errors import short_reason
from fedtune.server.messaging import broadcast, exchange
from fedtune.server.scores import EvalTotals, SiteEval, roster_name, site_evals


@dataclass
class SiteTrain:
    site: str
    num_examples: int  # plaintext rounds only: under secure aggregation a site's count stays inside the sum
    epsilon: float
    epsilon_cap: float
    noise_multiplier: float
    bytes_up: int
    declined: str | None = None
    epsilon_worst: float | None = None  # distributed noise: the epsilon of the site's own noise share alone


@dataclass
class RoundUpdate:
    mean_delta: AdapterState | None
    sites: dict[int, SiteTrain] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    error: str | None = None
    evals: dict[int, SiteEval] = field(default_factory=dict)  # the sent adapter's scores, sites' own figures
    totals: EvalTotals | None = None  # the same, as the secure sum's totals


def weighted_mean(deltas: list[tuple[AdapterState, float]]) -> AdapterState:
    total = sum(w for _, w in deltas)
    first = deltas[0][0]
    return OrderedDict(
        (k, np.sum([d[k].astype(np.float64) * (w / total) for d, w in deltas], axis=0).astype(np.float32))
        for k in first
    )


def site_train_metrics(reply: RecordDict, bytes_up: int, site: str) -> SiteTrain:
    """A site's plaintext training figures, filed under `site`: the server's roster name for the sender
    (`roster_name`), never the name the reply gives itself. The decline reason is site text bound for the run
    store and the operator's screen, so it is cut to `short_reason`'s length."""
    m = reply["metrics"]
    declined = (short_reason(reply["decline"]["reason"]) or "no reason given") if "decline" in reply else None
    return SiteTrain(
        site=site,
        num_examples=int(m.get("num-examples", 0)),
        epsilon=float(m.get("epsilon", 0.0)),
        epsilon_cap=float(m.get("epsilon-cap", 0.0)),
        noise_multiplier=float(m.get("noise-multiplier", 0.0)),
        bytes_up=bytes_up,
        declined=declined,
    )


def plain_round(
    grid: Grid,
    spec: FederationSpec,
    content: RecordDict,
    nodes: list[int],
    *,
    names: Mapping[int, str],
    group: str,
    template: AdapterState,
) -> RoundUpdate:
    """One plaintext round; every reply is filed under its sender's name in `names` (the server's roster)."""
    stage = exchange(grid, broadcast(nodes, content), "train", group=group, timeout=spec.training.round_timeout_s)
    update = RoundUpdate(mean_delta=None, failed=dict(stage.failed), bytes_down=stage.bytes_down)
    update.evals = site_evals(stage.replies, update.failed, names)
    deltas = []
    for node, reply in stage.replies.items():
        try:
            update.sites[node] = site_train_metrics(reply, stage.bytes_up[node], roster_name(names, node))
            if "delta" not in reply:
                continue
            weight = float(update.sites[node].num_examples)
            if not weight > 0:
                raise AdapterError(f"a site reporting {weight} training rows has no weight in the mean")
            deltas.append((from_record(reply["delta"], template), weight))
        except Exception as exc:  # refused, not averaged: one bad site must not poison the model or end the run
            update.failed[node] = f"update refused: {short_reason(exc)}"
    if len(deltas) < spec.training.min_sites:
        update.error = f"{len(deltas)} usable update(s), the federation needs at least {spec.training.min_sites}"
        return update
    update.mean_delta = weighted_mean(deltas)
    return update
