"""A sequence classifier that reads its inputs as fedtune trained it: the same pooling, the same truncation.

`fedtune export --merge` copies this file into a merged classifier's folder as `modeling_fedtune.py` and names its
classes in `config.json` (`auto_map`), so plain transformers loads the merged model with `trust_remote_code=True`:

    AutoModelForSequenceClassification.from_pretrained(DIR, trust_remote_code=True)
    pipeline("text-classification", model=DIR, trust_remote_code=True)

Why code at all: transformers has no BERT classifier that reads mean pooling. Its classifiers with a pooling option
(ModernBERT, EuroBERT, UltraBERT `classifier_pooling = "mean"`) are other architectures, and XLM's
`summary_type = "mean"` averages over padding too; a stock `BertForSequenceClassification` reads the tanh [CLS]
pooler, a layer the head never saw, and gives other labels without a word. The folder's `config.json` therefore
has its own `model_type` (`fedtune-bert`): loading it without `trust_remote_code` fails loudly instead of falling
back to the stock class. The file imports only torch and transformers; the merged model does not need fedtune.

Two things the stock classes would do differently, both read from config.json:
- `fedtune_pooling`: 'mean' (over real tokens) or 'cls' (the first token's state, no tanh pooler) replaces the
  body's `pooler_output`, by the same forward hook fedtune trains with; 'last' is what decoder classifiers do.
- `fedtune_max_length`: fedtune tokenized every row with truncation to this length, but a pipeline does not
  truncate unless asked; longer inputs are cut here exactly as the tokenizer cuts them (the first tokens, then the
  `fedtune_closing_tokens` special tokens that end every row), so a long text gets the label fedtune gives it.

Export writes the base model's type on the `BASE_MODEL_TYPE` line; the rest is the same for every export.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

BASE_MODEL_TYPE = "bert"  # written by `fedtune export --merge`: the base model's `model_type`
_BaseConfig: Any = CONFIG_MAPPING[BASE_MODEL_TYPE]
_BaseClassifier: Any = getattr(transformers, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES[BASE_MODEL_TYPE])


class FedtunePooledConfig(_BaseConfig):
    """The base model's config under a model type of its own, which stock transformers does not load by mistake."""

    model_type = f"fedtune-{BASE_MODEL_TYPE}"


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """Mean over real tokens, or the first token's state: what fedtune's `install_pooling` makes the head read."""
    if pooling == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def truncation_index(attention_mask: torch.Tensor, max_length: int, closing: int) -> torch.Tensor | None:
    """Positions to keep so that every row reads as if tokenized with `truncation=True, max_length=max_length`.

    Rows are right-padded; a row with n > max_length real tokens keeps its first max_length - closing tokens and
    its last `closing` ones (the special tokens the tokenizer puts after the text). None: nothing to cut.
    """
    rows, width = attention_mask.shape
    if width <= max_length:
        return None
    lengths = attention_mask.long().sum(dim=1)
    index = torch.arange(max_length, device=attention_mask.device).repeat(rows, 1)
    long = lengths > max_length
    if closing and bool(long.any()):
        tail = lengths[long].unsqueeze(1) - closing + torch.arange(closing, device=attention_mask.device)
        index[long, max_length - closing :] = tail
    return index


class FedtunePooledForSequenceClassification(_BaseClassifier):
    """The base classifier (same weights, head, loss and outputs) reading fedtune's pooling and truncation."""

    config_class = FedtunePooledConfig

    def __init__(self, config: FedtunePooledConfig) -> None:
        super().__init__(config)
        pooling = getattr(config, "fedtune_pooling", "mean")
        if pooling not in ("mean", "cls", "last"):
            raise ValueError(f"fedtune_pooling = {pooling!r} in config.json; expected 'mean', 'cls' or 'last'")
        if pooling == "last":  # decoder classifiers read the last real token natively
            return

        def hook(_module: nn.Module, _args: tuple, kwargs: dict, output: Any) -> Any:
            output["pooler_output"] = pool(output["last_hidden_state"], kwargs.get("attention_mask"), pooling)
            return output

        getattr(self, self.base_model_prefix).register_forward_hook(hook, with_kwargs=True)

    def forward(self, input_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        max_length = getattr(self.config, "fedtune_max_length", None)
        if input_ids is not None and max_length:
            mask = kwargs.get("attention_mask")
            if mask is None:
                mask = torch.ones_like(input_ids)
            index = truncation_index(mask, int(max_length), int(getattr(self.config, "fedtune_closing_tokens", 0)))
            if index is not None:
                input_ids = input_ids.gather(1, index)
                for name in ("attention_mask", "token_type_ids"):
                    if isinstance(kwargs.get(name), torch.Tensor) and kwargs[name].dim() == 2:
                        kwargs[name] = kwargs[name].gather(1, index)
                if isinstance(kwargs.get("position_ids"), torch.Tensor):  # the cut row's positions: 0..max_length-1
                    kwargs["position_ids"] = kwargs["position_ids"][..., : int(max_length)]
        return super().forward(input_ids=input_ids, **kwargs)
