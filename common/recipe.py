"""The learning recipe's schedule: which phase a round is in, and which adapter tensors it trains and sends.

Server and sites both derive these from the federation spec and the round
number, so the tensors a site masks and the template the server unmasks into
always agree, and a phase never uploads a tensor it did not train: the head
phase sends only the head, FFA-LoRA sends B (and the head) but never A.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable
from typing import Literal

from fedtune.common.adapter import AdapterState
from fedtune.common.config import FederationSpec

Phase = Literal["head", "lora"]

_HEAD_MARKERS = (".classifier.", ".score.")


def phase_of(spec: FederationSpec, round_: int) -> Phase:
    """Rounds 1..head.rounds of a classifier train the head on frozen features; the rest fine-tune LoRA and head."""
    if spec.task.kind == "classification" and round_ <= spec.training.head.rounds:
        return "head"
    return "lora"


def steps_per_round(spec: FederationSpec) -> int:
    t = spec.training
    return math.ceil(t.head.distributed.steps / min(t.rounds, t.head.rounds))


def step_range(spec: FederationSpec, round_: int) -> range:
    """The run's step numbers that belong to `round_` (1-based), the last round taking what is left."""
    k = steps_per_round(spec)
    return range((round_ - 1) * k + 1, min(round_ * k, spec.training.head.distributed.steps) + 1)


def step_size(learning_rate: float, reference: float | None, noise: float) -> float:
    """The learning rate at a noise level: shrunk in proportion once `noise` passes `reference`.

    SGD's stationary noise grows with the step times the noise, so a step that suits epsilon 8 spends a low
    epsilon's few bits of signal on noise; shrinking it keeps the noise one step adds to the model the same at any
    epsilon. The local head recipe measures the noise as sigma (its batch is a fixed fraction of the site's rows);
    the distributed one as sigma over the expected batch, so that one reference also serves federations of a few
    hundred rows, whose mean gradient is noisier at the same sigma (both chosen on validation splits;
    benchmarks/README.md).
    """
    if reference is not None and noise > reference:
        return learning_rate * reference / noise
    return learning_rate


def is_head(name: str) -> bool:
    return any(marker in f".{name}" for marker in _HEAD_MARKERS)


def trained_keys(names: Iterable[str], spec: FederationSpec, phase: Phase) -> list[str]:
    """The adapter tensors a phase trains, in adapter order."""
    keys = []
    for name in names:
        if is_head(name):
            keys.append(name)  # the head trains in both phases
        elif phase == "lora" and ("lora_B" in name or (spec.lora.factors == "ab" and "lora_A" in name)):
            keys.append(name)
    return keys


def select(state: AdapterState, keys: Iterable[str]) -> AdapterState:
    return OrderedDict((k, state[k]) for k in keys)
