"""Non-IID splitting of one dataset into per-site shards, for simulation and the demo federation.

Real sites (banks, hospitals) see different mixes of classes; a federated method that only works on IID
shards is not tested at all. The usual model of that skew is a Dirichlet(alpha) prior over sites for each
class: small alpha gives sites dominated by few classes, large alpha approaches an even split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["TooFewRows", "dirichlet_partition"]

# Resampling keeps the Dirichlet shape untouched; only when that keeps failing (tiny alpha, many parts)
# do we fall back to moving rows, which distorts the shape as little as is needed to meet min_size.
_MAX_RESAMPLES = 100


class TooFewRows(ValueError):
    """Too few rows for every part to get `min_size` of them; the numbers let a caller say so in its own terms."""

    def __init__(self, rows: int, parts: int, min_size: int) -> None:
        self.rows, self.parts, self.min_size = rows, parts, min_size
        super().__init__(
            f"cannot give {parts} parts at least {min_size} rows each from only {rows} rows "
            f"(need {parts * min_size}); lower min_size or num_parts"
        )


def _validate(n: int, num_parts: int, alpha: float, min_size: int) -> None:
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if num_parts * min_size > n:
        raise TooFewRows(n, num_parts, min_size)


def _sample(by_class: list[np.ndarray], num_parts: int, alpha: float, rng: np.random.Generator) -> list[list[int]]:
    """One draw: each class is cut into num_parts pieces with Dirichlet(alpha) proportions."""
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    for indices in by_class:
        shuffled = rng.permutation(indices)
        proportions = rng.dirichlet(np.full(num_parts, alpha))
        cuts = np.round(np.cumsum(proportions)[:-1] * len(shuffled)).astype(int)
        for part, piece in zip(parts, np.split(shuffled, cuts), strict=True):
            part.extend(int(i) for i in piece)
    return parts


def _rebalance(parts: list[list[int]], min_size: int, rng: np.random.Generator) -> None:
    """Move random rows from the largest parts into those below min_size, in place."""
    for needy in range(len(parts)):
        while len(parts[needy]) < min_size:
            donor = max(range(len(parts)), key=lambda p: len(parts[p]))
            surplus = len(parts[donor]) - min_size
            take = min(min_size - len(parts[needy]), surplus)
            if take <= 0:  # unreachable after _validate, kept so a bug cannot loop forever
                raise ValueError("cannot satisfy min_size")
            chosen = set(rng.choice(len(parts[donor]), size=take, replace=False).tolist())
            parts[needy].extend(x for k, x in enumerate(parts[donor]) if k in chosen)
            parts[donor] = [x for k, x in enumerate(parts[donor]) if k not in chosen]


def dirichlet_partition(
    labels: Sequence[int], num_parts: int, alpha: float, seed: int, min_size: int = 10
) -> list[list[int]]:
    """Split range(len(labels)) into num_parts sorted index lists with Dirichlet(alpha)-skewed label mixes.

    Deterministic for a seed, so every virtual site in a simulation (and every rerun) sees the same shard.
    Every part gets at least min_size rows, because a site with a handful of rows cannot run DP-SGD
    meaningfully; ValueError if the rows are too few for that.
    """
    labels_arr = np.asarray(labels)
    n = len(labels_arr)
    _validate(n, num_parts, alpha, min_size)
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels_arr == c) for c in np.unique(labels_arr)]
    best: list[list[int]] | None = None
    for _ in range(_MAX_RESAMPLES):
        parts = _sample(by_class, num_parts, alpha, rng)
        if min(len(p) for p in parts) >= min_size:
            best = parts
            break
    if best is None:
        best = parts
        _rebalance(best, min_size, rng)
    return [sorted(p) for p in best]
