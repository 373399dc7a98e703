"""Utility benchmark: what does a site gain by joining the federation, and what does privacy cost?

Scenarios (real data, read from ../shared/data or --data; skipped with a message when absent):

* banking77: 3 bank sites, the training file split non-IID by intent (Dirichlet, alpha 0.5);
* medical-abstracts: 2 hospital sites, split non-IID by condition (Dirichlet, alpha 0.5).

Each site holds out 20% of its rows; every configuration is scored on exactly these held-out sets (per site, and
pooled = weighted by held-out rows). Configurations:

* base (head only): LoRA off, only the classifier head trained, centrally on the pooled data, non-private;
* site alone, eps=E: each site runs the production site code (`Site.train`: ledger, sigma from its cap, DP-SGD)
  on its own data for the same rounds and steps, with the same epsilon cap E as the federation;
* federated DP-LoRA, eps=E (1, 3, 8; delta 1e-5): `fedtune.server.simulation.simulate`, secure aggregation on;
* federated LoRA, "non-private": the same `simulate`, with an epsilon cap of 1e6. Production has no way to turn
  DP off (the noise multiplier cannot go below 0.3, and clipping always applies), so this is the weakest DP a
  federation can run: sigma = 0.3, clip 1.0, reported epsilon in the hundreds or more, i.e. no meaningful
  privacy. It is labelled as such in every output;
* centralised LoRA, non-private: LoRA + head trained on the pooled data with plain minibatch SGD (no clipping, no
  noise), as many steps as all sites together take in the federation.

Output: JSON + markdown (benchmarks/results/utility[-quick].{json,md}) and a PNG of pooled held-out accuracy per
round. `--quick` keeps 10 banking intents and a few hundred rows per scenario so that it runs in minutes on CPU;
`--intents` and `--max-rows` do the same for a longer run.
"""

from __future__ import annotations

import argparse
import csv
import os
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
from fedtune.client.tasks import encode_classification, evaluate  # noqa: E402
from fedtune.common.adapter import AdapterState, adapter_state, add_scaled, load_adapter_state  # noqa: E402
from fedtune.common.config import DataSpec, FederationSpec, SiteSpec  # noqa: E402
from fedtune.common.data import ClassificationData, read_rows, split_holdout  # noqa: E402
from fedtune.common.model import load_lora_model  # noqa: E402
from fedtune.common.partition import dirichlet_partition  # noqa: E402
from fedtune.common.synthetic import BANK_INTENTS, generate_bank_messages  # noqa: E402

NONPRIVATE_CAP = 1e6
HOLDOUT = 0.2

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
    note: str = ""


def _split_sites(
    name: str,
    texts: list[str],
    labels: list[int],
    label_names: list[str],
    site_names: Sequence[str],
    *,
    alpha: float,
    seed: int,
    note: str,
) -> Scenario:
    """Dirichlet split into sites, then each site's own 20% held out (seeded, reproducible)."""
    data = ClassificationData(texts, labels)
    parts = dirichlet_partition(labels, len(site_names), alpha=alpha, seed=seed)
    sites = []
    for site_name, idx in zip(site_names, parts, strict=True):
        shard = data.subset(idx)
        train_idx, eval_idx = split_holdout(len(shard), HOLDOUT, seed=seed)
        sites.append(SiteData(site_name, shard.subset(train_idx), shard.subset(eval_idx)))
    return Scenario(name, label_names, sites, note)


def _subsample(n: int, keep: int | None, seed: int) -> list[int]:
    if keep is None or keep >= n:
        return list(range(n))
    return sorted(int(i) for i in np.random.default_rng(seed).choice(n, size=keep, replace=False))


