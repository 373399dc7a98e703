"""The server's side of distributed noise: sessions, one secure sum per DP step, and the optimizer on the sums.

The server picks sigma once per run (the noise one centralised DP-SGD step on the union of the rows needs for
`privacy.epsilon` over the head phase's steps), opens a session (one exchange of signed adverts), then runs each
step as one exchange: the current model goes down, one masked vector per site comes back, and their sum is the
noisy sum of every sampled row's clipped gradient plus the summed row count. It divides by the expected batch
(rate times rows) and takes an SGD step with momentum: post-processing of DP outputs, free of privacy cost.

A site that does not answer a step ends the session: its masks never cancel, and no key is ever revealed to
recover them. The server opens a new session among the sites that answered and carries on with the next step;
the sites are charged again for the round, under the new session (a step is never repeated under old masks).
"""

from __future__ import annotations

import json
import logging
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fedtune.common.adapter import AdapterState, to_record, unflatten
from fedtune.common.config import FederationSpec
from fedtune.common.noise import CLIP_UNITS, from_ring
from fedtune.common.privacy import choose_noise_multiplier
from fedtune.common.recipe import select, step_range, step_size, trained_keys
from fedtune.common.secagg import scores
from fedtune.common.secagg.errors import short_reason
from fedtune.common.secagg.stepsum import SESSION_BYTES, StepAdvert, unmask_sum
from fedtune.server.aggregation import RoundUpdate, SiteTrain
from fedtune.server.evaluation import round_config
from fedtune.server.messaging import exchange
from fedtune.server.scores import EvalTotals, roster_name, site_evals

log = logging.getLogger(__name__)

ADVERT, STEP = "train.dp_advert", "train.dp_step"
MAX_SESSIONS_PER_ROUND = 3  # re-keys after drop-outs before a round gives up


def federation_noise_multiplier(spec: FederationSpec) -> float:
    """Sigma of the whole sum: fixed by privacy.noise_multiplier, else the smallest that spends privacy.epsilon
    (default: default_epsilon_cap) over the head phase's steps at its rate. Every site checks its own charge."""
    p, d = spec.privacy, spec.training.head.distributed
    if p.noise_multiplier is not None:
        return p.noise_multiplier
    target = p.epsilon or p.default_epsilon_cap
    return choose_noise_multiplier(
        [], [(d.sample_rate, d.steps)], epsilon_cap=target, delta=p.target_delta, accountant=p.accountant
    )


@dataclass
class _Session:
    id: bytes
    nodes: list[int]
    adverts: list[str]  # JSON of each site's signed advert, sent with the session's first step
    started: bool = False


