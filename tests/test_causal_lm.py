"""The generative (causal-LM) task end to end, on a tiny Llama-style model built offline from a config.

Why a home-made model: the path must work with any local Hugging Face causal-LM checkpoint directory, and the
tests may download nothing. A 2-layer Llama with a byte-level BPE tokenizer trained in memory on the synthetic
instruction texts, saved with `save_pretrained`, is such a directory: `AutoModelForCausalLM` and `AutoTokenizer`
load it exactly as they would a real checkpoint, and one DP round on it takes well under a second.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedtune.client.tasks import IGNORE, encode_instructions, evaluate, per_example_loss
from fedtune.client.trainer import DPSettings, dp_sgd
from fedtune.common.adapter import adapter_state
from fedtune.common.config import FederationSpec
from fedtune.common.inference import generate_responses
from fedtune.common.model import load_lora_model
from fedtune.common.prompts import prompt_ids
from fedtune.common.synthetic import generate_bank_instructions

MAX_LEN = 48


def _spec(model_dir: Path, **training: object) -> FederationSpec:
    return FederationSpec.model_validate(
        {
            "name": "tiny-clm",
            "base_model": {"path": str(model_dir), "max_length": MAX_LEN},
            "task": {"kind": "causal-lm"},
            "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
            "training": {"rounds": 1, "local_steps": 10, "batch_size": 16, "min_sites": 2, **training},
            "privacy": {"default_epsilon_cap": 50.0},
        }
    )


def test_checkpoint_dir_loads_with_auto_classes(tiny_llama: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    assert tok.eos_token == "</s>" and tok.pad_token_id is not None
    assert model.config.model_type == "llama"
    assert tok.decode(tok("I lost my card")["input_ids"]) == "I lost my card"


def test_labels_cover_only_the_response_and_its_eos(tiny_llama: Path) -> None:
    loaded = load_lora_model(_spec(tiny_llama))
    tok = loaded.tokenizer
    prompt, response = "I lost my card yesterday", "Your card is now frozen."
    ids, mask, labels = (t[0] for t in encode_instructions(tok, [prompt], [response], MAX_LEN).tensors)
    n_prompt = len(prompt_ids(tok, prompt))
    n_resp = len(tok(response, add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert (labels[:n_prompt] == IGNORE).all()
    assert torch.equal(labels[n_prompt : n_prompt + n_resp], ids[n_prompt : n_prompt + n_resp])
    assert int(labels[n_prompt + n_resp - 1]) == tok.eos_token_id
    assert (labels[n_prompt + n_resp :] == IGNORE).all()  # padding carries no loss
    assert int(mask.sum()) == n_prompt + n_resp


def test_overlong_prompt_is_cut_at_its_start_so_the_response_keeps_its_labels(tiny_llama: Path) -> None:
    tok = load_lora_model(_spec(tiny_llama)).tokenizer
    prompt = " ".join(["please check my account balance"] * 40)
    _, _, labels = (t[0] for t in encode_instructions(tok, [prompt], ["Done."], MAX_LEN).tensors)
    n_resp = len(tok("Done.", add_special_tokens=False)["input_ids"]) + 1
    assert int((labels != IGNORE).sum()) == n_resp


def test_per_sequence_loss_weighs_a_long_and_a_short_response_equally(tiny_llama: Path) -> None:
    """Each example's loss is its own mean token NLL, independent of length and of what it is batched with.

    That is what makes the per-sample gradient DP-SGD clips a property of one record; a token-level mean over
    the batch would give the long sequence 10x the weight of the short one.
    """
    loaded = load_lora_model(_spec(tiny_llama))
    model, tok = loaded.model, loaded.tokenizer
    model.eval()
    prompts = ["What is my balance", "I want to close my account"]
    responses = ["Under Accounts.", " ".join(["You can close the account under Settings."] * 3)]
    batch = encode_instructions(tok, prompts, responses, MAX_LEN).tensors
    with torch.no_grad():
        together = per_example_loss(model, batch, "causal-lm")
        alone = [per_example_loss(model, tuple(t[i : i + 1] for t in batch), "causal-lm") for i in range(2)]
    assert torch.allclose(together, torch.cat(alone), atol=1e-5)

    counts = (batch[2][:, 1:] != IGNORE).sum(dim=1).float()
    assert counts[1] > 3 * counts[0]  # really a long and a short sequence
    token_weighted = float((together * counts).sum() / counts.sum())
    assert float(together.mean()) == pytest.approx(float(together.sum()) / 2)
    assert abs(float(together.mean()) - token_weighted) > 1e-4  # the two weightings do differ here


def test_heldout_perplexity_is_exp_of_token_mean_nll(tiny_llama: Path) -> None:
    loaded = load_lora_model(_spec(tiny_llama))
    prompts, responses = generate_bank_instructions(12, seed=5)
    data = encode_instructions(loaded.tokenizer, prompts, responses, MAX_LEN)
    result = evaluate(loaded.model, data, "causal-lm", batch_size=5)
    assert result.accuracy == 0.0 and result.num_examples == 12  # exact match: a random model writes no answer
    assert result.perplexity == pytest.approx(math.exp(result.loss), rel=1e-6)
    # An untrained model over a ~400-token vocabulary is close to uniform.
    assert 100 < result.perplexity < 1000


def test_one_dp_round_lowers_heldout_perplexity(tiny_llama: Path) -> None:
    """sigma = 1, clip 1, 30 Poisson steps of ~32: the signal in a mean of 32 clipped gradients beats the noise.

    The base model is random, so LoRA on q/v alone can only move it a little; a 2% drop in held-out perplexity
    is far outside what the noise produces (it comes out at 6-7% for every seed tried).
    """
    loaded = load_lora_model(_spec(tiny_llama), seed=0)
    prompts, responses = generate_bank_instructions(260, seed=1)
    train = encode_instructions(loaded.tokenizer, prompts[:200], responses[:200], MAX_LEN)
    held = encode_instructions(loaded.tokenizer, prompts[200:], responses[200:], MAX_LEN)
    before = evaluate(loaded.model, held, "causal-lm")
    start = adapter_state(loaded.model)
    settings = DPSettings(30, 32, 0.05, 1.0, 1.0, "adamw")
    result = dp_sgd(loaded.model, train, lambda m, b: per_example_loss(m, b, "causal-lm"), settings, seed=0)
    after = evaluate(loaded.model, held, "causal-lm")
    assert result.steps == 30
    moved = [k for k, v in adapter_state(loaded.model).items() if not np.array_equal(v, start[k])]
    assert moved and all("lora_B" in k for k in moved)  # only the adapter moves, and under FFA-LoRA only B
    assert after.perplexity < 0.98 * before.perplexity, (before.perplexity, after.perplexity)


def _write_jsonl(path: Path, prompts: list[str], responses: list[str]) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for p, r in zip(prompts, responses, strict=True):
            fh.write(json.dumps({"prompt": p, "response": r}) + "\n")
    return path


@pytest.mark.slow
def test_secure_two_site_federation_exports_an_adapter_that_merges_and_generates(
    tiny_llama: Path, tmp_path: Path
) -> None:
    from fedtune.server.demo import site_specs
    from fedtune.server.simulation import simulate

    prompts, responses = generate_bank_instructions(240, seed=2)
    files = [
        _write_jsonl(tmp_path / f"site-{i}.jsonl", prompts[i * 120 : (i + 1) * 120], responses[i * 120 : (i + 1) * 120])
        for i in range(2)
    ]
    spec = _spec(tiny_llama, rounds=2, local_steps=15, batch_size=24, optimizer="adamw", learning_rate=0.05)
    assert spec.secagg.enabled
    result = simulate(spec, site_specs(files, tmp_path), out_dir=tmp_path / "runs", parallel_sites=2)

    assert len(result.rounds) == 3  # round 0 (base) + 2 training rounds
    for report in result.rounds[1:]:
        assert report.update is not None and report.update.mean_delta is not None, report.update
        assert {s.site for s in report.update.sites.values()} == {"site-1", "site-2"}
    final = result.rounds[-1]
    assert {e.site for e in final.evals.values()} == {"site-1", "site-2"}
    assert all(e.accuracy is not None and math.isfinite(e.loss) for e in final.evals.values())
    assert final.weighted_loss < result.rounds[0].weighted_loss  # held-out NLL (log perplexity) went down

    cfg = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    merged = PeftModel.from_pretrained(base, str(result.adapter_dir)).merge_and_unload()
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    merged.eval()
    ids = torch.tensor([prompt_ids(tok, "I lost my card yesterday")])
    out = merged.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]  # new tokens were produced
    [text] = generate_responses(merged, tok, ["I lost my card yesterday"], max_new_tokens=8)
    assert text == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
