"""Scoring an adapter on the sites' held-out rows, as totals the server may see.

Sites score the adapter each training message carries before they train on it (`RoundUpdate.evals` and
`.totals`), so a round's adapter is scored by the next round and travels down once. This module scores the
one adapter no training message carries: the last round's, once the run ends. Under secure aggregation the
scores are a secure sum of `common/secagg/scores.py` coordinates; sites that opt in also send their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fedtune.common.adapter import AdapterState, to_record
from fedtune.common.config import FederationSpec
from fedtune.common.secagg import scores
from fedtune.common.secagg.quantize import QuantSpec
from fedtune.server.messaging import broadcast, exchange
from fedtune.server.scores import EvalTotals, SiteEval, secure_totals, site_evals
from fedtune.server.secure_round import secure_sum


@dataclass
class Evaluation:
    evals: dict[int, SiteEval] = field(default_factory=dict)  # every site that sent its own figures
    totals: EvalTotals | None = None
    bytes_down: dict[int, int] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    error: str | None = None


def round_config(spec: FederationSpec, run: str, round_: int) -> ConfigRecord:
    return ConfigRecord(
        {"federation": spec.model_dump_json(), "run": run, "round": round_, "rounds": spec.training.rounds}
    )


def evaluate_round(
    grid: Grid,
    spec: FederationSpec,
    run: str,
    round_: int,
    state: AdapterState,
    nodes: list[int],
    names: dict[int, str],
) -> Evaluation:
    """Every site scores `state`; under secure aggregation the server learns only the totals."""
    content = RecordDict({"global": to_record(state), "config": round_config(spec, run, round_)})
    group, timeout = f"{run}:{round_}:eval", spec.training.round_timeout_s
    out = Evaluation()
    if not spec.secagg.enabled:
        stage = exchange(grid, broadcast(nodes, content), "evaluate", group=group, timeout=timeout)
        out.bytes_down, out.failed = stage.bytes_down, stage.failed
        out.evals = site_evals(stage.replies, out.failed, names)
        return out
    participants = [(n, names[n]) for n in nodes if n in names]
    if len(participants) < 2:
        out.error = f"secure evaluation needs at least 2 known sites, {len(participants)} available"
        return out
    summed = secure_sum(
        grid,
        spec,
        content,
        "evaluate",
        participants,
        round_=round_,
        group=group,
        quant=QuantSpec(spec.secagg.clip_range, len(participants)),
        length=scores.LENGTH,
        first_timeout=timeout,
    )
    out.bytes_down, out.failed, out.error = summed.bytes_down, summed.failed, summed.error
    out.evals = site_evals(summed.first_replies, out.failed, names)
    if summed.total is not None:
        out.totals = secure_totals(spec, summed.total, len(summed.contributors))
    return out
