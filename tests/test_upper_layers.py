"""Causal LM with LoRA on the top layers over cached lower-layer states (client/upper_layers.py).

The shortcut is only worth having if it trains the same model: the cached states run through the top layers must
give the full forward pass's logits and per-example losses, and a site's round must move the top layers' LoRA
only. A 4-layer Llama with a ChatML tokenizer stands in for an instruction-tuned LLM (built offline).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_tiny_llama
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

from fedtune.cli import app as cli_app
from fedtune.client.site import Site
from fedtune.client.tasks import IGNORE, encode_instructions, evaluate, per_example_loss
from fedtune.client.upper_layers import UpperLayers, evaluate_upper, first_trained_layer, lower_states, upper_loss
from fedtune.common.adapter import adapter_state
from fedtune.common.config import FederationSpec, SiteSpec
from fedtune.common.inference import Generator, generate_responses, write_card
from fedtune.common.model import BaseModelError, fingerprint_model, load_lora_model
from fedtune.common.prompts import answer_set, prompt_ids
from fedtune.common.synthetic import generate_bank_instructions

MAX_LEN = 48
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("chat-llama"), layers=4, chat=True)


def _spec(model_dir: Path, layers: int | None = 2, **training: object) -> FederationSpec:
    return FederationSpec.model_validate(
        {
            "name": "upper",
            "base_model": {"path": str(model_dir), "max_length": MAX_LEN, "fingerprint": fingerprint_model(model_dir)},
            "task": {"kind": "causal-lm"},
            "lora": {"r": 4, "alpha": 8, "target_modules": ALL_LINEAR, "layers": layers, "factors": "ab"},
            "training": {"rounds": 1, "local_steps": 12, "batch_size": 32, "optimizer": "adamw", **training},
            "privacy": {"default_epsilon_cap": 50.0},
        }
    )


def _with_active_lora(spec: FederationSpec) -> torch.nn.Module:
    """The PEFT model with B moved off zero, so that the adapter changes what the top layers compute."""
    loaded = load_lora_model(spec, seed=0)
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    loaded.model.eval()
    return loaded


def _layer(name: str) -> int:
    return int(re.search(r"layers\.(\d+)\.", name).group(1))


def test_lora_sits_on_every_target_of_the_top_layers_only(chat_llama: Path) -> None:
    model = load_lora_model(_spec(chat_llama, layers=2)).model
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {_layer(n) for n in trained} == {2, 3}
    assert {re.search(r"\.(\w+_proj)\.", n).group(1) for n in trained} == set(ALL_LINEAR)
    assert first_trained_layer(model, 2) == 2
    with pytest.raises(ValueError, match=r"lora\.layers = 5"):
        load_lora_model(_spec(chat_llama, layers=5))


def test_cached_lower_layers_give_the_full_forward_logits_and_losses(chat_llama: Path) -> None:
    loaded = _with_active_lora(_spec(chat_llama))
    model, tok = loaded.model, loaded.tokenizer
    prompts, responses = generate_bank_instructions(10, seed=3)
    data = encode_instructions(tok, prompts, responses, MAX_LEN)
    states = lower_states(model, data, 2, batch_size=3)  # batches of different lengths, trimmed differently
    upper = UpperLayers(model, 2).eval()
    ids, mask, _ = data.tensors
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        cached = upper.lm_head(upper.hidden(states.tensors[0], mask))
        real = mask.bool()
        assert torch.allclose(full[real], cached[real], atol=1e-4), (full[real] - cached[real]).abs().max()
        expected = per_example_loss(model, data.tensors, "causal-lm")
        assert torch.allclose(upper_loss(upper, states.tensors), expected, atol=1e-5)
        # a row's loss does not depend on the rows it is batched with
        alone = torch.cat([upper_loss(upper, tuple(t[i : i + 1] for t in states.tensors)) for i in range(3)])
        assert torch.allclose(alone, expected[:3], atol=1e-5)


def test_vocabulary_projection_runs_only_at_response_positions(chat_llama: Path) -> None:
    loaded = _with_active_lora(_spec(chat_llama))
    prompts, _ = generate_bank_instructions(6, seed=4)
    data = encode_instructions(loaded.tokenizer, prompts, ["card arrival"] * 6, MAX_LEN)  # short answers
    states = lower_states(loaded.model, data, 2)
    upper = UpperLayers(loaded.model, 2)
    rows: list[int] = []
    handle = upper.lm_head.register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[0]))
    with torch.no_grad():
        upper_loss(upper, states.tensors)
    handle.remove()
    labelled = int((data.tensors[2][:, 1:] != IGNORE).sum())
    assert rows == [labelled] and labelled < int(data.tensors[1].sum()) / 3


def test_exact_match_counts_the_rows_greedy_decoding_would_write(chat_llama: Path) -> None:
    """Rows labelled with the model's own greedy answer count as exact, the same with its last token changed do
    not: from the full model's one teacher-forced pass and from the cached states alike."""
    loaded = _with_active_lora(_spec(chat_llama))
    model, tok = loaded.model, loaded.tokenizer
    ids, masks, labels = [], [], []
    for i, prompt in enumerate(["hi", "I lost my card", "top up please", "where is my money", "card declined", "x"]):
        p = prompt_ids(tok, prompt)
        out = model.generate(
            input_ids=torch.tensor([p]),
            attention_mask=torch.ones(1, len(p), dtype=torch.long),
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        answer = out[0, len(p) :].tolist()
        if i % 2:
            answer[-1] = (answer[-1] + 1) % len(tok)  # not what greedy decoding writes there
        pad = MAX_LEN - len(p) - len(answer)
        ids.append(p + answer + [tok.pad_token_id] * pad)
        masks.append([1] * (len(p) + len(answer)) + [0] * pad)
        labels.append([IGNORE] * len(p) + answer + [IGNORE] * pad)
    data = TensorDataset(torch.tensor(ids), torch.tensor(masks), torch.tensor(labels))
    assert evaluate(model, data, "causal-lm", batch_size=4).accuracy == pytest.approx(0.5)
    upper = UpperLayers(model, 2)
    assert evaluate_upper(upper, lower_states(model, data, 2), batch_size=4).accuracy == pytest.approx(0.5)


def test_a_chat_models_prompt_is_the_users_turn_and_only_the_answer_is_labelled(chat_llama: Path) -> None:
    tok = load_lora_model(_spec(chat_llama)).tokenizer
    rendered = tok.decode(prompt_ids(tok, "I lost my card"))
    assert rendered == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nI lost my card<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(prompt_ids(tok, "I lost my card", None)).startswith("<|im_start|>user\n")
    ids, _, labels = (
        t[0] for t in encode_instructions(tok, ["I lost my card"], ["lost_or_stolen_card"], MAX_LEN).tensors
    )
    answer = ids[labels != IGNORE]
    assert tok.decode(answer) == "lost_or_stolen_card<|im_end|>"  # the answer and the end of the turn, no more


def _site(tmp_path: Path, spec: FederationSpec, prompts: list[str], responses: list[str]) -> Site:
    train = tmp_path / "train.jsonl"
    train.write_text(
        "".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in zip(prompts, responses, strict=True))
    )
    site = SiteSpec.model_validate(
        {"name": "bank", "data": {"train": str(train)}, "state_dir": str(tmp_path / "state"), "seed": 7}
    )
    return Site(site, spec)


