"""Generative benchmark: banking77 as instruction -> intent name on a real instruction-tuned LLM, exact match.

The same three banks as benchmarks/utility.py (Dirichlet(0.5) split of train.csv, split seed 0, each bank's own 20%
held out), each row a chat prompt (the customer's message) and the answer (the intent's name), on the packaged
SmolLM2-135M-Instruct (Llama, 30 layers) with the generative recipe (server/demo.py: LoRA on the top layers over
the cached lower layers). Rows, each over the seeds:

* zero-shot: the base model;
* centralised, non-private: the same LoRA, AdamW on all banks' rows, same steps and batch, no clipping or noise;
* centralised DP: all banks' rows at one production site (`Site.train`, ledger, Opacus) at the run's epsilon;
* each bank alone, DP: the production site on its own rows only;
* federated DP with secure aggregation: `fedtune simulate`'s path (Flower simulation, every bank a site).

Exact match is teacher-forced (`tasks.exact_rows`: the rows whose answer greedy decoding writes exactly), from the
top layers over lower states computed once per row (`client/upper_layers.py`); `--generate N` also generates the
first N test rows with each federated adapter (`fedtune predict`'s path) and reports that exact match beside it.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/generative.py --seeds 0 --threads 1
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from utility import Scenario, _train_site, load_banking77

from common import data_dir, set_threads, write_outputs
from fedtune.client.site import Site
from fedtune.client.tasks import encode_instructions
from fedtune.client.upper_layers import UpperLayers, evaluate_upper, first_trained_layer, lower_states, upper_loss
from fedtune.common.adapter import AdapterState, adapter_state, load_adapter_state
from fedtune.common.config import FederationSpec
from fedtune.common.inference import generate_responses
from fedtune.common.model import load_lora_model
from fedtune.common.prompts import answer_set
from fedtune.server.demo import generative_federation, site_specs
from fedtune.server.simulate_cli import resolve_base_model
from fedtune.server.simulation import simulate

TRAINING_KEYS = ("rounds", "local_steps", "batch_size", "optimizer", "learning_rate")
CONFIGS = ("zero-shot", "central-nonprivate", "central-dp", "alone", "federated")


@dataclass
class Row:
    config: str
    label: str
    runs: list[dict[str, Any]] = field(default_factory=list)


class Scorer:
    """Every bank's held-out rows and the test rows, their lower states computed once, scored for any adapter."""

    def __init__(self, scenario: Scenario, spec: FederationSpec, test_rows: int | None) -> None:
        self.loaded = load_lora_model(spec, seed=spec.training.seed)
        self.spec, self.labels = spec, scenario.labels
        if spec.lora.layers is None:
            raise SystemExit("the generative recipe trains the top lora.layers over cached states; set lora.layers")
        self.first = first_trained_layer(self.loaded.model, spec.lora.layers)
        self.initial: AdapterState = adapter_state(self.loaded.model)
        self.answer_set = answer_set(spec, self.loaded.tokenizer)  # exact match among the task's answers
        sets = {s.name: s.eval for s in scenario.sites}
        if scenario.test is not None:
            sets["test"] = scenario.test.subset(range(min(test_rows or len(scenario.test), len(scenario.test))))
        self.texts = {name: d.texts for name, d in sets.items()}
        self.answers = {name: [self.labels[i] for i in d.labels] for name, d in sets.items()}
        self.states = {name: self._states(self.texts[name], self.answers[name]) for name in sets}
        self._pooled_train = (
            [t for s in scenario.sites for t in s.train.texts],
            [self.labels[y] for s in scenario.sites for y in s.train.labels],
        )

    def _states(self, texts: list[str], answers: list[str]) -> TensorDataset:
        tok, system = self.loaded.tokenizer, self.spec.task.system_prompt
        data = encode_instructions(tok, texts, answers, self.spec.base_model.max_length, system)
        return lower_states(self.loaded.model, data, self.first)

    @cached_property
    def train_states(self) -> TensorDataset:
        """Every bank's training rows, for the non-private row: computed once, not once per seed."""
        return self._states(*self._pooled_train)

    def __call__(self, state: AdapterState, names: Sequence[str] | None = None) -> dict[str, float]:
        load_adapter_state(self.loaded.model, state)
        upper = UpperLayers(self.loaded.model, self.first)
        return {
            n: float(evaluate_upper(upper, self.states[n], answers=self.answer_set).accuracy or 0.0)
            for n in names or self.states
        }

    def generated(self, state: AdapterState, rows: int) -> float:
        """Exact match of real greedy generation on the first `rows` test rows (what `fedtune predict` does)."""
        load_adapter_state(self.loaded.model, state)
        self.loaded.model.eval()
        texts, answers = self.texts["test"][:rows], self.answers["test"][:rows]
        out = generate_responses(
            self.loaded.model,
            self.loaded.tokenizer,
            texts,
            system_prompt=self.spec.task.system_prompt,
            answers=self.answer_set,
        )
        return sum(a == b for a, b in zip(out, answers, strict=True)) / max(len(answers), 1)


