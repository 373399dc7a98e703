"""Distributed discrete Gaussian noise: each site adds a share, the secure sum carries the whole.

In `privacy.noise = "distributed"` a DP step is one secure sum over the sites. The values a secure sum adds are
integers modulo 2^32, so the noise must be integer-valued and must still be Gaussian-like once the shares are
added: this is the distributed discrete Gaussian of Kairouz, Liu and Steinke (ICML 2021), applied per record:

* each clipped per-example gradient (L2 norm <= C) is scaled by 1/gamma, gamma = C / CLIP_UNITS, and rounded to
  integers by randomized rounding, re-drawn until its norm is at most `rounded_norm_bound` (KLS21's conditional
  rounding: the L2 sensitivity of the integer sum is then exactly that bound, whatever the rounding did);
* each site adds discrete Gaussian noise N_Z(0, s_i^2) per coordinate, drawn by OpenDP's exact sampler
  (`opendp.measurements.make_gaussian` on an integer vector domain; OS entropy, no floating-point sampling);
  s_i = sigma * bound / sqrt(h_i), where h_i is how many of the round's sites it assumes honest;
* by KLS21's Theorem (the sum of discrete Gaussians), h honest shares sum to noise within `sum_tau` of one
  discrete Gaussian of variance sigma^2 * bound^2 in Renyi divergence, and a discrete Gaussian has the Renyi (zCDP)
  bound of the continuous one of the same scale (Canonne, Kamath, Steinke 2020). Each step is charged as a
  Poisson-subsampled Gaussian step of noise multiplier `charged_noise_multiplier`, by the same Opacus accountant
  that composes a site's local-noise spends (common/privacy.py). That is an (epsilon, delta) claim, which CKS20
  prove only "essentially": for coarse noise (a unit or so) the discrete delta can exceed the continuous one. At
  the scale used here (a share is hundreds of integer units) tests/test_noise.py measures the subsampled discrete
  Gaussian's epsilon with dp_accounting's exact PLD and finds it within 1e-5 of the continuous one, below the PRV
  accountant's own error. `sum_tau` is checked against a bound far below that before a site joins.

The server dequantises the sum: a signed 32-bit integer per coordinate, times gamma.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

CLIP_UNITS = 1024  # the clip norm C in integer units: rounding then adds under 1% to the sensitivity
RING_BITS = 32
BETA = math.exp(-0.5)  # KLS21's default failure rate of one randomized rounding (it is retried, not failed)
MAX_TAU = 1e-12  # the distance from one discrete Gaussian a sum may have: negligible against any epsilon


class NoiseError(ValueError):
    """Distributed noise cannot be used with these parameters (the message says which to change)."""


def rounded_norm_bound(clip_units: float, dim: int, beta: float = BETA) -> float:
    """KLS21's bound on the norm of a randomized rounding of a vector of norm `clip_units` in `dim` coordinates:
    min(c^2 + d/4 + sqrt(2 log(1/beta)) (c + sqrt(d)/2), (c + sqrt(d))^2), square-rooted. Conditional rounding
    re-draws any rounding above it, which happens with probability at most beta."""
    c, d = float(clip_units), float(dim)
    squared = c * c + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(d) / 2)
    return math.sqrt(min(squared, (c + math.sqrt(d)) ** 2))


def conditional_round(scaled: np.ndarray, bound: float, rng: np.random.Generator) -> np.ndarray:
    """Randomized rounding of each row of `scaled` (floor + Bernoulli(fraction): unbiased before the re-draws),
    each row re-drawn until its L2 norm is at most `bound` (the re-draws pull a row towards zero by a fraction of a
    unit, KLS21's conditional rounding). Returns int32 rows (entries are at most the clip in units).

    The fractions and the uniforms are float32 (half the cost of float64 on the rows of a step): a fraction is then
    off by at most 2^-24 times the entry, a bias of about 1e-4 of a unit at CLIP_UNITS; the norm check, which the
    privacy guarantee rests on, is exact on the integers."""
    scaled = np.asarray(scaled, dtype=np.float32)
    floor = np.floor(scaled)
    frac = scaled - floor
    out = (floor + (rng.random(scaled.shape, dtype=np.float32) < frac)).astype(np.int32)
    limit = bound * bound
    for _ in range(1000):
        over = np.flatnonzero(np.einsum("ij,ij->i", out, out, dtype=np.int64) > limit)
        if over.size == 0:
            return out
        redraw = rng.random(frac[over].shape, dtype=np.float32) < frac[over]
        out[over] = (floor[over] + redraw).astype(np.int32)
    raise NoiseError("randomized rounding stayed above its norm bound 1000 times: the rows are not clipped")


def discrete_gaussian(scale: float, size: int, *, prefetch: bool = False) -> np.ndarray:
    """`size` independent draws of N_Z(0, scale^2) from OpenDP's exact sampler (OS entropy).

    The exact sampler costs about 11 us a draw (a third of a second for a 77-class head), and a site spends most
    of a DP step waiting for the server. `prefetch` starts the next draw of the same shape in a background thread
    (OpenDP runs outside the GIL) for the next call to take: each draw is still used once, by one step.
    """
    if scale <= 0:
        raise NoiseError(f"a discrete Gaussian needs a positive scale, got {scale}")
    key = (float(scale), int(size))
    pending = _PREFETCHED.pop(key, None)
    noise = pending.result() if pending is not None else _draw(*key)
    if prefetch:
        _PREFETCHED[key] = _DRAWER.submit(_draw, *key)
    return noise


def _draw(scale: float, size: int) -> np.ndarray:
    import opendp.prelude as dp

    dp.enable_features("contrib")
    space = dp.vector_domain(dp.atom_domain(T=dp.i64), size=size), dp.l2_distance(T=dp.i64)
    mechanism = dp.m.make_gaussian(*space, scale=scale)
    return np.asarray(mechanism([0] * size), dtype=np.int64)


_DRAWER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedtune-noise")
_PREFETCHED: dict[tuple[float, int], Future[np.ndarray]] = {}


def sum_tau(scales: Sequence[float]) -> float:
    """KLS21's tau for a sum of independent discrete Gaussians of these scales, in the form of their Theorem for
    equal scales, evaluated at the smallest: 10 * sum_{k=1}^{n-1} exp(-2 pi^2 s^2 k / (k + 1)). The sum's
    Renyi divergence exceeds one discrete Gaussian's by at most tau-order terms."""
    if not scales:
        return 0.0
    s = min(scales)
    return 10 * sum(math.exp(-2 * math.pi**2 * s * s * k / (k + 1)) for k in range(1, len(scales)))


def share_scale(noise_multiplier: float, bound: float, honest_sites: int) -> float:
    """The standard deviation (integer units) of one site's share: h shares of it sum to sigma * bound."""
    return noise_multiplier * bound / math.sqrt(honest_sites)


def charged_noise_multiplier(noise_multiplier: float, own_h: int, others_h: Sequence[int]) -> float:
    """The noise multiplier a site is guaranteed when `own_h` sites of the sum (itself included) are honest.

    Each honest site j adds variance sigma^2 / h_j (in units of the sensitivity). The least the sum can hold is the
    site's own share plus the own_h - 1 smallest shares of the others (the sites with the largest h_j): with
    every h_j equal to h it is exactly sigma. Fewer sites than own_h is refused before this is asked.
    """
    if len(others_h) + 1 < own_h:
        raise NoiseError(f"{len(others_h) + 1} site(s) in the sum, fewer than the {own_h} this site assumes honest")
    smallest = sorted(1.0 / h for h in others_h)[: own_h - 1]
    return noise_multiplier * math.sqrt(1.0 / own_h + sum(smallest))


def worst_noise_multiplier(noise_multiplier: float, own_h: int) -> float:
    """The noise multiplier of this site's own share alone: the server colluding with every other site."""
    return noise_multiplier / math.sqrt(own_h)


def to_ring(values: np.ndarray) -> np.ndarray:
    """Integers to their residues modulo 2^32 (two's complement)."""
    return np.asarray(values, dtype=np.int64).astype(np.uint32)


def from_ring(total: np.ndarray) -> np.ndarray:
    """A sum modulo 2^32 back to signed integers, as long as it lies in [-2^31, 2^31) (each site keeps its share of
    that range: `client.distributed._coordinate_limit`)."""
    return np.asarray(total, dtype=np.uint32).view(np.int32).astype(np.int64)
