"""One site's side of a round: ledger check, DP-LoRA training, evaluation.

A `Site` is built once per process and reused across rounds (loading the base
model and tokenising the data dominate a small round). It holds no Flower
types: `client_app` translates messages, this module decides.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Subset, TensorDataset

from fedtune.client.audit import EgressLog
from fedtune.client.ledger import DuplicateRound, PrivacyLedger
from fedtune.client.tasks import EvalResult, encode_classification, encode_instructions, evaluate
from fedtune.client.trainer import TrainResult, sample_rate, train_dp_lora
from fedtune.common.adapter import AdapterState, check_compatible, load_adapter_state
from fedtune.common.config import FederationSpec, SiteSpec
from fedtune.common.data import dataset_fingerprint, load_classification, load_instructions, split_holdout
from fedtune.common.model import load_lora_model, verify_fingerprint
from fedtune.common.privacy import BudgetExhausted, check_fixed_noise, choose_noise_multiplier, epsilon_spent

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
    result: TrainResult
    spend: RoundSpend


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
        self.dataset = dataset_fingerprint(site.data.train)
        self.epsilon_cap = site.epsilon_cap or spec.privacy.default_epsilon_cap
        self.ledger = PrivacyLedger(Path(site.state_dir) / "ledger.sqlite")

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
        return self.ledger.epsilon(self.dataset, self.spec.privacy.target_delta)

    def steps_per_round(self) -> int:
        t = self.spec.training
        if t.local_epochs is None:
            return t.local_steps
        return max(1, round(t.local_epochs * len(self.train_data) / t.batch_size))

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
        before = epsilon_spent(earlier, self.spec.privacy.target_delta)
        return min(self.epsilon_cap, before + self.site.epsilon_per_run)

    def commit_spend(self, run: str, round_: int, rounds_total: int) -> RoundSpend:
        """Decide sigma for this round and commit the spend durably, or decline."""
        p, t = self.spec.privacy, self.spec.training
        q = sample_rate(len(self.train_data), t.batch_size)
        steps = self.steps_per_round()
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
                )
            else:
                sigma = choose_noise_multiplier(
                    history,
                    sample_rate=q,
                    steps_per_round=steps,
                    rounds_left=max(1, rounds_total - round_ + 1),
                    epsilon_cap=target,
                    delta=p.target_delta,
                )
            eps = self.ledger.record_spend(
                self.dataset,
                run_id=run,
                round_=round_,
                noise_multiplier=sigma,
                sample_rate=q,
                steps=steps,
                delta=p.target_delta,
            )
        except (BudgetExhausted, DuplicateRound) as exc:
            self.ledger.record_decline(self.dataset, run_id=run, round_=round_, reason=str(exc))
            raise Declined(f"site {self.site.name}: {exc}") from None
        return RoundSpend(sigma, q, steps, eps)

    # -- rounds ----------------------------------------------------------------------------------

    def train(self, global_state: AdapterState, run: str, round_: int, rounds_total: int) -> TrainOutcome:
        spend = self.commit_spend(run, round_, rounds_total)
        load_adapter_state(self.loaded.model, global_state)
        t = self.spec.training
        result = train_dp_lora(
            self.loaded.model,
            self.train_data,
            self.kind,
            steps=spend.steps,
            batch_size=t.batch_size,
            learning_rate=t.learning_rate,
            max_grad_norm=self.spec.privacy.max_grad_norm,
            noise_multiplier=spend.noise_multiplier,
            optimizer=t.optimizer,
            device=self.device,
        )
        check_compatible(result.delta, global_state)  # a NaN update never leaves the site
        return TrainOutcome(result, spend)

    def evaluate(self, global_state: AdapterState) -> EvalResult:
        load_adapter_state(self.loaded.model, global_state)
        return evaluate(self.loaded.model, self.eval_data, self.kind)


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
