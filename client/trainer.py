"""DP-SGD with Opacus on whatever a phase trains: the LoRA factors, or the classifier head alone.

One call is one phase of one round at one site: wrap, train a fixed number of
Poisson-sampled steps, unwrap. The steps, sample rate and sigma are fixed in
advance so that the ledger can commit the exact spend before training starts,
and afterwards the accountant's own record is checked against that commitment.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

LossFn = Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]  # per-example losses


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DPSettings:
    """What the ledger committed for this round (sigma, and the sample rate `batch_size` implies) plus the rest."""

    steps: int
    batch_size: int
    learning_rate: float
    max_grad_norm: float
    noise_multiplier: float
    optimizer: str = "sgd"


@dataclass(frozen=True)
class TrainStats:
    steps: int
    train_loss: float
    empty_batches: int


def sample_rate(num_examples: int, batch_size: int) -> float:
    """The Poisson rate Opacus really samples at: 1 / (batches per epoch), not batch_size / rows."""
    return 1.0 / max(1, math.ceil(num_examples / max(batch_size, 1)))


def dp_sgd(
    module: nn.Module,
    data: TensorDataset,
    per_example_loss: LossFn,
    settings: DPSettings,
    *,
    device: str = "cpu",
    seed: int | None = None,
    ghost: bool = False,
) -> TrainStats:
    """Train `module`'s trainable parameters in place with DP-SGD.

    `seed` fixes Poisson sampling and noise (simulation and benchmarks); None draws both from fresh entropy.
    `ghost` uses Opacus' ghost clipping: per-example gradient norms without materialising per-example gradients
    (for a 77 x 384 head at batch 1,350 that is 40M floats a step), then a second backward pass of the clipped
    loss; same clipping, noise and accounting.
    """
    module.to(device)
    module.train()  # after get_peft_model the model is in eval mode and Opacus sees no activations
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(settings.optimizer, params, settings.learning_rate)
    sampling = torch.Generator().manual_seed(seed) if seed is not None else None
    noise = torch.Generator(device=device).manual_seed(seed + 1) if seed is not None else None
    loader = DataLoader(data, batch_size=settings.batch_size, generator=sampling)
    engine = PrivacyEngine(accountant="rdp")
    wrapped = engine.make_private(
        module=module,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=settings.noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
        poisson_sampling=True,
        noise_generator=noise,
        **({"criterion": _PerExampleCriterion(per_example_loss), "grad_sample_mode": "ghost"} if ghost else {}),
    )
    if ghost:
        dp_module, dp_optimizer, dp_criterion, dp_loader = wrapped
    else:
        dp_module, dp_optimizer, dp_loader = wrapped
        dp_criterion = None
    losses: list[float] = []
    done = empty = 0
    try:
        with torch.random.fork_rng(devices=[], enabled=seed is not None):  # seeds dropout, global RNG untouched
            if seed is not None:
                torch.manual_seed(seed + 2)
            while done < settings.steps:
                for batch in dp_loader:
                    if done >= settings.steps:
                        break
                    if len(batch[0]) == 0:
                        _noise_only_step(params, dp_optimizer, ghost)
                        empty += 1
                    else:
                        batch = tuple(t.to(device) for t in batch)
                        if dp_criterion is not None:
                            loss = dp_criterion(dp_module, batch)  # per-example norms, then the clipped loss
                        else:
                            loss = per_example_loss(dp_module, batch).mean()
                        loss.backward()
                        if dp_criterion is None:
                            _require_one_gradient_per_row(params, len(batch[0]))
                            _zero_nonfinite_rows(params)
                        dp_optimizer.step()
                        losses.append(float(loss.detach()))
                    dp_optimizer.zero_grad(set_to_none=True)
                    done += 1
    finally:
        dp_module.to_standard_module()  # a second make_private on hooked modules would fail
    _check_accounted(engine, settings, len(data))
    return TrainStats(steps=done, train_loss=sum(losses) / len(losses) if losses else float("nan"), empty_batches=empty)


def _check_accounted(engine: PrivacyEngine, settings: DPSettings, num_examples: int) -> None:
    """The ledger committed (sigma, q, steps); anything else Opacus did would be a silent privacy bug."""
    committed = (settings.noise_multiplier, sample_rate(num_examples, settings.batch_size), settings.steps)
    accounted = engine.accountant.history
    steps = sum(n for _, _, n in accounted)
    same = all(math.isclose(s, committed[0]) and math.isclose(q, committed[1]) for s, q, _ in accounted)
    if steps != committed[2] or not same:  # the figures (a sample rate tells the row count) stay in the site's log
        log.error("Opacus accounted %s, the ledger committed %s", accounted, committed)
        raise RuntimeError(
            "Opacus accounted another (sigma, sample rate, steps) than the privacy ledger committed; this round's "
            "update is withheld (details in the site's log)"
        )


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        # Momentum averages the DP noise across steps; plain SGD needs far larger learning rates.
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


class _PerExampleCriterion:
    """`LossFn` in the shape of a criterion, for Opacus' ghost clipping (which sets `reduction` around the call)."""

    def __init__(self, per_example_loss: LossFn) -> None:
        self.per_example_loss = per_example_loss
        self.reduction = "mean"

    def __call__(self, module: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        losses = self.per_example_loss(module, batch)
        return losses if self.reduction == "none" else losses.mean()


def _require_one_gradient_per_row(params: list[torch.nn.Parameter], rows: int) -> None:
    """Opacus clips per entry of a layer's first dimension. A LoRA module that runs on a flattened list of tokens
    (the vocabulary projection at response positions, an MoE expert over `hidden.view(-1, H)`) gives one gradient
    per token, and clipping each token lets one row move the update by its token count times C while the ledger
    charged C (review round 5). `load_lora_model` refuses the known placements; anything else is caught here, and
    the update is withheld (after the spend: a budget lost, nothing leaked)."""
    for p in params:
        sample = getattr(p, "grad_sample", None)
        if isinstance(sample, torch.Tensor) and sample.size(0) != rows:
            raise RuntimeError(
                f"a trained tensor has {sample.size(0)} per-example gradients for a batch of {rows} rows: its "
                "module runs per token, not per row, so DP-SGD's clipping would not bound a row; this round's "
                "update is withheld. Put LoRA only on modules that keep the batch dimension (attention and MLP "
                "projections of standard transformer layers)"
            )


def _zero_nonfinite_rows(params: list[torch.nn.Parameter]) -> None:
    """A row whose per-example gradient is not finite adds zero, in every tensor: still a contribution of norm at
    most C, as DP-SGD allows any row. Without this one such row made the whole update NaN, the site refused it
    after its spend, and whether it did told the server whether some sampled row met the condition its adapter
    set (ghost clipping, used for the head, materialises no per-example gradient: there the head's own loss zeroes
    such rows, `site._head_loss`)."""
    samples = [p.grad_sample for p in params if isinstance(getattr(p, "grad_sample", None), torch.Tensor)]
    if not samples:
        return
    finite = torch.stack([torch.isfinite(g.flatten(1)).all(dim=1) for g in samples]).all(dim=0)
    if not bool(finite.all()):
        for g in samples:
            g[~finite] = 0.0


def _noise_only_step(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, ghost: bool) -> None:
    """An empty Poisson batch is still a DP-SGD step: noise is added and the step is accounted.

    Without per-sample gradients Opacus would skip the step (and its accounting)
    entirely, which would make the privacy analysis and the update disagree.
    """
    for p in params:
        if ghost:  # ghost clipping sums clipped gradients in p.grad: nothing to sum
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()
