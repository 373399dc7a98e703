"""A real federation in Flower's simulation engine: DP-LoRA at each site, secure aggregation at the server."""

import json
from dataclasses import asdict

import numpy as np
import pytest
from safetensors.numpy import load_file
from transformers import BertConfig, BertForSequenceClassification

from fedtune.client.audit import ALLOWED_KINDS, EgressLog
from fedtune.client.ledger import PrivacyLedger
from fedtune.common.adapter import num_parameters
from fedtune.common.recipe import select, trained_keys
from fedtune.server.demo import site_specs, write_demo_data
from fedtune.server.simulation import simulate
from fedtune.server.store import RunStore

pytestmark = pytest.mark.slow


def _run_federation(work, base_model_path):
    from fedtune.common.config import FederationSpec
    from fedtune.common.synthetic import BANK_INTENTS

    spec = FederationSpec.model_validate(
        {
            "base_model": {"path": str(base_model_path), "max_length": 32},
            "task": {"labels": list(BANK_INTENTS)},
            "training": {"rounds": 2, "local_steps": 15, "batch_size": 64, "min_sites": 2, "head": {"rounds": 1}},
            "privacy": {"default_epsilon_cap": 30.0},
        }
    )
    _, files = write_demo_data(work, 3, 200, seed=1)
    sites = site_specs(files, work, seed=3)  # seeded held-out splits and noise: the figures repeat
    sites[1] = sites[1].model_copy(update={"share_eval_metrics": False})  # site-2 keeps its own figures
    # site-3 installed another checkpoint: it must be named with its reason, and the others train without it.
    other = work / "other-model"
    BertForSequenceClassification(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    ).save_pretrained(other)
    sites[2] = sites[2].model_copy(update={"base_model_path": other})
    result = simulate(spec, sites, out_dir=work / "runs", parallel_sites=2)
    return spec, sites[:2], result


@pytest.fixture(scope="module")
def federation(tmp_path_factory, base_model_path):
    """One 2-site secure federation, a head round then a FFA-LoRA round, shared by the assertions below."""
    return _run_federation(tmp_path_factory.mktemp("sim"), base_model_path)


def test_a_seeded_simulation_repeats_to_the_last_digit(federation, tmp_path, base_model_path):
    """Same seeds, fresh state: the same DP noise, Poisson batches, stochastic rounding and so the same adapter
    and secure totals, although Flower's run and node ids differ between the two runs."""
    _, _, first = federation
    _, _, again = _run_federation(tmp_path, base_model_path)
    assert again.run != first.run
    assert list(again.final_state) == list(first.final_state)
    for name, value in first.final_state.items():
        assert np.array_equal(again.final_state[name], value), name
    assert [r.totals.accuracy for r in again.rounds] == [r.totals.accuracy for r in first.rounds]


def test_a_site_with_another_base_model_is_named_with_its_reason(federation):
    _, _, result = federation
    for report in result.rounds[1:]:
        assert set(report.missing) == {"site-3"}
        assert "base model fingerprint" in report.missing["site-3"] and "does not match" in report.missing["site-3"]
    with RunStore(result.adapter_dir.parent.parent / "store.sqlite", readonly=True) as store:
        rows = [r for r in store.site_rounds(result.run) if r["site"] == "site-3" and r["round"] > 0]
    assert len(rows) == 2 and all("fingerprint" in r["failed"] for r in rows)


def test_federation_improves_over_the_base_model_in_secure_totals(federation):
    _, _, result = federation
    base, final = result.rounds[0], result.rounds[1]  # the head round; the LoRA round is checked for what it sends
    assert len(result.rounds) == 3  # round 0 (base) + 2 training rounds
    # The server's figures come from the secure sum over both sites ...
    assert base.totals.sites == final.totals.sites == 2
    assert final.totals.accuracy > base.totals.accuracy
    # ... and per site only from site-1, which opted in; of site-2's scores the server sees nothing of its own.
    by_site = {e.site: (b, e) for b in base.evals.values() for e in final.evals.values() if e.site == b.site}
    assert set(by_site) == {"site-1"}
    # seeded, so the figures repeat run after run (28 rows: 26 right before the round, 28 after)
    assert by_site["site-1"][1].accuracy > by_site["site-1"][0].accuracy
    opted = by_site["site-1"][1]
    assert 0 < opted.num_examples < final.totals.num_examples  # the total counts site-2's rows too