def _write_sites(scenario: Scenario, work: Path) -> dict[str, Path]:
    work.mkdir(parents=True, exist_ok=True)
    files = {}
    for s in scenario.sites:
        path = work / f"{s.name}.csv"
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["prompt", "response"])
            writer.writerows([t, scenario.labels[y]] for t, y in zip(s.train.texts, s.train.labels, strict=True))
        files[s.name] = path
    pooled = work / "all-banks.csv"
    with pooled.open("w", newline="", encoding="utf-8") as fh:
        fh.write("prompt,response\n")
        for s in scenario.sites:
            fh.write(files[s.name].read_text(encoding="utf-8").split("\n", 1)[1])
    files["all"] = pooled
    return files


def _sites(files: dict[str, Path], names: Sequence[str], work: Path, epsilon: float, seed: int) -> list:
    specs = site_specs(
        [files[n] for n in names],
        work,
        epsilon_cap=epsilon,
        seed=seed,
        prompt_column="prompt",
        response_column="response",
    )
    return [s.model_copy(update={"name": n}) for s, n in zip(specs, names, strict=True)]


def run_federated(
    spec: FederationSpec, files: dict, names: list[str], work: Path, eps: float, seed: int
) -> AdapterState:
    sites = _sites(files, names, work, eps, seed)
    return simulate(spec, sites, out_dir=work / "runs", parallel_sites=2).final_state


def run_site(
    spec: FederationSpec, file: Path, name: str, work: Path, eps: float, seed: int, start: AdapterState
) -> AdapterState:
    (site_spec,) = _sites({name: file}, [name], work, eps, seed)
    site = Site(site_spec, spec)
    state = _train_site(site, start, spec.training.rounds, f"{name}-{seed}")
    site.ledger.close()
    return state


