"""How a causal LM is prompted: the one format training, evaluation and generation share."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

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
