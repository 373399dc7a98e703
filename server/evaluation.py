"""Scoring the global adapter on the sites' held-out rows, as totals the server may see.

Held-out accuracy and loss are computed from a site's data without DP noise, so under secure
aggregation they leave a site only inside a secure sum: the server learns the federation's correct
answers, rows and summed loss, never one site's. A site that opts in (`share_eval_metrics` in its own
file) also sends its own figures. Each site reports its privacy spend (epsilon) in plaintext: that is
accounting, not data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fedtune.common.adapter import AdapterState, to_record
from fedtune.common.config import FederationSpec
from fedtune.common.secagg.errors import short_reason
from fedtune.common.secagg.quantize import QuantSpec
from fedtune.server.messaging import broadcast, exchange
from fedtune.server.secure_round import secure_sum

EVAL_VECTOR = ("correct", "rows", "loss-sum")  # what each site adds into the secure sum, in this order


@dataclass
class SiteEval:
    site: str
    num_examples: int
    loss: float
    accuracy: float | None
    epsilon: float


@dataclass
class EvalTotals:
    """The federation's held-out figures, from the secure sum (or from the sites' own figures, in plaintext)."""

    num_examples: int
    loss: float
    accuracy: float | None
    sites: int


@dataclass
class Evaluation:
    evals: dict[int, SiteEval] = field(default_factory=dict)  # every site that answered; figures only if opted in
    totals: EvalTotals | None = None
    bytes_down: dict[int, int] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    error: str | None = None


def round_config(spec: FederationSpec, run: str, round_: int) -> ConfigRecord:
    return ConfigRecord(
        {"federation": spec.model_dump_json(), "run": run, "round": round_, "rounds": spec.training.rounds}
    )


def eval_quant(num_sites: int) -> QuantSpec:
    """Counts up to ~8M/num_sites rows per site, summed exactly (resolution 1/512 of a row, then rounded)."""
    return QuantSpec(float(2**32 // (num_sites * 2**10)), num_sites)


def _site_eval(reply: RecordDict) -> SiteEval:
    m = reply["metrics"]
    rows = int(m.get("num-examples", 0))
    return SiteEval(
        site=str(reply["info"]["site"]),
        num_examples=rows,
        loss=float(m["eval-loss"]) if "eval-loss" in m else math.nan,
        accuracy=float(m["eval-accuracy"]) if "eval-accuracy" in m else None,
        epsilon=float(m.get("epsilon", 0.0)),
    )


def totals_of(evals: dict[int, SiteEval]) -> EvalTotals | None:
    """Pooled figures of the sites that sent their own (plaintext mode, or sites that opted in)."""
    scored = [e for e in evals.values() if e.num_examples and not math.isnan(e.loss)]
    rows = sum(e.num_examples for e in scored)
    if not rows:
        return None
    with_acc = [e for e in scored if e.accuracy is not None]
    accuracy = sum(e.accuracy * e.num_examples for e in with_acc) / rows if len(with_acc) == len(scored) else None
    return EvalTotals(rows, sum(e.loss * e.num_examples for e in scored) / rows, accuracy, len(scored))


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
        replies = stage.replies
    else:
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
            quant=eval_quant(len(participants)),
            length=len(EVAL_VECTOR),
            first_timeout=timeout,
        )
        out.bytes_down, out.failed, out.error = summed.bytes_down, summed.failed, summed.error
        replies = summed.first_replies
        if summed.total is not None:
            correct, rows, loss_sum = (float(v) for v in summed.total)
            if round(rows) > 0:
                accuracy = round(correct) / round(rows) if spec.task.kind == "classification" else None
                out.totals = EvalTotals(round(rows), loss_sum / round(rows), accuracy, len(summed.contributors))
    for node, reply in replies.items():
        try:
            out.evals[node] = _site_eval(reply)
        except Exception as exc:
            out.failed.setdefault(node, f"malformed evaluation reply: {short_reason(exc)}")
    return out
