"""Helpers shared by the utility and cost benchmarks: paths, devices, non-private training, output.

Kept out of the package on purpose: nothing here is part of what a site or the operator runs. The non-private
trainer in particular exists only so that the benchmarks can show the price of privacy; production code has
no way to train without DP.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # benchmarks never download weights
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from peft import PeftModel
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch.utils.data import DataLoader, TensorDataset

from fedtune.client.tasks import per_example_loss
from fedtune.client.trainer import make_optimizer

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"

console = Console(stderr=True)


def data_dir(arg: str | Path | None) -> Path:
    """--data, else $FEDTUNE_DATA, else ../shared/data next to the repository (never inside it)."""
    return Path(arg or os.environ.get("FEDTUNE_DATA") or DEFAULT_DATA_DIR).expanduser().resolve()


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return name


def set_threads(n: int | None) -> None:
    """Pin torch's intra-op threads. On a shared CPU, OpenMP threads that spin-wait for each other make a step
    5-10x slower than one thread does, and the slowdown varies with the neighbours' load; one thread per process
    gives stable timings (the simulated sites already get one each from the engine)."""
    if n:
        torch.set_num_threads(n)


def sync(device: str) -> None:
    """Wait for queued GPU work, so that wall-clock timings measure the work and not its launch."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def environment(device: str) -> dict[str, Any]:
    """Enough about the machine to compare two result files honestly."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


@contextmanager
def quiet() -> Iterator[None]:
    """Silence library chatter (Opacus' secure-RNG notice, Flower's deprecation banner, HF hints).

    Benchmarks print one progress display and one table; hundreds of repeated warnings would hide both.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        levels = {name: logging.getLogger(name).level for name in ("flwr", "ray", "transformers", "fedtune")}
        for name in levels:
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def train_nonprivate(
    model: PeftModel,
    data: TensorDataset,
    kind: str,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    optimizer: str,
    device: str,
    seed: int,
) -> list[float]:
    """Plain minibatch training of whatever is trainable: no clipping, no noise, no per-sample gradients.

    This is the non-private reference ("how good could it be"), used only by the benchmarks.
    """
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(optimizer, params, learning_rate)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    while len(losses) < steps:
        for batch in DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator, drop_last=False):
            if len(losses) >= steps:
                break
            batch = tuple(t.to(device, non_blocking=True) for t in batch)
            loss = per_example_loss(model, batch, kind).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    model.to("cpu")
    return losses


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(stem: Path, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """STEM.json and STEM.md, side by side."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    md_path.write_text(markdown.rstrip() + "\n", encoding="utf-8")
    return json_path, md_path
