"""Who is connected, which site each node is, and whether it can take part: asked before a round, not learned
from its failure.

A secure sum needs every participant's site name (to check its pinned key) and, with t > 2n/3, a site that
fails mid-round can cost the round its threshold. So new nodes, and nodes that were not ready, are asked
first (a Flower "query" message): each site answers with its name and, if it cannot train, why (a base model
with another fingerprint, a ledger that fails closed, unreadable data). The operator sees that reason by site
name in the run store, the console and `fedtune run`; the site is asked again next round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flwr.app import RecordDict
from flwr.serverapp import Grid

from fedtune.common.config import FederationSpec
from fedtune.common.secagg.errors import short_reason
from fedtune.server.evaluation import round_config
from fedtune.server.messaging import broadcast, exchange


@dataclass
class Roster:
    names: dict[int, str] = field(default_factory=dict)  # node id -> site name, as each site reports it
    problems: dict[int, str] = field(default_factory=dict)  # node id -> why it cannot take part now

    def refresh(self, grid: Grid, spec: FederationSpec, run: str, round_: int, nodes: list[int]) -> None:
        """Ask the nodes this roster does not know, or knows as not ready."""
        ask = [n for n in nodes if n not in self.names or n in self.problems]
        if not ask:
            return
        content = RecordDict({"config": round_config(spec, run, round_)})
        stage = exchange(
            grid, broadcast(ask, content), "query", group=f"{run}:{round_}:hello", timeout=spec.training.round_timeout_s
        )
        for node in ask:
            self.problems.pop(node, None)
            reply = stage.replies.get(node)
            try:
                self.names[node] = str(reply["info"]["site"])  # type: ignore[index]
                if "decline" in reply:  # type: ignore[operator]
                    self.problems[node] = f"not ready: {short_reason(reply['decline']['reason'])}"  # type: ignore[index]
            except Exception:
                self.problems[node] = stage.failed.get(node) or "no valid answer to the roster query"

    def ready(self, nodes: list[int]) -> list[int]:
        return [n for n in nodes if n in self.names and n not in self.problems]
