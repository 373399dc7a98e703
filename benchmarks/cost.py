"""Cost benchmark: what DP, secure aggregation and federation cost, each as a ratio measured in one run.

* DP-SGD step time / non-DP LoRA step time, for Opacus' per-sample-gradient modes `hooks`, `ew` (expanded
  weights) and `ghost` (ghost clipping: `make_private(..., grad_sample_mode="ghost")` returns a criterion
  wrapper whose `backward()` runs the two passes). All four models (non-DP and the three DP modes) are built
  first and then timed interleaved, step by step, so machine load hits every mode alike. Fixed batches (no
  Poisson sampling) keep the work per step identical. Median per-step time.
* bytes per site per round / adapter fp32 size, and / full-model fp32 size: from the egress audit logs of a
  small real `simulate` run (everything a site sent in a training round, its evaluation metrics included).
* secure-aggregation round time / plain FedAvg round time: two `simulate` runs, same seed, sites, data and
  settings, secure aggregation on vs off; mean wall time of the training rounds (train + aggregate + evaluate).
* simulation wall time for 2, 8 and 32 virtual sites, 1 round, tiny data, secure aggregation on (whole
  `simulate` call, engine start included). `--quick` uses a 2-layer BERT built from a config for this part, so
  that 32 sites fit in a CPU smoke run; the full mode uses the real base model.
* peak RSS of a site process: a fresh Python process builds a `Site` (base model, data, ledger), trains one DP
  round and evaluates, then reports `getrusage(RUSAGE_SELF).ru_maxrss` (and the CUDA peak on a GPU).

`--device cuda` applies to the step-time and site-memory parts; the simulations run on CPU (Flower's engine
reserves no GPU for virtual sites).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import torch  # noqa: E402

from common import (  # noqa: E402
    RESULTS_DIR,
    console,
    environment,
    make_optimizer,
    markdown_table,
    progress,
    quiet,
    resolve_device,
    set_threads,
    sync,
    write_outputs,
)
from fedtune.client.audit import EgressLog, egress_path  # noqa: E402
from fedtune.client.tasks import encode_classification, per_example_loss  # noqa: E402
from fedtune.common.adapter import num_parameters  # noqa: E402
from fedtune.common.config import FederationSpec, SiteSpec  # noqa: E402
from fedtune.common.model import load_base_model, load_lora_model  # noqa: E402
from fedtune.common.synthetic import BANK_INTENTS, generate_bank_messages, write_demo_sites  # noqa: E402

DP_MODES = ("hooks", "ew", "ghost")


@dataclass
class Settings:
    base_model: Path
    device: str = "cpu"
    # step time
    step_batch: int = 32
    step_max_length: int = 64
    step_warmup: int = 3
    step_samples: int = 20
    # simulations
    sim_rows_per_site: int = 120
    sim_local_steps: int = 10
    sim_batch: int = 32
    sim_max_length: int = 64
    sim_rounds: int = 2
    scaling_sites: tuple[int, ...] = (2, 8, 32)
    scaling_rows_per_site: int = 24
    scaling_tiny_model: bool = False
    parallel_sites: int | None = None
    seed: int = 0


def _spec(base: Path, max_length: int, **training: Any) -> FederationSpec:
    return FederationSpec.model_validate(
        {
            "name": "cost",
            "base_model": {"path": str(base), "max_length": max_length},
            "task": {"kind": "classification", "labels": list(BANK_INTENTS)},
            "lora": {"r": 8, "alpha": 16},
            "training": {"min_sites": 2, **training},
            "privacy": {"default_epsilon_cap": 50.0},
        }
    )


# -------------------------------------------------------------------------------------------------
# DP-SGD step time


class _CrossEntropy(torch.nn.Module):
    """A criterion with a `reduction` attribute, which Opacus' ghost-clipping wrapper switches to "none"."""

    def __init__(self) -> None:
        super().__init__()
        self.reduction = "mean"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits, labels, reduction=self.reduction)


