"""A merged model folder (LoRA folded into the base weights) that plain transformers reads as fedtune does.

A merged causal LM is a stock Hugging Face model: its classes compute what fedtune computed. A merged classifier
is not, on its own: fedtune's head reads the pooling the federation chose (mean over real tokens for sentence
encoders), installed as a runtime hook, and fedtune truncates every text to `base_model.max_length` tokens; a stock
`BertForSequenceClassification` reads the [CLS] pooler and a pipeline does not truncate, so both give other labels
in silence. So a merged classifier folder carries `modeling_fedtune.py` (`pooled_classifier.py`, which does both
the way fedtune does) under a `model_type` of its own, loaded with `trust_remote_code=True`; `fedtune predict` reads
the same folder with fedtune's own pooling and tokenizer call instead, and runs no code from it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
from transformers.utils import logging as hf_logging

from fedtune.common import pooled_classifier
from fedtune.common.config import FederationSpec
from fedtune.common.pooling import PoolingError, install_pooling

MODEL_CONFIG = "config.json"
MODELING_FILE = "modeling_fedtune.py"
_MODULE = MODELING_FILE.removesuffix(".py")
REDO_MERGED = "export the model again (`fedtune export RUN DIR --merge`)"
_CLOSING_TRIES = range(4)  # special tokens a tokenizer may put after the text ([SEP]; </s>; none for GPT-2)


class MergeError(ValueError):
    """The model cannot be written, or read, as a merged folder that gives fedtune's answers."""


def is_merged_dir(path: Path) -> bool:
    """A full model folder (`fedtune export --merge`), as opposed to a PEFT adapter folder."""
    return (Path(path) / MODEL_CONFIG).is_file() and not (Path(path) / "adapter_config.json").is_file()


def load_hint(spec: FederationSpec) -> str:
    """How to load a merged export with plain transformers (the export command prints it with the folder in place
    of DIR, the model card as it is)."""
    if spec.task.kind == "causal-lm":
        return 'AutoModelForCausalLM.from_pretrained("DIR"), or `fedtune predict DIR DATA`'
    return (
        'pipeline("text-classification", model="DIR", trust_remote_code=True), whose code (DIR/modeling_fedtune.py) '
        f"reads the federation's {spec.task.pooling} pooling and cuts texts at {spec.base_model.max_length} tokens as "
        "fedtune does; or `fedtune predict DIR DATA`"
    )


def closing_tokens(tokenizer: PreTrainedTokenizerBase, max_length: int) -> int:
    """How many special tokens end every tokenized row: what a cut row keeps after its first tokens.

    Found by matching the tokenizer's own `truncation=True` on a long probe text; a tokenizer that cuts some other
    way (left padding or truncation, a template with text after the special tokens) is refused, since the merged
    model could not reproduce its rows.
    """
    texts = ["a short row", " ".join(["word", "text", "card"] * max_length)]
    full = tokenizer(texts, padding=True, return_tensors="pt")
    cut = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    for closing in _CLOSING_TRIES:
        index = pooled_classifier.truncation_index(full["attention_mask"], max_length, closing)
        if index is not None and all(
            torch.equal(full[key].gather(1, index), cut[key]) for key in cut if key in full and cut[key].dim() == 2
        ):
            return closing
    raise MergeError(
        f"{type(tokenizer).__name__} does not cut long rows as [first tokens][closing special tokens] with right "
        "padding, so a merged model could not read texts as fedtune does; export the adapter (without --merge)"
    )


def save_merged(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: FederationSpec, out_dir: Path
) -> None:
    """Weights, tokenizer and (classifiers) config.json naming `modeling_fedtune.py`, which is written beside them.

    Everything that can refuse is checked before the first file is written.
    """
    out_dir = Path(out_dir)
    extra: dict[str, object] = {}
    if spec.task.kind == "classification":
        base_type = str(model.config.model_type)
        if base_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
            raise MergeError(f"transformers has no classifier for model type {base_type!r}; export the adapter")
        extra = {
            "model_type": f"fedtune-{base_type}",
            "architectures": [pooled_classifier.FedtunePooledForSequenceClassification.__name__],
            "auto_map": {
                "AutoConfig": f"{_MODULE}.{pooled_classifier.FedtunePooledConfig.__name__}",
                "AutoModelForSequenceClassification": (
                    f"{_MODULE}.{pooled_classifier.FedtunePooledForSequenceClassification.__name__}"
                ),
            },
            "fedtune_pooling": spec.task.pooling,
            "fedtune_max_length": spec.base_model.max_length,
            "fedtune_closing_tokens": closing_tokens(tokenizer, spec.base_model.max_length),
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    if not extra:
        return
    config_path = out_dir / MODEL_CONFIG
    config = json.loads(config_path.read_text(encoding="utf-8")) | extra
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out_dir / MODELING_FILE).write_text(_modeling_source(str(model.config.model_type)), encoding="utf-8")


def _modeling_source(base_type: str) -> str:
    """`pooled_classifier.py` with the base model's type on its BASE_MODEL_TYPE line."""
    source = Path(pooled_classifier.__file__).read_text(encoding="utf-8")
    line = re.compile(r'^BASE_MODEL_TYPE = "[^"]*"', flags=re.MULTILINE)
    if len(line.findall(source)) != 1:
        raise MergeError(f"{pooled_classifier.__file__}: no single BASE_MODEL_TYPE line to write")
    return line.sub(f"BASE_MODEL_TYPE = {json.dumps(base_type)}", source)


def load_merged_classifier(model_dir: Path, spec: FederationSpec) -> PreTrainedModel:
    """The merged classifier as fedtune runs it: the base architecture's stock class (no code from the folder)
    with the federation's pooling installed; callers tokenize with truncation to `base_model.max_length`."""
    path = Path(model_dir) / MODEL_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MergeError(f"{path}: unreadable ({exc}); {REDO_MERGED}") from None
    base_type = str(config.get("model_type", "")).removeprefix("fedtune-")
    if base_type not in CONFIG_MAPPING or base_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise MergeError(f"{path}: model_type {config.get('model_type')!r} is not a classifier this transformers has")
    labels = [config.get("id2label", {}).get(str(i)) for i in range(len(spec.task.labels))]
    if labels != list(spec.task.labels) or len(config.get("id2label", {})) != len(labels):
        raise MergeError(f"{path}: its labels differ from the ones in fedtune.json; {REDO_MERGED}")
    stock = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "auto_map")}
    classifier = getattr(transformers, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES[base_type])
    _quiet()
    model = classifier.from_pretrained(str(model_dir), config=CONFIG_MAPPING[base_type].from_dict(stock))
    try:
        install_pooling(model, spec.task.pooling)
    except PoolingError as exc:
        raise MergeError(f"{model_dir}: {exc}") from None
    return model


def load_merged_causal_lm(model_dir: Path) -> PreTrainedModel:
    """A merged causal LM is a stock transformers model."""
    _quiet()
    return AutoModelForCausalLM.from_pretrained(str(model_dir))


def _quiet() -> None:
    """No weight-loading progress bar or notices in `fedtune predict`'s output, as for the base model."""
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
