"""Utility benchmark: what does a site gain by joining the federation, and what does privacy cost?

Scenarios (real data, read from ../shared/data or --data; skipped with a message when absent):

* banking77: all 77 intents, all train.csv rows, 3 banks split non-IID by intent (Dirichlet 0.5); scored also on
  test.csv, which no configuration ever trains or tunes on;
* medical-abstracts: all rows, 2 hospitals split non-IID by condition (Dirichlet 0.5).

Each site holds out 20% of its rows. Every configuration trains with the federation's default recipe
(`FederationSpec()` defaults: mean pooling, label-name head init, head rounds on cached features, then FFA-LoRA;
PRV accountant), whose hyperparameters were chosen on a validation split carved from the sites' training rows
(`--validation`: each site's training rows lose another 15% to a validation set, held-out and test rows are not
touched). Configurations, each DP one for every seed (mean ± std):

* majority: each site's own most frequent training label (no model);
* frozen-feature logistic regression, non-private: the ceiling of the head on the frozen encoder;
* centralised LoRA, non-private (`--central-lora`): LoRA + head on all rows, plain minibatch SGD;
* centralised DP, eps=8: all rows at one site, the production site code (the DP upper bound for a federation);
* site alone, eps=E: each site runs the production site code (`Site.train`: ledger, sigma from its cap, Opacus)
  on its own rows only;
* federated, eps=E: `fedtune.server.simulation.simulate` (Flower's simulation engine, secure aggregation on).

Output: JSON + markdown (benchmarks/results/utility[-quick].{json,md}) and a PNG of accuracy against epsilon.
`--quick` keeps 10 intents and a few hundred rows with one seed, so that it runs in minutes on a CPU.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import (  # noqa: E402
    RESULTS_DIR,
    console,
    data_dir,
    environment,
    markdown_table,
    progress,
    quiet,
    resolve_device,
    set_threads,
    train_nonprivate,
    write_outputs,
)
from fedtune.client.site import Site  # noqa: E402
from fedtune.client.tasks import encode_classification, evaluate, evaluate_head, pooled_dataset  # noqa: E402
from fedtune.common.adapter import AdapterState, adapter_state, add_scaled, load_adapter_state  # noqa: E402
from fedtune.common.config import DataSpec, FederationSpec, SiteSpec  # noqa: E402
from fedtune.common.data import ClassificationData, read_rows, split_holdout  # noqa: E402
from fedtune.common.inference import label_log_prior  # noqa: E402
from fedtune.common.model import load_lora_model  # noqa: E402
from fedtune.common.partition import dirichlet_partition  # noqa: E402
from fedtune.common.pooling import classifier_head  # noqa: E402
from fedtune.common.synthetic import BANK_INTENTS, generate_bank_messages  # noqa: E402

HOLDOUT = 0.2
VALIDATION = 0.15

# -------------------------------------------------------------------------------------------------
# Scenarios


@dataclass
class SiteData:
    name: str
    train: ClassificationData
    eval: ClassificationData


@dataclass
class Scenario:
    name: str
    labels: list[str]
    sites: list[SiteData]
    test: ClassificationData | None = None
    note: str = ""


def _split_sites(
    name: str,
    data: ClassificationData,
    label_names: list[str],
    site_names: Sequence[str],
    *,
    seed: int,
    note: str,
    test: ClassificationData | None = None,
    validation: bool = False,
) -> Scenario:
    """Dirichlet(0.5) split into sites, each site's own 20% held out; with `validation`, 15% of the rest scored."""
    parts = dirichlet_partition(data.labels, len(site_names), alpha=0.5, seed=seed)
    sites = []
    for site_name, idx in zip(site_names, parts, strict=True):
        shard = data.subset(idx)
        train_idx, eval_idx = split_holdout(len(shard), HOLDOUT, seed=seed)
        train, held = shard.subset(train_idx), shard.subset(eval_idx)
        if validation:  # tuning never sees held-out or test rows
            fit_idx, val_idx = split_holdout(len(train), VALIDATION, seed=seed + 1)
            train, held = train.subset(fit_idx), train.subset(val_idx)
        sites.append(SiteData(site_name, train, held))
    if validation:
        test, note = None, note + ", validation split (held-out and test rows unused)"
    return Scenario(name, label_names, sites, test, note)


def _subsample(n: int, keep: int | None, seed: int) -> list[int]:
    if keep is None or keep >= n:
        return list(range(n))
    return sorted(int(i) for i in np.random.default_rng(seed).choice(n, size=keep, replace=False))


