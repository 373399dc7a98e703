"""Held-out scores as three more coordinates of a secure sum, in the quantiser's own range.

A site scores the adapter it receives before it trains on it, and the scores ride in the same masked
vector as its update, so one secure sum per round carries both and the adapter travels down once. The
scores are counts (correct answers, rows) and a summed loss, each divided by a public number of rows
(`secagg.weight_cap`) so that every coordinate lies in [0, clip_range], the range the update is
quantised in: a row is then clip_range / cap, far above the quantisation step, and the server recovers
the totals to a small fraction of a row. A site with more held-out rows than the cap counts as cap rows
(its accuracy and mean loss are kept); a per-row loss above `LOSS_CAP` counts as `LOSS_CAP`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LENGTH = 3  # (correct, rows, loss-sum)
LOSS_CAP = 16.0  # nats per row: a row scored at probability e^-16 or less counts as e^-16
LOSS_UNITS = 1000  # a distributed-noise sum carries integer figures: the summed loss in thousandths of a nat


def loss_units(sites: int, cap: int) -> int:
    """The loss coordinate's units per nat in a distributed-noise sum of `sites` sites' figures: thousandths, or
    coarser where `sites` sites of `cap` rows at LOSS_CAP would pass 2^31. Both ends derive it from the message
    (the session's size, `secagg.weight_cap`), so a sum decodes without either side clamping a figure."""
    return max(1, min(LOSS_UNITS, int(2**31 // (sites * cap * LOSS_CAP))))


@dataclass(frozen=True)
class ScoreTotals:
    """What the server learns: the contributors' held-out rows, mean loss and accuracy (None: no accuracy)."""

    rows: float
    loss: float
    accuracy: float | None


def encode(rows: int, loss: float, accuracy: float | None, clip_range: float, cap: int) -> np.ndarray:
    """One site's scores as `LENGTH` coordinates in [0, clip_range]; zeros for a site with nothing to score.

    A loss that is not finite counts as `LOSS_CAP` a row, with the rows kept: zeros there would tell whether some
    held-out row met a condition the server's adapter set (its role, the round's row count)."""
    if rows <= 0:
        return np.zeros(LENGTH)
    loss = float(loss) if np.isfinite(loss) else LOSS_CAP
    counted = min(rows, cap)
    unit = clip_range / cap
    correct = (accuracy or 0.0) * counted
    return np.array([correct * unit, counted * unit, min(loss, LOSS_CAP) / LOSS_CAP * counted * unit])


def decode(total: np.ndarray, clip_range: float, cap: int, *, classification: bool) -> ScoreTotals | None:
    """The federation's scores from the summed coordinates; None if no contributor had a row to score."""
    unit = clip_range / cap
    correct, rows, loss_part = (float(v) / unit for v in np.asarray(total, dtype=np.float64)[-LENGTH:])
    if rows < 0.5:
        return None
    accuracy = min(max(correct / rows, 0.0), 1.0) if classification else None
    return ScoreTotals(rows, loss_part * LOSS_CAP / rows, accuracy)
