"""The learning recipe: pooling, head-first phase, FFA-LoRA, accountant, the sample rate Opacus really uses, seeds."""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, TensorDataset

from fedtune.client.site import Site
from fedtune.client.tasks import encode_classification, evaluate, per_example_loss
from fedtune.client.trainer import DPSettings, dp_sgd, sample_rate
from fedtune.common.adapter import AdapterState, adapter_state, load_adapter_state
from fedtune.common.config import FederationSpec
from fedtune.common.model import load_lora_model
from fedtune.common.privacy import choose_noise_multiplier, epsilon_spent
from fedtune.common.recipe import is_head, phase_of, select, trained_keys
from fedtune.server.demo import site_specs, write_demo_data


def _spec(tiny_spec: FederationSpec, **training: object) -> FederationSpec:
    return tiny_spec.model_copy(update={"training": tiny_spec.training.model_copy(update=training)})


def _site(tmp_path: Path, spec: FederationSpec, seed: int | None = 5, name: str = "a") -> Site:
    _, files = write_demo_data(tmp_path / name, 1, 80, seed=0)
    (site,) = site_specs(files, tmp_path / name, epsilon_cap=20.0)
    return Site(site.model_copy(update={"seed": seed}), spec)


def test_mean_pooling_ignores_padding(tiny_spec: FederationSpec) -> None:
    """The same text padded to 12 or to 32 tokens gets the same logits: padding never enters the mean."""
    loaded = load_lora_model(tiny_spec, seed=0)
    loaded.model.eval()
    short = loaded.tokenizer(["my card has not arrived"], padding="max_length", max_length=12, return_tensors="pt")
    long = loaded.tokenizer(["my card has not arrived"], padding="max_length", max_length=32, return_tensors="pt")
    with torch.no_grad():
        a = loaded.model(input_ids=short["input_ids"], attention_mask=short["attention_mask"]).logits
        b = loaded.model(input_ids=long["input_ids"], attention_mask=long["attention_mask"]).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    cls_spec = tiny_spec.model_copy(update={"task": tiny_spec.task.model_copy(update={"pooling": "cls"})})
    cls = load_lora_model(cls_spec, seed=0)
    cls.model.eval()
    with torch.no_grad():
        c = cls.model(input_ids=long["input_ids"], attention_mask=long["attention_mask"]).logits
    assert not torch.allclose(b, c, atol=1e-3)  # the choice is real: another pooling, other features


def test_ffa_lora_fedavg_of_b_is_exact_fedavg_of_the_weight_update(tiny_spec: FederationSpec) -> None:
    """With A frozen and shared, mean_k(B_k) A == mean_k(B_k A); training A as well breaks this."""

    def two_sites(spec: FederationSpec) -> tuple[AdapterState, list[AdapterState]]:
        texts = [f"message number {i} about my card" for i in range(32)]
        labels = [i % len(spec.task.labels) for i in range(32)]
        start: AdapterState | None = None
        ends = []
        for seed in (1, 2):
            loaded = load_lora_model(spec, seed=0)
            if start is None:
                start = adapter_state(loaded.model)
            data = encode_classification(loaded.tokenizer, texts, labels, 16)
            settings = DPSettings(3, 16, 0.5, 1.0, 0.5)
            dp_sgd(loaded.model, data, lambda m, b: per_example_loss(m, b, "classification"), settings, seed=seed)
            ends.append(adapter_state(loaded.model))
        assert start is not None
        return start, ends

    def gap(start: AdapterState, ends: list[AdapterState]) -> float:
        worst = 0.0
        for a_key in [k for k in start if "lora_A" in k]:
            b_key = a_key.replace("lora_A", "lora_B")
            per_site = [e[b_key].astype(np.float64) @ e[a_key] for e in ends]
            mean_a = np.mean([e[a_key] for e in ends], axis=0)
            mean_b = np.mean([e[b_key] for e in ends], axis=0)
            worst = max(worst, float(np.abs(mean_b @ mean_a - np.mean(per_site, axis=0)).max()))
        return worst

    start, ends = two_sites(tiny_spec)  # factors = "b", the default
    assert all(np.array_equal(e[k], start[k]) for e in ends for k in start if "lora_A" in k)
    assert gap(start, ends) < 1e-6
    both = tiny_spec.model_copy(update={"lora": tiny_spec.lora.model_copy(update={"factors": "ab"})})
    start_ab, ends_ab = two_sites(both)
    assert gap(start_ab, ends_ab) > 1e-4


