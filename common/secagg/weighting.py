"""Each site weighs its own update, and its weight travels inside the masked vector.

A server that chose per-site weights could isolate one site (weight 1 for it, 1e-9 for the rest), and
plaintext example counts would tell it each site's size. So a site computes its weight from its own
row count under the federation's policy (the same function for every site), scales its update by it,
and appends the weight as one more coordinate: after unmasking, the server holds only the weighted sum
and the total weight of the survivors, and divides.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from .errors import SecAggIntegrityError
from .quantize import QuantSpec

Weighting = Literal["examples", "uniform"]


def site_weight(policy: Weighting, num_examples: int, cap: int) -> float:
    """This site's weight in (0, 1]: its rows over the federation's public cap, or 1 for every site."""
    if policy == "uniform":
        return 1.0
    if num_examples < 1:
        raise SecAggIntegrityError("A site with no training rows has nothing to contribute; it must decline.")
    return min(num_examples, cap) / cap


def pack(update: np.ndarray, weight: float, clip_range: float) -> np.ndarray:
    """[weight * update, weight * clip_range]: the weight coordinate is scaled to the quantiser's range,
    where it is exact to the quantisation step and never clipped."""
    if not 0.0 < weight <= 1.0:
        raise SecAggIntegrityError(f"Site weight {weight} is outside (0, 1].")
    flat = np.asarray(update, dtype=np.float64).ravel()
    return np.concatenate([weight * flat, [weight * clip_range]])


def unpack(total: np.ndarray, quant: QuantSpec, contributors: int) -> tuple[np.ndarray, float]:
    """Weighted mean of the survivors' updates and their total weight, from the unmasked sum.

    A total weight within the quantisation error of zero means that every contributor abstained (a site
    that declines a round still takes part with zeros and weight 0, so that the round keeps its threshold).
    """
    weight = float(total[-1]) / quant.clip_range
    if weight * quant.clip_range <= quant.error_bound(contributors):
        raise SecAggIntegrityError("No site contributed an update this round (every survivor declined).")
    return total[:-1] / weight, weight
