"""Causal LM with LoRA on the top layers only: the frozen layers below run once per site, DP steps only above.

With LoRA on the top k of a decoder's L layers (`lora.layers = k`), the hidden states that enter layer L-k are a
function of the base weights and the row alone: no round changes them. A site computes them once (they stay in its
state directory beside the head phase's pooled features and are never sent), and every DP step then runs k layers
instead of L, projects onto the vocabulary only at the positions that carry a label (the response), and takes
per-example gradients only of LoRA's tensors. On a 30-layer SmolLM2 with k = 4 that is what makes DP-LoRA
affordable on a CPU site. The result is the same model: `UpperLayers` over the cached states gives the logits of
a full forward pass (tests/test_upper_layers.py).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedtune.client.tasks import IGNORE, EvalResult, exact_rows, tame_rows, trim_padding
from fedtune.common.prompts import AnswerSet


class UpperLayersError(ValueError):
    """The base model is not a decoder this module can split (it needs `model.layers`, `norm` and `lm_head`)."""


def _decoder(model: PeftModel) -> nn.Module:
    lm = model.get_base_model()
    decoder = getattr(lm, "model", None)
    if decoder is None or not all(hasattr(decoder, a) for a in ("layers", "norm", "rotary_emb")):
        raise UpperLayersError(
            f"{type(lm).__name__} is not a Llama-style decoder (model.layers, model.norm, rotary embeddings); "
            "unset lora.layers to train LoRA through the whole model"
        )
    return decoder


def first_trained_layer(model: PeftModel, layers: int) -> int:
    """Index of the lowest layer with LoRA when the top `layers` layers carry it."""
    total = len(_decoder(model).layers)
    if layers > total:
        raise UpperLayersError(f"lora.layers = {layers}, but the base model has {total} layers")
    return total - layers


class _Reached(Exception):
    """Raised from the first trained layer's pre-hook: the layers above need not run while caching."""


@torch.no_grad()
def lower_states(
    model: PeftModel, data: TensorDataset, first: int, *, batch_size: int = 32, device: str = "cpu"
) -> TensorDataset:
    """(hidden states entering layer `first`, attention mask, labels) for every row of `data`.

    Rows run longest first in batches of similar length, and the forward pass stops at layer `first`: the
    frozen part is computed once, and only that part.
    """
    decoder = _decoder(model)
    input_ids, attention_mask, labels = data.tensors
    states = torch.zeros(len(data), input_ids.size(1), decoder.config.hidden_size)
    captured: list[torch.Tensor] = []

    def reach(_: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise _Reached

    was_training = model.training
    model.eval()
    handle = decoder.layers[first].register_forward_pre_hook(reach, with_kwargs=True)
    try:
        order = torch.argsort(attention_mask.sum(dim=1), descending=True)
        for chunk in order.split(batch_size):
            ids, mask = trim_padding((input_ids[chunk], attention_mask[chunk]))
            with contextlib.suppress(_Reached):
                decoder(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            states[chunk, : ids.size(1)] = captured.pop().float().cpu()
    finally:
        handle.remove()
        model.train(was_training)
    return TensorDataset(tame_rows(states), attention_mask, labels)  # as pooled features (`tame_rows`)


class UpperLayers(nn.Module):
    """The layers from `first` up, the final norm and the vocabulary projection of a PEFT-wrapped decoder.

    It holds the model's own modules (LoRA included), so training it trains the model's adapter in place.
    """

    def __init__(self, model: PeftModel, first: int) -> None:
        super().__init__()
        decoder = _decoder(model)
        self.layers = nn.ModuleList(decoder.layers[first:])
        self.norm = decoder.norm
        self.rotary_emb = decoder.rotary_emb
        self.lm_head = model.get_base_model().lm_head

    def hidden(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The final normed hidden states, as the full model computes them from these layer inputs.

        The mask is causal and hides padding keys, additive so that eager and SDPA attention read it alike; rows
        are right-padded, so every query sees at least its first token.
        """
        length = states.size(1)
        positions = torch.arange(length, device=states.device).unsqueeze(0)
        causal = torch.ones(length, length, dtype=torch.bool, device=states.device).tril()
        allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
        mask = torch.zeros(allowed.shape, dtype=states.dtype, device=states.device)
        mask.masked_fill_(~allowed, torch.finfo(states.dtype).min)
        rotary = self.rotary_emb(states, position_ids=positions)
        hidden = states
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
        return self.norm(hidden)

    def forward(
        self, states: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits and targets at every labelled position, and the row each belongs to.

        Only those positions are projected onto the vocabulary (a response of a few tokens, not the whole row).
        """
        hidden = self.hidden(states, attention_mask)[:, :-1]
        target = labels[:, 1:]
        at = target != IGNORE
        return self.lm_head(hidden[at]).float(), target[at], at.nonzero()[:, 0]


def upper_loss(module: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """One loss per row: the mean NLL of its response tokens (rows weigh equally, as DP-SGD clips per row)."""
    states, mask, labels = trim_padding(batch)
    logits, target, rows = module(states, mask, labels)
    token_loss = F.cross_entropy(logits, target, reduction="none")
    total = torch.zeros(states.size(0), dtype=token_loss.dtype, device=token_loss.device)
    counts = torch.bincount(rows, minlength=states.size(0)).clamp(min=1)
    return total.index_add(0, rows, token_loss) / counts


@torch.no_grad()
def evaluate_upper(
    module: UpperLayers, data: TensorDataset, batch_size: int = 64, answers: AnswerSet | None = None
) -> EvalResult:
    """`tasks.evaluate` for a causal LM from cached lower states: mean NLL per response token, perplexity, and
    the exact match of the greedy answer (`tasks.exact_rows`)."""
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    nll, tokens, correct = 0.0, 0, 0
    for batch in DataLoader(data, batch_size=batch_size):
        states, mask, labels = (t.to(device) for t in trim_padding(batch))
        logits, target, rows = module(states, mask, labels)
        nll += float(F.cross_entropy(logits, target, reduction="sum"))
        tokens += target.numel()
        correct += exact_rows(logits, target, rows, states.size(0), answers)
    module.train(was_training)
    mean = nll / max(tokens, 1)
    return EvalResult(len(data), mean, correct / max(len(data), 1), math.exp(min(mean, 50.0)))