def test_phases_send_only_what_they_train(tiny_spec: FederationSpec) -> None:
    spec = _spec(tiny_spec, rounds=3, head=tiny_spec.training.head.model_copy(update={"rounds": 1}))
    names = list(adapter_state(load_lora_model(spec, seed=0).model))
    assert [phase_of(spec, r) for r in (1, 2, 3)] == ["head", "lora", "lora"]
    head = trained_keys(names, spec, "head")
    lora = trained_keys(names, spec, "lora")
    assert head and all(is_head(k) for k in head)
    assert all("lora_A" not in k for k in lora) and any("lora_B" in k for k in lora)
    ab = spec.model_copy(update={"lora": spec.lora.model_copy(update={"factors": "ab"})})
    assert len(trained_keys(names, ab, "lora")) == len(names)
    # FFA halves the LoRA part of the upload
    state = adapter_state(load_lora_model(spec, seed=0).model)
    lora_size = sum(v.size for k, v in state.items() if "lora_" in k)
    sent = sum(v.size for k, v in select(state, lora).items() if "lora_" in k)
    assert sent == lora_size // 2


def test_head_round_is_charged_to_the_ledger_at_opacus_rate_and_leaves_the_encoder(
    tiny_spec: FederationSpec, tmp_path: Path
) -> None:
    spec = _spec(tiny_spec, rounds=2, head=tiny_spec.training.head.model_copy(update={"rounds": 1, "local_steps": 7}))
    site = _site(tmp_path, spec)
    start = adapter_state(site.loaded.model)
    outcome = site.train(start, "run-1", 1, 2)
    assert outcome.phase == "head" and all(is_head(k) for k in outcome.delta)
    assert any(np.abs(v).max() > 0 for v in outcome.delta.values())
    after = adapter_state(site.loaded.model)
    assert all(np.array_equal(after[k], start[k]) for k in start if not is_head(k))
    (entry,) = site.ledger.entries(site.dataset)
    n = len(site.train_data)
    expected_q = 1 / math.ceil(n / math.ceil(0.5 * n))
    assert entry.steps == 7 and entry.sample_rate == pytest.approx(expected_q)
    assert site.epsilon_spent() == pytest.approx(outcome.spend.epsilon_after) and outcome.spend.epsilon_after > 0


