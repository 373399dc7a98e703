"""Privacy maths: composing DP-SGD spends and choosing sigma from what is left.

We never call Opacus' `make_private_with_epsilon` per round: it plans each
round as if it were the first, so a site would silently overspend. Instead a
site keeps its whole spend history (sigma, sample rate, steps) and asks an
Opacus accountant what the history *plus* the planned rounds would cost.

The accountant is Opacus' PRV accountant by default (its epsilon is an upper
bound, tighter than RDP's, so less noise buys the same epsilon), or RDP. PRV
evaluations cost about a second each on a CPU, so the sigma search brackets the
answer with the cheap RDP solution (an upper bound on sigma) before refining.

Most of a PRV evaluation is Opacus sizing its domain with per-step RDP values, in
pure Python, recomputed for every history although a ledger's history repeats the
same (sigma, q) round after round. `_memoise_per_step_rdp` caches that pure
function: a site's per-round ledger check went from 0.9 s to 0.03 s (profiled in
benchmarks/deploy.py's workers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from functools import lru_cache
from typing import Literal

from opacus.accountants import create_accountant
from opacus.accountants.analysis import rdp as opacus_rdp

from fedtune.common.config import MAX_NOISE_MULTIPLIER, MIN_NOISE_MULTIPLIER

Spend = tuple[float, float, int]  # (noise multiplier, sample rate, steps)
Planned = tuple[float, int]  # (sample rate, steps) of one round still to come
Accountant = Literal["prv", "rdp"]

SIGMA_TOLERANCE = 0.005  # relative: a sigma 0.5% above the smallest admissible one is close enough
# The smallest delta a site accounts at. Opacus' PRV accountant refuses deltas from about 1e-15 on (floating
# point error dominates), and delta need only be below 1 / rows: no dataset a site holds needs less than 1e-12.
MIN_DELTA = 1e-12
# Below this delta the PRV accountant's estimate fell short of a tight PLD accountant's by up to 0.5 epsilon on
# histories a server can shape (review round 4), and could even fall when a spend was added; RDP's bound holds at
# every delta, so PRV hands over to it there.
PRV_MIN_DELTA = 1e-10


def _memoise_per_step_rdp() -> None:
    """Cache Opacus' `_compute_rdp(q, sigma, alpha)`, a pure function of three numbers that every RDP and PRV
    evaluation calls once per order. Refuses an Opacus that no longer has it, so an upgrade fails loudly."""
    per_step = getattr(opacus_rdp, "_compute_rdp", None)
    if per_step is None:
        raise RuntimeError("opacus.accountants.analysis.rdp._compute_rdp is gone: install opacus==1.6.0")
    if not hasattr(per_step, "cache_info"):
        opacus_rdp._compute_rdp = lru_cache(maxsize=65_536)(per_step)


_memoise_per_step_rdp()


class BudgetExhausted(RuntimeError):
    """This round would take the dataset past its epsilon cap."""


class AccountantError(ValueError):
    """The accountant cannot compose this history at this delta (Opacus' ValueError, e.g. a delta too small)."""


def compress(history: Iterable[Spend]) -> list[Spend]:
    """Merge spends with the same (sigma, q): composing k and m steps of one mechanism is k + m steps.

    Exact for every accountant, and it keeps a long ledger cheap to evaluate.
    """
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        if n > 0:
            key = (float(sigma), float(q))
            steps[key] = steps.get(key, 0) + int(n)
    return [(s, q, n) for (s, q), n in steps.items()]


def epsilon_spent(history: Iterable[Spend], delta: float, accountant: Accountant = "prv") -> float:
    return _epsilon(tuple(sorted(compress(history))), float(delta), accountant)


@lru_cache(maxsize=512)
def _epsilon(merged: tuple[Spend, ...], delta: float, accountant: Accountant) -> float:
    """Memoised: a round asks about the same composed history several times (plan check, ledger, metrics)."""
    if not merged:
        return 0.0
    if accountant == "prv" and delta < PRV_MIN_DELTA:
        accountant = "rdp"
    acc = create_accountant(accountant)
    acc.history = list(merged)
    try:
        return float(acc.get_epsilon(delta))
    except ValueError as exc:  # told apart from our own ValueErrors: a site declines the round on it
        raise AccountantError(f"the {accountant.upper()} accountant cannot compose at delta {delta:g}: {exc}") from exc


def _planned(sigma: float, plan: Sequence[Planned]) -> list[Spend]:
    return [(sigma, q, n) for q, n in plan]


def choose_noise_multiplier(
    history: Sequence[Spend],
    plan: Sequence[Planned],
    *,
    epsilon_cap: float,
    delta: float,
    accountant: Accountant = "prv",
    hint: float | None = None,
) -> float:
    """Smallest sigma (within SIGMA_TOLERANCE) such that the past plus every planned round stays within the cap.

    One sigma for all rounds still to come keeps the last round as useful as the first, instead of spending
    everything early. `hint` (the sigma chosen last round) is kept if it still fits: when the run goes as
    planned, past and planned rounds compose to the same total, so it is still the smallest (and that check
    is a cache hit); when rounds were skipped it is merely conservative.
    """
    if not plan:
        raise ValueError("plan needs at least one round")

    def fits(sigma: float) -> bool:
        return epsilon_spent([*history, *_planned(sigma, plan)], delta, accountant) <= epsilon_cap

    if hint is not None and fits(hint):
        return hint
    lo, hi = MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER
    if accountant != "rdp":
        # RDP over-estimates epsilon, so its (cheap) sigma is admissible here and close above the answer.
        with suppress(BudgetExhausted):
            hi = choose_noise_multiplier(history, plan, epsilon_cap=epsilon_cap, delta=delta, accountant="rdp")
    if not fits(hi):
        if hi == MAX_NOISE_MULTIPLIER or not fits(MAX_NOISE_MULTIPLIER):
            spent = epsilon_spent(history, delta, accountant)
            steps = sum(n for _, n in plan)
            raise BudgetExhausted(
                f"epsilon already spent on this dataset is {spent:.3f} of a cap of {epsilon_cap:g}; "
                f"{len(plan)} more round(s) ({steps} DP-SGD steps) cannot fit even with noise multiplier "
                f"{MAX_NOISE_MULTIPLIER:g}. Raise the site's epsilon_cap (a policy decision) or use a new dataset."
            )
        lo, hi = hi, MAX_NOISE_MULTIPLIER
    elif hi < MAX_NOISE_MULTIPLIER and not fits(near := max(lo, 0.8 * hi)):
        lo = near
    if fits(lo):
        return lo
    return _bisect(fits, lo, hi)


def _bisect(fits: Callable[[float], bool], lo: float, hi: float) -> float:
    """Smallest admissible sigma in (lo, hi] to SIGMA_TOLERANCE, given fits(hi) and not fits(lo)."""
    while hi / lo > 1 + SIGMA_TOLERANCE:
        mid = (lo * hi) ** 0.5
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi


def check_fixed_noise(
    history: Sequence[Spend],
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    epsilon_cap: float,
    delta: float,
    accountant: Accountant = "prv",
) -> float:
    """Epsilon after one more round at a federation-fixed sigma, refused past the cap."""
    after = epsilon_spent([*history, (noise_multiplier, sample_rate, steps)], delta, accountant)
    if after > epsilon_cap:
        spent = epsilon_spent(history, delta, accountant)
        raise BudgetExhausted(
            f"this round would bring epsilon from {spent:.3f} to {after:.3f}, past the site's cap "
            f"of {epsilon_cap:g}; the site declines. Raise epsilon_cap or the federation's noise."
        )
    return after
