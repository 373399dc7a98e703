"""How a causal LM is prompted: the one format training, evaluation and generation share."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from fedtune.common.config import FederationSpec

PROMPT_SEPARATOR = "\n"


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, system_prompt: str | None = "") -> list[int]:
    """The token ids a prompt is trained on, and must be given in at generation time.

    A model with a chat template (an instruction-tuned LLM) reads the prompt as the user's turn, with
    `system_prompt` as the system turn ('' an empty one, None the template's default), ending where the
    assistant's answer begins: the format it was tuned on. A model without one reads the prompt and a newline.
    """
    if tokenizer.chat_template:
        turns = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
        text = tokenizer.apply_chat_template(
            [*turns, {"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt + PROMPT_SEPARATOR, add_special_tokens=False)["input_ids"]


def answer_ids(tokenizer: PreTrainedTokenizerBase, response: str) -> list[int]:
    """The token ids an answer is trained on: its text, then EOS as an id (not every tokenizer maps the string
    form back to the special token; for a chat model it ends the assistant's turn)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return tokenizer(response, add_special_tokens=False)["input_ids"] + eos


class AnswerSet:
    """The answers a task allows (`task.responses`, public like a classifier's labels), as a token trie.

    Greedy decoding then picks, at each step, the likeliest token that continues some allowed answer, so it always
    writes one of them; and exact match counts, from one teacher-forced pass, the rows that decoding would write
    (`constrain`). With answers such as banking77's 77 intent names, this is what a DP-trained model needs: it
    must learn which answer fits, not also how each is spelt.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, responses: list[str]) -> None:
        self.end = tokenizer.eos_token_id
        self.trie: dict[int, dict] = {}
        for response in responses:
            node = self.trie
            for token in answer_ids(tokenizer, response):
                node = node.setdefault(token, {})

    def allowed(self, written: list[int]) -> list[int]:
        """The tokens that continue some answer after `written` (EOS alone once no answer does)."""
        node: dict[int, dict] | None = self.trie
        for token in written:
            node = node.get(token) if node else None
        return list(node) if node else [self.end]

    def constrain(self, logits: torch.Tensor, target: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits at labelled positions (row-major, as `UpperLayers` and `tasks.evaluate` list them)
        with every token no answer continues the row's true prefix with at -inf: their argmax is what constrained
        greedy decoding writes wherever it wrote the true prefix."""
        out = torch.full_like(logits, float("-inf"))
        written: list[int] = []
        for i, (token, row) in enumerate(zip(target.tolist(), rows.tolist(), strict=True)):
            if i == 0 or row != rows[i - 1]:
                written = []
            allowed = self.allowed(written)
            out[i, allowed] = logits[i, allowed]
            written.append(token)
        return out


def answer_set(spec: FederationSpec, tokenizer: PreTrainedTokenizerBase) -> AnswerSet | None:
    """The task's allowed answers, or None where it names none (free text)."""
    return AnswerSet(tokenizer, spec.task.responses) if spec.task.responses else None