def test_ledger_sample_rate_is_the_one_opacus_samples_at() -> None:
    """10 rows, batch 3: Opacus samples at 1/ceil(10/3) = 0.25, not 3/10."""
    data = TensorDataset(torch.zeros(10, 2), torch.zeros(10, dtype=torch.long))
    assert DPDataLoader.from_data_loader(DataLoader(data, batch_size=3)).sample_rate == sample_rate(10, 3) == 0.25
    head = torch.nn.Linear(2, 2)
    settings = DPSettings(4, 3, 0.1, 1.0, 1.0)

    def loss(m: torch.nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")

    assert dp_sgd(head, data, loss, settings, seed=0).steps == 4  # and the accountant check inside passed


def test_a_seeded_site_repeats_exactly_and_another_seed_differs(tiny_spec: FederationSpec, tmp_path: Path) -> None:
    spec = _spec(tiny_spec, rounds=1, head=tiny_spec.training.head.model_copy(update={"rounds": 0}))
    deltas = []
    start = adapter_state(load_lora_model(spec, seed=0).model)  # the global adapter every site receives
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        site = _site(tmp_path, spec, seed=seed, name=name)
        deltas.append(site.train(start, "run-1", 1, 1).delta)
    same = OrderedDict((k, np.array_equal(deltas[0][k], deltas[1][k])) for k in deltas[0])
    assert all(same.values()), [k for k, v in same.items() if not v][:3]
    assert any(not np.array_equal(deltas[0][k], deltas[2][k]) for k in deltas[0])


def test_prv_buys_the_same_epsilon_with_less_noise_and_never_passes_the_cap() -> None:
    plan = [(0.25, 40)] * 10
    prv = choose_noise_multiplier([], plan, epsilon_cap=8.0, delta=1e-5, accountant="prv")
    rdp = choose_noise_multiplier([], plan, epsilon_cap=8.0, delta=1e-5, accountant="rdp")
    assert prv < rdp
    assert epsilon_spent([(prv, 0.25, 400)], 1e-5, "prv") <= 8.0
    assert epsilon_spent([(prv, 0.25, 400)], 1e-5, "rdp") > 8.0  # the same noise, judged by RDP, looks worse


def test_label_name_head_is_a_zero_shot_classifier_of_the_label_names(tiny_spec: FederationSpec) -> None:
    """Built from the public label list only: each label's own name is classified as that label."""
    loaded = load_lora_model(tiny_spec, seed=0)
    names = [label.replace("_", " ") for label in tiny_spec.task.labels]
    enc = loaded.tokenizer(names, padding=True, return_tensors="pt")
    loaded.model.eval()
    with torch.no_grad():
        logits = loaded.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert logits.argmax(-1).tolist() == list(range(len(names)))
    head = select(adapter_state(loaded.model), [k for k in adapter_state(loaded.model) if is_head(k)])
    weight = next(v for k, v in head.items() if k.endswith("weight"))
    np.testing.assert_allclose(np.linalg.norm(weight, axis=1), tiny_spec.task.head_init_scale, rtol=1e-5)
    random_spec = tiny_spec.model_copy(update={"task": tiny_spec.task.model_copy(update={"head_init": "random"})})
    random_weight = next(
        v for k, v in adapter_state(load_lora_model(random_spec, seed=0).model).items() if is_head(k) and "weight" in k
    )
    assert np.linalg.norm(random_weight, axis=1).max() < 1.0  # Hugging Face's init: small random rows


def test_pooling_that_does_not_fit_the_model_is_refused(tiny_spec: FederationSpec) -> None:
    from fedtune.common.model import BaseModelError

    last = tiny_spec.model_copy(update={"task": tiny_spec.task.model_copy(update={"pooling": "last"})})
    with pytest.raises(BaseModelError, match=r"an encoder; use task\.pooling = .mean. or .cls."):
        load_lora_model(last, seed=0)


def test_ghost_clipping_gives_the_same_dp_step_as_per_example_gradients() -> None:
    """The head phase uses ghost clipping for speed; with the same seed it must produce the same update."""
    x, y = torch.randn(300, 16), torch.randint(0, 5, (300,))
    data = TensorDataset(x, y)

    def loss(m: torch.nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")

    weights = []
    for ghost in (False, True):
        torch.manual_seed(0)
        head = torch.nn.Linear(16, 5)
        start = head.weight.detach().clone()
        dp_sgd(head, data, loss, DPSettings(5, 100, 0.5, 0.1, 2.0), seed=3, ghost=ghost)  # clip 0.1: clipping bites
        weights.append(head.weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=1e-5)
    assert (weights[0] - start).abs().max() > 1e-3  # and the step did move the head


def test_head_step_shrinks_with_the_noise_past_the_reference_sigma(tiny_spec: FederationSpec, tmp_path: Path) -> None:
    site = _site(tmp_path, tiny_spec)
    lr = tiny_spec.training.head.learning_rate
    assert site.dp_settings("head", 4.0).learning_rate == pytest.approx(lr)  # below the reference: as configured
    assert site.dp_settings("head", 16.0).learning_rate == pytest.approx(lr / 2)
    assert site.dp_settings("head", 16.0).noise_multiplier == 16.0
    assert site.dp_settings("lora", 16.0).learning_rate == tiny_spec.training.learning_rate  # LoRA: unscaled


def test_site_label_prior_scores_a_shared_model_on_the_sites_own_label_mix(
    tiny_spec: FederationSpec, tmp_path: Path
) -> None:
    """A head with equal logits for every label predicts, under the site prior, the site's most frequent training
    label: held-out accuracy becomes that label's share of the held-out rows, on the feature path and the full
    model alike; without the prior the tie breaks to label 0."""
    site = _site(tmp_path, tiny_spec)
    state = adapter_state(site.loaded.model)
    flat = OrderedDict((k, np.zeros_like(v) if is_head(k) else v) for k, v in state.items())
    train_labels, held_labels = site.train_data.tensors[-1], site.eval_data.tensors[-1]
    majority = int(torch.bincount(train_labels).argmax())
    share = float((held_labels == majority).float().mean())
    assert majority != 0 or share < 1.0  # the data must tell the two rules apart
    assert site.evaluate(flat).accuracy == pytest.approx(share)  # head-phase path, from pooled features
    assert evaluate(site.loaded.model, site.eval_data, "classification", logit_shift=site.logit_shift).accuracy == (
        pytest.approx(share)
    )
    none = tiny_spec.model_copy(update={"task": tiny_spec.task.model_copy(update={"label_prior": "none"})})
    plain = _site(tmp_path / "none", none)
    assert plain.logit_shift is None
    assert plain.evaluate(flat).accuracy == pytest.approx(float((held_labels == 0).float().mean()))
    prior = site.logit_shift.exp()
    counts = torch.bincount(train_labels, minlength=len(tiny_spec.task.labels)) + 1
    assert torch.allclose(prior, counts / counts.sum())  # add-one smoothed frequencies of the training rows


def test_head_features_are_read_back_from_the_site_state_and_only_for_the_same_encoder(
    tiny_spec: FederationSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarted worker (or another simulation actor) reads the site's stored features instead of encoding
    every row again; another encoder, or a damaged file, is computed afresh."""
    from fedtune.client import site as site_module

    monkeypatch.setattr(site_module, "_FEATURES", {})
    site = _site(tmp_path, tiny_spec)
    state = adapter_state(site.loaded.model)
    train, held = site.features(state)
    stored = list(site_module.features_dir(site.site).glob("*.pt"))
    assert len(stored) == 1

    encoded: list[int] = []
    real = site_module.pooled_dataset
    monkeypatch.setattr(site_module, "pooled_dataset", lambda *a, **k: encoded.append(1) or real(*a, **k))
    monkeypatch.setattr(site_module, "_FEATURES", {})  # a fresh process
    again = Site(site.site, tiny_spec)
    train2, held2 = again.features(state)
    assert encoded == []
    torch.testing.assert_close(train2.tensors[0], train.tensors[0], rtol=0, atol=0)
    torch.testing.assert_close(held2.tensors[1], held.tensors[1], rtol=0, atol=0)

    lora = next(k for k in state if "lora_B" in k)
    changed = OrderedDict(state)
    changed[lora] = state[lora] + 0.5
    load_adapter_state(again.loaded.model, changed)  # as `Site.train` does before asking for features
    moved, _ = again.features(changed)
    assert len(encoded) == 2  # training and held-out rows, under the new encoder
    assert not torch.allclose(moved.tensors[0], train.tensors[0])

    stored[0].write_bytes(b"not a tensor file")
    monkeypatch.setattr(site_module, "_FEATURES", {})
    train3, _ = Site(site.site, tiny_spec).features(state)
    assert len(encoded) == 4  # recomputed, not crashed
    torch.testing.assert_close(train3.tensors[0], train.tensors[0])
