"""Task-specific encoding, loss and metrics: classification and causal LM.

Everything the trainer needs to know about a task lives here, so the DP loop
itself is task-agnostic. Each batch is a tuple of fixed-length tensors (no
ragged collate), which lets Opacus build correctly-shaped empty batches when
Poisson sampling draws nobody.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch.utils.data import DataLoader, TensorDataset
from transformers import PreTrainedTokenizerBase

IGNORE = -100


def encode_classification(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], labels: list[int], max_length: int
) -> TensorDataset:
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return TensorDataset(enc["input_ids"], enc["attention_mask"], torch.tensor(labels, dtype=torch.long))


def encode_instructions(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], responses: list[str], max_length: int
) -> TensorDataset:
    """Prompt and response in one sequence; only response tokens carry labels."""
    eos = tokenizer.eos_token or ""
    ids, masks, labels = [], [], []
    for prompt, response in zip(prompts, responses, strict=True):
        p = tokenizer(prompt + "\n", add_special_tokens=False)["input_ids"]
        r = tokenizer(response + eos, add_special_tokens=False)["input_ids"]
        seq = (p + r)[:max_length]
        lab = ([IGNORE] * len(p) + r)[:max_length]
        pad = max_length - len(seq)
        ids.append(seq + [tokenizer.pad_token_id] * pad)
        masks.append([1] * len(seq) + [0] * pad)
        labels.append(lab + [IGNORE] * pad)
    return TensorDataset(torch.tensor(ids), torch.tensor(masks), torch.tensor(labels))


def per_example_loss(model: PeftModel, batch: tuple[torch.Tensor, ...], kind: str) -> torch.Tensor:
    """One loss value per example (see `_losses_and_logits`)."""
    return _losses_and_logits(model, batch, kind)[0]


def _losses_and_logits(
    model: PeftModel, batch: tuple[torch.Tensor, ...], kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example losses and the logits they came from.

    For causal LM the token losses are averaged *within* each sequence first:
    a per-token mean over the batch would let long sequences dominate and
    break the per-sample gradient that DP-SGD clips.
    """
    input_ids, attention_mask, labels = batch
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    if kind == "classification":
        return F.cross_entropy(logits, labels, reduction="none"), logits
    shifted = logits[:, :-1, :]
    target = labels[:, 1:]
    token_loss = F.cross_entropy(
        shifted.reshape(-1, shifted.size(-1)), target.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(target.shape)
    counted = (target != IGNORE).float()
    return (token_loss * counted).sum(dim=1) / counted.sum(dim=1).clamp(min=1.0), logits


@dataclass(frozen=True)
class EvalResult:
    num_examples: int
    loss: float
    accuracy: float | None  # classification only
    perplexity: float | None  # causal LM only

    def as_metrics(self) -> dict[str, float]:
        metrics = {"num-examples": float(self.num_examples), "eval-loss": self.loss}
        if self.accuracy is not None:
            metrics["eval-accuracy"] = self.accuracy
        if self.perplexity is not None:
            metrics["eval-perplexity"] = self.perplexity
        return metrics


@torch.no_grad()
def evaluate(model: PeftModel, data: TensorDataset, kind: str, batch_size: int = 64) -> EvalResult:
    was_training = model.training
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    device = next(model.parameters()).device
    for batch in DataLoader(data, batch_size=batch_size):
        batch = tuple(t.to(device) for t in batch)
        losses, logits = _losses_and_logits(model, batch, kind)
        total_loss += float(losses.sum())
        n += len(losses)
        if kind == "classification":
            correct += int((logits.argmax(-1) == batch[2]).sum())
    model.train(was_training)
    mean_loss = total_loss / max(n, 1)
    if kind == "classification":
        return EvalResult(n, mean_loss, correct / max(n, 1), None)
    return EvalResult(n, mean_loss, None, math.exp(min(mean_loss, 50.0)))
