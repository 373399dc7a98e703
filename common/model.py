"""Base model loading, fingerprinting and LoRA wrapping.

The base model never travels: every site loads it from its own disk, and the
fingerprint proves that all of them (and the server) hold the same weights.
An adapter trained against other weights would be meaningless when summed.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from fedtune.common.config import FederationSpec
from fedtune.common.pooling import classifier_head, install_pooling, pooled_features

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class BaseModelError(ValueError):
    """The base model directory is missing, unreadable, or not the federation's model."""


def fingerprint_model(path: Path) -> str:
    """SHA-256 over the safetensors weight files, in name order.

    Hashing the weights rather than the config means a re-saved config or a
    different tokenizer file does not break the match, but any changed weight does.
    """
    files = _weight_files(Path(path))
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _weight_files(path: Path) -> list[Path]:
    if not path.is_dir():
        raise BaseModelError(f"{path}: base model directory not found")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise BaseModelError(
            f"{path}: no *.safetensors weights found; save the model with "
            "`model.save_pretrained(dir, safe_serialization=True)`"
        )
    return files


def check_base_model_dir(path: Path) -> None:
    """The directory is there with a config and safetensors weights: a check in milliseconds, so that a command
    can refuse a wrong path before it writes anything or starts a process (fingerprinting reads every weight)."""
    _weight_files(Path(path))
    if not (Path(path) / "config.json").is_file():
        raise BaseModelError(f"{path}: no config.json; point base_model.path at a Hugging Face model folder")


def verify_fingerprint(spec: FederationSpec) -> str:
    """Refuse a local base model whose weights differ from the federation's."""
    actual = fingerprint_model(spec.base_model.path)
    expected = spec.base_model.fingerprint
    if expected and actual != expected:
        raise BaseModelError(
            f"{spec.base_model.path}: base model fingerprint {actual[:16]}... does not match the "
            f"federation's {expected[:16]}...; install the exact checkpoint the operator named "
            "(compare with `fedtune fingerprint DIR`)"
        )
    return actual


@dataclass
class LoadedModel:
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase


def _peft_config(spec: FederationSpec, num_layers: int) -> LoraConfig:
    """LoRA as the federation names it; `lora.layers` = k puts it on the top k of the model's `num_layers`."""
    task_type = TaskType.SEQ_CLS if spec.task.kind == "classification" else TaskType.CAUSAL_LM
    k = spec.lora.layers
    if k is not None and k > num_layers:
        raise BaseModelError(f"lora.layers = {k}, but {spec.base_model.path} has {num_layers} layers")
    return LoraConfig(
        task_type=task_type,
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=list(spec.lora.target_modules),
        layers_to_transform=None if k is None else list(range(num_layers - k, num_layers)),
    )


_BLOCK = re.compile(r"\.(?:layers|layer|h|blocks)\.(\d+)\.")  # a transformer block: `model.layers.3.`


def _check_lora_placement(model: PeftModel, spec: FederationSpec) -> None:
    """LoRA only inside the model's transformer layers, and with `lora.layers` = k only in the top k.

    PEFT matches a target that is a module's full name even outside `layers_to_transform`, and places LoRA on any
    module named, so the server's `target_modules` alone could put it on the vocabulary projection (which runs on
    a flattened list of response tokens: DP-SGD would clip per token, review round 5), on the embeddings (whose
    frozen weights would then travel in the adapter), or below the layers whose inputs a site caches.
    """
    total = model.get_base_model().config.num_hidden_layers
    first = 0 if spec.lora.layers is None else total - spec.lora.layers
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        block = _BLOCK.search(name)
        if block is None or int(block.group(1)) < first:
            where = "below the top lora.layers layers" if block else "outside the model's transformer layers"
            raise BaseModelError(
                f"lora.target_modules {spec.lora.target_modules} put LoRA on {name}, {where}; name projections "
                "inside the layers (e.g. q_proj, v_proj), where DP-SGD clips per row"
            )


def load_base_model(spec: FederationSpec) -> PreTrainedModel:
    """The base model as the federation uses it: for classification, with the task's pooling installed."""
    path = spec.base_model.path
    if not (Path(path) / "config.json").is_file():
        raise BaseModelError(f"{path}: no config.json; point base_model.path at a Hugging Face model folder")
    hf_logging.set_verbosity_error()  # the fresh classifier head warning is expected, not news
    hf_logging.disable_progress_bar()
    if spec.task.kind == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(spec.task.labels),
            id2label=dict(enumerate(spec.task.labels)),
            label2id={name: i for i, name in enumerate(spec.task.labels)},
        )
        try:
            install_pooling(model, spec.task.pooling)
        except ValueError as exc:
            raise BaseModelError(f"{path}: {exc}") from None
        return model
    return AutoModelForCausalLM.from_pretrained(path)


def load_tokenizer(spec: FederationSpec) -> PreTrainedTokenizerBase:
    """The tokenizer of `base_model.path`; fedtune runs no code from a model folder.

    `trust_remote_code=False` says so: a merged export's config names its own modeling file, and transformers
    would otherwise stop to ask whether to run it (it then reads the plain tokenizer config, as wanted here).
    """
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model.path, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_lora_model(spec: FederationSpec, seed: int | None = None) -> LoadedModel:
    """Base model + fresh LoRA adapter (and, for classification, a trainable head).

    `seed` makes the fresh adapter reproducible; only the server's initial
    adapter matters, since sites overwrite theirs with the global one.
    """
    if seed is not None:
        torch.manual_seed(seed)
    base = load_base_model(spec)
    positions = getattr(base.config, "max_position_embeddings", None) or getattr(base.config, "n_positions", None)
    if positions and spec.base_model.max_length > positions:  # learned positions fail only on rows that long
        raise BaseModelError(
            f"base_model.max_length = {spec.base_model.max_length} is past the {positions} positions of "
            f"{spec.base_model.path}; set it to at most {positions}"
        )
    try:
        model = get_peft_model(base, _peft_config(spec, base.config.num_hidden_layers))
    except ValueError as exc:
        raise BaseModelError(
            f"lora.target_modules {spec.lora.target_modules} do not fit {spec.base_model.path}: {exc}"
        ) from None
    _check_lora_placement(model, spec)
    if spec.task.kind == "causal-lm" and model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    tokenizer = load_tokenizer(spec)
    if spec.task.kind == "classification" and spec.task.head_init == "label-names":
        init_head_from_label_names(model, tokenizer, spec)
    if spec.lora.factors == "b":  # FFA-LoRA: A keeps the server's seeded random init on every site
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer)


@torch.no_grad()
def init_head_from_label_names(model: PeftModel, tokenizer: PreTrainedTokenizerBase, spec: FederationSpec) -> None:
    """Row c of the head = the pooled feature of label c's name, normalised to `head_init_scale`.

    Built from the federation's public label list only, so it spends no privacy budget; on banking77 this
    zero-shot head alone labels 62% of the training rows correctly, which DP training then only has to refine.
    """
    names = [label.replace("_", " ").replace("-", " ").strip() or label for label in spec.task.labels]
    enc = tokenizer(names, padding=True, truncation=True, max_length=spec.base_model.max_length, return_tensors="pt")
    hf = model.get_base_model()
    was_training = hf.training
    hf.eval()
    features = pooled_features(hf, enc["input_ids"], enc["attention_mask"]).float()
    hf.train(was_training)
    head = classifier_head(hf)
    rows = features / features.norm(dim=1, keepdim=True).clamp(min=1e-12) * spec.task.head_init_scale
    head.weight.copy_(rows.to(head.weight.dtype))
    if head.bias is not None:
        head.bias.zero_()
