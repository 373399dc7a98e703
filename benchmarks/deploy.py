"""Deployment against simulation: the same federation, data and settings, side by side in one run.

Deployment is the real thing on loopback: a TLS SuperLink with SuperNode authentication, a signed app bundle,
secure aggregation, and each site started as an operator's site starts it (`fedtune client start`: the warm
worker and its SuperNode), one torch thread per site. Simulation is `fedtune simulate`'s engine on the same
sites' data. Reported:

- mean round time in each and the ratio deployment / simulation (both from the run store's `wall_s`: the
  federation loop is the same code in both);
- per-stage site time: seconds each kind of message costs a site in its worker, pull to push (`tasks.jsonl`);
- peak RSS of each site's worker (it holds the base model, so this is the site's memory);
- array bytes a site receives per round, against the adapter's fp32 size (the adapter should travel once).

The loopback federation is the one the deployment tests use (`tests/deploy_harness.py`), so the benchmark
measures exactly what the tests exercise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one torch thread per site, here and in every child

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import RESULTS_DIR, console, environment, markdown_table, set_threads, write_outputs
from fedtune.common.config import FederationSpec

STAGES = ("train", "train.secagg_share", "train.secagg_mask", "train.secagg_consistency", "train.secagg_unmask")


def _spec(base_model: Path, out: Path, args: argparse.Namespace) -> FederationSpec:
    from fedtune.common.synthetic import BANK_INTENTS

    return FederationSpec.model_validate(
        {
            "name": "deploy-bench",
            "base_model": {"path": str(base_model), "max_length": 32},
            "task": {"kind": "classification", "labels": list(BANK_INTENTS)},
            "training": {
                "rounds": args.rounds,
                "local_steps": args.local_steps,
                "batch_size": 16,
                "min_sites": 2,
                "seed": 0,
                "head": {"rounds": args.head_rounds, "local_steps": args.local_steps},
            },
            "privacy": {"default_epsilon_cap": 50.0, "noise_multiplier": 1.0},
            "secagg": {"enabled": True, "stage_timeout_s": 120},
            "output_dir": str(out),
        }
    )


def _round_times(store: Path, run: str | None = None) -> list[float]:
    from fedtune.server.store import RunStore

    with RunStore(store, readonly=True) as db:
        run = run or db.runs()[0]["id"]  # newest first
        return [float(r["wall_s"]) for r in db.rounds(run) if r["round"] >= 1 and r["wall_s"] is not None]


def simulation(spec: FederationSpec, files: list[Path], work: Path) -> dict[str, Any]:
    from fedtune.server.demo import site_specs
    from fedtune.server.simulation import simulate

    sites = site_specs(files, work)
    t0 = time.monotonic()
    simulate(spec, sites, out_dir=Path(spec.output_dir), parallel_sites=len(sites))
    rounds = _round_times(Path(spec.output_dir) / "store.sqlite")
    return {"wall_s": time.monotonic() - t0, "round_s": rounds, "mean_round_s": statistics.mean(rounds)}


def deployment(spec: FederationSpec, files: list[Path], work: Path) -> dict[str, Any]:
    from deploy_harness import start_superlink, write_federation

    fed = start_superlink(work)
    try:
        for i, f in enumerate(files):
            fed.add_site(f"site-{i + 1}", f, epsilon_cap=50.0)
        fed.pin_peers()
        for name in fed.sites:
            fed.register(name)
            fed.start_site(name)
        fed.wait_online(len(files), timeout=300)
        federation = write_federation(work / "federation.toml", spec)
        cmd = [str(Path(sys.executable).parent / "fedtune"), "run", str(federation), "--superlink", fed.address]
        cmd += ["--root-certificates", str(fed.certs / "ca.pem"), "--signing-key", str(fed.signing_key)]
        cmd += ["--database", str(fed.database)]
        t0 = time.monotonic()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env={**os.environ})
        wall = time.monotonic() - t0
        if done.returncode != 0:
            raise RuntimeError(f"fedtune run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        rounds = _round_times(Path(spec.output_dir) / "store.sqlite")
        sites = {name: _site_costs(s.state) for name, s in fed.sites.items()}
        rejoin = _rejoin(fed, next(iter(fed.sites)))
    finally:
        fed.close()
    return {
        "wall_s": wall,
        "round_s": rounds,
        "mean_round_s": statistics.mean(rounds),
        "sites": sites,
        "rejoin_s": rejoin,
    }


def _rejoin(fed: Any, name: str) -> float:
    """SIGKILL a site's agent (no goodbye: the SuperLink still has its node online), restart it at once, and
    time until its SuperNode is active again."""
    site = fed.sites[name]
    site.process.kill()
    site.process.proc.wait(timeout=30)
    t0 = time.monotonic()
    fed.start_site(name)
    if not site.process.wait_for_log("SuperNode ID", timeout=180):
        raise RuntimeError(f"{name} did not rejoin:\n{site.process.log_text()[-3000:]}")
    return time.monotonic() - t0


def _site_costs(state: Path) -> dict[str, Any]:
    from fedtune.client.worker import tasks_log_path

    tasks = [json.loads(line) for line in tasks_log_path(state).read_text().splitlines() if line.strip()]
    by_stage: dict[str, list[float]] = defaultdict(list)
    app_by_stage: dict[str, list[float]] = defaultdict(list)
    down: dict[int, int] = defaultdict(int)
    for t in tasks:
        by_stage[t["task"]].append(t["total_s"])
        app_by_stage[t["task"]].append(t["app_s"])
        if t["round"] is not None:
            down[t["round"]] += t["array_bytes_in"]
    return {
        "workers": len({t["pid"] for t in tasks}),
        "tasks": len(tasks),
        "stage_total_s": {k: statistics.mean(v) for k, v in by_stage.items()},
        "stage_app_s": {k: statistics.mean(v) for k, v in app_by_stage.items()},
        "peak_rss_bytes": max(t["peak_rss_bytes"] for t in tasks),
        "array_bytes_down_per_round": dict(sorted(down.items())),
    }


def _adapter_bytes(spec: FederationSpec) -> int:
    from fedtune.common.adapter import adapter_state, num_parameters
    from fedtune.common.model import load_lora_model

    return 4 * num_parameters(adapter_state(load_lora_model(spec).model))


def _times(values: list[float]) -> str:
    return " / ".join(f"{x:.1f}" for x in values)


def render_markdown(payload: dict[str, Any]) -> str:
    sim, dep = payload["simulation"], payload["deployment"]
    lines = [
        f"Deployment vs simulation: {payload['settings']['sites']} sites x {payload['settings']['rows']} rows, "
        f"{payload['settings']['rounds']} rounds ({payload['settings']['head_rounds']} head), "
        f"{payload['settings']['local_steps']} DP steps, secure aggregation, one torch thread per site.",
        "",
        markdown_table(
            ["", "simulation", "deployment", "deployment / simulation"],
            [
                [
                    "mean round time (s)",
                    f"{sim['mean_round_s']:.2f}",
                    f"{dep['mean_round_s']:.2f}",
                    f"**{payload['round_time_ratio']:.2f}x**",
                ],
                ["rounds (s)", _times(sim["round_s"]), _times(dep["round_s"]), ""],
            ],
        ),
        "",
    ]
    names = sorted(dep["sites"])
    rows = []
    for stage in (*STAGES, "evaluate"):
        cells = [f"{dep['sites'][n]['stage_total_s'].get(stage, float('nan')):.3f}" for n in names]
        rows.append([stage, *cells])
    rows.append(["peak RSS of the worker (MiB)", *[f"{dep['sites'][n]['peak_rss_bytes'] / 2**20:.0f}" for n in names]])
    rows.append(["worker processes for the run", *[str(dep["sites"][n]["workers"]) for n in names]])
    lines += [
        "Per-stage site time (s, mean; the worker's pull-to-push time of each message):",
        "",
        markdown_table(["", *names], rows),
        "",
        f"Array bytes down per site per round / adapter fp32 bytes ({payload['adapter_bytes']:,}): "
        + ", ".join(f"{n}: {payload['down_over_adapter'][n]}" for n in names)
        + " (the last round also carries the final evaluation's adapter).",
        "",
        f"A site's agent killed (SIGKILL) and restarted at once is active again after {dep['rejoin_s']:.1f} s.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    from fedtune.server.demo import packaged_base_model, write_demo_data

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--rows", type=int, default=300, help="rows per site (built-in bank data)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--head-rounds", type=int, default=1, help="the first rounds train the head, then FFA-LoRA")
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "deploy")
    parser.add_argument("--work", type=Path, help="keep the scratch folder here (site logs, task logs, run store)")
    args = parser.parse_args(argv)
    set_threads(1)
    base = packaged_base_model()
    with contextlib.ExitStack() as scratch:
        work = args.work or Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix="fedtune-deploy-bench-")))
        work.mkdir(parents=True, exist_ok=True)
        _, files = write_demo_data(work, args.sites, args.rows, seed=0)
        console.print("simulation ...")
        sim = simulation(_spec(base, work / "sim" / "runs", args), files, work / "sim")
        console.print(f"simulation: {sim['mean_round_s']:.2f} s per round; deployment on loopback ...")
        spec = _spec(base, work / "deploy" / "runs", args)
        dep = deployment(spec, files, work / "deploy")
        adapter = _adapter_bytes(spec)
    rounds = range(1, args.rounds + 1)
    payload = {
        "settings": {**vars(args), "out": str(args.out), "work": str(args.work) if args.work else None},
        "machine": environment("cpu"),
        "simulation": sim,
        "deployment": dep,
        "round_time_ratio": dep["mean_round_s"] / sim["mean_round_s"],
        "adapter_bytes": adapter,
        "down_over_adapter": {
            n: [round(s["array_bytes_down_per_round"].get(r, 0) / adapter, 3) for r in rounds]
            for n, s in dep["sites"].items()
        },
    }
    json_path, md_path = write_outputs(args.out, payload, render_markdown(payload))
    console.print(render_markdown(payload))
    console.print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