def _step_fn(mode: str, spec: FederationSpec, batch: tuple[torch.Tensor, ...], device: str) -> Callable[[], None]:
    """One optimizer step of LoRA training in `mode` ("nondp" or an Opacus grad_sample_mode), ready to time."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    model = load_lora_model(spec, seed=spec.training.seed).model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer("sgd", params, 0.05)
    batch = tuple(t.to(device) for t in batch)
    if mode == "nondp":

        def step() -> None:
            per_example_loss(model, batch, "classification").mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step
    loader = DataLoader(TensorDataset(*(t.cpu() for t in batch)), batch_size=len(batch[0]))
    engine = PrivacyEngine(accountant="rdp")
    common = dict(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,  # identical work every step
        grad_sample_mode=mode,
    )
    if mode == "ghost":
        dp_model, dp_opt, criterion, _ = engine.make_private(criterion=_CrossEntropy(), **common)

        def step() -> None:
            logits = dp_model(input_ids=batch[0], attention_mask=batch[1]).logits
            criterion(logits, batch[2]).backward()  # DPTensorFastGradientClipping: both passes
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)

        return step
    dp_model, dp_opt, _ = engine.make_private(**common)

    def step() -> None:
        if mode == "ew":  # the expanded-weights wrapper takes the batch tensor positionally (forward(x, ...))
            logits = dp_model(batch[0], attention_mask=batch[1]).logits
            torch.nn.functional.cross_entropy(logits, batch[2]).backward()
        else:
            per_example_loss(dp_model, batch, "classification").mean().backward()
        dp_opt.step()
        dp_opt.zero_grad(set_to_none=True)

    return step


def _model_label(path: Path) -> str:
    config = path / "config.json"
    arch = json.loads(config.read_text()).get("model_type", "?") if config.is_file() else "?"
    return f"{path.name} ({arch})" if path.name != "model" else f"packaged all-MiniLM-L6-v2 ({arch})"


def step_times(settings: Settings, tick: Callable[[], None]) -> dict[str, Any]:
    spec = _spec(settings.base_model, settings.step_max_length, seed=settings.seed)
    tokenizer = load_lora_model(spec).tokenizer
    texts, labels = generate_bank_messages(settings.step_batch, settings.seed)
    batch = encode_classification(tokenizer, texts, labels, settings.step_max_length).tensors
    steps: dict[str, Callable[[], None]] = {}
    errors: dict[str, str] = {}
    for mode in ("nondp", *DP_MODES):
        try:
            steps[mode] = _step_fn(mode, spec, batch, settings.device)
            steps[mode]()  # first call: a mode that cannot run this model fails here, not in the timing loop
        except Exception as exc:  # recorded, not fatal: e.g. expanded weights reject some layer types
            errors[mode] = f"{type(exc).__name__}: {exc}"[:300]
            steps.pop(mode, None)
    for _ in range(settings.step_warmup):
        for fn in steps.values():
            fn()
    samples: dict[str, list[float]] = defaultdict(list)
    peak: dict[str, float] = {}
    for _ in range(settings.step_samples):
        for mode, fn in steps.items():  # interleaved: load changes during the run hit every mode alike
            sync(settings.device)
            t0 = time.perf_counter()
            fn()
            sync(settings.device)
            samples[mode].append(time.perf_counter() - t0)
        tick()
    if settings.device.startswith("cuda"):
        # Transient memory of one step in each mode, above what all resident models already hold.
        for mode, fn in steps.items():
            sync(settings.device)
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            sync(settings.device)
            peak[mode] = (torch.cuda.max_memory_allocated() - before) / 2**20
    median = {m: statistics.median(v) for m, v in samples.items()}
    fastest = {m: min(v) for m, v in samples.items()}
    base = fastest.get("nondp")
    return {
        "model": _model_label(settings.base_model),
        "batch_size": settings.step_batch,
        "max_length": settings.step_max_length,
        "samples": settings.step_samples,
        "median_s": median,
        "fastest_s": fastest,
        # Ratios of the fastest samples: on a shared machine contention only ever adds time.
        "ratio_to_nondp": {m: fastest[m] / base for m in DP_MODES if m in fastest and base},
        "median_ratio_to_nondp": {m: median[m] / median["nondp"] for m in DP_MODES if m in median and base},
        "errors": errors,
        "cuda_step_peak_extra_mib": peak,
    }


# -------------------------------------------------------------------------------------------------
# Simulations: bytes, secure vs plain, scaling


def _sites(work: Path, n: int, rows: int, seed: int) -> list[SiteSpec]:
    from fedtune.server.demo import site_specs

    files = write_demo_sites(work / "data", n, rows, alpha=1.0, seed=seed)
    return site_specs(files, work)


def _simulate(spec: FederationSpec, work: Path, n_sites: int, rows: int, settings: Settings, tick: Callable[[], None]):
    from fedtune.server.simulation import simulate

    class _Ticker:
        def round_started(self, round_: int, total: int) -> None:
            pass

        def round_finished(self, report: Any) -> None:
            tick()

    sites = _sites(work, n_sites, rows, settings.seed)
    t0 = time.monotonic()
    result = simulate(spec, sites, out_dir=work / "runs", reporter=_Ticker(), parallel_sites=settings.parallel_sites)
    return result, sites, time.monotonic() - t0


def _egress_per_round(sites: Sequence[SiteSpec]) -> dict[str, Any]:
    """Bytes each site sent in each training round, by kind, read back from its egress audit log."""
    per_site_round: dict[tuple[str, int], int] = defaultdict(int)
    by_kind: dict[str, list[int]] = defaultdict(list)
    for site in sites:
        kinds: dict[tuple[int, str], int] = defaultdict(int)
        for entry in EgressLog(egress_path(site.state_dir)).entries():
            if entry.round < 1:  # round 0 only evaluates the initial adapter
                continue
            per_site_round[(site.name, entry.round)] += entry.bytes
            kinds[(entry.round, entry.kind)] += entry.bytes
        for (_, kind), b in kinds.items():
            by_kind[kind].append(b)
    totals = list(per_site_round.values())
    return {
        "mean_bytes": statistics.mean(totals),
        "max_bytes": max(totals),
        "by_kind_mean": {k: statistics.mean(v) for k, v in sorted(by_kind.items())},
    }


def federation_costs(settings: Settings, work: Path, tick: Callable[[], None]) -> dict[str, Any]:
    """Secure vs plain rounds, side by side, for both phases of the recipe: LoRA rounds (the whole model's
    forward and backward per step) and head rounds (a linear head on cached features: seconds or less)."""
    common = dict(
        rounds=settings.sim_rounds,
        local_steps=settings.sim_local_steps,
        batch_size=settings.sim_batch,
        seed=settings.seed,
    )
    runs: dict[str, Any] = {}
    for phase, head_rounds in (("lora", 0), ("head", settings.sim_rounds)):
        for name, secure in (("secure", True), ("plain", False)):
            spec = _spec(settings.base_model, settings.sim_max_length, **common)
            training = spec.training.model_copy(
                update={"head": spec.training.head.model_copy(update={"rounds": head_rounds})}
            )
            spec = spec.model_copy(
                update={"secagg": spec.secagg.model_copy(update={"enabled": secure}), "training": training}
            )
            result, sites, wall = _simulate(
                spec, work / f"{phase}-{name}", 2, settings.sim_rows_per_site, settings, tick
            )
            rounds = [r.wall_s for r in result.rounds[1:]]
            runs[f"{phase}-{name}"] = {
                "wall_s": wall,
                "round_s": rounds,
                "mean_round_s": statistics.mean(rounds),
                "egress_per_site_round": _egress_per_round(sites),
                "applied": all(r.update is not None and r.update.mean_delta is not None for r in result.rounds[1:]),
            }
            if phase == "lora":
                adapter_bytes = 4 * num_parameters(result.final_state)
    full_params = sum(p.numel() for p in load_base_model(_spec(settings.base_model, 32)).parameters())
    full_bytes = 4 * full_params
    secure_bytes = runs["lora-secure"]["egress_per_site_round"]["mean_bytes"]
    plain_bytes = runs["lora-plain"]["egress_per_site_round"]["mean_bytes"]
    return {
        "sites": 2,
        "rounds": settings.sim_rounds,
        "adapter_fp32_bytes": adapter_bytes,
        "full_model_fp32_bytes": full_bytes,
        "runs": runs,
        "bytes_ratio": {
            "secure_over_adapter": secure_bytes / adapter_bytes,
            "secure_over_full_model": secure_bytes / full_bytes,
            "plain_over_adapter": plain_bytes / adapter_bytes,
            "plain_over_full_model": plain_bytes / full_bytes,
        },
        "secure_over_plain_round_time": {
            phase: runs[f"{phase}-secure"]["mean_round_s"] / runs[f"{phase}-plain"]["mean_round_s"]
            for phase in ("lora", "head")
        },
    }


def tiny_bert(out: Path, tokenizer_from: Path) -> Path:
    """A 2-layer BERT with the base model's tokenizer: lets 32 virtual sites fit a CPU smoke run."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(str(tokenizer_from))
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def scaling(settings: Settings, work: Path, tick: Callable[[], None]) -> dict[str, Any]:
    base = tiny_bert(work / "tiny-bert", settings.base_model) if settings.scaling_tiny_model else settings.base_model
    out: dict[str, Any] = {"model": "tiny 2-layer BERT" if settings.scaling_tiny_model else str(base), "runs": {}}
    for n in settings.scaling_sites:
        spec = _spec(base, 32, rounds=1, local_steps=2, batch_size=8, seed=settings.seed, min_sites=2)
        result, _, wall = _simulate(spec, work / f"sites-{n}", n, settings.scaling_rows_per_site, settings, tick)
        out["runs"][str(n)] = {
            "wall_s": wall,
            "round_s": result.rounds[-1].wall_s,
            "applied": result.rounds[-1].update is not None and result.rounds[-1].update.mean_delta is not None,
        }
    first = out["runs"][str(settings.scaling_sites[0])]["wall_s"]
    out["ratio_to_smallest"] = {n: r["wall_s"] / first for n, r in out["runs"].items()}
    return out


