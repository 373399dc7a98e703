"""What the server learns about held-out scores: per site where a site shares them, else federation totals.

Held-out accuracy and loss are computed from a site's data without DP noise, so under secure aggregation
they leave a site only inside a secure sum (`common/secagg/scores.py`); a site that opts in
(`share_eval_metrics` in its own file) also sends its own figures, in the reply's `scores` record. Each
site reports its privacy spend (epsilon) in plaintext: that is accounting, not data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import RecordDict

from fedtune.common.config import FederationSpec
from fedtune.common.secagg import scores
from fedtune.common.secagg.errors import short_reason


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


def roster_name(names: Mapping[int, str], node: int) -> str:
    """The site name the server registered for `node` (its roster), never one a reply writes about itself:
    a reply naming another site must not get its figures filed, stored or shown under that site."""
    return names.get(node) or f"node-{node}"


def site_eval(reply: RecordDict, site: str) -> SiteEval | None:
    """A site's own scores, if it sent them (plaintext rounds, or a site that opted in), filed under `site`
    (the server's name for the sender, see `roster_name`)."""
    if "scores" not in reply:
        return None
    s = reply["scores"]
    return SiteEval(
        site=site,
        num_examples=int(s.get("num-examples", 0)),
        loss=float(s["eval-loss"]) if "eval-loss" in s else math.nan,
        accuracy=float(s["eval-accuracy"]) if "eval-accuracy" in s else None,
        epsilon=float(s.get("epsilon", 0.0)),
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


def secure_totals(spec: FederationSpec, total: np.ndarray, contributors: int) -> EvalTotals | None:
    """The federation's scores from the last `scores.LENGTH` coordinates of a secure sum."""
    sa = spec.secagg
    got = scores.decode(total, sa.clip_range, sa.weight_cap, classification=spec.task.kind == "classification")
    return EvalTotals(round(got.rows), got.loss, got.accuracy, contributors) if got else None


def site_evals(replies: dict[int, RecordDict], failed: dict[int, str], names: Mapping[int, str]) -> dict[int, SiteEval]:
    """The sites' own figures from their replies (keyed by the authenticated sender), each filed under the
    sender's roster name in `names`; a malformed `scores` record is that site's failure."""
    out = {}
    for node, reply in replies.items():
        try:
            if (got := site_eval(reply, roster_name(names, node))) is not None:
                out[node] = got
        except Exception as exc:
            failed.setdefault(node, f"malformed scores: {short_reason(exc)}")
    return out
