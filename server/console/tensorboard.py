"""TensorBoard event files from the run store, for people who already watch TensorBoard.

Optional: it needs `tensorboard` (for `torch.utils.tensorboard`) or `tensorboardX`.
The store stays the source of truth; event files can be rewritten from it at any time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedtune.server.store import RunStore


class TensorBoardUnavailable(RuntimeError):
    """Neither tensorboard nor tensorboardX is installed."""


def _writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter
    except ImportError:
        pass
    try:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    except ImportError:
        raise TensorBoardUnavailable(
            "writing TensorBoard events needs the `tensorboard` package: `pip install tensorboard`"
        ) from None


def _scalars(store: RunStore, run: str, round_: int) -> list[tuple[str, float]]:
    """Every number the store holds for one round, under stable TensorBoard tags."""
    out: list[tuple[str, float]] = []
    for r in store.rounds(run):
        if r["round"] != round_:
            continue
        for key in ("weighted_accuracy", "weighted_loss", "wall_s", "train_s", "eval_s"):
            if r[key] is not None:
                out.append((f"global/{key}", float(r[key])))
    up = down = 0
    for s in store.site_rounds(run):
        if s["round"] != round_:
            continue
        up, down = up + s["bytes_up"], down + s["bytes_down"]
        for key in ("eval_accuracy", "eval_loss", "epsilon", "epsilon_worst", "bytes_up", "bytes_down"):
            if s[key] is not None:
                out.append((f"site/{s['site']}/{key}", float(s[key])))
    out += [("global/bytes_up", float(up)), ("global/bytes_down", float(down))]
    return out


class TensorBoardSink:
    """Appends rounds to one run's event files as the federation records them."""

    def __init__(self, store_path: Path, run: str, log_dir: Path) -> None:
        self._writer = _writer_class()(log_dir=str(Path(log_dir) / run))
        self.store_path, self.run = Path(store_path), run

    def write_round(self, round_: int) -> None:
        with RunStore(self.store_path, readonly=True) as store:
            for tag, value in _scalars(store, self.run, round_):
                self._writer.add_scalar(tag, value, global_step=round_)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def write_run(store: RunStore, run: str, log_dir: Path) -> Path:
    """All finished rounds of a run as event files under LOG_DIR/RUN; returns that directory."""
    run_id = store.run(run)["id"]
    writer = _writer_class()(log_dir=str(Path(log_dir) / run_id))
    try:
        for r in store.rounds(run_id):
            if r["status"] in ("completed", "failed"):
                for tag, value in _scalars(store, run_id, r["round"]):
                    writer.add_scalar(tag, value, global_step=r["round"])
    finally:
        writer.close()
    return Path(log_dir) / run_id
