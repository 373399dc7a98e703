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

from fedtune.common.pooling import pooled_features
from fedtune.common.prompts import AnswerSet, answer_ids, prompt_ids

IGNORE = -100


def encode_classification(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], labels: list[int], max_length: int
) -> TensorDataset:
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return TensorDataset(enc["input_ids"], enc["attention_mask"], torch.tensor(labels, dtype=torch.long))


def encode_instructions(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    max_length: int,
    system_prompt: str | None = "",
) -> TensorDataset:
    """Prompt and response in one sequence; only response tokens (and the closing EOS, `answer_ids`) carry labels.

    A prompt too long for `max_length` loses its
    *start*, so that the response (the only part with labels) still fits; otherwise long prompts would give
    examples with no loss at all.
    """
    ids, masks, labels = [], [], []
    for prompt, response in zip(prompts, responses, strict=True):
        p = prompt_ids(tokenizer, prompt, system_prompt)
        r = answer_ids(tokenizer, response)
        keep = max(max_length - len(r), max_length // 2)  # prompt budget; the response gets the rest
        p = p[-keep:] if len(p) > keep else p
        seq = (p + r)[:max_length]
        lab = ([IGNORE] * len(p) + r)[:max_length]
        pad = max_length - len(seq)
        ids.append(seq + [tokenizer.pad_token_id] * pad)
        masks.append([1] * len(seq) + [0] * pad)
        labels.append(lab + [IGNORE] * pad)
    return TensorDataset(torch.tensor(ids), torch.tensor(masks), torch.tensor(labels))


def trim_padding(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Cut the columns that are padding in every row of the batch (rows are right-padded).

    Rows are stored padded to `max_length` so that Opacus can build empty batches, but short texts
    such as banking queries fill a fraction of it; attention over padding is wasted work.
    """
    input_ids, attention_mask, *rest = batch
    if input_ids.dim() < 2 or input_ids.size(0) == 0:
        return batch
    length = max(1, int(attention_mask.sum(dim=1).max()))
    labels = [t[:, :length] if t.dim() == 2 else t for t in rest]
    return (input_ids[:, :length], attention_mask[:, :length], *labels)


@torch.no_grad()
def pooled_dataset(
    model: PeftModel, data: TensorDataset, *, batch_size: int = 128, device: str = "cpu"
) -> TensorDataset:
    """(features, labels): for every row the vector the classifier head reads, for the head phase.

    Rows are processed longest first in batches of similar length, so almost no padding is computed.
    """
    input_ids, attention_mask, labels = data.tensors
    if len(data) == 0:  # a site that holds out no rows (eval_fraction = 0) still trains on its features
        return TensorDataset(torch.empty(0, model.get_base_model().config.hidden_size), labels)
    was_training = model.training
    model.eval()
    order = torch.argsort(attention_mask.sum(dim=1), descending=True)
    features: torch.Tensor | None = None
    for chunk in order.split(batch_size):
        ids, mask = trim_padding((input_ids[chunk], attention_mask[chunk]))
        pooled = pooled_features(model.get_base_model(), ids.to(device), mask.to(device)).float().cpu()
        if features is None:
            features = torch.empty(len(data), pooled.size(1))
        features[chunk] = pooled
    model.train(was_training)
    if features is None:
        raise ValueError("no training rows to compute features from")
    return TensorDataset(tame_rows(features, MAX_FEATURE_NORM), labels)


# Far above any pooled feature of a real encoder (MiniLM's: 5.4 on average), and small enough that a head bounded
# by `adapter.MAX_RECEIVED_VALUE` gives finite logits on any row.
MAX_FEATURE_NORM = 1e6


def tame_rows(rows: torch.Tensor, max_norm: float | None = None) -> torch.Tensor:
    """`rows` with every row that is not finite (or, given `max_norm`, longer than it) set to zero.

    The frozen encoder runs the LoRA of the adapter the server sent, and a bounded LoRA can still overflow on rows
    with a token of the server's choosing; one such row made the head's update NaN, which the site refused after
    its spend: a membership answer. Whatever a row holds, it now gives a finite vector of its own (zero: still a
    clipped gradient of norm at most C in DP-SGD, and a finite loss when scored)."""
    flat = rows.flatten(1)
    bad = ~torch.isfinite(flat).all(dim=1)
    if max_norm is not None:
        bad |= flat.norm(dim=1) > max_norm
    if bool(bad.any()):
        rows = rows.clone()
        rows[bad] = 0.0
    return rows


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
    input_ids, attention_mask, labels = trim_padding(batch)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    if kind == "classification":
        return F.cross_entropy(logits, labels, reduction="none"), logits
    token_loss, counted = _token_losses(logits, labels)
    return token_loss.sum(dim=1) / counted.sum(dim=1).clamp(min=1.0), logits


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL at every position (0 where unlabelled) and the 0/1 mask of labelled positions."""
    shifted = logits[:, :-1, :]
    target = labels[:, 1:]
    token_loss = F.cross_entropy(
        shifted.reshape(-1, shifted.size(-1)), target.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(target.shape)
    counted = (target != IGNORE).to(token_loss.dtype)
    return token_loss * counted, counted


@dataclass(frozen=True)
class EvalResult:
    num_examples: int
    loss: float
    accuracy: float | None  # classification: accuracy; causal LM: exact match of the greedy answer
    perplexity: float | None  # causal LM only

    def as_metrics(self) -> dict[str, float]:
        metrics = {"num-examples": float(self.num_examples), "eval-loss": self.loss}
        if self.accuracy is not None:
            metrics["eval-accuracy"] = self.accuracy
        if self.perplexity is not None:
            metrics["eval-perplexity"] = self.perplexity
        return metrics


@torch.no_grad()
def evaluate(
    model: PeftModel,
    data: TensorDataset,
    kind: str,
    batch_size: int = 64,
    logit_shift: torch.Tensor | None = None,
    answers: AnswerSet | None = None,
) -> EvalResult:
    """Mean loss and accuracy (classification) or perplexity and exact match (causal LM) on held-out rows.

    `logit_shift` (classification: a site's `label_log_prior`) is added to every row's logits first.
    Held-out causal-LM loss is the mean NLL per *response token* over all pairs, so that perplexity =
    exp(loss) has its usual meaning; training still weighs sequences equally (see `_losses_and_logits`).
    Exact match is `exact_rows`'s, from the same forward pass (among `answers` where the task names them).
    """
    was_training = model.training
    model.eval()
    total_loss, correct, n, tokens = 0.0, 0, 0, 0.0
    device = next(model.parameters()).device
    for batch in DataLoader(data, batch_size=batch_size):
        batch = tuple(t.to(device) for t in trim_padding(batch))
        n += len(batch[0])
        logits = model(input_ids=batch[0], attention_mask=batch[1]).logits
        if kind == "classification":
            if logit_shift is not None:
                logits = logits + logit_shift.to(logits.device)
            total_loss += float(F.cross_entropy(logits, batch[2], reduction="sum"))
            correct += int((logits.argmax(-1) == batch[2]).sum())
        else:
            token_loss, counted = _token_losses(logits, batch[2])
            total_loss += float(token_loss.sum())
            tokens += float(counted.sum())
            at = batch[2][:, 1:] != IGNORE
            rows = at.nonzero()[:, 0]
            correct += exact_rows(logits[:, :-1][at], batch[2][:, 1:][at], rows, len(batch[0]), answers)
    model.train(was_training)
    if kind == "classification":
        return EvalResult(n, total_loss / max(n, 1), correct / max(n, 1), None)
    mean_nll = total_loss / max(tokens, 1.0)
    return EvalResult(n, mean_nll, correct / max(n, 1), math.exp(min(mean_nll, 50.0)))


def exact_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    rows: torch.Tensor,
    batch_size: int,
    answers: AnswerSet | None = None,
) -> int:
    """How many rows' answers greedy decoding would write exactly, from one teacher-forced pass.

    `logits` and `target` are at the labelled positions, `rows` the row of each. Greedy decoding writes the answer
    (and stops at its EOS) exactly when every answer token is the argmax given the answer's own prefix, so this
    counts what generation would, without generating (a row whose answer another tokenization would spell the
    same way counts as wrong here, right in `fedtune predict`). With `answers`, decoding is constrained to them.
    """
    if answers is not None:
        logits = answers.constrain(logits, target, rows)
    wrong = torch.zeros(batch_size, dtype=torch.long, device=target.device)
    wrong.index_add_(0, rows, (logits.argmax(-1) != target).long())
    answered = torch.bincount(rows, minlength=batch_size) > 0
    return int(((wrong == 0) & answered).sum())


@torch.no_grad()
def evaluate_head(
    head: torch.nn.Module, features: TensorDataset, logit_shift: torch.Tensor | None = None
) -> EvalResult:
    """`evaluate` for a classifier whose pooled features are already computed: the head's logits are the model's."""
    was_training = head.training
    head.eval()
    x, y = features.tensors
    logits = head(x.to(next(head.parameters()).device)).cpu()
    if logit_shift is not None:
        logits = logits + logit_shift
    head.train(was_training)
    loss = float(F.cross_entropy(logits, y, reduction="sum"))
    correct = int((logits.argmax(-1) == y).sum())
    n = len(y)
    return EvalResult(n, loss / max(n, 1), correct / max(n, 1), None)