def run_nonprivate(spec: FederationSpec, scorer: Scorer, seed: int) -> AdapterState:
    """Plain AdamW on every bank's rows: the same LoRA, steps and batch as the federation, no clipping, no noise."""
    torch.manual_seed(seed)
    load_adapter_state(scorer.loaded.model, scorer.initial)
    states = scorer.train_states
    upper = UpperLayers(scorer.loaded.model, scorer.first).train()
    t = spec.training
    params = [p for p in upper.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=0.0)
    for _ in range(t.rounds * t.local_steps):
        idx = torch.randint(len(states), (t.batch_size,))
        loss = upper_loss(upper, tuple(x[idx] for x in states.tensors)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return adapter_state(scorer.loaded.model)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="folder with banking77/ (default ../shared/data)")
    parser.add_argument("--base-model", default="smollm2-135m-instruct", help="directory or packaged name")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--test-rows", type=int, help="score the first N rows of test.csv (default all)")
    parser.add_argument("--generate", type=int, default=0, help="also generate the first N test rows (federated)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path(".fedtune/bench-generative"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/generative"))
    args = parser.parse_args(argv)
    set_threads(args.threads)
    started = time.monotonic()
    scenario = load_banking77(data_dir(args.data), intents=None, seed=0, max_rows=None)
    if scenario is None:
        print("banking77 not found: pass --data FOLDER (with banking77/train.csv)")
        return 2
    spec = generative_federation(resolve_base_model(args.base_model), scenario.labels)  # the 77 intent names
    names = [s.name for s in scenario.sites]
    scorer = Scorer(scenario, spec, args.test_rows)
    files = _write_sites(scenario, args.work / "data")
    labels = {
        "zero-shot": "zero-shot (the base model)",
        "central-nonprivate": "centralised LoRA, non-private",
        "central-dp": f"centralised DP ε={args.epsilon:g}",
        "alone": f"each bank alone, DP ε={args.epsilon:g}",
        "federated": f"federated DP ε={args.epsilon:g}, secure aggregation",
    }
    rows = {c: Row(c, labels[c]) for c in args.configs}
    for seed in args.seeds:
        for config in args.configs:
            t0, work = time.monotonic(), args.work / f"{config}-{seed}"
            if config == "alone":
                scores = _alone(spec, scorer, files, names, work, args.epsilon, seed)
            else:
                state = _train(config, spec, scorer, files, names, work, args.epsilon, seed)
                scores = scorer(state)
                if config == "federated" and args.generate:
                    scores["test (generated)"] = scorer.generated(state, args.generate)
            scores["wall_s"] = time.monotonic() - t0
            rows[config].runs.append({"seed": seed, **scores})
            print(json.dumps({"config": config, **rows[config].runs[-1]}), flush=True)
    payload = {
        "epsilon": args.epsilon,
        "seeds": args.seeds,
        "recipe": json.loads(spec.model_dump_json()),
        "test_rows": len(scorer.texts.get("test", [])),
        "rows": [r.__dict__ for r in rows.values()],
        "wall_s": time.monotonic() - started,
    }
    write_outputs(args.out, payload, render(payload, names))
    return 0


def _train(
    config: str,
    spec: FederationSpec,
    scorer: Scorer,
    files: dict[str, Path],
    names: list[str],
    work: Path,
    eps: float,
    seed: int,
) -> AdapterState:
    if config == "zero-shot":
        return scorer.initial
    if config == "central-nonprivate":
        return run_nonprivate(spec, scorer, seed)
    if config == "central-dp":
        return run_site(spec, files["all"], "all-banks", work, eps, seed, scorer.initial)
    return run_federated(spec, files, names, work, eps, seed)


def _alone(
    spec: FederationSpec, scorer: Scorer, files: dict[str, Path], names: list[str], work: Path, eps: float, seed: int
) -> dict[str, float]:
    """Each bank's own model on its own held-out rows; test: the mean over the banks' models."""
    out, tests = {}, []
    for name in names:
        state = run_site(spec, files[name], name, work / name, eps, seed, scorer.initial)
        scores = scorer(state, [name, "test"])
        out[name] = scores[name]
        tests.append(scores["test"])
    out["test"] = statistics.fmean(tests)
    return out


def render(payload: dict[str, Any], names: list[str]) -> str:
    columns = [*names, "test", "test (generated)", "wall_s"]
    lines = [
        "# Generative benchmark: banking77 intent names, exact match",
        "",
        f"SmolLM2-135M-Instruct, recipe {json.dumps(payload['recipe']['lora'])}, training "
        f"{json.dumps({k: payload['recipe']['training'][k] for k in TRAINING_KEYS})}; "
        f"seeds {payload['seeds']}; test: first {payload['test_rows']} rows of test.csv; exact match teacher-forced "
        "(what greedy decoding writes), 'generated': real greedy generation.",
        "",
        "| configuration | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for row in payload["rows"]:
        cells = []
        for c in columns:
            values = [r[c] for r in row["runs"] if c in r]
            if not values:
                cells.append("-")
            elif c == "wall_s":
                cells.append(f"{statistics.fmean(values):.0f}")
            else:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.fmean(values):.3f} ± {std:.3f}")
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
