"""TensorBoard event files from the run store, for people who already watch TensorBoard.

The figures are `round_figures.round_scalars`, the same ones the MLflow sink logs.

Optional: it needs `tensorboard` (for `torch.utils.tensorboard`) or `tensorboardX`.
The store stays the source of truth; event files can be rewritten from it at any time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedtune.server.console.round_figures import round_scalars
from fedtune.server.store import FINISHED, RunStore


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


class TensorBoardSink:
    """Appends rounds to one run's event files as the federation records them."""

    def __init__(self, store_path: Path, run: str, log_dir: Path) -> None:
        self._writer = _writer_class()(log_dir=str(Path(log_dir) / run))
        self.store_path, self.run = Path(store_path), run

    def write_round(self, round_: int) -> None:
        with RunStore(self.store_path, readonly=True) as store:
            for tag, value in round_scalars(store, self.run, [round_]).get(round_, []):
                self._writer.add_scalar(tag, value, global_step=round_)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def write_run(store: RunStore, run: str, log_dir: Path) -> Path:
    """All finished rounds of a run as event files under LOG_DIR/RUN; returns that directory."""
    run_id = store.run(run)["id"]
    writer = _writer_class()(log_dir=str(Path(log_dir) / run_id))
    try:
        finished = [r["round"] for r in store.rounds(run_id) if r["status"] in FINISHED]
        for round_, scalars in sorted(round_scalars(store, run_id, finished).items()):
            for tag, value in scalars:
                writer.add_scalar(tag, value, global_step=round_)
    finally:
        writer.close()
    return Path(log_dir) / run_id