@dataclass
class DistributedHead:
    """Runs the head phase's rounds as DP steps over secure sums; keeps the session and the momentum between
    rounds (a restarted server starts a fresh session and momentum from the last checkpoint)."""

    grid: Grid
    spec: FederationSpec
    run: str
    names: Mapping[int, str]
    sigma: float = 0.0
    session: _Session | None = None
    velocity: np.ndarray | None = None
    sessions_opened: int = 0
    failed: dict[int, str] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)  # this round's, per site

    def __post_init__(self) -> None:
        self.sigma = federation_noise_multiplier(self.spec)
        log.info("distributed noise: sigma %.3f for the whole sum", self.sigma)

    def round(self, state: AdapterState, round_: int, nodes: list[int]) -> RoundUpdate:
        """The round's steps; `mean_delta` is the head's change, already the optimizer's step."""
        keys = trained_keys(state, self.spec, "head")
        start = select(state, keys)
        current = OrderedDict(state)
        update = RoundUpdate(mean_delta=None)
        self.failed, self.bytes_up = {}, {}
        timeout = self.spec.secagg.stage_timeout_s
        for k in step_range(self.spec, round_):
            total = self._step_sum(k, round_, current, nodes, timeout, update)
            if total is None:
                update.error = update.error or f"step {k}: no secure sum ({len(self.failed)} site(s) failed)"
                break
            self._apply(total, current, keys)
        update.failed.update(self.failed)
        for node, site in update.sites.items():
            site.bytes_up = self.bytes_up.get(node, 0)
        if update.error is None:
            after = select(current, keys)
            update.mean_delta = OrderedDict((key, after[key] - start[key]) for key in keys)
        return update

    def _step_sum(
        self, k: int, round_: int, state: AdapterState, nodes: list[int], timeout: float, update: RoundUpdate
    ) -> np.ndarray | None:
        """Step k's noisy sum; a site that misses it ends the session (its masks never cancel), and the step runs
        again in a fresh session of the sites left. None when no session can be opened or none completes."""
        for _ in range(MAX_SESSIONS_PER_ROUND):
            if self.session is None:
                live = [n for n in nodes if n not in self.failed]
                if not self._open(live, round_, timeout, update):
                    return None
            total = self._step(k, round_, state, timeout, update)
            if total is not None:
                return total
            self.session = None
        return None

    def _open(self, nodes: list[int], round_: int, timeout: float, update: RoundUpdate) -> bool:
        minimum = max(self.spec.training.min_sites, 2)
        if len(nodes) < minimum:
            update.error = f"{len(nodes)} site(s) left for a distributed session, the federation needs {minimum}"
            return False
        session = secrets.token_bytes(SESSION_BYTES)
        content = RecordDict(
            {
                "config": round_config(self.spec, self.run, round_),
                "dsession": ConfigRecord({"session": session.hex(), "noise-multiplier": self.sigma}),
            }
        )
        stage = exchange(
            self.grid, dict.fromkeys(nodes, content), ADVERT, group=f"{self.run}:{round_}:dsession", timeout=timeout
        )
        self.sessions_opened += 1
        adverts = {}
        for node, reply in stage.replies.items():
            try:
                adverts[node] = StepAdvert.from_dict(dict(reply["keys"]))
            except Exception as exc:  # a bad advert leaves its site out of the session
                stage.failed[node] = f"advert refused: {exc}"
        self.failed.update(stage.failed)
        if len(adverts) < minimum:
            update.error = f"{len(adverts)} site(s) joined the distributed session, the federation needs {minimum}"
            return False
        self.session = _Session(session, sorted(adverts), [json.dumps(a.to_dict()) for _, a in sorted(adverts.items())])
        silent = sorted(a.site for a in adverts.values() if not a.scores)
        if silent and len(silent) < len(adverts):  # figures decode only where every site of a session scores
            log.warning(
                "held-out figures stay masked in this session: %s do(es) not set secure_scores, and sites release "
                "theirs only where every site of the session scores",
                ", ".join(silent),
            )
        return True

    def _step(self, k: int, round_: int, state: AdapterState, timeout: float, update: RoundUpdate) -> np.ndarray | None:
        assert self.session is not None
        request = {"session": self.session.id.hex(), "step": k}
        if not self.session.started:
            request["adverts"] = self.session.adverts
        # The whole adapter where a site needs it (the encoder of a new session, a round's scores), else the head.
        whole = not self.session.started or k == step_range(self.spec, round_).start
        model = to_record(state) if whole else to_record(select(state, trained_keys(state, self.spec, "head")))
        content = RecordDict(
            {
                "config": round_config(self.spec, self.run, round_),
                "dstep": ConfigRecord(request),
                "global" if whole else "head": model,
            }
        )
        stage = exchange(
            self.grid,
            dict.fromkeys(self.session.nodes, content),
            STEP,
            group=f"{self.run}:{round_}:dstep:{k}",
            timeout=timeout,
        )
        for node, size in stage.bytes_down.items():
            update.bytes_down[node] = update.bytes_down.get(node, 0) + size
        self.session.started = True
        self.failed.update(stage.failed)
        if stage.failed:
            return None
        vectors = []
        update.evals.update(site_evals(stage.replies, self.failed, self.names))
        for node, reply in stage.replies.items():
            vectors.append(reply["masked"]["y"].numpy())
            self.bytes_up[node] = self.bytes_up.get(node, 0) + stage.bytes_up.get(node, 0)
            if "metrics" in reply:  # the step that charged the site's round: its epsilons, as it reported them
                m = reply["metrics"]
                worst = m.get("epsilon-worst")
                update.sites[node] = SiteTrain(
                    site=roster_name(self.names, node),
                    num_examples=0,
                    epsilon=float(m.get("epsilon", 0.0)),
                    epsilon_cap=float(m.get("epsilon-cap", 0.0)),
                    noise_multiplier=0.0,
                    bytes_up=0,
                    epsilon_worst=None if worst is None else float(worst),
                )
            if "decline" in reply and node not in update.sites:  # its noise share only, and why
                declined = short_reason(reply["decline"].get("reason", "")) or "no reason given"
                update.sites[node] = SiteTrain(roster_name(self.names, node), 0, 0.0, 0.0, 0.0, 0, declined)
        if len({v.shape for v in vectors}) != 1:
            self.failed.update(dict.fromkeys(stage.replies, "masked vectors of different lengths"))
            return None
        total = from_ring(unmask_sum(vectors))
        if k == step_range(self.spec, round_).start:  # the sent model's held-out figures ride on a round's first step
            update.totals = _totals(total[-scores.LENGTH :], len(vectors), self.spec.secagg.weight_cap)
        return total[: -scores.LENGTH]

    def _apply(self, total: np.ndarray, state: OrderedDict, keys: list[str]) -> None:
        """SGD with momentum on the mean clipped gradient: the sum, dequantised, over the expected batch."""
        d = self.spec.training.head.distributed
        gamma = self.spec.privacy.max_grad_norm / CLIP_UNITS
        rows = float(total[-1])
        if rows <= 0:  # every site sent its noise share only (all declined): nothing to learn from
            log.warning("a distributed step without rows (every site declined its data); the step is skipped")
            return
        batch = d.sample_rate * rows  # expected
        gradient = total[:-1].astype(np.float64) * gamma / batch
        self.velocity = gradient if self.velocity is None else d.momentum * self.velocity + gradient
        head = select(state, keys)
        lr = step_size(d.learning_rate, d.reference_noise, self.sigma / batch)
        stepped = unflatten(np.concatenate([v.ravel() for v in head.values()]) - lr * self.velocity, head)
        for key in keys:
            state[key] = stepped[key].astype(np.float32)


def _totals(figures: np.ndarray, sites: int, cap: int) -> EvalTotals | None:
    """The federation's held-out figures from the sum's integer score coordinates (client/distributed.py).

    None where no site brought figures, or where they did not decode: a scoring site without figures for the step
    leaves every scorer's figures under masks (`StepSumSite.mask`), which read as values no real sum can take."""
    correct, rows, loss = (int(v) for v in figures)
    units = scores.loss_units(sites, cap)
    plausible = 0 < rows <= sites * cap and 0 <= correct <= rows and 0 <= loss <= scores.LOSS_CAP * units * rows
    if not plausible:
        if rows != 0 or correct != 0 or loss != 0:
            log.warning("the step's held-out figures did not decode (a scoring site brought none); no totals")
        return None
    return EvalTotals(rows, loss / units / rows, correct / rows, sites)