def test_epsilon_reported_matches_each_ledger_and_stays_under_cap(federation):
    spec, sites, result = federation
    for site in sites:
        with PrivacyLedger(site.state_dir / "ledger.sqlite") as ledger:
            (dataset,) = ledger.datasets()
            eps = ledger.epsilon(dataset, spec.privacy.target_delta)
            assert len(ledger.history(dataset)) == 2  # one committed spend per round
        reported = [t.epsilon for t in result.rounds[-1].update.sites.values() if t.site == site.name]
        # privacy accounting is the one figure every site sends, to the nearest 0.1 (finer tells the row count)
        assert reported == [pytest.approx(eps, abs=0.05)]
        assert eps <= spec.privacy.default_epsilon_cap


def test_what_leaves_a_site_is_keys_shares_masked_uint32_and_metrics_only(federation):
    """Measured from each site's egress audit log: no plaintext adapter delta, row count or training loss
    ever left; held-out figures left in plaintext only from the site that opted in."""
    spec, sites, result = federation
    names = list(result.final_state)
    sizes = [  # round 1 sends the head only, round 2 the LoRA B factors and the head (FFA-LoRA: never A)
        num_parameters(select(result.final_state, trained_keys(names, spec, phase))) for phase in ("head", "lora")
    ]
    assert sizes[0] < sizes[1] < num_parameters(result.final_state)
    for site in sites:
        entries = [asdict(e) for e in EgressLog(site.state_dir / "egress.jsonl").entries()]
        assert all(e["delivered"] for e in entries)  # simulation hands every reply over in process
        kinds = {e["kind"] for e in entries}
        assert kinds <= ALLOWED_KINDS
        assert "adapter-delta" not in kinds
        assert {"public-keys", "encrypted-shares", "masked-vector", "consistency-signature", "unmask-shares"} <= kinds
        metric_keys = {
            k for e in entries if e["kind"] == "metrics" for k in e["detail"].removeprefix("keys: ").split(", ")
        }
        assert not metric_keys & {"train-loss", "empty-batches", "steps"}
        assert ("num-examples" in metric_keys) == site.share_eval_metrics  # held-out rows, opted in
        assert ("eval-accuracy" in metric_keys) == site.share_eval_metrics
        masked = [e for e in entries if e["kind"] == "masked-vector" and e["record"] == "masked"]
        evals = [e for e in masked if "uint32[3]" in e["detail"]]  # (correct, rows, loss sum) of the last round
        trains = [e for e in masked if e not in evals]
        # one secure sum per training round, which also carries the scores of the adapter it sent (rounds 0, 1),
        # and one for the last adapter, which no training message carries
        assert len(evals) == 1 and len(trains) == 2
        # uint32, one per trained parameter plus the site's own weight and its 3 scores, plus the .npy header
        for entry, n_params in zip(trains, sizes, strict=True):
            assert 4 * (n_params + 4) <= entry["bytes"] <= 4 * (n_params + 4) + 256
            assert f"uint32[{n_params + 4}]" in entry["detail"]
        key_bytes = sum(e["bytes"] for e in entries if e["kind"] in {"public-keys", "encrypted-shares"})
        assert key_bytes < 0.1 * sum(e["bytes"] for e in masked)  # protocol overhead is small


def test_final_adapter_is_exported_in_peft_format(federation):
    _, _, result = federation
    cfg = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    tensors = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert sum(t.size for t in tensors.values()) == num_parameters(result.final_state)
    assert all(np.isfinite(t).all() for t in tensors.values())