# -------------------------------------------------------------------------------------------------
# Site process memory


def _site_child(job: Path) -> None:
    """Runs in a fresh process: one site, one DP round and an evaluation; prints its peak memory as JSON."""
    from fedtune.client.site import Site
    from fedtune.common.adapter import adapter_state

    payload = json.loads(job.read_text())
    spec = FederationSpec.model_validate_json(payload["spec"])
    site_spec = SiteSpec.model_validate_json(payload["site"])
    with quiet():
        site = Site(site_spec, spec)
        state = adapter_state(site.loaded.model)
        site.train(state, "rss", 1, 1)
        site.evaluate(state)
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    if site.device.startswith("cuda"):
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


def site_memory(settings: Settings, work: Path) -> dict[str, Any]:
    spec = _spec(
        settings.base_model,
        settings.sim_max_length,
        local_steps=settings.sim_local_steps,
        batch_size=settings.sim_batch,
        seed=settings.seed,
    )
    site = _sites(work, 2, settings.sim_rows_per_site, settings.seed)[0]
    site = site.model_copy(update={"device": settings.device})
    job = work / "job.json"
    job.write_text(json.dumps({"spec": spec.model_dump_json(), "site": site.model_dump_json()}))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--site-child", str(job)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(
        {"rows": settings.sim_rows_per_site, "batch_size": settings.sim_batch, "max_length": settings.sim_max_length}
    )
    return result