def test_a_dp_round_over_cached_states_trains_the_top_layers_and_lowers_heldout_loss(
    chat_llama: Path, tmp_path: Path
) -> None:
    spec = _spec(chat_llama, learning_rate=0.02, local_steps=25)
    prompts, responses = generate_bank_instructions(300, seed=5)
    site = _site(tmp_path, spec, prompts, responses)
    start = adapter_state(site.loaded.model)
    before = site.evaluate(start)
    outcome = site.train(start, "run-1", 1, 1, plaintext=False)
    assert outcome.stats.steps == 25 and outcome.spend.epsilon_after <= 50.0
    moved = [k for k, v in outcome.delta.items() if np.abs(v).max() > 0]
    assert moved and {_layer(k) for k in moved} == {2, 3}
    assert set(outcome.delta) == {k for k in start if _layer(k) >= 2}  # only the top layers' tensors travel
    after = site.evaluate(adapter_state(site.loaded.model))
    # a random 4-layer base over a 400-token vocabulary starts near uniform (perplexity ~400); 25 DP steps on
    # 240 rows took 5 to 8% off it at every learning rate tried (0.01 to 0.05)
    assert after.perplexity < 0.97 * before.perplexity, (before.perplexity, after.perplexity)
    assert after.accuracy is not None and 0.0 <= after.accuracy <= 1.0  # exact match (teacher-forced)

    # the states are kept in the site's state dir: another process of this site reads them back, not recomputes
    stored = list((tmp_path / "state" / "features").glob("*.pt"))
    assert len(stored) == 1
    again = Site(site.site, spec)
    first = site.lower_states(2)
    assert torch.equal(again.features_under("lower-layers:2")[0].tensors[0], first[0].tensors[0])


