"""Distributed noise end to end in Flower's simulation engine: one secure sum per DP step, each site a noise share.

The protocol's attacks are in tests/test_stepsum.py and the noise and its accounting in tests/test_noise.py; this
file runs the production ServerApp and ClientApp on three virtual sites and checks what the issue asks of the
whole: the federation learns, every site's ledger holds both epsilons (charged under its h, and its own share
alone), the reported figures match the ledgers, and what left each site is masked vectors, keys and metrics.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import pytest

from fedtune.client.audit import ALLOWED_KINDS, EgressLog
from fedtune.client.ledger import PrivacyLedger
from fedtune.common.adapter import num_parameters
from fedtune.common.config import FederationSpec
from fedtune.common.privacy import epsilon_spent
from fedtune.common.recipe import select, trained_keys
from fedtune.common.synthetic import BANK_INTENTS
from fedtune.server.demo import site_specs, write_demo_data
from fedtune.server.distributed import federation_noise_multiplier
from fedtune.server.simulation import simulate

pytestmark = pytest.mark.slow

STEPS, ROUNDS, SITES = 6, 2, 3


@pytest.fixture(scope="module")
def federation(tmp_path_factory, base_model_path):
    work = tmp_path_factory.mktemp("distributed")
    spec = FederationSpec.model_validate(
        {
            "base_model": {"path": str(base_model_path), "max_length": 32},
            "task": {"labels": list(BANK_INTENTS)},
            "training": {
                "rounds": ROUNDS,
                "min_sites": SITES,
                "head": {"rounds": ROUNDS, "distributed": {"steps": STEPS, "sample_rate": 0.3}},
            },
            "privacy": {"noise": "distributed", "epsilon": 4.0, "default_epsilon_cap": 8.0},
        }
    )
    _, files = write_demo_data(work, SITES, 150, seed=2)
    sites = [s.model_copy(update={"min_honest_sites": SITES}) for s in site_specs(files, work, seed=5)]
    result = simulate(spec, sites, out_dir=work / "runs", parallel_sites=2)
    return spec, sites, result


def test_the_federation_learns_from_noisy_secure_sums(federation):
    _, _, result = federation
    assert [r.update.error for r in result.rounds[1:]] == [None, None]
    base, last = result.rounds[0], result.rounds[-1]
    assert base.totals.sites == last.totals.sites == SITES  # the sum's figures, from every site
    assert last.totals.accuracy > base.totals.accuracy


def test_each_ledger_holds_the_charged_and_the_own_share_epsilon(federation):
    """h = n = 3: charged at the federation's sigma, worst case at sigma / sqrt(3); both reported, to 0.1."""
    spec, sites, result = federation
    sigma = federation_noise_multiplier(spec)
    reported = {t.site: t for r in result.rounds[1:] for t in r.update.sites.values()}
    for site in sites:
        with PrivacyLedger(site.state_dir / "ledger.sqlite") as ledger:
            (dataset,) = ledger.datasets()
            entries = ledger.entries(dataset)
            charged = ledger.epsilon(dataset, spec.privacy.target_delta)
            worst = ledger.worst_epsilon(dataset, spec.privacy.target_delta)
        assert [e.round for e in entries] == [1, 2]
        assert sum(e.steps for e in entries) == STEPS
        for e in entries:
            assert e.noise_multiplier == pytest.approx(sigma)
            assert e.worst_noise_multiplier == pytest.approx(sigma / math.sqrt(SITES))
            assert e.sample_rate == pytest.approx(0.3)
        assert charged <= spec.privacy.epsilon + 1e-9  # the run spends what the federation planned, no more
        assert worst == pytest.approx(epsilon_spent([(sigma / math.sqrt(SITES), 0.3, STEPS)], 1e-5))
        assert worst > 2 * charged
        assert reported[site.name].epsilon == pytest.approx(charged, abs=0.05)
        assert reported[site.name].epsilon_worst == pytest.approx(worst, abs=0.05)


def test_what_leaves_a_site_is_one_masked_vector_per_step(federation):
    """From each site's egress log: per step one masked uint32 vector (the head's parameters, the row count and
    three score coordinates), never an adapter delta, a plaintext row count or a training figure."""
    spec, sites, result = federation
    head = num_parameters(select(result.final_state, trained_keys(result.final_state, spec, "head")))
    for site in sites:
        entries = [asdict(e) for e in EgressLog(site.state_dir / "egress.jsonl").entries()]
        assert {e["kind"] for e in entries} <= ALLOWED_KINDS
        steps = [e for e in entries if e["kind"] == "masked-vector" and f"uint32[{head + 4}]" in e["detail"]]
        assert len(steps) == STEPS
        metric_keys = {
            k for e in entries if e["kind"] == "metrics" for k in e["detail"].removeprefix("keys: ").split(", ")
        }
        assert not metric_keys & {"train-loss", "num-examples-trained", "steps", "noise-multiplier"}
        assert {"epsilon", "epsilon-worst"} <= metric_keys