# -------------------------------------------------------------------------------------------------
# Output


def render_markdown(payload: dict[str, Any]) -> str:
    env, s = payload["environment"], payload["settings"]
    where = env.get("gpu") or f"CPU ({env['cpu_count']} cores)"
    lines = [f"# Cost ({payload['mode']})", "", f"Device for step time and site memory: {where}.", ""]
    st = payload.get("step_time")
    if st:
        mem = st["cuda_step_peak_extra_mib"]
        f, md = st["fastest_s"], st["median_s"]
        rows = [["non-DP LoRA", f.get("nondp"), md.get("nondp"), 1.0, 1.0, mem.get("nondp")]]
        for m in DP_MODES:
            ratios = [st["ratio_to_nondp"].get(m), st["median_ratio_to_nondp"].get(m)]
            rows.append([f"DP-SGD, Opacus `{m}`", f.get(m), md.get(m), *ratios, mem.get(m)])
        headers = ["mode", "s/step (fastest)", "s/step (median)", "ratio (fastest)", "ratio (median)"]
        headers.append("extra GPU memory per step (MiB)")
        if not mem:
            rows, headers = [r[:5] for r in rows], headers[:5]
        lines += [
            f"### Step time (batch {st['batch_size']}, max_length {st['max_length']}, {st['samples']} samples each)",
            "",
            f"Model: {st['model']}.",
            "",
            markdown_table(headers, rows),
        ]
        lines += [f"\n`{m}` failed: {e}" for m, e in st["errors"].items()]
        lines.append("")
    fc = payload.get("federation")
    if fc:
        br, ratio = fc["bytes_ratio"], fc["secure_over_plain_round_time"]
        sec, pl = fc["runs"]["lora-secure"], fc["runs"]["lora-plain"]
        hsec, hpl = fc["runs"]["head-secure"], fc["runs"]["head-plain"]
        lines += [
            f"### Bytes and round time ({fc['sites']} sites, {fc['rounds']} rounds, from the egress audit logs)",
            "",
            markdown_table(
                ["quantity", "secure aggregation", "plain FedAvg"],
                [
                    [
                        "bytes sent per site per round",
                        sec["egress_per_site_round"]["mean_bytes"],
                        pl["egress_per_site_round"]["mean_bytes"],
                    ],
                    ["/ adapter fp32 size", br["secure_over_adapter"], br["plain_over_adapter"]],
                    ["/ full-model fp32 size", br["secure_over_full_model"], br["plain_over_full_model"]],
                    ["mean LoRA round time (s)", sec["mean_round_s"], pl["mean_round_s"]],
                    ["LoRA round time / plain", ratio["lora"], 1.0],
                    ["mean head round time (s)", hsec["mean_round_s"], hpl["mean_round_s"]],
                    ["head round time / plain", ratio["head"], 1.0],
                ],
            ),
            "",
            f"Adapter: {fc['adapter_fp32_bytes']:,} bytes fp32; "
            f"full model: {fc['full_model_fp32_bytes']:,} bytes fp32.",
            "",
        ]
    sc = payload.get("scaling")
    if sc:
        rows = [[n, r["wall_s"], r["round_s"], sc["ratio_to_smallest"][n]] for n, r in sc["runs"].items()]
        lines += [
            f"### Simulation wall time (1 round, secure aggregation, model: {sc['model']})",
            "",
            markdown_table(["virtual sites", "simulate() s", "round s", "ratio to smallest"], rows),
            "",
        ]
    mem = payload.get("site_memory")
    if mem:
        if "error" in mem:
            lines += ["### Site process memory", "", f"failed: {mem['error'][-300:]}", ""]
        else:
            extra = f", CUDA peak {mem['cuda_peak_mib']:.0f} MiB" if "cuda_peak_mib" in mem else ""
            lines += [
                "### Site process memory",
                "",
                f"Peak RSS of a site process (load model + data, one DP round of {s['sim_local_steps']} steps, "
                f"evaluate): {mem['peak_rss_mib']:.0f} MiB{extra}.",
                "",
            ]
    return "\n".join(lines)