def test_batched_generation_answers_as_one_prompt_at_a_time(chat_llama: Path) -> None:
    loaded = _with_active_lora(_spec(chat_llama))
    model = loaded.model.merge_and_unload()
    prompts = ["hi", "I lost my card yesterday and need a new one", "top up", "why was my transfer declined?"]
    together = generate_responses(model, loaded.tokenizer, prompts, max_new_tokens=6, batch_size=4)
    alone = [generate_responses(model, loaded.tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert together == alone
    assert any(together)  # something was generated


def test_predict_reports_the_exact_match_of_the_answers_it_writes(chat_llama: Path, tmp_path: Path) -> None:
    spec = _spec(chat_llama)
    loaded = _with_active_lora(spec)
    adapter = tmp_path / "adapter"
    loaded.model.save_pretrained(str(adapter))
    write_card(adapter, spec, run="r1", rounds=1, sites=[])
    prompts = ["hi", "I lost my card", "top up please", "where is my money", "card declined"]
    answers = Generator.from_dir(adapter).generate(prompts, max_new_tokens=6)
    truth = [a if i % 2 == 0 else a + " (not this)" for i, a in enumerate(answers)]  # 3 of 5 right
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"text": p, "category": t}) + "\n" for p, t in zip(prompts, truth, strict=True)))
    out = tmp_path / "preds.csv"
    args = ["predict", str(adapter), str(data), "--prompt-column", "text", "--label-column", "category"]
    result = CliRunner().invoke(cli_app, [*args, "--out", str(out), "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    assert "exact match: 0.6000 (3/5)" in result.output
    written = out.read_text().splitlines()
    assert written[0] == "text,prediction" and len(written) == 6


@pytest.mark.parametrize(
    ("targets", "layers", "where"),
    [
        (["lm_head"], 2, "outside the model's transformer layers"),  # the vocabulary projection, run per token
        (["lm_head"], None, "outside the model's transformer layers"),
        (["embed_tokens", "q_proj"], None, "outside the model's transformer layers"),  # frozen weights would travel
    ],
)
def test_lora_outside_the_trained_layers_is_refused_before_any_row(
    chat_llama: Path, targets: list[str], layers: int | None, where: str
) -> None:
    """Review round 5: `lm_head` as a target put LoRA on the vocabulary projection, which runs on the flattened
    response tokens, so Opacus clipped each token (one row moved the update by 21 x C); `embed_tokens` made the
    adapter carry the frozen embedding matrix, which a server could then overwrite."""
    spec = _spec(chat_llama, layers=layers)
    spec = spec.model_copy(update={"lora": spec.lora.model_copy(update={"target_modules": targets})})
    with pytest.raises(BaseModelError, match=where):
        load_lora_model(spec)


def test_a_full_module_path_below_the_cached_layers_is_refused(chat_llama: Path) -> None:
    """PEFT matches a full module path even outside `layers_to_transform`: LoRA on layer 0, under the states a
    site caches (review round 5), which an honest federation would later read as its own."""
    spec = _spec(chat_llama, layers=2)
    targets = ["q_proj", "model.layers.0.self_attn.q_proj"]
    spec = spec.model_copy(update={"lora": spec.lora.model_copy(update={"target_modules": targets})})
    with pytest.raises(BaseModelError, match=r"below the top lora\.layers layers"):
        load_lora_model(spec)


def test_the_adapter_never_carries_base_weights(chat_llama: Path) -> None:
    state = adapter_state(load_lora_model(_spec(chat_llama)).model)
    assert state and all("lora_" in name for name in state)


ANSWERS = ["card_arrival", "lost_or_stolen_card", "top_up_failed", "exchange_rate", "card_not_working"]


def test_answers_are_the_task_s_and_exact_match_counts_what_constrained_decoding_writes(chat_llama: Path) -> None:
    """With `task.responses`, greedy decoding writes one of them whatever the model prefers; teacher-forced exact
    match (full model and cached states) counts exactly the rows it writes right."""
    spec = _spec(chat_llama)
    spec = spec.model_copy(update={"task": spec.task.model_copy(update={"responses": ANSWERS})})
    loaded = _with_active_lora(spec)
    model, tok = loaded.model, loaded.tokenizer
    answers = answer_set(spec, tok)
    prompts = ["hi", "I lost my card", "top up please", "where is my money", "card declined", "rate?"]
    written = generate_responses(model, tok, prompts, max_new_tokens=16, answers=answers)
    assert set(written) <= set(ANSWERS)
    free = generate_responses(model, tok, prompts, max_new_tokens=16)
    assert not set(free) <= set(ANSWERS)  # the random model's own answers are not intents
    truth = [w if i % 2 == 0 else next(a for a in ANSWERS if a != w) for i, w in enumerate(written)]
    data = encode_instructions(tok, prompts, truth, MAX_LEN)
    assert evaluate(model, data, "causal-lm", batch_size=4, answers=answers).accuracy == pytest.approx(0.5)
    upper = UpperLayers(model, 2)
    held = lower_states(model, data, 2)
    assert evaluate_upper(upper, held, batch_size=4, answers=answers).accuracy == pytest.approx(0.5)
    assert evaluate_upper(upper, held, batch_size=4).accuracy == 0.0  # unconstrained, it writes none of them


def test_responses_belong_to_a_causal_lm_task() -> None:
    with pytest.raises(ValueError, match="only meaningful for kind = 'causal-lm'"):
        FederationSpec.model_validate(
            {"base_model": {"path": "x"}, "task": {"labels": ["a", "b"], "responses": ["a", "b"]}}
        )