def load_banking77(root: Path, *, intents: int | None, seed: int, max_rows: int | None) -> Scenario | None:
    path = root / "banking77" / "train.csv"
    if not path.is_file():
        return None
    rows = read_rows(path, ["text", "category"])
    note = "banking77 train.csv"
    if intents is not None:  # 77 intents need more data and steps than a CPU run has; keep the most frequent
        ranked = sorted(Counter(r["category"] for r in rows).items(), key=lambda kv: (-kv[1], kv[0]))
        top = {c for c, _ in ranked[:intents]}
        rows = [r for r in rows if r["category"] in top]
        note += f", {len(top)} most frequent intents"
    keep = _subsample(len(rows), max_rows, seed)
    rows = [rows[i] for i in keep]
    names = sorted({r["category"] for r in rows})
    index = {n: i for i, n in enumerate(names)}
    note += f", {len(rows)} rows"
    return _split_sites(
        "banking77",
        [r["text"] for r in rows],
        [index[r["category"]] for r in rows],
        names,
        ["bank-1", "bank-2", "bank-3"],
        alpha=0.5,
        seed=seed,
        note=note,
    )


def load_medical(root: Path, *, seed: int, max_rows: int | None) -> Scenario | None:
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
    return _split_sites(
        "medical-abstracts",
        [r["medical_abstract"] for r in rows],
        [index[r["condition_label"]] for r in rows],
        [names_by_code[c] for c in codes],
        ["hospital-1", "hospital-2"],
        alpha=0.5,
        seed=seed,
        note=f"medical-abstracts abstracts.csv, {len(rows)} rows",
    )


def synthetic_scenario(num_sites: int = 2, rows: int = 160, seed: int = 0) -> Scenario:
    """The built-in synthetic bank messages: lets tests run the benchmark with no real data present."""
    texts, labels = generate_bank_messages(rows, seed)
    return _split_sites(
        "synthetic",
        texts,
        labels,
        list(BANK_INTENTS),
        [f"site-{i + 1}" for i in range(num_sites)],
        alpha=1.0,
        seed=seed,
        note=f"synthetic bank messages, {rows} rows",
    )


# -------------------------------------------------------------------------------------------------
# Settings and results


@dataclass
class Settings:
    base_model: Path
    rounds: int = 10
    local_steps: int = 40
    batch_size: int = 64
    learning_rate: float = 0.1
    optimizer: str = "sgd"
    max_length: int = 64
    lora_r: int = 8
    lora_alpha: int = 16
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    epsilons: tuple[float, ...] = (1.0, 3.0, 8.0)
    alone_epsilons: tuple[float, ...] = (1.0, 3.0, 8.0)
    nonprivate_federated: bool = True
    device: str = "cpu"
    parallel_sites: int | None = None
    eval_batch_size: int = 256
    seed: int = 0


@dataclass
class ConfigResult:
    key: str
    label: str
    kind: str  # "reference" | "central" | "alone" | "federated"
    epsilon_cap: float | None
    accuracy: dict[str, float]  # site name -> held-out accuracy, plus "pooled"
    curve: list[float]  # pooled held-out accuracy after round 0..R (round-equivalents for central runs)
    epsilon_spent: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    note: str = ""


