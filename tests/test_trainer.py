"""DP-LoRA training touches only the adapter, accounts every step, and exports a loadable adapter."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from peft import PeftModel

from fedtune.client.tasks import encode_classification, per_example_loss
from fedtune.client.trainer import DPSettings, TrainStats, dp_sgd
from fedtune.common.adapter import (
    AdapterError,
    adapter_state,
    check_compatible,
    from_record,
    load_adapter_state,
    save_peft_adapter,
    to_record,
)
from fedtune.common.model import load_base_model, load_lora_model
from fedtune.common.synthetic import generate_bank_messages


@pytest.fixture
def loaded(tiny_spec):
    return load_lora_model(tiny_spec, seed=0)


def train_dp_lora(model, data, kind, *, steps, batch_size, learning_rate, max_grad_norm, noise_multiplier, seed=None):
    settings = DPSettings(steps, batch_size, learning_rate, max_grad_norm, noise_multiplier)
    return dp_sgd(model, data, lambda m, b: per_example_loss(m, b, kind), settings, seed=seed)


def _data(loaded, n=48):
    texts, labels = generate_bank_messages(n, seed=3)
    return encode_classification(loaded.tokenizer, texts, labels, 32)


def test_dp_step_changes_only_adapter_parameters(loaded):
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    start = adapter_state(loaded.model)
    result = train_dp_lora(
        loaded.model,
        _data(loaded),
        "classification",
        steps=3,
        batch_size=16,
        learning_rate=0.1,
        max_grad_norm=1.0,
        noise_multiplier=1.0,
    )
    after = loaded.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "training changed nothing"
    assert all("lora_" in k or "modules_to_save" in k for k in changed), sorted(changed)[:5]
    base_weights = [k for k in before if "lora_" not in k and "modules_to_save" not in k]
    assert base_weights and all(torch.equal(before[k], after[k]) for k in base_weights)
    assert isinstance(result, TrainStats) and result.steps == 3
    end = adapter_state(loaded.model)
    assert any(np.abs(end[k] - start[k]).max() > 0 for k in start)


def test_empty_poisson_batches_are_noise_steps_and_counted(loaded):
    # Expected batch of 1 in 48 rows: P(empty) = (47/48)^48 ~ 0.36, so 12 steps almost surely hit one.
    torch.manual_seed(0)
    result = train_dp_lora(
        loaded.model,
        _data(loaded),
        "classification",
        steps=12,
        batch_size=1,
        learning_rate=0.1,
        max_grad_norm=1.0,
        noise_multiplier=1.0,
    )
    assert result.steps == 12
    assert result.empty_batches >= 1


def test_wrapping_twice_in_a_row_works(loaded):
    """Each round wraps the same model with Opacus; the previous hooks must be gone."""
    for _ in range(2):
        train_dp_lora(
            loaded.model,
            _data(loaded, 16),
            "classification",
            steps=1,
            batch_size=8,
            learning_rate=0.1,
            max_grad_norm=1.0,
            noise_multiplier=1.0,
        )


def test_adapter_record_round_trip_and_nan_refused(loaded):
    state = adapter_state(loaded.model)
    record = to_record(state)
    # one layout and one value vector on the wire, whatever the number of LoRA tensors
    assert list(record) == ["layout", "values"] and len(state) > 2
    assert record["values"].numpy().size == sum(v.size for v in state.values())
    back = from_record(record, state)
    assert list(back) == list(state) and all(np.array_equal(state[k], back[k]) for k in state)
    short = ArrayRecord({"layout": record["layout"], "values": Array(record["values"].numpy()[:-1])})
    with pytest.raises(AdapterError, match="values, its layout needs"):
        from_record(short)
    garbled = ArrayRecord({"layout": Array(np.frombuffer(b"[[1", dtype=np.uint8).copy()), "values": record["values"]})
    with pytest.raises(AdapterError, match="layout unreadable"):
        from_record(garbled)
    with pytest.raises(AdapterError, match="not an adapter record"):
        from_record(ArrayRecord({k: Array(v) for k, v in state.items()}))
    poisoned = type(state)((k, v.copy()) for k, v in state.items())
    first = next(iter(poisoned))
    poisoned[first][0] = np.nan
    with pytest.raises(AdapterError, match="NaN"):
        check_compatible(poisoned, state)
    with pytest.raises(AdapterError, match="shape"):
        check_compatible(type(state)((k, v[..., :1]) for k, v in state.items()), state)


def test_exported_adapter_reloads_with_peft_and_gives_the_same_logits(loaded, tiny_spec, tmp_path):
    train_dp_lora(
        loaded.model,
        _data(loaded),
        "classification",
        steps=2,
        batch_size=16,
        learning_rate=0.1,
        max_grad_norm=1.0,
        noise_multiplier=1.0,
    )
    state = adapter_state(loaded.model)
    out = save_peft_adapter(loaded.model, state, tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(load_base_model(tiny_spec), str(out))
    batch = loaded.tokenizer(["my card was stolen", "what is my balance"], return_tensors="pt", padding=True)
    loaded.model.eval()
    reloaded.eval()
    with torch.no_grad():
        expected = loaded.model(**batch).logits
        got = reloaded(**batch).logits
    assert torch.allclose(expected, got, atol=1e-5)
    load_adapter_state(loaded.model, state)  # and the state loads back into a live model


def test_a_row_with_a_non_finite_gradient_adds_nothing_instead_of_poisoning_the_update():
    """One row whose loss overflows (here a feature at infinity) must not turn the whole update into NaN: the site
    would refuse it after its spend, and whether it refused would tell the server whether that row was there."""
    from torch.utils.data import TensorDataset

    def loss(module: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(module(batch[0]), batch[1], reduction="none")

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
    x[5, 0] = float("inf")
    model = torch.nn.Linear(4, 3)
    before = model.weight.detach().clone()
    settings = DPSettings(steps=3, batch_size=32, learning_rate=0.5, max_grad_norm=1.0, noise_multiplier=0.5)
    dp_sgd(model, TensorDataset(x, y), loss, settings, seed=0)
    assert torch.isfinite(model.weight).all() and torch.isfinite(model.bias).all()
    assert not torch.equal(model.weight.detach(), before)


def test_a_module_that_runs_per_token_is_refused_instead_of_clipped_per_token():
    """Opacus clips per entry of a layer's first dimension: a layer run on a flattened list of tokens would be
    clipped per token, and one row of T tokens would move the update by T x C (review round 5)."""
    from torch.utils.data import TensorDataset

    class PerToken(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (rows, tokens, 4) -> per-token logits
            return self.proj(x.reshape(-1, 4))

    def loss(module: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        logits = module(x).view(x.size(0), x.size(1), 3)
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(dim=1)

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 5, 4, generator=g), torch.randint(0, 3, (16, 5), generator=g))
    settings = DPSettings(steps=2, batch_size=16, learning_rate=0.5, max_grad_norm=1.0, noise_multiplier=0.5)
    with pytest.raises(RuntimeError, match="per token, not per row"):
        dp_sgd(PerToken(), data, loss, settings, seed=0)
