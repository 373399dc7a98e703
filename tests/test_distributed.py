"""Distributed noise end to end in Flower's simulation engine: one secure sum per DP step, each site a noise share.

The protocol's attacks are in tests/test_stepsum.py and the noise and its accounting in tests/test_noise.py; this
file runs the production ServerApp and ClientApp on three virtual sites and checks what the issue asks of the
whole: the federation learns, every site's ledger holds both epsilons (charged under its h, and its own share
alone), the reported figures match the ledgers, and what left each site is masked vectors, keys and metrics.
"""

from __future__ import annotations

import math
from dataclasses import asdict

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