def federation_spec(settings: Settings, scenario: Scenario, epsilon_cap: float, out: Path) -> FederationSpec:
    return FederationSpec.model_validate(
        {
            "name": f"utility-{scenario.name}",
            "base_model": {"path": str(settings.base_model), "max_length": settings.max_length},
            "task": {"kind": "classification", "labels": scenario.labels},
            "lora": {"r": settings.lora_r, "alpha": settings.lora_alpha},
            "training": {
                "rounds": settings.rounds,
                "local_steps": settings.local_steps,
                "batch_size": settings.batch_size,
                "learning_rate": settings.learning_rate,
                "optimizer": settings.optimizer,
                "min_sites": len(scenario.sites),
                "seed": settings.seed,
            },
            "privacy": {
                "target_delta": settings.delta,
                "max_grad_norm": settings.max_grad_norm,
                "default_epsilon_cap": epsilon_cap,
            },
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
    scenario: Scenario, files: dict[str, tuple[Path, Path]], work: Path, cap: float, device: str
) -> list[SiteSpec]:
    from fedtune.server.demo import site_specs

    specs = site_specs([files[s.name][0] for s in scenario.sites], work, epsilon_cap=cap)
    return [
        spec.model_copy(
            update={
                "name": site.name,
                "data": DataSpec(train=files[site.name][0], eval=files[site.name][1]),
                "device": device,
                "peers": {site_b.name: key for site_b, key in zip(scenario.sites, spec.peers.values(), strict=True)},
            }
        )
        for site, spec in zip(scenario.sites, specs, strict=True)
    ]


def _pooled(acc: dict[str, float], sizes: dict[str, int]) -> float:
    total = sum(sizes[s] for s in acc)
    return sum(acc[s] * sizes[s] for s in acc) / total if total else float("nan")


# -------------------------------------------------------------------------------------------------
# Runners


class _Evaluator:
    """Every site's held-out set, tokenised once, scored for any adapter state."""

    def __init__(self, scenario: Scenario, spec: FederationSpec, settings: Settings) -> None:
        self.loaded = load_lora_model(spec, seed=settings.seed)
        tok = self.loaded.tokenizer
        self.sets = {
            s.name: encode_classification(tok, s.eval.texts, s.eval.labels, settings.max_length) for s in scenario.sites
        }
        self.sizes = {name: len(d) for name, d in self.sets.items()}
        self.device = settings.device
        self.batch = settings.eval_batch_size
        self.initial: AdapterState = adapter_state(self.loaded.model)

    def __call__(self, state: AdapterState) -> dict[str, float]:
        load_adapter_state(self.loaded.model, state)
        self.loaded.model.to(self.device)
        try:
            acc = {
                n: float(evaluate(self.loaded.model, d, "classification", self.batch).accuracy)
                for n, d in self.sets.items()
            }
        finally:
            self.loaded.model.to("cpu")
        acc["pooled"] = _pooled(acc, self.sizes)
        return acc


def run_majority(scenario: Scenario, settings: Settings, sizes: dict[str, int]) -> ConfigResult:
    """Each site predicting its own most frequent training label: how much a skewed site gets from its prior alone.

    Under strong DP a model learns the label prior long before it learns from the text, and a site alone learns
    its own prior, which is exactly what its held-out rows follow; this row shows how much of a score that is.
    """
    acc = {}
    for site in scenario.sites:
        majority = Counter(site.train.labels).most_common(1)[0][0]
        acc[site.name] = sum(y == majority for y in site.eval.labels) / len(site.eval)
    acc["pooled"] = _pooled(acc, sizes)
    curve = [acc["pooled"]] * (settings.rounds + 1)
    return ConfigResult("majority", "each site's own majority class (no model)", "reference", None, acc, curve)


def run_central(
    scenario: Scenario,
    settings: Settings,
    spec: FederationSpec,
    evaluator: _Evaluator,
    *,
    lora: bool,
    tick: Callable[[], None],
) -> ConfigResult:
    """Non-private training on the pooled data; the same total steps as all sites together in the federation."""
    started = time.monotonic()
    # The evaluator's model, reset to the initial adapter: training only ever moves adapter tensors, so this is
    # a fresh model without paying for another load.
    loaded = evaluator.loaded
    load_adapter_state(loaded.model, evaluator.initial)
    frozen = [p for n, p in loaded.model.named_parameters() if "lora_" in n and p.requires_grad] if not lora else []
    for param in frozen:
        param.requires_grad_(False)
    pooled = ClassificationData(
        [t for s in scenario.sites for t in s.train.texts], [y for s in scenario.sites for y in s.train.labels]
    )
    data = encode_classification(loaded.tokenizer, pooled.texts, pooled.labels, settings.max_length)
    per_round = settings.local_steps * len(scenario.sites)
    curve = [evaluator(adapter_state(loaded.model))["pooled"]]
    tick()
    for round_ in range(1, settings.rounds + 1):
        train_nonprivate(
            loaded.model,
            data,
            "classification",
            steps=per_round,
            batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            optimizer=settings.optimizer,
            device=settings.device,
            seed=settings.seed + round_,
        )
        acc = evaluator(adapter_state(loaded.model))
        curve.append(acc["pooled"])
        tick()
    for param in frozen:
        param.requires_grad_(True)
    load_adapter_state(loaded.model, evaluator.initial)
    key, label = (
        ("central-lora", "centralised LoRA, non-private")
        if lora
        else ("base-head", "base model (head only), non-private")
    )
    return ConfigResult(
        key,
        label,
        "central",
        None,
        acc,
        curve,
        wall_s=time.monotonic() - started,
        note=f"{per_round} steps per round-equivalent on {len(pooled)} pooled rows",
    )


def run_alone(
    scenario: Scenario,
    settings: Settings,
    files: dict[str, tuple[Path, Path]],
    work: Path,
    epsilon: float,
    evaluator: _Evaluator,
    tick: Callable[[], None],
) -> ConfigResult:
    """Each site with the production site code on its own data only: the 'why join?' baseline."""
    started = time.monotonic()
    spec = federation_spec(settings, scenario, epsilon, work)
    acc: dict[str, float] = {}
    spent: dict[str, float] = {}
    curves: dict[str, list[float]] = {}
    for site_spec in _site_specs(scenario, files, work, epsilon, settings.device):
        site = Site(site_spec, spec)
        state = evaluator.initial
        curves[site_spec.name] = [float(site.evaluate(state).accuracy)]
        for round_ in range(1, settings.rounds + 1):
            outcome = site.train(state, "alone", round_, settings.rounds)
            state = add_scaled(state, outcome.result.delta, spec.training.server_learning_rate)
            curves[site_spec.name].append(float(site.evaluate(state).accuracy))
            tick()
        acc[site_spec.name] = curves[site_spec.name][-1]
        spent[site_spec.name] = site.epsilon_spent()
        site.ledger.close()
    acc["pooled"] = _pooled(acc, evaluator.sizes)
    curve = [_pooled({n: c[r] for n, c in curves.items()}, evaluator.sizes) for r in range(settings.rounds + 1)]
    return ConfigResult(
        f"alone-eps{epsilon:g}",
        f"each site alone, DP ε={epsilon:g}",
        "alone",
        epsilon,
        acc,
        curve,
        spent,
        time.monotonic() - started,
        note="each site scored on its own held-out rows with its own model",
    )


class _Ticker:
    """A simulate() reporter that advances the progress bar per finished round."""

    def __init__(self, tick: Callable[[], None]) -> None:
        self.tick = tick

    def round_started(self, round_: int, total: int) -> None:
        pass

    def round_finished(self, report: Any) -> None:
        self.tick()


def run_federated(
    scenario: Scenario,
    settings: Settings,
    files: dict[str, tuple[Path, Path]],
    work: Path,
    epsilon_cap: float,
    evaluator: _Evaluator,
    tick: Callable[[], None],
) -> ConfigResult:
    """The real thing: Flower's simulation engine, production ServerApp/ClientApp, secure aggregation on."""
    from fedtune.server.simulation import simulate

    started = time.monotonic()
    spec = federation_spec(settings, scenario, epsilon_cap, work)
    sites = _site_specs(scenario, files, work, epsilon_cap, settings.device)
    result = simulate(
        spec, sites, out_dir=work / "runs", reporter=_Ticker(tick), parallel_sites=settings.parallel_sites
    )
    curve = []
    for report in result.rounds:
        by_site = {e.site: float(e.accuracy) for e in report.evals.values() if e.accuracy is not None}
        curve.append(_pooled(by_site, evaluator.sizes))
    final = result.rounds[-1]
    acc = {e.site: float(e.accuracy) for e in final.evals.values() if e.accuracy is not None}
    acc["pooled"] = _pooled(acc, evaluator.sizes)
    spent = {e.site: float(e.epsilon) for e in final.evals.values()}
    skipped = [r.round for r in result.rounds[1:] if r.update is None or r.update.mean_delta is None]
    if epsilon_cap >= NONPRIVATE_CAP:
        key, label = "fed-nonprivate", "federated LoRA, no meaningful DP (sigma=0.3 floor)"
    else:
        key, label = f"fed-eps{epsilon_cap:g}", f"federated DP-LoRA ε={epsilon_cap:g}"
    note = "secure aggregation on" + (f"; rounds without an update: {skipped}" if skipped else "")
    return ConfigResult(key, label, "federated", epsilon_cap, acc, curve, spent, time.monotonic() - started, note)


def run_scenario(scenario: Scenario, settings: Settings, work: Path, progress_bar: Any | None = None) -> dict[str, Any]:
    """All configurations of one scenario; returns the scenario's JSON object."""
    files = {
        s.name: (
            _write_csv(work / "data" / f"{s.name}-train.csv", s.train, scenario.labels),
            _write_csv(work / "data" / f"{s.name}-eval.csv", s.eval, scenario.labels),
        )
        for s in scenario.sites
    }
    base_spec = federation_spec(settings, scenario, 1.0, work)
    evaluator = _Evaluator(scenario, base_spec, settings)
    fed_caps = list(settings.epsilons) + ([NONPRIVATE_CAP] if settings.nonprivate_federated else [])
    total = 2 * (settings.rounds + 1) + settings.rounds * len(scenario.sites) * len(settings.alone_epsilons)
    total += (settings.rounds + 1) * len(fed_caps)
    task = progress_bar.add_task(scenario.name, total=total) if progress_bar else None

    def tick() -> None:
        if progress_bar is not None:
            progress_bar.advance(task)

    def describe(what: str) -> None:
        if progress_bar is not None:
            progress_bar.update(task, description=f"{scenario.name}: {what}")
            if not progress_bar.console.is_terminal:  # logs and CI: a line per stage instead of a live bar
                progress_bar.console.log(f"{scenario.name}: {what}")

    configs: list[ConfigResult] = [run_majority(scenario, settings, evaluator.sizes)]
    describe("base (head only)")
    configs.append(run_central(scenario, settings, base_spec, evaluator, lora=False, tick=tick))
    for eps in settings.alone_epsilons:
        describe(f"sites alone ε={eps:g}")
        configs.append(run_alone(scenario, settings, files, work / f"alone-eps{eps:g}", eps, evaluator, tick))
    for cap in fed_caps:
        describe("federated non-private" if cap >= NONPRIVATE_CAP else f"federated ε={cap:g}")
        configs.append(run_federated(scenario, settings, files, work / f"fed-{cap:g}", cap, evaluator, tick))
    describe("centralised LoRA")
    configs.append(run_central(scenario, settings, base_spec, evaluator, lora=True, tick=tick))
    describe("done")
    return {
        "note": scenario.note,
        "labels": len(scenario.labels),
        "sites": [{"name": s.name, "train_rows": len(s.train), "eval_rows": len(s.eval)} for s in scenario.sites],
        "configs": [asdict(c) for c in configs],
        "federation_beats_alone": federation_beats_alone(configs, [s.name for s in scenario.sites]),
    }


def federation_beats_alone(configs: Sequence[ConfigResult], sites: Sequence[str]) -> dict[str, dict[str, bool]]:
    """For each epsilon with both runs: did every site score higher in the federation than alone?"""
    by_key = {c.key: c for c in configs}
    out: dict[str, dict[str, bool]] = {}
    for c in configs:
        if c.kind != "alone":
            continue
        fed = by_key.get(f"fed-eps{c.epsilon_cap:g}")
        if fed is not None:
            out[f"{c.epsilon_cap:g}"] = {s: fed.accuracy[s] > c.accuracy[s] for s in sites}
    return out


# -------------------------------------------------------------------------------------------------
# Output


def build_payload(scenarios: dict[str, Any], settings: Settings, mode: str, wall_s: float) -> dict[str, Any]:
    """The JSON document: settings and machine first, so any number can be traced to how it was made."""
    return {
        "benchmark": "utility",
        "mode": mode,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
        "environment": environment(settings.device),
        "wall_s": wall_s,
        "scenarios": scenarios,
    }


def _verdict(by_site: dict[str, bool]) -> str:
    losers = [site for site, better in by_site.items() if not better]
    return "yes" if not losers else f"no ({', '.join(losers)} did better alone)"


def render_markdown(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    lines = [
        f"# Utility ({payload['mode']})",
        "",
        f"Held-out accuracy (each site's own 20%; pooled = weighted by held-out rows). {s['rounds']} rounds x "
        f"{s['local_steps']} DP-SGD steps, expected batch {s['batch_size']}, {s['optimizer']} lr {s['learning_rate']}, "
        f"LoRA r={s['lora_r']}, max_length {s['max_length']}, delta {s['delta']:g}, clip {s['max_grad_norm']}, "
        f"device {payload['environment']['device']}.",
        "",
    ]
    for name, sc in payload["scenarios"].items():
        sites = [x["name"] for x in sc["sites"]]
        sizes = ", ".join(f"{x['name']} {x['train_rows']}+{x['eval_rows']}" for x in sc["sites"])
        lines += [f"## {name}", "", f"{sc['note']}; {sc['labels']} classes; train+held-out rows: {sizes}.", ""]
        rows = []
        for c in sc["configs"]:
            spent = max(c["epsilon_spent"].values()) if c["epsilon_spent"] else None
            rows.append(
                [
                    c["label"],
                    c["epsilon_cap"] if c["kind"] in ("alone", "federated") else None,
                    spent,
                    *[c["accuracy"].get(x) for x in sites],
                    c["accuracy"]["pooled"],
                ]
            )
        lines.append(markdown_table(["configuration", "ε cap", "ε spent (max site)", *sites, "pooled"], rows))
        beats = sc["federation_beats_alone"]
        if beats:
            verdicts = ", ".join(f"ε={e}: {_verdict(v)}" for e, v in beats.items())
            lines += ["", f"Every site better in the federation than alone at the same ε: {verdicts}."]
        lines.append("")
    lines.append(
        '"No meaningful DP": production cannot switch DP off, so the non-private federated run uses an epsilon cap '
        "of 1e6, which gives the lowest noise multiplier allowed (0.3) with clipping at 1.0. Centralised rows train "
        "without clipping or noise (benchmark-only code)."
    )
    return "\n".join(lines)


def plot(payload: dict[str, Any], path: Path) -> Path | None:
    """Pooled held-out accuracy per round, one panel per scenario."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        console.print("[yellow]matplotlib is not installed; no plot (pip install matplotlib)")
        return None
    scenarios = payload["scenarios"]
    fig, axes = plt.subplots(1, len(scenarios), figsize=(6.5 * len(scenarios), 4.5), squeeze=False)
    for ax, (name, sc) in zip(axes[0], scenarios.items(), strict=True):
        for c in sc["configs"]:
            style = {"reference": "-.", "central": ":", "alone": "--", "federated": "-"}[c["kind"]]
            ax.plot(range(len(c["curve"])), c["curve"], style, marker="o", markersize=3, label=c["label"])
        ax.set_title(name)
        ax.set_xlabel("round (central runs: same number of steps)")
        ax.set_ylabel("pooled held-out accuracy")
        ax.set_ylim(0, 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
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
    if args.quick:
        # Every simulate() call pays for an engine start and a model load per site; four of them per scenario
        # would not fit a few minutes on 2 cores, so the quick grid is the two ends of the epsilon range.
        s = Settings(
            base,
            rounds=2,
            local_steps=6,
            batch_size=16,
            max_length=32,
            epsilons=(1.0, 8.0),
            alone_epsilons=(8.0,),
            nonprivate_federated=False,
        )
    else:
        s = Settings(base)
    grid = {"epsilons": args.epsilons, "alone_epsilons": args.alone_epsilons}
    grid["nonprivate_federated"] = args.fed_nonprivate
    s = replace(s, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in grid.items() if v is not None})
    overrides = {
        k: v
        for k, v in {
            "rounds": args.rounds,
            "local_steps": args.local_steps,
            "batch_size": args.batch_size,
            "learning_rate": args.lr,
            "max_length": args.max_length,
            "lora_r": args.lora_r,
            "lora_alpha": args.lora_alpha,
            "parallel_sites": args.parallel_sites,
        }.items()
        if v is not None
    }
    return replace(s, device=device, seed=args.seed, **overrides)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="subsampled data, 2 rounds x 6 steps: minutes on a CPU")
    parser.add_argument("--data", help="folder with banking77/ and medical-abstracts/ (default ../shared/data)")
    parser.add_argument("--scenarios", nargs="+", default=["banking77", "medical"], choices=["banking77", "medical"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--base-model", help="local HF model folder (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--epsilons", type=float, nargs="+", help="federated DP caps (default 1 3 8; quick 1 8)")
    parser.add_argument("--alone-epsilons", type=float, nargs="+", help="site-alone caps (default 1 3 8; quick 8)")
    parser.add_argument(
        "--fed-nonprivate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run the federation with no meaningful DP (default: on; quick: off)",
    )
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--local-steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--lora-r", type=int, help="LoRA rank (default 8): under DP, fewer parameters, less noise")
    parser.add_argument("--lora-alpha", type=int, help="LoRA alpha (default 16)")
    parser.add_argument("--intents", type=int, help="banking77: keep the N most frequent intents (quick: 10)")
    parser.add_argument("--max-rows", type=int, help="rows per scenario (default: quick 600/400, full all)")
    parser.add_argument("--parallel-sites", type=int)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in this process (0: torch default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, help="output stem (default benchmarks/results/utility[-quick])")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    set_threads(args.threads)
    if device.startswith("cuda"):
        # Ray hides GPUs from actors that reserve none; simulated sites must see it to train on it.
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    settings = _settings(args, device)
    root = data_dir(args.data)
    scenarios: list[Scenario] = []
    if "banking77" in args.scenarios:
        sc = load_banking77(
            root,
            intents=args.intents or (10 if args.quick else None),
            seed=args.seed,
            max_rows=args.max_rows or (600 if args.quick else None),
        )
        scenarios.append(sc) if sc else console.print(f"[yellow]skipping banking77: not found under {root}")
    if "medical" in args.scenarios:
        sc = load_medical(root, seed=args.seed, max_rows=args.max_rows or (400 if args.quick else None))
        scenarios.append(sc) if sc else console.print(f"[yellow]skipping medical-abstracts: not found under {root}")
    if not scenarios:
        console.print(f"[yellow]no benchmark data under {root}; nothing to do (pass --data DIR)")
        return 0

    import tempfile

    stem = args.out or RESULTS_DIR / ("utility-quick" if args.quick else "utility")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedtune-utility-") as tmp, quiet(), progress() as bar:
        work = args.work or Path(tmp)
        results = {sc.name: run_scenario(sc, settings, work / sc.name, bar) for sc in scenarios}
    payload = build_payload(results, settings, "quick" if args.quick else "full", time.monotonic() - started)
    markdown = render_markdown(payload)
    json_path, md_path = write_outputs(stem, payload, markdown)
    png = plot(payload, stem.with_suffix(".png"))
    console.print(markdown)
    console.print(f"wrote {json_path}, {md_path}" + (f", {png}" if png else "") + f" in {payload['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