class _SessionGrid:
    """Flower's Grid interface over an in-memory hop, with sites that open one session, answer step 1, and then
    go silent: the second step's sum never completes and no new session opens."""

    def __init__(self, nodes: list[int], length: int) -> None:
        self.nodes, self.length, self.outbox, self.sessions = nodes, length, [], 0

    def push_messages(self, messages):
        from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

        kind = messages[0].metadata.message_type
        self.sessions += kind == "train.dp_advert"
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            node = msg.metadata.dst_node_id
            if kind == "train.dp_advert" and self.sessions == 1:
                advert = {
                    "node_id": node,
                    "site": f"s{node}",
                    "session": "00",
                    "digest": "00",
                    "public": "00",
                    "honest": 2,
                    "scores": False,
                    "score_min": 2,
                    "signature": "00",
                }
                self.outbox.append(Message(RecordDict({"keys": ConfigRecord(advert)}), reply_to=msg))
            elif kind == "train.dp_step" and int(msg.content["dstep"]["step"]) == 1:
                y = np.zeros(self.length, dtype=np.uint32)
                y[-4] = 10  # the site's rows
                self.outbox.append(Message(RecordDict({"masked": ArrayRecord({"y": Array(y)})}), reply_to=msg))
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids):
        replies = [m for m in self.outbox if m.metadata.reply_to_message_id in ids]
        self.outbox = [m for m in self.outbox if m not in replies]
        return replies


def test_a_step_or_session_that_fails_ends_the_round_with_its_reason(base_model_path, monkeypatch):
    """Step 2 gets no sum and no new session opens: the round reports it and applies nothing; the next round,
    which starts without a session and cannot open one, reports that too (it crashed with an unbound sum)."""
    from collections import OrderedDict

    from flwr.supercore.task_identity import TaskIdentity

    from fedtune.server.distributed import DistributedHead

    for attr, value in (("_run_id", 7), ("_task_id", 1), ("_node_id", 1)):  # as a ServerApp's process has them
        monkeypatch.setattr(TaskIdentity, attr, value)

    spec = FederationSpec.model_validate(
        {
            "base_model": {"path": str(base_model_path)},
            "task": {"labels": ["a", "b"]},
            "training": {"rounds": 2, "head": {"rounds": 2, "distributed": {"steps": 4}}},
            "privacy": {"noise": "distributed", "noise_multiplier": 1.0},
            "secagg": {"stage_timeout_s": 0.3},
        }
    )
    head = "base_model.model.classifier.modules_to_save.default"
    state = OrderedDict([(f"{head}.weight", np.zeros((2, 3), np.float32)), (f"{head}.bias", np.zeros(2, np.float32))])
    grid = _SessionGrid([1, 2], 2 * 3 + 2 + 1 + 3)
    head_phase = DistributedHead(grid, spec, "run", {1: "s1", 2: "s2"})
    update = head_phase.round(state, 1, [1, 2])
    assert update.mean_delta is None
    assert "left for a distributed session" in update.error  # no site left to re-key with
    assert set(update.failed) == {1, 2}
    # the next round starts without a session, and none opens: reported, not a crash
    update = head_phase.round(state, 2, [1, 2])
    assert update.mean_delta is None and "joined the distributed session" in update.error
    assert grid.sessions == 2


def test_the_servers_step_shrinks_once_the_noise_on_the_mean_gradient_passes_the_reference(base_model_path):
    """The same noisy sum moves the head by lr while sigma over the expected batch is at most `reference_noise`,
    and by lr * reference / noise past it: a higher sigma and fewer rows both shrink the step (chosen on the
    validation splits: banking77 at epsilon 1 and the medical abstracts at epsilon 8)."""
    from collections import OrderedDict

    from fedtune.common.noise import CLIP_UNITS
    from fedtune.server.distributed import DistributedHead

    head = "base_model.model.classifier.modules_to_save.default"
    moves = {}
    for sigma, rows in ((2.0, 10_000), (4.0, 10_000), (8.0, 10_000), (2.0, 1_000)):
        spec = FederationSpec.model_validate(
            {
                "base_model": {"path": str(base_model_path)},
                "task": {"labels": ["a", "b"]},
                "training": {"rounds": 1, "head": {"rounds": 1}},
                "privacy": {"noise": "distributed", "noise_multiplier": sigma},
            }
        )
        state = OrderedDict(
            [(f"{head}.weight", np.zeros((2, 3), np.float32)), (f"{head}.bias", np.zeros(2, np.float32))]
        )
        phase = DistributedHead(None, spec, "run", {})
        assert phase.sigma == sigma
        total = np.full(2 * 3 + 2 + 1, CLIP_UNITS * rows, dtype=np.int64)  # every coordinate: one clip per row
        total[-1] = rows
        phase._apply(total, state, list(state))
        moves[sigma, rows] = float(state[f"{head}.bias"][0])
    d = spec.training.head.distributed
    assert d.sample_rate == 0.2 and d.reference_noise == 0.002  # noise 2 / 2,000 rows = 0.001: under it
    one = -d.learning_rate * spec.privacy.max_grad_norm / d.sample_rate
    assert moves[2.0, 10_000] == pytest.approx(one) and moves[4.0, 10_000] == pytest.approx(one)
    assert moves[8.0, 10_000] == pytest.approx(one / 2)  # noise 0.004: twice the reference
    assert moves[2.0, 1_000] == pytest.approx(one / 5)  # 200 rows a step: noise 0.01
