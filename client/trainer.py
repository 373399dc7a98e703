"""DP-SGD on the LoRA parameters with Opacus.

One call is one round at one site: wrap, train a fixed number of Poisson-sampled
steps, unwrap, and return the adapter delta. The number of steps is fixed in
advance so that the ledger can commit the exact spend before training starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from peft import PeftModel
from torch.utils.data import DataLoader, TensorDataset

from fedtune.client.tasks import per_example_loss
from fedtune.common.adapter import AdapterState, adapter_state, subtract


@dataclass(frozen=True)
class TrainResult:
    delta: AdapterState
    num_examples: int
    train_loss: float
    steps: int
    empty_batches: int


def sample_rate(num_examples: int, batch_size: int) -> float:
    return min(1.0, batch_size / max(num_examples, 1))


def train_dp_lora(
    model: PeftModel,
    data: TensorDataset,
    kind: str,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    max_grad_norm: float,
    noise_multiplier: float,
    optimizer: str = "adamw",
    device: str = "cpu",
) -> TrainResult:
    start = adapter_state(model)
    model.to(device)
    model.train()  # after get_peft_model the model is in eval mode and Opacus sees no activations
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(optimizer, params, learning_rate)
    loader = DataLoader(data, batch_size=batch_size)
    engine = PrivacyEngine(accountant="rdp")
    dp_model, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
    )
    losses: list[float] = []
    done = empty = 0
    try:
        while done < steps:
            for batch in dp_loader:
                if done >= steps:
                    break
                if len(batch[0]) == 0:
                    _noise_only_step(params, dp_optimizer)
                    empty += 1
                else:
                    batch = tuple(t.to(device) for t in batch)
                    loss = per_example_loss(dp_model, batch, kind).mean()
                    loss.backward()
                    dp_optimizer.step()
                    losses.append(float(loss.detach()))
                dp_optimizer.zero_grad(set_to_none=True)
                done += 1
    finally:
        dp_model.to_standard_module()  # a second make_private on hooked modules would fail
    accounted = sum(n for _, _, n in engine.accountant.history)
    if accounted != steps:  # the ledger committed `steps`; anything else would be a silent privacy bug
        raise RuntimeError(f"Opacus accounted {accounted} steps, the ledger committed {steps}")
    return TrainResult(
        delta=subtract(adapter_state(model), start),
        num_examples=len(data),
        train_loss=sum(losses) / len(losses) if losses else float("nan"),
        steps=done,
        empty_batches=empty,
    )


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        # Momentum averages the DP noise across steps; plain SGD needs far larger learning rates.
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def _noise_only_step(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
    """An empty Poisson batch is still a DP-SGD step: noise is added and the step is accounted.

    Without per-sample gradients Opacus would skip the step (and its accounting)
    entirely, which would make the privacy analysis and the update disagree.
    """
    for p in params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()
