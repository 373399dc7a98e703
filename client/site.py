"""One site's side of a round: ledger check, DP-LoRA training, evaluation.

A `Site` is built once per process and reused across rounds (loading the base
model and tokenising the data dominate a small round). It holds no Flower
types: `client_app` translates messages, this module decides.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import pickle
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Subset, TensorDataset

from fedtune.client.audit import EgressLog, egress_path
from fedtune.client.ledger import (
    DatasetIdentity,
    DuplicateRound,
    HighWater,
    LedgerEntry,
    LedgerError,
    PrivacyLedger,
    ReleaseRefused,
    classification_identity,
    instruction_identity,
)
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
from fedtune.client.upper_layers import UpperLayers, evaluate_upper, first_trained_layer, lower_states, upper_loss
from fedtune.common.adapter import (
    AdapterState,
    adapter_state,
    check_compatible,
    check_received,
    load_adapter_state,
    subtract,
)
from fedtune.common.config import MAX_NOISE_MULTIPLIER, MIN_NOISE_MULTIPLIER, DataSpec, FederationSpec, SiteSpec
from fedtune.common.data import (
    ClassificationData,
    dataset_fingerprint,
    load_classification,
    load_instructions,
    split_holdout,
)
from fedtune.common.inference import label_log_prior
from fedtune.common.model import load_lora_model, verify_fingerprint
from fedtune.common.pooling import classifier_head
from fedtune.common.privacy import (
    MIN_DELTA,
    AccountantError,
    BudgetExhausted,
    Planned,
    Spend,
    check_fixed_noise,
    choose_noise_multiplier,
    epsilon_spent,
)
from fedtune.common.prompts import AnswerSet, answer_set
from fedtune.common.recipe import Phase, is_head, phase_of, select, step_size, trained_keys

log = logging.getLogger(__name__)


class Declined(RuntimeError):
    """The site will not take part in this round; the message says why, at the site.

    `public` is what the reply carries: the same words where they name only settings, a fixed sentence where the
    detail would carry data (an exact epsilon history or step count is a function of the site's row count).
    """

    def __init__(self, detail: str, public: str | None = None) -> None:
        super().__init__(detail)
        self.public = public or detail


LEDGER_REFUSED = (
    "the site's privacy ledger is not trusted (missing, unreadable or behind what the site sent); the site operator "
    "must restore it (`fedtune client ledger restore`)"
)
BUDGET_REFUSED = "this round would pass the site's privacy budget (its epsilon cap or its allowance for the window)"


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


def local_spec(spec: FederationSpec, site: SiteSpec) -> FederationSpec:
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
        self.spec = local_spec(spec, site)
        self.kind = spec.task.kind
        self.device = _resolve_device(site.device)
        self.base_fingerprint = verify_fingerprint(self.spec)
        self.loaded = load_lora_model(self.spec)
        self.loaded.model.to(self.device)  # once: rounds load adapter tensors into it in place
        self.layout = adapter_state(self.loaded.model)  # its keys and shapes: what an adapter sent to it must have
        layers = self.spec.lora.layers
        # causal LM with LoRA on the top layers: the layers below run once (`lower_states`), DP steps only above
        self.upper_first = (
            first_trained_layer(self.loaded.model, layers) if self.kind == "causal-lm" and layers else None
        )
        self.identity: DatasetIdentity = DatasetIdentity()
        self.train_data, self.eval_data = self._load_data()
        self._rows = _rows_key(self.train_data) + _rows_key(self.eval_data)  # the rows never change: hash once
        self.logit_shift = (
            label_log_prior(self.train_data.tensors[-1], len(self.spec.task.labels))
            if self.kind == "classification" and self.spec.task.label_prior == "site"
            else None
        )
        self.epsilon_cap = site.cap_under(spec)
        self.delta = accounting_delta(site, spec)
        self.ledger_path = Path(site.state_dir) / "ledger.sqlite"
        self.ledger_error: str | None = None
        self.ledger: PrivacyLedger = None  # type: ignore[assignment]  # set by _open_ledger unless it fails closed
        self.dataset = self.identity.key  # the budget this dataset is charged to, once the ledger is open
        self._open_ledger()
        self._feature_encoder: str | None = None  # encoder key of the features this site last used

    def accept(self, state: AdapterState) -> None:
        """Refuse, before any row is read, an adapter that is not this site's model's (`check_received`)."""
        check_received(state, self.layout)

    def _open_ledger(self) -> PrivacyLedger | None:
        """The ledger, or None with `ledger_error` set: an untrusted ledger refuses training, not the site."""
        if self.ledger is not None:
            return self.ledger
        try:
            self.ledger = PrivacyLedger(self.ledger_path)
        except LedgerError as exc:
            self.ledger_error = str(exc)
            log.error("site %s: %s", self.site.name, exc)
            return None
        self.ledger_error = None
        self.dataset = self.ledger.resolve(self.identity)[0]
        return self.ledger

    def _load_data(self) -> tuple[TensorDataset, TensorDataset]:
        d, tok, max_len = self.site.data, self.loaded.tokenizer, self.spec.base_model.max_length
        if self.kind == "classification":
            train, self.identity = classification_rows(d, self.spec.task.labels)
            encoded = encode_classification(tok, train.texts, train.labels, max_len)
            held = load_classification(d.eval, d.text_column, d.label_column, self.spec.task.labels) if d.eval else None
            held_encoded = encode_classification(tok, held.texts, held.labels, max_len) if held else None
        else:
            pairs = load_instructions(d.train, d.prompt_column, d.response_column)
            source = dataset_fingerprint(d.train)
            self.identity = instruction_identity(pairs.prompts, pairs.responses, name=d.dataset_name, source=source)
            system = self.spec.task.system_prompt
            encoded = encode_instructions(tok, pairs.prompts, pairs.responses, max_len, system)
            held = load_instructions(d.eval, d.prompt_column, d.response_column) if d.eval else None
            held_encoded = encode_instructions(tok, held.prompts, held.responses, max_len, system) if held else None
        if held_encoded is not None:
            return encoded, held_encoded
        train_idx, eval_idx = split_holdout(len(encoded), d.eval_fraction, seed=split_seed(self.site))
        return _materialise(Subset(encoded, train_idx)), _materialise(Subset(encoded, eval_idx))

    # -- privacy ---------------------------------------------------------------------------------

    def epsilon_spent(self) -> float:
        """Epsilon (at `self.delta`) composed over every budget this dataset shares records with.

        With the ledger refused (fails closed) it is the high-water mark's figure, the most the site knows.
        """
        p = self.spec.privacy
        if self._open_ledger() is None:
            try:
                mark = HighWater.read(self.ledger_path.with_suffix(".hwm"))
            except LedgerError:
                mark = None
            return max((b["epsilon"] for b in mark.budgets.values()), default=0.0) if mark else 0.0
        return self.ledger.epsilon(self.identity, self.delta, p.accountant)

    def dp_settings(self, phase: Phase, noise_multiplier: float = 0.0) -> DPSettings:
        """Steps, batch and step size of one round of `phase` at the sigma the ledger committed.

        The head's step shrinks in proportion once sigma passes `head.reference_sigma` (`recipe.step_size`).
        """
        t, n, clip = self.spec.training, len(self.train_data), self.spec.privacy.max_grad_norm
        if phase == "head":
            h = t.head
            batch = max(1, math.ceil(h.batch_fraction * n))
            lr = step_size(h.learning_rate, h.reference_sigma, noise_multiplier)
            return DPSettings(h.local_steps, batch, lr, clip, noise_multiplier, "sgd")
        steps = t.local_steps if t.local_epochs is None else max(1, round(t.local_epochs * n / t.batch_size))
        return DPSettings(steps, t.batch_size, t.learning_rate, clip, noise_multiplier, t.optimizer)

    def _planned(self, phase: Phase) -> Planned:
        settings = self.dp_settings(phase)
        return sample_rate(len(self.train_data), settings.batch_size), settings.steps

    def run_target(self, run: str, entries: list[LedgerEntry] | None = None, now: float | None = None) -> float:
        """The epsilon this run may bring the dataset to: the cap, or less if the site keeps budget for later runs.

        Without `epsilon_per_run` one run plans to spend everything left, which leaves nothing for the next
        federation. With it, the allowance bounds what every spend of the last `epsilon_window_hours` (by the
        site's clock) adds, whatever its run id: run ids are the server's to pick, and a fresh one each round
        would otherwise get a fresh allowance each round. Spends of this run (its attempts `RUN.N` included)
        count however old they are, and a spend without a timestamp counts as recent (fails closed).
        """
        if self.site.epsilon_per_run is None:
            return self.epsilon_cap
        if entries is None:
            entries = self.ledger.entries(self.identity)
        since = (time.time() if now is None else now) - self.site.epsilon_window_hours * 3600.0
        this_run = run.split(".")[0]

        def counted(e: LedgerEntry) -> bool:
            recent = not e.created or e.created >= since  # no timestamp (None, 0): inside the window
            return recent or e.run_id.split(".")[0] == this_run

        earlier = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries if not counted(e)]
        before = epsilon_spent(earlier, self.delta, self.spec.privacy.accountant)
        return min(self.epsilon_cap, before + self.site.epsilon_per_run)

    def release_scores(self, run: str, round_: int) -> bool:
        """Whether the held-out figures of the adapter of `round_` may leave now: counted in the ledger against
        `max_score_releases` before they do (see `PrivacyLedger.release`); refused ones stay here, with why."""
        if self._open_ledger() is None:
            return False
        try:
            count = self.ledger.release(self.identity, run_id=run, round_=round_, cap=self.site.max_score_releases)
        except (ReleaseRefused, LedgerError) as exc:
            log.warning("held-out figures of round %d of run %s withheld: %s", round_, run, exc)
            return False
        log.debug("held-out figures of round %d of run %s released (%d for this dataset)", round_, run, count)
        return True

    def _decline(self, run: str, round_: int, reason: str, public: str | None = None) -> Declined:
        """Record the decline (with its detail) in the ledger and log; `public` replaces the detail in the reply."""
        if self.ledger is not None:
            self.ledger.record_decline(self.identity, run_id=run, round_=round_, reason=reason)
        log.warning("site %s declines round %d of run %s: %s", self.site.name, round_, run, reason)
        name = self.site.name
        return Declined(f"site {name}: {reason}", None if public is None else f"site {name}: {public}")

    def _untrusted_ledger(self, detail: str) -> Declined:
        """A decline the ledger cannot record: its detail (spend counts, epsilons) stays in the site's log."""
        return Declined(f"site {self.site.name}: {detail}", f"site {self.site.name}: {LEDGER_REFUSED}")

    def commit_spend(
        self, run: str, round_: int, rounds_total: int, *, fixed: Spend | None = None, worst: float | None = None
    ) -> RoundSpend:
        """Decide sigma for this round and commit the spend durably, or decline.

        The dataset's history is read, sigma decided and the spend written in one exclusive ledger transaction.
        Sigma is chosen for the whole rest of the run (head rounds and LoRA rounds have different sample rates
        and steps), so the cap holds however the remaining rounds are split between phases. `fixed` is a spend
        decided elsewhere (a distributed-noise round: sigma is the federation's, charged under the site's
        honest-site assumption), checked against the cap and committed with `worst`, its own share's sigma.
        """
        p = self.spec.privacy
        if self._open_ledger() is None:
            raise self._untrusted_ledger(str(self.ledger_error))
        if not MIN_DELTA <= p.target_delta < 1.0:  # NaN too: no accountant composes there, the site cannot check
            raise self._decline(
                run,
                round_,
                f"the federation asks for privacy.target_delta = {p.target_delta:g}, outside [{MIN_DELTA:g}, 1) "
                "where the privacy accountant can compose spends; the site declines. The operator should set "
                f"privacy.target_delta between {MIN_DELTA:g} and {self.site.privacy_delta:g} (this site's "
                "privacy_delta)",
            )
        if self.delta < MIN_DELTA:
            raise self._decline(
                run,
                round_,
                f"this site's privacy_delta = {self.site.privacy_delta:g} is below {MIN_DELTA:g}, where the privacy "
                f"accountant cannot compose spends; set privacy_delta in the site config to at least {MIN_DELTA:g}",
            )
        if p.target_delta > self.site.privacy_delta:
            raise self._decline(
                run,
                round_,
                f"the federation asks for privacy.target_delta = {p.target_delta:g}, larger than this site's "
                f"privacy_delta = {self.site.privacy_delta:g}; the site accounts at its own delta and declines. "
                f"The operator should set privacy.target_delta <= {self.site.privacy_delta:g} (or the site raise "
                "privacy_delta, a policy decision)",
            )
        if fixed is not None:
            sigma_fixed, q, steps = fixed
        else:
            sigma_fixed, (q, steps) = p.noise_multiplier, self._planned(phase_of(self.spec, round_))
        if sigma_fixed is not None and not MIN_NOISE_MULTIPLIER <= sigma_fixed <= MAX_NOISE_MULTIPLIER:
            # a sigma past the top makes a round free (and its scores with it); an infinite one hangs the accountant
            raise self._decline(
                run,
                round_,
                f"this round's noise multiplier {sigma_fixed:g} is outside [{MIN_NOISE_MULTIPLIER:g}, "
                f"{MAX_NOISE_MULTIPLIER:g}], the noise a site composes; the site declines. The operator should set "
                "privacy.noise_multiplier in that range, or leave it unset",
            )

        def decide(entries: list[LedgerEntry]) -> Spend:
            history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]
            target = self.run_target(run, entries)
            if sigma_fixed is not None:
                check_fixed_noise(
                    history,
                    noise_multiplier=sigma_fixed,
                    sample_rate=q,
                    steps=steps,
                    epsilon_cap=target,
                    delta=self.delta,
                    accountant=p.accountant,
                )
                return sigma_fixed, q, steps
            plan = [self._planned(phase_of(self.spec, r)) for r in range(round_, max(round_, rounds_total) + 1)]
            # the sigma this run used last round, from the ledger: a restarted or relocated process knows it too
            hint = next((e.noise_multiplier for e in reversed(entries) if e.run_id == run), None)
            sigma = choose_noise_multiplier(
                history, plan, epsilon_cap=target, delta=self.delta, accountant=p.accountant, hint=hint
            )
            return sigma, q, steps

        try:
            done = self.ledger.commit(
                self.identity,
                run_id=run,
                round_=round_,
                decide=decide,
                delta=self.delta,
                accountant=p.accountant,
                worst_noise_multiplier=worst,
            )
        except BudgetExhausted as exc:
            raise self._decline(run, round_, str(exc), BUDGET_REFUSED) from None
        except DuplicateRound as exc:
            raise self._decline(run, round_, str(exc), "this site already trained this round of this run") from None
        except AccountantError as exc:  # nothing was written: the transaction rolled back
            raise self._decline(
                run,
                round_,
                f"{exc}. Nothing was spent; the site declines. Set privacy.target_delta (federation) or "
                f"privacy_delta (site) to a larger delta, at least {MIN_DELTA:g}, or privacy.accountant = 'rdp'",
                "the privacy accountant cannot compose this round's spend at this delta; nothing was spent. Set a "
                f"larger privacy.target_delta (at least {MIN_DELTA:g}) or privacy.accountant = 'rdp'",
            ) from None
        except LedgerError as exc:
            raise self._untrusted_ledger(str(exc)) from None
        self.dataset = done.budget
        return RoundSpend(done.noise_multiplier, done.sample_rate, done.steps, done.epsilon_after)

    # -- rounds ----------------------------------------------------------------------------------

    def train(
        self, global_state: AdapterState, run: str, round_: int, rounds_total: int, *, plaintext: bool = False
    ) -> TrainOutcome:
        """One round's DP training; `plaintext` where the update will leave unmasked (a round without secure
        aggregation).

        A plaintext round (the server sees the update and the row count) is declined before any budget is spent
        unless the site's own file allows it: a server cannot downgrade a site by leaving secure aggregation out.
        """
        if plaintext and not self.site.allow_plaintext:
            raise self._decline(
                run,
                round_,
                "this round has no secure aggregation, so the server would see this site's update and row count; "
                "the site's file does not allow that (allow_plaintext = false). The operator should enable "
                "secagg; a site that trusts the server may set allow_plaintext = true",
            )
        self.accept(global_state)
        phase = phase_of(self.spec, round_)
        load_adapter_state(self.loaded.model, global_state)
        # what the round trains on is computed before it is paid for: a failure here must not cost budget (review
        # rounds 7 and 8: an empty held-out split, a head that is not one Linear layer, lower states too large)
        if phase == "head":
            head = classifier_head(self.loaded.model.get_base_model())
            features, _ = self.features(global_state)
        elif self.upper_first is not None:
            states, _ = self.lower_states(self.upper_first)
        spend = self.commit_spend(run, round_, rounds_total)
        keys = trained_keys(global_state, self.spec, phase)
        settings = self.dp_settings(phase, spend.noise_multiplier)
        seed = self._spend_seed()
        if phase == "head":
            stats = dp_sgd(head, features, _head_loss, settings, device=self.device, seed=seed, ghost=True)
        elif self.upper_first is not None:
            upper = UpperLayers(self.loaded.model, self.upper_first)
            stats = dp_sgd(upper, states, upper_loss, settings, device=self.device, seed=seed)
        else:
            kind = self.kind

            def loss(module: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
                return per_example_loss(module, batch, kind)

            stats = dp_sgd(self.loaded.model, self.train_data, loss, settings, device=self.device, seed=seed)
        start = select(global_state, keys)
        delta = subtract(select(adapter_state(self.loaded.model), keys), start)
        check_compatible(delta, start)  # a NaN update never leaves the site
        return TrainOutcome(delta, len(self.train_data), stats, spend, phase)

    def _spend_seed(self) -> int | None:
        """Seed of this spend's noise and sampling when the site is seeded (simulation, benchmarks); None for a
        real site (fresh entropy).

        It is the site seed and the spend's position in the ledger: a repeated simulation from fresh state
        repeats exactly (a run id would not: it is a fresh uuid), and no two spends of one ledger ever share noise.
        """
        if self.site.seed is None:
            return None
        assert self.ledger is not None  # commit_spend opened it
        position = len(self.ledger.entries())
        digest = hashlib.sha256(f"{self.site.seed}:spend:{position}".encode()).digest()
        return int.from_bytes(digest[:8], "big") >> 1

    def features(self, global_state: AdapterState) -> tuple[TensorDataset, TensorDataset]:
        """Pooled features of the training and held-out rows under the current encoder, computed once.

        The head phase leaves the encoder (LoRA included) untouched, so the features stay valid across its
        rounds, for training and for evaluation alike; a changed encoder recomputes them (see `_frozen`).
        """
        encoder = encoder_key(global_state)

        def compute() -> tuple[TensorDataset, TensorDataset]:
            model, device = self.loaded.model, self.device
            return (
                pooled_dataset(model, self.train_data, device=device),
                pooled_dataset(model, self.eval_data, device=device),
            )

        features = self._frozen(encoder, compute)
        self._feature_encoder = encoder
        return features

    def lower_states(self, first: int) -> tuple[TensorDataset, TensorDataset]:
        """What the frozen layers below `first` compute for the training and held-out rows (`upper_layers`):
        no adapter changes them, so they are computed once per site, as the head phase's features are."""

        def compute() -> tuple[TensorDataset, TensorDataset]:
            model, device = self.loaded.model, self.device
            return (
                lower_states(model, self.train_data, first, device=device),
                lower_states(model, self.eval_data, first, device=device),
            )

        return self._frozen(f"lower-layers:{first}", compute)

    def _frozen(
        self, key: str, compute: Callable[[], tuple[TensorDataset, TensorDataset]]
    ) -> tuple[TensorDataset, TensorDataset]:
        """What a frozen part of the model computes for this site's rows, under `key`, computed once.

        The cache is process-wide and keyed like the file that backs it (key, rows, base weights, pooling): a
        long-lived process that hosts the same data again (another run, another site object) reuses it. It is
        backed by the site's state directory, so a restarted worker, or another simulation actor hosting this
        site, reads it back instead of running the model over every row again (minutes on a CPU).
        """
        return self.features_under(key) or _keep(self._features_file(key).name, self._store(key, compute()))

    def features_under(self, key: str) -> tuple[TensorDataset, TensorDataset] | None:
        """The features (or lower states) under `key` if this process or the site's state dir holds them; never
        computed here (that needs the encoder's tensors loaded: `features`)."""
        path = self._features_file(key)
        if path.name not in _FEATURES:
            stored = self._stored_features(path)
            return None if stored is None else _keep(path.name, stored)
        return _FEATURES[path.name]

    def _features_file(self, key: str) -> Path:
        """Named by everything the features depend on: encoder tensors (or the layer), rows, base weights, pooling,
        the LoRA settings and the model's config (review round 7: a new alpha reused the old features)."""
        parts = (key, self._rows, self.base_fingerprint, self.spec.task.pooling, self._model_setup)
        return features_dir(self.site) / f"{hashlib.sha256(':'.join(parts).encode()).hexdigest()}.pt"

    @functools.cached_property
    def _model_setup(self) -> str:
        """The whole LoRA block (alpha scales what the same tensors compute) and the model folder's config, hashed
        once: a Site serves one spec."""
        config = (Path(self.spec.base_model.path) / "config.json").read_bytes()
        return hashlib.sha256(self.spec.lora.model_dump_json().encode() + b"\0" + config).hexdigest()

    @functools.cached_property
    def answers(self) -> AnswerSet | None:
        """The task's allowed answers as a token trie, built once (`task.responses` can name thousands)."""
        return answer_set(self.spec, self.loaded.tokenizer)

    def _stored_features(self, path: Path) -> tuple[TensorDataset, TensorDataset] | None:
        """The features a process of this site stored at `path`.

        A file that does not load, or whose rows do not match, is ignored and recomputed: it is a cache.
        """
        try:
            stored = torch.load(path, weights_only=True)
            pairs = [TensorDataset(*stored[part]) for part in ("train", "eval")]
        except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError, pickle.UnpicklingError):
            return None
        for pair, rows in zip(pairs, (self.train_data, self.eval_data), strict=True):
            if not torch.equal(pair.tensors[-1], rows.tensors[-1]):
                return None
        return pairs[0], pairs[1]

    def _store(self, key: str, pair: tuple[TensorDataset, TensorDataset]) -> tuple[TensorDataset, TensorDataset]:
        path = self._features_file(key)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        for old in sorted(path.parent.glob("*.pt"), key=lambda f: f.stat().st_mtime)[:-1]:
            old.unlink(missing_ok=True)  # keep this site's latest two: the head phase needs one encoder's
        partial = path.with_suffix(".partial")
        torch.save({"train": pair[0].tensors, "eval": pair[1].tensors}, partial)
        os.replace(partial, path)  # readers see a whole file or none
        return pair

    def evaluate(self, global_state: AdapterState, *, prior: bool = True) -> EvalResult:
        """Held-out loss and accuracy; for a head-phase classifier from pooled features (the same logits).

        Features are used while the encoder is the one they were computed under (from the baseline on, when the
        recipe has head rounds); once LoRA rounds change the encoder, the full model scores the rows.
        `prior=False` for figures that leave the site: the label prior is computed from the training rows, and a
        released loss would carry them out without DP.
        """
        self.accept(global_state)
        load_adapter_state(self.loaded.model, global_state)
        shift = self.logit_shift if prior else None
        head_phase = self.kind == "classification" and self.spec.training.head.rounds > 0
        if head_phase and self._feature_encoder in (None, encoder_key(global_state)):
            _, held = self.features(global_state)
            return evaluate_head(classifier_head(self.loaded.model.get_base_model()), held, shift)
        if self.upper_first is not None:
            _, held = self.lower_states(self.upper_first)
            return evaluate_upper(UpperLayers(self.loaded.model, self.upper_first), held, answers=self.answers)
        return evaluate(self.loaded.model, self.eval_data, self.kind, logit_shift=shift, answers=self.answers)


_FEATURES: dict[str, tuple[TensorDataset, TensorDataset]] = {}  # by features file name


def _keep(name: str, features: tuple[TensorDataset, TensorDataset]) -> tuple[TensorDataset, TensorDataset]:
    if len(_FEATURES) >= 4:  # as large as the rows themselves: keep a few datasets, not every run's
        _FEATURES.pop(next(iter(_FEATURES)))
    _FEATURES[name] = features
    return features


def _rows_key(data: TensorDataset) -> str:
    digest = hashlib.sha256()
    for tensor in data.tensors:
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def encoder_key(state: AdapterState) -> str:
    """Identifies everything but the head: equal keys mean equal pooled features."""
    digest = hashlib.sha256()
    for name, value in state.items():
        if not is_head(name):
            digest.update(name.encode())
            digest.update(value.tobytes())
    return digest.hexdigest()


def _head_loss(head: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Per-row cross-entropy; a row whose logits are not finite (a head grown past any bound within a round, on a
    large feature) gets a zero loss with a zero gradient, so it adds nothing instead of making the update NaN."""
    features, labels = batch
    logits = head(features)
    finite = torch.isfinite(logits).all(dim=1, keepdim=True)
    return F.cross_entropy(torch.where(finite, logits, 0.0), labels, reduction="none") * finite.squeeze(1)


EPSILON_REPORT_STEP = 0.1


def reported_epsilon(epsilon: float) -> float:
    """Epsilon as it leaves the site in plaintext: to the nearest 0.1.

    The exact figure (and sigma, which the site no longer sends) is a function of the sample rate, hence of the
    site's row count; at this resolution a 20-round run's epsilon tells the row count only to within tens of
    percent (README's security model).
    """
    return round(round(epsilon / EPSILON_REPORT_STEP) * EPSILON_REPORT_STEP, 10)


def accounting_delta(site: SiteSpec, spec: FederationSpec) -> float:
    """The delta the ledger accounts at: the site's own, or the federation's when that is smaller.

    Epsilon at the smaller delta bounds both guarantees (an (eps, d)-DP mechanism is (eps, d')-DP for any d' >= d),
    so the site's cap holds at its own delta and the epsilon it reports holds at the federation's. A federation
    asking for a larger delta than the site's is declined in `commit_spend`, and so is one outside
    [MIN_DELTA, 1): the site then keeps its own delta, so that what it reports on a decline is still computable.
    """
    target = spec.privacy.target_delta
    if not MIN_DELTA <= target < 1.0:
        return site.privacy_delta
    return min(site.privacy_delta, target)


def classification_rows(data: DataSpec, labels: Sequence[str]) -> tuple[ClassificationData, DatasetIdentity]:
    """A site's training rows and the identity its ledger charges them to: the label cells as stored, not the
    server's names for them (renamed labels are the same records)."""
    rows = load_classification(data.train, data.text_column, data.label_column, labels)
    identity = classification_identity(
        rows.texts,
        rows.labels,
        labels,
        values=rows.values,
        name=data.dataset_name,
        source=dataset_fingerprint(data.train),
    )
    return rows, identity


SPLIT_SEED_FILE = "split-seed"


def split_seed(site: SiteSpec) -> int:
    """The seed of this site's held-out split: the site's, never the federation's.

    A server that picked the split seed could choose which rows are held out, and the held-out metrics leave the
    site without DP. In simulation (`site.seed` set) it derives from the site seed so a run repeats; a deployed
    site draws it once from the OS (`secrets`) and keeps it in STATE_DIR/split-seed, so that every run and restart
    holds out the same rows.
    """
    if site.seed is not None:
        return int.from_bytes(hashlib.sha256(f"split:{site.seed}".encode()).digest()[:8], "big") >> 1
    path = Path(site.state_dir) / SPLIT_SEED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{secrets.randbits(63)}\n")
            fh.flush()
            os.fsync(fh.fileno())
    for _ in range(50):  # a concurrent creator may not have written it yet
        text = path.read_text().strip()
        if text:
            try:
                return int(text)
            except ValueError:
                break
        time.sleep(0.1)
    raise RuntimeError(f"{path}: not a split seed (one integer); delete it to draw a new one (other rows held out)")


def features_dir(site: SiteSpec) -> Path:
    """Pooled features of the site's own rows: computed and kept at the site, never sent."""
    return Path(site.state_dir) / "features"


def egress_log(site: SiteSpec) -> EgressLog:
    return EgressLog(egress_path(site.state_dir))


def _materialise(subset: Subset) -> TensorDataset:
    idx = list(subset.indices)
    return TensorDataset(*(t[idx] for t in subset.dataset.tensors))


_CACHE: dict[str, tuple[str, Site]] = {}  # site name -> (fingerprint of its configuration, Site)


def get_site(site: SiteSpec, spec: FederationSpec) -> Site:
    """The process-wide `Site` for this (site, federation) pair.

    One per site name: a site that gets a new configuration (another federation, an edited site.toml)
    replaces its old `Site`, so a long-lived worker never holds two copies of a base model.
    """
    key = hashlib.sha256((site.model_dump_json() + spec.model_dump_json()).encode()).hexdigest()
    cached = _CACHE.get(site.name)
    if cached is None or cached[0] != key:
        _CACHE.pop(site.name, None)  # before building the new one: never two base models at once
        _CACHE[site.name] = (key, Site(site, spec))
    return _CACHE[site.name][1]