def load_banking77(
    root: Path, *, intents: int | None, seed: int, max_rows: int | None, validation: bool = False
) -> Scenario | None:
    path = root / "banking77" / "train.csv"
    if not path.is_file():
        return None
    rows = read_rows(path, ["text", "category"])
    note = "banking77 train.csv"
    if intents is not None:
        ranked = sorted(Counter(r["category"] for r in rows).items(), key=lambda kv: (-kv[1], kv[0]))
        top = {c for c, _ in ranked[:intents]}
        rows = [r for r in rows if r["category"] in top]
        note += f", {len(top)} most frequent intents"
    rows = [rows[i] for i in _subsample(len(rows), max_rows, seed)]
    names = sorted({r["category"] for r in rows})
    index = {n: i for i, n in enumerate(names)}
    note += f", {len(rows)} rows"
    test = None
    test_path = root / "banking77" / "test.csv"
    if test_path.is_file():
        test_rows = [r for r in read_rows(test_path, ["text", "category"]) if r["category"] in index]
        test = ClassificationData([r["text"] for r in test_rows], [index[r["category"]] for r in test_rows])
    data = ClassificationData([r["text"] for r in rows], [index[r["category"]] for r in rows])
    sites = ["bank-1", "bank-2", "bank-3"]
    return _split_sites("banking77", data, names, sites, seed=seed, note=note, test=test, validation=validation)


def load_medical(root: Path, *, seed: int, max_rows: int | None, validation: bool = False) -> Scenario | None:
    folder = root / "medical-abstracts"
    if not (folder / "abstracts.csv").is_file() or not (folder / "labels.csv").is_file():
        return None
    names_by_code = {
        r["condition_label"]: r["condition_name"]
        for r in read_rows(folder / "labels.csv", ["condition_label", "condition_name"])
    }
    codes = sorted(names_by_code, key=int)
    index = {c: i for i, c in enumerate(codes)}
    rows = read_rows(folder / "abstracts.csv", ["condition_label", "medical_abstract"])
    rows = [rows[i] for i in _subsample(len(rows), max_rows, seed)]
    data = ClassificationData([r["medical_abstract"] for r in rows], [index[r["condition_label"]] for r in rows])
    note = f"medical-abstracts abstracts.csv, {len(rows)} rows"
    sites = ["hospital-1", "hospital-2"]
    labels = [names_by_code[c] for c in codes]
    return _split_sites("medical-abstracts", data, labels, sites, seed=seed, note=note, validation=validation)


def synthetic_scenario(num_sites: int = 2, rows: int = 160, seed: int = 0) -> Scenario:
    """The built-in synthetic bank messages: lets tests run the benchmark with no real data present."""
    texts, labels = generate_bank_messages(rows, seed)
    test_texts, test_labels = generate_bank_messages(60, seed + 1)
    names = [f"site-{i + 1}" for i in range(num_sites)]
    data = ClassificationData(texts, labels)
    return _split_sites(
        "synthetic",
        data,
        list(BANK_INTENTS),
        names,
        seed=seed,
        note=f"synthetic bank messages, {rows} rows",
        test=ClassificationData(test_texts, test_labels),
    )


# -------------------------------------------------------------------------------------------------
# Settings and results


@dataclass
class Settings:
    base_model: Path
    max_length: int = 64
    training: dict[str, Any] = field(default_factory=dict)  # overrides of the default recipe, e.g. {"rounds": 3}
    delta: float = 1e-5
    epsilons: tuple[float, ...] = (1.0, 3.0, 8.0)
    alone_epsilons: tuple[float, ...] = (1.0, 3.0, 8.0)
    central_epsilons: tuple[float, ...] = (8.0,)
    noise_modes: tuple[str, ...] = ("local",)  # which federated rows: local noise, distributed noise, or both
    central_lora: bool = False
    seeds: tuple[int, ...] = (0, 1, 2)
    device: str = "cpu"
    parallel_sites: int | None = None
    split_seed: int = 0


@dataclass
class ConfigResult:
    key: str
    label: str
    kind: str  # "reference" | "central" | "alone" | "federated" | "distributed"
    epsilon_cap: float | None
    accuracy: dict[str, float]  # site name (own held-out rows) and "pooled": mean over seeds
    accuracy_std: dict[str, float] = field(default_factory=dict)
    test: float | None = None  # test.csv accuracy (alone: mean over sites' own models), mean over seeds
    test_std: float | None = None
    epsilon_spent: dict[str, float] = field(default_factory=dict)
    epsilon_worst: dict[str, float] = field(default_factory=dict)  # distributed: each site's own share alone
    wall_s: float = 0.0  # per seed
    runs: list[dict[str, Any]] = field(default_factory=list)  # every seed's figures
    note: str = ""


def federation_spec(settings: Settings, scenario: Scenario, epsilon_cap: float, out: Path, seed: int) -> FederationSpec:
    """The default recipe (FederationSpec defaults) on this scenario, with only what the benchmark must set."""
    training = {"min_sites": 1, "seed": seed, **settings.training}
    return FederationSpec.model_validate(
        {
            "name": f"utility-{scenario.name}",
            "base_model": {"path": str(settings.base_model), "max_length": settings.max_length},
            "task": {"kind": "classification", "labels": scenario.labels},
            "training": training,
            "privacy": {"target_delta": settings.delta, "default_epsilon_cap": epsilon_cap},
            "output_dir": str(out / "runs"),
        }
    )


