"""Using a trained adapter: its model card, and predictions from it.

An exported adapter directory holds PEFT's two files plus `fedtune.json`: the
federation spec it was trained under (base model and fingerprint, task,
labels, pooling, max length) and what the run spent (sites, rounds, each
site's epsilon, delta and the accountant). Loading goes through the same
`load_base_model` as training, so the pooling and label map are the ones the
federation trained with; PEFT's own `PeftModel.from_pretrained` on a bare
`AutoModelForSequenceClassification` would read the [CLS] pooler instead. A merged
export (`fedtune export --merge`, see `merged.py`) holds a full model with the same
card; `Classifier` and `Generator` read both kinds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from peft import PeftModel
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedtune.common.config import FederationSpec
from fedtune.common.merged import (
    REDO_MERGED,
    MergeError,
    is_merged_dir,
    load_hint,
    load_merged_causal_lm,
    load_merged_classifier,
)
from fedtune.common.model import load_base_model, load_tokenizer, verify_fingerprint
from fedtune.common.prompts import AnswerSet, answer_set, prompt_ids

CARD_FILE = "fedtune.json"
README_FILE = "README.md"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_REDO_ADAPTER = "export the adapter again (`fedtune export RUN DIR`)"


class AdapterDirError(ValueError):
    """The directory is not a fedtune adapter, or does not fit the base model given."""


@dataclass(frozen=True)
class SiteSpend:
    site: str
    epsilon: float  # under distributed noise: charged under the site's honest-site assumption (min_honest_sites)
    epsilon_worst: float | None = None  # distributed noise: its own noise share alone (None: not reported)


def write_card(
    out_dir: Path, spec: FederationSpec, *, run: str, rounds: int, sites: Sequence[SiteSpend], merged: bool = False
) -> None:
    """`fedtune.json` (machine-readable) and a model card README next to the PEFT files (or the merged model's)."""
    p, t = spec.privacy, spec.training
    distributed = p.noise == "distributed"
    privacy: dict = {"delta": p.target_delta, "accountant": p.accountant, "max_grad_norm": p.max_grad_norm}
    if distributed:  # both figures per site: charged under its honest-site assumption, and its own share alone
        privacy["noise"] = p.noise
        privacy["sites"] = {
            s.site: {"epsilon": s.epsilon} | ({} if s.epsilon_worst is None else {"epsilon_worst": s.epsilon_worst})
            for s in sites
        }
    else:
        privacy["sites"] = {s.site: {"epsilon": s.epsilon} for s in sites}
    card = {
        "federation": json.loads(spec.model_dump_json()),
        "run": run,
        "rounds_completed": rounds,
        "privacy": privacy,
    }
    out_dir = Path(out_dir)
    (out_dir / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    task = spec.task
    lines = [
        *_hub_metadata(spec, merged),
        f"# {spec.name}: fedtune {'merged model' if merged else 'adapter'} (run {run})",
        "",
        f"- base model: `{base_model_name(spec)}`, fingerprint `{spec.base_model.fingerprint or 'unset'}`",
        f"- task: {task.kind}" + (f", {len(task.labels)} labels, pooling `{task.pooling}`" if task.labels else ""),
        f"- training: {rounds} of {t.rounds} rounds, {_phases(spec)}, max length {spec.base_model.max_length}",
        f"- privacy: {_privacy_kind(spec)}, delta {p.target_delta:g}, accountant `{p.accountant}`, "
        f"clip {p.max_grad_norm:g}; secure aggregation {'on' if spec.secagg.enabled else 'off'}",
        "",
        *(_distributed_table(sites) if distributed else _local_table(sites)),
        "",
        f"Load with {load_hint(spec)}." if merged else "",
        "Load with `fedtune.common.inference.Classifier.from_dir(DIR)` or `fedtune predict DIR DATA.csv`: they apply",
        "the pooling and labels above. Labels, in logit order: " + ", ".join(task.labels) if task.labels else "",
    ]
    (out_dir / README_FILE).write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")


def base_model_name(spec: FederationSpec) -> str:
    """The base model's name for people and the Hugging Face Hub: the checkpoint folder's name, or the package
    folder's where the weights sit in a generic `model/` folder (the packaged all-MiniLM-L6-v2)."""
    path = Path(spec.base_model.path)
    return path.parent.name if path.name == "model" else path.name


def _hub_metadata(spec: FederationSpec, merged: bool = False) -> list[str]:
    """The model card's YAML header, as the Hugging Face Hub and `huggingface_hub.ModelCard` read it (a merged
    model is a transformers model, with the LoRA folded in)."""
    pipeline = "text-classification" if spec.task.kind == "classification" else "text-generation"
    tags = ["fedtune", "federated-learning", "differential-privacy", "lora", "peft", "secure-aggregation"]
    return [
        "---",
        f"library_name: {'transformers' if merged else 'peft'}",
        f"base_model: {base_model_name(spec)}",
        f"pipeline_tag: {pipeline}",
        "tags:",
        *[f"- {tag}" for tag in tags],
        "---",
        "",
    ]


def _privacy_kind(spec: FederationSpec) -> str:
    if spec.privacy.noise == "distributed":
        return (
            "record-level DP-SGD with distributed noise (one secure sum per step, to which each site adds a share "
            "of the step's noise)"
        )
    return "record-level DP-SGD at every site"


def _local_table(sites: Sequence[SiteSpend]) -> list[str]:
    return [
        "| site | epsilon spent (this dataset, all runs) |",
        "|---|---|",
        *[f"| {s.site} | {s.epsilon:.2f} |" for s in sites],
    ]


def _distributed_table(sites: Sequence[SiteSpend]) -> list[str]:
    """Both epsilons per site: what its ledger charged, and what its own noise share alone guarantees."""
    return [
        "| site | epsilon charged (this dataset, all runs) | epsilon, own noise share alone |",
        "|---|---|---|",
        *[
            f"| {s.site} | {s.epsilon:.2f} | {'-' if s.epsilon_worst is None else f'{s.epsilon_worst:.2f}'} |"
            for s in sites
        ],
        "",
        "Charged: what each site's ledger spent against its cap, assuming at least its `min_honest_sites` sites of "
        "every sum add their noise share honestly. Own noise share alone: its epsilon if the server colluded with "
        "every other site of the sums (- where the site did not report it).",
    ]


def _phases(spec: FederationSpec) -> str:
    head = min(spec.training.head.rounds, spec.training.rounds) if spec.task.kind == "classification" else 0
    lora = f"LoRA r={spec.lora.r} on {', '.join(spec.lora.target_modules)} (factors `{spec.lora.factors}`)"
    if head >= spec.training.rounds:
        return "all on the classifier head over frozen pooled features (LoRA left at its initial values)"
    return f"{head} on the classifier head, then {lora}" if head else lora


def read_card(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / CARD_FILE
    if not path.is_file():
        raise AdapterDirError(
            f"{adapter_dir}: no {CARD_FILE}; export the adapter with `fedtune export RUN DIR` (or use the "
            "run's adapter/ directory), which writes the label map and pooling next to the PEFT files"
        )
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterDirError(f"{path}: not valid JSON ({exc}); export the adapter again (`fedtune export`)") from None
    if not isinstance(card, dict) or not isinstance(card.get("federation"), dict):
        raise AdapterDirError(f"{path}: no federation spec inside; export the adapter again (`fedtune export`)")
    return card


def card_spec(adapter_dir: Path, kind: str, refusal: str) -> FederationSpec:
    """The federation spec in the card, which must be of task `kind` (else `refusal` says why not)."""
    try:
        spec = FederationSpec.model_validate(read_card(adapter_dir)["federation"])
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise AdapterDirError(
            f"{Path(adapter_dir) / CARD_FILE}: its federation is invalid here ({where}: {first['msg']}); export it "
            "again with this fedtune (`fedtune export`)"
        ) from None
    if spec.task.kind != kind:
        raise AdapterDirError(f"{adapter_dir}: a {spec.task.kind} adapter {refusal}")
    return spec


def check_adapter_files(adapter_dir: Path) -> None:
    """PEFT's two files are there and readable, so that a damaged download fails in one line, not in PEFT."""
    config = Path(adapter_dir) / ADAPTER_CONFIG
    if not config.is_file():
        raise AdapterDirError(f"{config}: not found; {_REDO_ADAPTER}")
    try:
        if not isinstance(json.loads(config.read_text(encoding="utf-8")), dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise AdapterDirError(f"{config}: not valid JSON ({exc}); {_REDO_ADAPTER}") from None
    check_safetensors(Path(adapter_dir) / ADAPTER_WEIGHTS, _REDO_ADAPTER)


def check_safetensors(path: Path, redo: str) -> None:
    """The file exists and its header covers it (a truncated copy fails here, naming the file)."""
    if not path.is_file():
        raise AdapterDirError(f"{path}: not found; {redo}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            fh.keys()
    except (SafetensorError, OSError) as exc:
        raise AdapterDirError(f"{path}: damaged or truncated ({exc}); {redo}") from None


def _with_adapter(adapter_dir: Path, spec: FederationSpec, base_model: Path | None) -> tuple[FederationSpec, PeftModel]:
    """The card's base model (or `base_model`, whose fingerprint must still match) with the adapter's PEFT files,
    checked whole first."""
    check_adapter_files(adapter_dir)
    if base_model is not None:
        spec = spec.model_copy(update={"base_model": spec.base_model.model_copy(update={"path": base_model})})
    verify_fingerprint(spec)
    return spec, PeftModel.from_pretrained(load_base_model(spec), str(adapter_dir))


def _merged_spec(model_dir: Path, spec: FederationSpec, base_model: Path | None) -> FederationSpec:
    """A merged folder is its own base model: its weights and tokenizer are read from it, not from the card's path.

    The card's fingerprint is of the base the adapter was trained on, not of the merged weights, so it is dropped;
    every weight file is checked to be whole instead.
    """
    if base_model is not None:
        raise AdapterDirError(f"{model_dir}: a merged model carries its own weights; drop --base-model")
    weights = sorted(Path(model_dir).glob("*.safetensors"))
    if not weights:
        raise AdapterDirError(f"{model_dir}: no *.safetensors weights; {REDO_MERGED}")
    for path in weights:
        check_safetensors(path, REDO_MERGED)
    return spec.model_copy(
        update={"base_model": spec.base_model.model_copy(update={"path": Path(model_dir), "fingerprint": None})}
    )


def label_log_prior(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """log p(label) of a site's training rows, add-one smoothed (so an unseen label is unlikely, not impossible).

    Added to a shared classifier's logits, it turns the federation's label mix into the site's own: with skewed
    sites (banks that see different intents) the shared model otherwise predicts every site's rare labels as
    often as the federation's. It is computed and used only at the site.
    """
    counts = torch.bincount(labels.long().cpu(), minlength=num_labels).double() + 1.0
    return (counts / counts.sum()).log().float()


class Prediction(NamedTuple):
    label: str
    score: float  # the model's probability of that label


class Classifier:
    """A federated classifier ready to label texts."""

    def __init__(self, spec: FederationSpec, model: torch.nn.Module, device: str = "cpu") -> None:
        self.spec, self.model, self.device = spec, model.to(device).eval(), device
        self.tokenizer = load_tokenizer(spec)
        self.labels = list(spec.task.labels)

    @classmethod
    def from_dir(cls, adapter_dir: Path, *, base_model: Path | None = None, device: str = "cpu") -> Classifier:
        """Load the base model named in the card (or `base_model`, whose fingerprint must match) plus the adapter;
        or a merged export, with the card's pooling installed on it."""
        spec = card_spec(adapter_dir, "classification", "has no labels to predict")
        if is_merged_dir(adapter_dir):
            spec = _merged_spec(adapter_dir, spec, base_model)
            try:
                return cls(spec, load_merged_classifier(adapter_dir, spec), device)
            except MergeError as exc:
                raise AdapterDirError(str(exc)) from None
        spec, model = _with_adapter(adapter_dir, spec, base_model)
        return cls(spec, model, device)

    def log_prior_of(self, labels: Sequence[str], source: str) -> torch.Tensor:
        """`label_log_prior` of a site's own training labels, given as names (`source` names them in errors)."""
        index = {name: i for i, name in enumerate(self.labels)}
        unknown = sorted({label for label in labels if label not in index})
        if unknown:
            raise AdapterDirError(
                f"{source}: label(s) {', '.join(map(repr, unknown[:5]))} are not among this adapter's "
                f"{len(self.labels)} labels; give the site's training file, with the federation's label names"
            )
        return label_log_prior(torch.tensor([index[label] for label in labels]), len(self.labels))

    @torch.no_grad()
    def predict(
        self, texts: Sequence[str], *, batch_size: int = 64, logit_shift: torch.Tensor | None = None
    ) -> list[Prediction]:
        """The label of each text with its probability under the model; `logit_shift` (a site's `log_prior_of`)
        is added to the logits first."""
        out: list[Prediction] = []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.spec.base_model.max_length,
                return_tensors="pt",
            ).to(self.device)
            logits = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            if logit_shift is not None:
                logits = logits + logit_shift.to(logits.device)
            best = logits.softmax(-1).max(-1)
            out.extend(
                Prediction(self.labels[i], float(p))
                for i, p in zip(best.indices.tolist(), best.values.tolist(), strict=True)
            )
        return out


class Generator:
    """A federated causal LM ready to answer prompts, as it was trained: same chat template, greedy decoding."""

    def __init__(self, spec: FederationSpec, model: torch.nn.Module, device: str = "cpu") -> None:
        self.spec, self.model, self.device = spec, model.to(device).eval(), device
        self.tokenizer = load_tokenizer(spec)

    @classmethod
    def from_dir(cls, adapter_dir: Path, *, base_model: Path | None = None, device: str = "cpu") -> Generator:
        """The base model named in the card (or `base_model`, whose fingerprint must match) with the adapter
        merged in: generation then costs what the base model costs. A merged export is read as it is."""
        spec = card_spec(adapter_dir, "causal-lm", "does not generate text")
        if is_merged_dir(adapter_dir):
            spec = _merged_spec(adapter_dir, spec, base_model)
            return cls(spec, load_merged_causal_lm(adapter_dir), device)
        spec, model = _with_adapter(adapter_dir, spec, base_model)
        return cls(spec, model.merge_and_unload(), device)

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 32) -> list[str]:
        return generate_responses(
            self.model,
            self.tokenizer,
            list(prompts),
            system_prompt=self.spec.task.system_prompt,
            max_new_tokens=max_new_tokens,
            answers=answer_set(self.spec, self.tokenizer),
        )


@torch.no_grad()
def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    system_prompt: str | None = "",
    max_new_tokens: int = 32,
    batch_size: int = 32,
    answers: AnswerSet | None = None,
) -> list[str]:
    """Greedy answers of a (merged or adapter-wrapped) causal LM, prompted exactly as in training; with `answers`,
    each is one of them (every step picks the likeliest token that continues some answer).

    Prompts go in batches, left-padded so that every answer starts at the same column; the KV cache makes each
    new token one position's work.
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    written: list[str] = []
    for start in range(0, len(prompts), batch_size):
        rows = [prompt_ids(tokenizer, p, system_prompt) for p in prompts[start : start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        constrained = {}
        if answers is not None:
            constrained["prefix_allowed_tokens_fn"] = lambda _, ids, at=width: answers.allowed(ids[at:].tolist())
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
            **constrained,
        )
        written += [a.strip() for a in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]
    return written
