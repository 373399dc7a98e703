"""One site's side of a round: ledger check, DP-LoRA training, evaluation.

A `Site` is built once per process and reused across rounds (loading the base
model and tokenising the data dominate a small round). It holds no Flower
types: `client_app` translates messages, this module decides.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Subset, TensorDataset

from fedtune.client.audit import EgressLog
from fedtune.client.ledger import DuplicateRound, PrivacyLedger
from fedtune.client.tasks import (
    EvalResult,
    encode_classification,
    encode_instructions,
    evaluate,
    evaluate_head,
    per_example_loss,
    pooled_dataset,
)
from fedtune.client.trainer import DPSettings, TrainStats, dp_sgd, sample_rate
from fedtune.common.adapter import AdapterState, adapter_state, check_compatible, load_adapter_state, subtract
from fedtune.common.config import FederationSpec, SiteSpec
from fedtune.common.data import dataset_fingerprint, load_classification, load_instructions, split_holdout
from fedtune.common.model import load_lora_model, verify_fingerprint
from fedtune.common.pooling import classifier_head
from fedtune.common.privacy import (
    BudgetExhausted,
    Planned,
    check_fixed_noise,
    choose_noise_multiplier,
    epsilon_spent,
)
from fedtune.common.recipe import Phase, is_head, phase_of, select, trained_keys

log = logging.getLogger(__name__)


class Declined(RuntimeError):
    """The site will not take part in this round; the message says why."""


@dataclass(frozen=True)
class RoundSpend:
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_after: float


@dataclass(frozen=True)
class TrainOutcome:
    delta: AdapterState  # only the tensors this round's phase trained
    num_examples: int
    stats: TrainStats
    spend: RoundSpend
    phase: Phase


def _local_spec(spec: FederationSpec, site: SiteSpec) -> FederationSpec:
    if site.base_model_path is None:
        return spec
    base = spec.base_model.model_copy(update={"path": site.base_model_path})
    return spec.model_copy(update={"base_model": base})


def _resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("site.device = 'cuda' but no CUDA device is visible; use 'cpu' or 'auto'")
    return requested


class Site:
    def __init__(self, site: SiteSpec, spec: FederationSpec) -> None:
        self.site = site
        self.spec = _local_spec(spec, site)
        self.kind = spec.task.kind
        self.device = _resolve_device(site.device)
        verify_fingerprint(self.spec)
        self.loaded = load_lora_model(self.spec)
        self.loaded.model.to(self.device)  # once: rounds load adapter tensors into it in place
        self.train_data, self.eval_data = self._load_data()
        self._rows = _rows_key(self.train_data) + _rows_key(self.eval_data)  # the rows never change: hash once
        self.dataset = dataset_fingerprint(site.data.train)
        self.epsilon_cap = site.epsilon_cap or spec.privacy.default_epsilon_cap
        self.ledger = PrivacyLedger(Path(site.state_dir) / "ledger.sqlite")
        self._feature_encoder: str | None = None  # encoder key of the features this site last used

    def _load_data(self) -> tuple[TensorDataset, TensorDataset]:
        d, tok, max_len = self.site.data, self.loaded.tokenizer, self.spec.base_model.max_length
        if self.kind == "classification":
            train = load_classification(d.train, d.text_column, d.label_column, self.spec.task.labels)
            encoded = encode_classification(tok, train.texts, train.labels, max_len)
            held = load_classification(d.eval, d.text_column, d.label_column, self.spec.task.labels) if d.eval else None
            held_encoded = encode_classification(tok, held.texts, held.labels, max_len) if held else None
        else:
            pairs = load_instructions(d.train, d.prompt_column, d.response_column)
            encoded = encode_instructions(tok, pairs.prompts, pairs.responses, max_len)
            held = load_instructions(d.eval, d.prompt_column, d.response_column) if d.eval else None
            held_encoded = encode_instructions(tok, held.prompts, held.responses, max_len) if held else None
        if held_encoded is not None:
            return encoded, held_encoded
        train_idx, eval_idx = split_holdout(len(encoded), d.eval_fraction, seed=self.spec.training.seed)
        return _materialise(Subset(encoded, train_idx)), _materialise(Subset(encoded, eval_idx))

    # -- privacy ---------------------------------------------------------------------------------

    def epsilon_spent(self) -> float:
        p = self.spec.privacy
        return self.ledger.epsilon(self.dataset, p.target_delta, p.accountant)

    def dp_settings(self, phase: Phase, noise_multiplier: float = 0.0) -> DPSettings:
        """Steps, batch and step size of one round of `phase` at the sigma the ledger committed.

        The head's step shrinks in proportion once sigma passes `head.reference_sigma`, so that the noise a step
        adds stays the same at any epsilon (the step sizes that won on the validation split at epsilon 8, 3 and 1
        follow this rule).
        """
        t, n, clip = self.spec.training, len(self.train_data), self.spec.privacy.max_grad_norm
        if phase == "head":
            h = t.head
            batch = max(1, math.ceil(h.batch_fraction * n))
            lr = h.learning_rate
            if h.reference_sigma is not None and noise_multiplier > h.reference_sigma:
                lr *= h.reference_sigma / noise_multiplier
            return DPSettings(h.local_steps, batch, lr, clip, noise_multiplier, "sgd")
        steps = t.local_steps if t.local_epochs is None else max(1, round(t.local_epochs * n / t.batch_size))
        return DPSettings(steps, t.batch_size, t.learning_rate, clip, noise_multiplier, t.optimizer)

    def _planned(self, phase: Phase) -> Planned:
        settings = self.dp_settings(phase)
        return sample_rate(len(self.train_data), settings.batch_size), settings.steps

    def run_target(self, run: str) -> float:
        """The epsilon this run may bring the dataset to: the cap, or less if the site keeps budget for later runs.

        Without `epsilon_per_run` one run plans to spend everything left, which leaves
        nothing for the next federation; attempts of one resumed run (`RUN.N`) share
        one allowance.
        """
        if self.site.epsilon_per_run is None:
            return self.epsilon_cap
        this_run = run.split(".")[0]
        earlier = [
            (e.noise_multiplier, e.sample_rate, e.steps)
            for e in self.ledger.entries(self.dataset)
            if e.run_id.split(".")[0] != this_run
        ]
        p = self.spec.privacy
        before = epsilon_spent(earlier, p.target_delta, p.accountant)
        return min(self.epsilon_cap, before + self.site.epsilon_per_run)

    def _last_sigma(self, run: str) -> float | None:
        """The sigma this run used last round, from the ledger: a restarted or relocated site process knows it too."""
        return next((e.noise_multiplier for e in reversed(self.ledger.entries(self.dataset)) if e.run_id == run), None)

    def commit_spend(self, run: str, round_: int, rounds_total: int) -> RoundSpend:
        """Decide sigma for this round and commit the spend durably, or decline.

        Sigma is chosen for the whole rest of the run (head rounds and LoRA rounds have different sample rates
        and steps), so the cap holds however the remaining rounds are split between phases.
        """
        p = self.spec.privacy
        q, steps = self._planned(phase_of(self.spec, round_))
        history = self.ledger.history(self.dataset)
        target = self.run_target(run)
        try:
            if p.noise_multiplier is not None:
                sigma = p.noise_multiplier
                check_fixed_noise(
                    history,
                    noise_multiplier=sigma,
                    sample_rate=q,
                    steps=steps,
                    epsilon_cap=target,
                    delta=p.target_delta,
                    accountant=p.accountant,
                )
            else:
                plan = [self._planned(phase_of(self.spec, r)) for r in range(round_, max(round_, rounds_total) + 1)]
                sigma = choose_noise_multiplier(
                    history,
                    plan,
                    epsilon_cap=target,
                    delta=p.target_delta,
                    accountant=p.accountant,
                    hint=self._last_sigma(run),
                )
            eps = self.ledger.record_spend(
                self.dataset,
                run_id=run,
                round_=round_,
                noise_multiplier=sigma,
                sample_rate=q,
                steps=steps,
                delta=p.target_delta,
                accountant=p.accountant,
            )
        except (BudgetExhausted, DuplicateRound) as exc:
            self.ledger.record_decline(self.dataset, run_id=run, round_=round_, reason=str(exc))
            raise Declined(f"site {self.site.name}: {exc}") from None
        return RoundSpend(sigma, q, steps, eps)

    # -- rounds ----------------------------------------------------------------------------------

    def train(self, global_state: AdapterState, run: str, round_: int, rounds_total: int) -> TrainOutcome:
        phase = phase_of(self.spec, round_)
        spend = self.commit_spend(run, round_, rounds_total)
        load_adapter_state(self.loaded.model, global_state)
        keys = trained_keys(global_state, self.spec, phase)
        settings = self.dp_settings(phase, spend.noise_multiplier)
        seed = self._round_seed(run, round_)
        if phase == "head":
            head = classifier_head(self.loaded.model.get_base_model())
            features, _ = self._features(global_state)
            stats = dp_sgd(head, features, _head_loss, settings, device=self.device, seed=seed, ghost=True)
        else:
            kind = self.kind

            def loss(module: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
                return per_example_loss(module, batch, kind)

            stats = dp_sgd(self.loaded.model, self.train_data, loss, settings, device=self.device, seed=seed)
        start = select(global_state, keys)
        delta = subtract(select(adapter_state(self.loaded.model), keys), start)
        check_compatible(delta, start)  # a NaN update never leaves the site
        return TrainOutcome(delta, len(self.train_data), stats, spend, phase)

    def _round_seed(self, run: str, round_: int) -> int | None:
        """Per-round seed for noise and sampling when the site is seeded (simulation); None in deployment."""
        if self.site.seed is None:
            return None
        digest = hashlib.sha256(f"{self.site.seed}:{run.split('.')[0]}:{round_}".encode()).digest()
        return int.from_bytes(digest[:8], "big") >> 1

    def _features(self, global_state: AdapterState) -> tuple[TensorDataset, TensorDataset]:
        """Pooled features of the training and held-out rows under the current encoder, computed once.

        The head phase leaves the encoder (LoRA included) untouched, so the features stay valid across its
        rounds, for training and for evaluation alike. The cache is process-wide and keyed by the encoder
        tensors and the rows themselves: a changed encoder recomputes them, and a long-lived process that
        hosts the same data again (another run, another site object) reuses them.
        """
        encoder = _encoder_key(global_state)
        key = (encoder, self._rows)
        if key not in _FEATURES:
            model, device = self.loaded.model, self.device
            train = pooled_dataset(model, self.train_data, device=device)
            if len(_FEATURES) >= 4:  # as large as the rows themselves: keep a few datasets, not every run's
                _FEATURES.pop(next(iter(_FEATURES)))
            _FEATURES[key] = (train, pooled_dataset(model, self.eval_data, device=device))
        self._feature_encoder = encoder
        return _FEATURES[key]

    def evaluate(self, global_state: AdapterState) -> EvalResult:
        """Held-out loss and accuracy; for a head-phase classifier from pooled features (the same logits).

        Features are used while the encoder is the one they were computed under (from the baseline on, when the
        recipe has head rounds); once LoRA rounds change the encoder, the full model scores the rows.
        """
        load_adapter_state(self.loaded.model, global_state)
        head_phase = self.kind == "classification" and self.spec.training.head.rounds > 0
        if head_phase and self._feature_encoder in (None, _encoder_key(global_state)):
            _, held = self._features(global_state)
            return evaluate_head(classifier_head(self.loaded.model.get_base_model()), held)
        return evaluate(self.loaded.model, self.eval_data, self.kind)


_FEATURES: dict[tuple[str, str], tuple[TensorDataset, TensorDataset]] = {}


def _rows_key(data: TensorDataset) -> str:
    digest = hashlib.sha256()
    for tensor in data.tensors:
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _encoder_key(state: AdapterState) -> str:
    """Identifies everything but the head: equal keys mean equal pooled features."""
    digest = hashlib.sha256()
    for name, value in state.items():
        if not is_head(name):
            digest.update(name.encode())
            digest.update(value.tobytes())
    return digest.hexdigest()


def _head_loss(head: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    features, labels = batch
    return F.cross_entropy(head(features), labels, reduction="none")


def egress_log(site: SiteSpec) -> EgressLog:
    return EgressLog(Path(site.state_dir) / "egress.jsonl")


def _materialise(subset: Subset) -> TensorDataset:
    idx = list(subset.indices)
    return TensorDataset(*(t[idx] for t in subset.dataset.tensors))


_CACHE: dict[str, Site] = {}


def get_site(site: SiteSpec, spec: FederationSpec) -> Site:
    """The process-wide `Site` for this (site, federation) pair."""
    key = hashlib.sha256((site.model_dump_json() + spec.model_dump_json()).encode()).hexdigest()
    if key not in _CACHE:
        _CACHE[key] = Site(site, spec)
    return _CACHE[key]