def _write_csv(path: Path, data: ClassificationData, labels: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows([t, labels[y]] for t, y in zip(data.texts, data.labels, strict=True))
    return path


def _site_specs(
    names: Sequence[str], files: dict[str, tuple[Path, Path]], work: Path, cap: float, device: str, seed: int
) -> list[SiteSpec]:
    from fedtune.server.demo import site_specs

    specs = site_specs([files[n][0] for n in names], work, epsilon_cap=cap, seed=seed)
    return [
        spec.model_copy(
            update={
                "name": name,
                "data": DataSpec(train=files[name][0], eval=files[name][1]),
                "device": device,
                "peers": dict(zip(names, spec.peers.values(), strict=True)),
            }
        )
        for name, spec in zip(names, specs, strict=True)
    ]


def _pooled(acc: dict[str, float], sizes: dict[str, int]) -> float:
    total = sum(sizes[s] for s in acc)
    return sum(acc[s] * sizes[s] for s in acc) / total if total else float("nan")


# -------------------------------------------------------------------------------------------------
# Scoring


class Evaluator:
    """Every site's held-out set and the test set, tokenised once, scored for any adapter state.

    States whose encoder is the initial one (head-only training) are scored from pooled features computed once,
    which gives the same logits as the full forward pass in a fraction of the time.
    """

    def __init__(self, scenario: Scenario, spec: FederationSpec, device: str) -> None:
        self.loaded = load_lora_model(spec, seed=spec.training.seed)
        tok, max_len = self.loaded.tokenizer, spec.base_model.max_length
        self.sets = {s.name: encode_classification(tok, s.eval.texts, s.eval.labels, max_len) for s in scenario.sites}
        if scenario.test is not None:
            self.sets["test"] = encode_classification(tok, scenario.test.texts, scenario.test.labels, max_len)
        self.sizes = {s.name: len(s.eval) for s in scenario.sites}
        self.device = device
        self.initial: AdapterState = adapter_state(self.loaded.model)
        # What each site adds to a shared model's logits under task.label_prior = "site" (as `Site.evaluate` does)
        self.shifts = {
            s.name: label_log_prior(torch.tensor(s.train.labels), len(scenario.labels))
            for s in scenario.sites
            if spec.task.label_prior == "site"
        }
        self.loaded.model.to(device)
        self.features = {n: pooled_dataset(self.loaded.model, d, device=device) for n, d in self.sets.items()}

    def _encoder_unchanged(self, state: AdapterState) -> bool:
        return all(np.array_equal(v, self.initial[k]) for k, v in state.items() if "lora_" in k)

    def __call__(
        self, state: AdapterState, names: Sequence[str] | None = None, *, shared: bool = True
    ) -> dict[str, float]:
        """Accuracy of `state` on each named set. A `shared` model (trained on more than one site's label mix) is
        scored on a site's rows with that site's label prior, as the site itself scores it; test.csv never."""
        load_adapter_state(self.loaded.model, state)
        fast = self._encoder_unchanged(state)
        head = classifier_head(self.loaded.model.get_base_model())
        out = {}
        for name in names or list(self.sets):
            shift = self.shifts.get(name) if shared else None
            if fast:
                out[name] = float(evaluate_head(head, self.features[name], shift).accuracy)
            else:
                result = evaluate(self.loaded.model, self.sets[name], "classification", 256, logit_shift=shift)
                out[name] = float(result.accuracy)
        return out


def _summarise(
    key: str, label: str, kind: str, cap: float | None, runs: list[dict[str, Any]], sites: list[str], note: str = ""
) -> ConfigResult:
    def stats(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    acc, std = {}, {}
    for name in [*sites, "pooled"]:
        acc[name], std[name] = stats([r["accuracy"][name] for r in runs])
    tests = [r["test"] for r in runs if r.get("test") is not None]
    test, test_std = stats(tests) if tests else (None, None)
    spent: dict[str, float] = {}
    worst: dict[str, float] = {}
    for r in runs:
        for s, e in r.get("epsilon_spent", {}).items():
            spent[s] = max(spent.get(s, 0.0), e)
        for s, e in r.get("epsilon_worst", {}).items():
            worst[s] = max(worst.get(s, 0.0), e)
    wall = statistics.fmean(r["wall_s"] for r in runs)
    return ConfigResult(key, label, kind, cap, acc, std, test, test_std, spent, worst, wall, runs, note)


# -------------------------------------------------------------------------------------------------
# Configurations


def run_majority(scenario: Scenario, sizes: dict[str, int]) -> ConfigResult:
    """Each site predicting its own most frequent training label: how much of a DP score is the label prior."""
    acc = {}
    for site in scenario.sites:
        majority = Counter(site.train.labels).most_common(1)[0][0]
        acc[site.name] = sum(y == majority for y in site.eval.labels) / len(site.eval)
    acc["pooled"] = _pooled(acc, sizes)
    test = None
    if scenario.test is not None:
        tops = [Counter(s.train.labels).most_common(1)[0][0] for s in scenario.sites]
        test = statistics.fmean(sum(y == t for y in scenario.test.labels) / len(scenario.test) for t in tops)
    run = {"seed": None, "accuracy": acc, "test": test, "wall_s": 0.0}
    names = [s.name for s in scenario.sites]
    return _summarise("majority", "each site's own majority class (no model)", "reference", None, [run], names)


def run_logistic(scenario: Scenario, evaluator: Evaluator) -> ConfigResult:
    """Non-private multinomial logistic regression on the frozen encoder's pooled features of all training rows."""
    started = time.monotonic()
    tok = evaluator.loaded.tokenizer
    texts = [t for s in scenario.sites for t in s.train.texts]
    labels = [y for s in scenario.sites for y in s.train.labels]
    load_adapter_state(evaluator.loaded.model, evaluator.initial)
    spec_len = evaluator.sets[scenario.sites[0].name].tensors[0].shape[1]
    train = pooled_dataset(
        evaluator.loaded.model, encode_classification(tok, texts, labels, spec_len), device=evaluator.device
    )
    x, y = train.tensors
    head = torch.nn.Linear(x.shape[1], len(scenario.labels))
    optimizer = torch.optim.LBFGS(
        head.parameters(), lr=1.0, max_iter=500, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y) + 1e-4 * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    acc = {s.name: float(evaluate_head(head, evaluator.features[s.name]).accuracy) for s in scenario.sites}
    acc["pooled"] = _pooled(acc, evaluator.sizes)
    test = float(evaluate_head(head, evaluator.features["test"]).accuracy) if "test" in evaluator.features else None
    run = {"seed": None, "accuracy": acc, "test": test, "wall_s": time.monotonic() - started}
    names = [s.name for s in scenario.sites]
    label = "frozen-feature logistic regression, non-private (ceiling)"
    return _summarise("logreg", label, "reference", None, [run], names, note="L-BFGS, L2 1e-4")


def run_central_lora(
    scenario: Scenario, settings: Settings, spec: FederationSpec, evaluator: Evaluator
) -> ConfigResult:
    """Non-private LoRA + head on all rows: plain minibatch SGD, 3 epochs, no clipping or noise."""
    started = time.monotonic()
    loaded = evaluator.loaded
    load_adapter_state(loaded.model, evaluator.initial)
    for name, param in loaded.model.named_parameters():  # LoRA A trains here too: no DP, no aggregation
        if "lora_A" in name:
            param.requires_grad_(True)
    texts = [t for s in scenario.sites for t in s.train.texts]
    labels = [y for s in scenario.sites for y in s.train.labels]
    data = encode_classification(loaded.tokenizer, texts, labels, settings.max_length)
    steps = 3 * len(data) // 32
    train_nonprivate(
        loaded.model,
        data,
        "classification",
        steps=steps,
        batch_size=32,
        learning_rate=0.05,
        optimizer="sgd",
        device=settings.device,
        seed=settings.split_seed,
    )
    state = adapter_state(loaded.model)
    scores = evaluator(state)
    acc = {s.name: scores[s.name] for s in scenario.sites}
    acc["pooled"] = _pooled(acc, evaluator.sizes)
    run = {"seed": None, "accuracy": acc, "test": scores.get("test"), "wall_s": time.monotonic() - started}
    names = [s.name for s in scenario.sites]
    return _summarise(
        "central-lora",
        "centralised LoRA, non-private",
        "central",
        None,
        [run],
        names,
        note=f"{steps} steps of batch 32, lr 0.05",
    )


def _train_site(site: Site, state: AdapterState, rounds: int, run: str) -> AdapterState:
    for round_ in range(1, rounds + 1):
        outcome = site.train(state, run, round_, rounds)
        state = add_scaled(state, outcome.delta, site.spec.training.server_learning_rate)
    return state


def run_alone(
    scenario: Scenario, settings: Settings, files: dict, work: Path, epsilon: float, evaluator: Evaluator, seed: int
) -> dict[str, Any]:
    """Each site with the production site code on its own rows only: the 'why join?' baseline."""
    started = time.monotonic()
    spec = federation_spec(settings, scenario, epsilon, work, seed)
    names = [s.name for s in scenario.sites]
    acc, spent, tests = {}, {}, []
    for site_spec in _site_specs(names, files, work, epsilon, settings.device, seed):
        site = Site(site_spec, spec)
        state = _train_site(site, evaluator.initial, spec.training.rounds, f"alone-{seed}")
        # a site's own model already learned its own label mix: no prior added
        scores = evaluator(state, [site_spec.name] + (["test"] if "test" in evaluator.sets else []), shared=False)
        acc[site_spec.name] = scores[site_spec.name]
        if "test" in scores:
            tests.append(scores["test"])
        spent[site_spec.name] = site.epsilon_spent()
        site.ledger.close()
    acc["pooled"] = _pooled(acc, evaluator.sizes)
    test = statistics.fmean(tests) if tests else None
    return {"seed": seed, "accuracy": acc, "test": test, "epsilon_spent": spent, "wall_s": time.monotonic() - started}


def run_central_dp(
    scenario: Scenario, settings: Settings, work: Path, epsilon: float, evaluator: Evaluator, seed: int
) -> dict[str, Any]:
    """All training rows at one site (production site code): what a federation could at best reach under DP."""
    started = time.monotonic()
    spec = federation_spec(settings, scenario, epsilon, work, seed)
    pooled_train = ClassificationData(
        [t for s in scenario.sites for t in s.train.texts], [y for s in scenario.sites for y in s.train.labels]
    )
    pooled_eval = ClassificationData(
        [t for s in scenario.sites for t in s.eval.texts], [y for s in scenario.sites for y in s.eval.labels]
    )
    files = {
        "central": (
            _write_csv(work / "data" / "central-train.csv", pooled_train, scenario.labels),
            _write_csv(work / "data" / "central-eval.csv", pooled_eval, scenario.labels),
        )
    }
    (site_spec,) = _site_specs(["central"], files, work, epsilon, settings.device, seed)
    site = Site(site_spec, spec)
    state = _train_site(site, evaluator.initial, spec.training.rounds, f"central-{seed}")
    scores = evaluator(state)
    acc = {s.name: scores[s.name] for s in scenario.sites}
    acc["pooled"] = _pooled(acc, evaluator.sizes)
    spent = {"central": site.epsilon_spent()}
    site.ledger.close()
    return {
        "seed": seed,
        "accuracy": acc,
        "test": scores.get("test"),
        "epsilon_spent": spent,
        "wall_s": time.monotonic() - started,
    }


def run_federated(
    scenario: Scenario,
    settings: Settings,
    files: dict,
    work: Path,
    epsilon: float,
    evaluator: Evaluator,
    seed: int,
    noise: str = "local",
) -> dict[str, Any]:
    """The real thing: Flower's simulation engine, production ServerApp/ClientApp, secure aggregation on.

    `noise = "distributed"`: one secure sum per DP step, every bank assuming all banks honest (h = n), so the sum
    carries the noise of one centralised step; each bank's ledger also records its own share's epsilon.
    """
    from fedtune.server.simulation import simulate

    started = time.monotonic()
    spec = federation_spec(settings, scenario, epsilon, work, seed)
    names = [s.name for s in scenario.sites]
    spec = spec.model_copy(update={"training": spec.training.model_copy(update={"min_sites": len(names)})})
    sites = _site_specs(names, files, work, epsilon, settings.device, seed)
    if noise == "distributed":
        privacy = spec.privacy.model_copy(update={"noise": "distributed", "epsilon": epsilon})
        spec = FederationSpec.model_validate({**spec.model_dump(), "privacy": privacy.model_dump()})
        sites = [s.model_copy(update={"min_honest_sites": len(names)}) for s in sites]
    result = simulate(spec, sites, out_dir=work / "runs", parallel_sites=settings.parallel_sites)
    final = result.rounds[-1]
    # Each bank's held-out rows scored here with its own label prior, as every other row of the table is: what a
    # site reports leaves it without the prior (its training-label mix stays at the site).
    acc = evaluator(result.final_state, names)
    acc["pooled"] = _pooled(acc, evaluator.sizes)
    test = evaluator(result.final_state, ["test"])["test"] if "test" in evaluator.sets else None
    spent = {e.site: float(e.epsilon) for e in final.evals.values()}
    worst = {}
    for report in result.rounds[1:]:  # the figures each site sent with the step that charged its last round
        for site in (report.update.sites if report.update else {}).values():
            if site.epsilon_worst is not None:
                spent[site.site], worst[site.site] = site.epsilon, site.epsilon_worst
    skipped = [r.round for r in result.rounds[1:] if r.update is None or r.update.mean_delta is None]
    return {
        "seed": seed,
        "accuracy": acc,
        "test": test,
        "epsilon_spent": spent,
        "epsilon_worst": worst,
        "skipped_rounds": skipped,
        "wall_s": time.monotonic() - started,
    }


def run_scenario(
    scenario: Scenario,
    settings: Settings,
    work: Path,
    progress_bar: Any | None = None,
    partial: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """All configurations of one scenario; returns the scenario's JSON object.

    `partial` receives that object after every configuration, so a long run that is stopped keeps what it did.
    """
    names = [s.name for s in scenario.sites]
    files = {
        s.name: (
            _write_csv(work / "data" / f"{s.name}-train.csv", s.train, scenario.labels),
            _write_csv(work / "data" / f"{s.name}-eval.csv", s.eval, scenario.labels),
        )
        for s in scenario.sites
    }
    evaluator = Evaluator(scenario, federation_spec(settings, scenario, 1.0, work, 0), settings.device)
    plan: list[tuple[str, float]] = []
    everything = {*settings.epsilons, *settings.alone_epsilons, *settings.central_epsilons}
    for eps in sorted(everything, reverse=True):  # the headline epsilon first
        if eps in settings.epsilons:
            plan += [("federated" if mode == "local" else mode, eps) for mode in settings.noise_modes]
        plan += [("alone", eps)] if eps in settings.alone_epsilons else []
        plan += [("central-dp", eps)] if eps in settings.central_epsilons else []
    task = progress_bar.add_task(scenario.name, total=len(plan) * len(settings.seeds) + 2) if progress_bar else None

    def step(what: str) -> None:
        if progress_bar is not None:
            progress_bar.update(task, description=f"{scenario.name}: {what}", advance=1)
            if not progress_bar.console.is_terminal:
                progress_bar.console.log(f"{scenario.name}: {what}")

    configs = [run_majority(scenario, evaluator.sizes), run_logistic(scenario, evaluator)]
    step("references")
    if settings.central_lora:
        configs.append(
            run_central_lora(scenario, settings, federation_spec(settings, scenario, 1.0, work, 0), evaluator)
        )
    step("centralised LoRA")
    runners = {"alone": run_alone, "federated": run_federated}
    for kind, eps in plan:
        runs = []
        for seed in settings.seeds:
            where = work / f"{kind}-eps{eps:g}-seed{seed}"
            if kind == "central-dp":
                runs.append(run_central_dp(scenario, settings, where, eps, evaluator, seed))
            elif kind == "distributed":
                runs.append(run_federated(scenario, settings, files, where, eps, evaluator, seed, "distributed"))
            else:
                runs.append(runners[kind](scenario, settings, files, where, eps, evaluator, seed))
            step(f"{kind} ε={eps:g} seed {seed}")
        label = {
            "alone": f"each site alone, DP ε={eps:g}",
            "federated": f"federated DP, secure aggregation, ε={eps:g}",
            "distributed": f"federated DP, distributed noise, ε={eps:g}",
            "central-dp": f"centralised DP (all rows at one site), ε={eps:g}",
        }[kind]
        result_kind = "central" if kind == "central-dp" else kind
        configs.append(_summarise(f"{kind}-eps{eps:g}", label, result_kind, eps, runs, names))
        if partial is not None:
            partial(_scenario_json(scenario, configs))
    return _scenario_json(scenario, configs)


def _scenario_json(scenario: Scenario, configs: list[ConfigResult]) -> dict[str, Any]:
    return {
        "note": scenario.note,
        "labels": len(scenario.labels),
        "sites": [{"name": s.name, "train_rows": len(s.train), "eval_rows": len(s.eval)} for s in scenario.sites],
        "test_rows": len(scenario.test) if scenario.test is not None else 0,
        "configs": [asdict(c) for c in configs],
        "federation_beats_alone": federation_beats_alone(configs, [s.name for s in scenario.sites]),
    }


def federation_beats_alone(configs: Sequence[ConfigResult], sites: Sequence[str]) -> dict[str, dict[str, bool]]:
    """Per epsilon with both rows: is every site's federated mean above its alone mean by more than the stds?"""
    by_key = {c.key: c for c in configs}
    out: dict[str, dict[str, bool]] = {}
    for c in configs:
        if c.kind != "alone":
            continue
        for kind in ("federated", "distributed"):
            fed = by_key.get(f"{kind}-eps{c.epsilon_cap:g}")
            if fed is not None:
                key = f"{c.epsilon_cap:g}" + (" distributed" if kind == "distributed" else "")
                out[key] = {
                    s: fed.accuracy[s] - c.accuracy[s] > max(fed.accuracy_std[s], c.accuracy_std[s]) for s in sites
                }
    return out


# -------------------------------------------------------------------------------------------------
# Output


def build_payload(scenarios: dict[str, Any], settings: Settings, mode: str, wall_s: float) -> dict[str, Any]:
    """The JSON document: settings, recipe and machine first, so any number can be traced to how it was made."""
    recipe = json_recipe(settings)
    return {
        "benchmark": "utility",
        "mode": mode,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
        "recipe": recipe,
        "environment": environment(settings.device),
        "wall_s": wall_s,
        "scenarios": scenarios,
    }


def json_recipe(settings: Settings) -> dict[str, Any]:
    spec = federation_spec(settings, synthetic_scenario(), 8.0, Path("."), 0)
    return {
        "task": spec.task.model_dump(exclude={"labels"}),
        "lora": spec.lora.model_dump(),
        "training": spec.training.model_dump(),
        "privacy": spec.privacy.model_dump(exclude={"default_epsilon_cap"}),
    }


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "—"
    return f"{mean:.3f}" if not std else f"{mean:.3f} ± {std:.3f}"


def _verdict(by_site: dict[str, bool]) -> str:
    losers = [site for site, better in by_site.items() if not better]
    return "yes" if not losers else f"no ({', '.join(losers)} not better by more than the std)"


def render_markdown(payload: dict[str, Any]) -> str:
    r = payload["recipe"]
    t, h = r["training"], r["training"]["head"]
    d = h["distributed"]
    lines = [
        f"# Utility ({payload['mode']})",
        "",
        f"Default recipe: pooling {r['task']['pooling']}, head init {r['task']['head_init']}; {t['rounds']} rounds, "
        f"of which {h['rounds']} head-only ({h['local_steps']} DP-SGD steps, expected batch {h['batch_fraction']:g} of "
        f"a site's rows, lr {h['learning_rate']:g} scaled by {h['reference_sigma']} / sigma past that sigma)"
        + (
            f", then FFA-LoRA r={r['lora']['r']} ({t['local_steps']} steps, batch {t['batch_size']}, "
            f"lr {t['learning_rate']:g})"
            if t["rounds"] > h["rounds"]
            else " (no LoRA rounds)"
        )
        + (
            f". Distributed noise: {d['steps']} steps at rate {d['sample_rate']:g}, "
            f"server SGD lr {d['learning_rate']:g} (shrunk in proportion once sigma over the expected batch passes "
            f"{d['reference_noise']}), "
            f"momentum {d['momentum']:g}"
            if "distributed" in payload["settings"].get("noise_modes", ())
            else ""
        )
        + f"; accountant {r['privacy']['accountant']}, delta {r['privacy']['target_delta']:g}, "
        f"clip {r['privacy']['max_grad_norm']:g}. "
        f"Seeds: {payload['settings']['seeds']}; mean ± std over seeds; wall time per seed.",
        "",
    ]
    for name, sc in payload["scenarios"].items():
        sites = [x["name"] for x in sc["sites"]]
        sizes = ", ".join(f"{x['name']} {x['train_rows']}+{x['eval_rows']}" for x in sc["sites"])
        lines += [f"## {name}", "", f"{sc['note']}; {sc['labels']} classes; train+held-out rows: {sizes}."]
        if sc["test_rows"]:
            lines.append(f"test: {sc['test_rows']} rows of test.csv (alone: mean over the sites' own models).")
        lines.append("")
        rows = []
        for c in sc["configs"]:
            spent = f"{max(c['epsilon_spent'].values()):.2f}" if c["epsilon_spent"] else None
            if c.get("epsilon_worst"):
                spent = f"{spent} (own share alone: {max(c['epsilon_worst'].values()):.1f})"
            rows.append(
                [
                    c["label"],
                    spent,
                    *[_pm(c["accuracy"][s], c["accuracy_std"].get(s)) for s in sites],
                    _pm(c["accuracy"]["pooled"], c["accuracy_std"].get("pooled")),
                    _pm(c["test"], c["test_std"]) if sc["test_rows"] else None,
                    f"{c['wall_s']:.0f}",
                ]
            )
        headers = ["configuration", "ε spent (max)", *sites, "pooled held-out", "test", "wall s"]
        lines.append(markdown_table(headers, rows))
        beats = sc["federation_beats_alone"]
        if beats:
            verdicts = ", ".join(f"ε={e}: {_verdict(v)}" for e, v in beats.items())
            lines += ["", f"Every site better federated than alone, by more than the std: {verdicts}."]
        lines.append("")
    return "\n".join(lines)


def plot(payload: dict[str, Any], path: Path) -> Path | None:
    """Accuracy against epsilon (test.csv where there is one, else pooled held-out), one panel per scenario."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("[yellow]matplotlib is not installed; no plot (pip install matplotlib)")
        return None
    scenarios = payload["scenarios"]
    fig, axes = plt.subplots(1, len(scenarios), figsize=(6.5 * len(scenarios), 4.5), squeeze=False)
    for ax, (name, sc) in zip(axes[0], scenarios.items(), strict=True):
        metric = "test" if sc["test_rows"] else "pooled"

        def value(c: dict[str, Any], m: str = metric) -> tuple[float, float]:
            if m == "test":
                return c["test"], c["test_std"] or 0.0
            return c["accuracy"]["pooled"], c["accuracy_std"].get("pooled", 0.0)

        for kind, style in (("federated", "-o"), ("distributed", "-^"), ("central", ":d"), ("alone", "--s")):
            points = sorted((c["epsilon_cap"], *value(c)) for c in sc["configs"] if c["kind"] == kind)
            if points:
                xs, ys, es = zip(*points, strict=True)
                ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label=kind)
        for c in sc["configs"]:
            if c["kind"] == "reference":
                ax.axhline(value(c)[0], linestyle=":", linewidth=1, color="grey")
                ax.annotate(c["label"], (0.02, value(c)[0]), xycoords=("axes fraction", "data"), fontsize=6)
        ax.set_xscale("log")
        ax.set_title(f"{name} ({'test.csv' if metric == 'test' else 'pooled held-out'})")
        ax.set_xlabel("epsilon per site (delta 1e-5)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------------------------
# CLI


def _settings(args: argparse.Namespace, device: str) -> Settings:
    from fedtune.server.demo import packaged_base_model

    base = Path(args.base_model) if args.base_model else packaged_base_model()
    s = Settings(base)
    if args.quick:
        s = replace(s, max_length=32, epsilons=(1.0, 8.0), alone_epsilons=(8.0,), seeds=(0,))
    training = {}
    if args.rounds is not None:
        training["rounds"] = args.rounds
    if args.head_rounds is not None:
        training["head"] = {"rounds": args.head_rounds}
    distributed = {
        k: v
        for k, v in {"learning_rate": args.distributed_lr, "steps": args.distributed_steps}.items()
        if v is not None
    }
    if distributed:
        training["head"] = {**training.get("head", {}), "distributed": distributed}
    grid = {
        "epsilons": args.epsilons,
        "alone_epsilons": args.alone_epsilons,
        "central_epsilons": args.central_epsilons,
        "noise_modes": args.noise,
        "seeds": args.seeds,
        "max_length": args.max_length,
        "parallel_sites": args.parallel_sites,
    }
    s = replace(s, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in grid.items() if v is not None})
    return replace(s, device=device, training=training, central_lora=args.central_lora, split_seed=args.split_seed)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 intents, a few hundred rows, one seed")
    parser.add_argument("--validation", action="store_true", help="score on a validation split of train rows")
    parser.add_argument("--data", help="folder with banking77/ and medical-abstracts/ (default ../shared/data)")
    parser.add_argument("--scenarios", nargs="+", default=["banking77", "medical"], choices=["banking77", "medical"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--base-model", help="local HF model folder (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--epsilons", type=float, nargs="+", help="federated DP caps (default 1 3 8)")
    parser.add_argument("--alone-epsilons", type=float, nargs="*", help="site-alone caps (default 1 3 8)")
    parser.add_argument("--central-epsilons", type=float, nargs="*", help="centralised DP caps (default 8)")
    parser.add_argument(
        "--noise", nargs="+", choices=["local", "distributed"], help="federated rows' noise modes (default local)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="DP seeds (default 0 1 2)")
    parser.add_argument("--central-lora", action="store_true", help="also train centralised non-private LoRA")
    parser.add_argument("--rounds", type=int, help="override the recipe's training.rounds")
    parser.add_argument("--head-rounds", type=int, help="override the recipe's training.head.rounds")
    parser.add_argument("--distributed-lr", type=float, help="override training.head.distributed.learning_rate")
    parser.add_argument("--distributed-steps", type=int, help="override training.head.distributed.steps")
    parser.add_argument("--max-length", type=int, help="tokens per example (default 64; medical: 128 suggested)")
    parser.add_argument("--intents", type=int, help="banking77: keep the N most frequent intents (quick: 10)")
    parser.add_argument("--max-rows", type=int, help="rows per scenario (default: quick 600/400, full all)")
    parser.add_argument("--parallel-sites", type=int)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in this process (0: torch default)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the site split (fixed across DP seeds)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, help="output stem (default benchmarks/results/utility[-quick])")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    set_threads(args.threads)
    if device.startswith("cuda"):
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    settings = _settings(args, device)
    root = data_dir(args.data)
    scenarios: list[Scenario] = []
    if "banking77" in args.scenarios:
        sc = load_banking77(
            root,
            intents=args.intents or (10 if args.quick else None),
            seed=args.split_seed,
            max_rows=args.max_rows or (600 if args.quick else None),
            validation=args.validation,
        )
        scenarios.append(sc) if sc else console.print(f"[yellow]skipping banking77: not found under {root}")
    if "medical" in args.scenarios:
        sc = load_medical(
            root,
            seed=args.split_seed,
            max_rows=args.max_rows or (400 if args.quick else None),
            validation=args.validation,
        )
        scenarios.append(sc) if sc else console.print(f"[yellow]skipping medical-abstracts: not found under {root}")
    if not scenarios:
        console.print(f"[yellow]no benchmark data under {root}; nothing to do (pass --data DIR)")
        return 0

    import tempfile

    default = "utility-quick" if args.quick else ("utility-validation" if args.validation else "utility")
    stem = args.out or RESULTS_DIR / default
    started = time.monotonic()
    mode = "quick" if args.quick else ("validation" if args.validation else "full")
    results: dict[str, Any] = {}

    def save(name: str, scenario_json: dict[str, Any]) -> None:
        results[name] = scenario_json
        payload = build_payload(results, settings, mode + " (in progress)", time.monotonic() - started)
        write_outputs(stem, payload, render_markdown(payload))

    with tempfile.TemporaryDirectory(prefix="fedtune-utility-") as tmp, quiet(), progress() as bar:
        work = args.work or Path(tmp)
        for sc in scenarios:
            results[sc.name] = run_scenario(sc, settings, work / sc.name, bar, partial=lambda j, n=sc.name: save(n, j))
    payload = build_payload(results, settings, mode, time.monotonic() - started)
    markdown = render_markdown(payload)
    json_path, md_path = write_outputs(stem, payload, markdown)
    png = plot(payload, stem.with_suffix(".png"))
    console.print(markdown)
    console.print(f"wrote {json_path}, {md_path}" + (f", {png}" if png else "") + f" in {payload['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
