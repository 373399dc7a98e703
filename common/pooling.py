"""How a sequence classifier turns token states into the one vector its head reads.

Hugging Face's BERT-family classifiers read the [CLS] token through a pooler
layer that sentence encoders such as all-MiniLM-L6-v2 never trained: their
useful output is the mean over real tokens. Rather than fork each architecture,
`install_pooling` hooks the encoder body so that its `pooler_output` is the
chosen pooling; the model's own forward, PEFT and Opacus keep working
unchanged, and `pooled_features` gives the head phase exactly what the head
reads in the full model. A hook is not saved with the weights: a merged export
carries the same pooling as code of its own (`pooled_classifier.py`, via
`merged.py`), or a stock loader would read the [CLS] pooler. Decoder
classifiers (GPT-2, Llama) already read the last real token, which is what
'last' means.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

POOLINGS = ("mean", "cls", "last")


class PoolingError(ValueError):
    """The requested pooling does not fit this model."""


def _body(model: PreTrainedModel) -> nn.Module:
    """The encoder/decoder body under a task head (`model.bert`, `model.model`, ...)."""
    body = getattr(model, model.base_model_prefix, None)
    if body is None:
        raise PoolingError(f"{type(model).__name__} has no body at `.{model.base_model_prefix}`")
    return body


def _has_pooler(model: PreTrainedModel) -> bool:
    return getattr(_body(model), "pooler", None) is not None


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def last_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The state of the last real token (right padding, as fedtune's encoders produce)."""
    last = attention_mask.long().sum(dim=1).clamp(min=1) - 1
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last]


def install_pooling(model: PreTrainedModel, pooling: str) -> None:
    """Make the classifier read `pooling` of the body's last hidden states.

    For 'mean' and 'cls' the body must have a pooler output (BERT family): a forward hook replaces it. 'last' is
    what decoder classifiers do natively, so it needs no hook there and is refused for encoders with a pooler,
    whose head would otherwise read something else.
    """
    if pooling not in POOLINGS:
        raise PoolingError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    if not _has_pooler(model):
        if pooling != "last":
            raise PoolingError(
                f"task.pooling = {pooling!r} needs an encoder with a pooler (BERT family); "
                f"{type(model).__name__} classifies from the last token: set task.pooling = 'last'"
            )
        return
    if pooling == "last":
        raise PoolingError(f"{type(model).__name__} is an encoder; use task.pooling = 'mean' or 'cls'")

    def hook(_module: nn.Module, _args: tuple, kwargs: dict, output: object) -> object:
        hidden = output["last_hidden_state"]  # type: ignore[index]
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        output["pooler_output"] = mean_pool(hidden, mask) if pooling == "mean" else hidden[:, 0]  # type: ignore[index]
        return output

    _body(model).register_forward_hook(hook, with_kwargs=True)


def classifier_head(model: PreTrainedModel) -> nn.Linear:
    """The Linear layer that maps pooled features to logits (under PEFT, its trainable copy)."""
    head = getattr(model, "classifier", None) or getattr(model, "score", None)
    saved = getattr(head, "modules_to_save", None)  # PEFT's ModulesToSaveWrapper
    if saved is not None:
        head = saved[next(iter(saved))]
    if not isinstance(head, nn.Linear):
        raise PoolingError(
            f"{type(model).__name__}'s classification head is {type(head).__name__}, not one Linear layer; "
            "the head phase (training.head.rounds) needs a linear head: set training.head.rounds = 0"
        )
    return head


@torch.no_grad()
def pooled_features(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The vectors the classifier head reads, as in the model's own forward pass (eval mode: no dropout)."""
    out = _body(model)(input_ids=input_ids, attention_mask=attention_mask)
    pooled = getattr(out, "pooler_output", None)
    if pooled is not None:
        return pooled
    return last_token(out.last_hidden_state, attention_mask)