def _settings(args: argparse.Namespace, device: str) -> Settings:
    from fedtune.server.demo import packaged_base_model

    base = Path(args.base_model) if args.base_model else packaged_base_model()
    if args.quick:
        s = Settings(
            base,
            step_batch=16,
            step_max_length=32,
            step_warmup=2,
            step_samples=8,
            sim_rows_per_site=60,
            sim_local_steps=4,
            sim_batch=16,
            sim_max_length=32,
            scaling_rows_per_site=12,
            scaling_tiny_model=True,
        )
    else:
        s = Settings(base)
    overrides = {"step_batch": args.step_batch, "step_max_length": args.step_max_length}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(s, device=device, parallel_sites=args.parallel_sites, seed=args.seed, **overrides)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches, few samples, tiny model for scaling")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--base-model", help="local HF model folder (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--parts", nargs="+", default=["step", "federation", "scaling", "memory"],
                        choices=["step", "federation", "scaling", "memory"])  # fmt: skip
    parser.add_argument("--step-batch", type=int, help="batch size for the step-time part")
    parser.add_argument("--step-max-length", type=int, help="tokens per example for the step-time part")
    parser.add_argument("--parallel-sites", type=int)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in this process (0: torch default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="output stem (default benchmarks/results/cost[-quick][-cuda])")
    parser.add_argument("--site-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.site_child:
        _site_child(args.site_child)
        return 0

    device = resolve_device(args.device)
    set_threads(args.threads)
    settings = _settings(args, device)
    suffix = ("-quick" if args.quick else "") + ("-cuda" if device.startswith("cuda") else "")
    stem = args.out or RESULTS_DIR / f"cost{suffix}"
    payload: dict[str, Any] = {
        "benchmark": "cost",
        "mode": "quick" if args.quick else "full",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
        "environment": environment(device),
    }
    started = time.monotonic()
    sim_ticks = 4 * (settings.sim_rounds + 1) if "federation" in args.parts else 0
    sim_ticks += 2 * len(settings.scaling_sites) if "scaling" in args.parts else 0
    with tempfile.TemporaryDirectory(prefix="fedtune-cost-") as tmp, quiet(), progress() as bar:
        work = Path(tmp)
        if "step" in args.parts:
            task = bar.add_task("step time (non-DP, hooks, ew, ghost)", total=settings.step_samples)
            payload["step_time"] = step_times(settings, lambda: bar.advance(task))
        if "memory" in args.parts:
            task = bar.add_task("site process memory", total=1)
            payload["site_memory"] = site_memory(settings, work / "memory")
            bar.advance(task)
        sims = bar.add_task("simulations", total=sim_ticks) if sim_ticks else None
        if "federation" in args.parts:
            payload["federation"] = federation_costs(settings, work / "federation", lambda: bar.advance(sims))
        if "scaling" in args.parts:
            payload["scaling"] = scaling(settings, work / "scaling", lambda: bar.advance(sims))
    payload["wall_s"] = time.monotonic() - started
    markdown = render_markdown(payload)
    json_path, md_path = write_outputs(stem, payload, markdown)
    console.print(markdown)
    console.print(f"wrote {json_path}, {md_path} in {payload['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
