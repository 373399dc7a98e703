"""Privacy maths: composing DP-SGD spends and choosing sigma from what is left.

We never call Opacus' `make_private_with_epsilon` per round: it plans each
round as if it were the first, so a site would silently overspend. Instead a
site keeps its whole spend history (sigma, sample rate, steps) and asks Opacus'
RDP accountant what the history *plus* the planned rounds would cost.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from opacus.accountants import RDPAccountant

Spend = tuple[float, float, int]  # (noise multiplier, sample rate, steps)

MIN_NOISE_MULTIPLIER = 0.3
MAX_NOISE_MULTIPLIER = 64.0


class BudgetExhausted(RuntimeError):
    """This round would take the dataset past its epsilon cap."""


def epsilon_spent(history: Iterable[Spend], delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not accountant.history:
        return 0.0
    return float(accountant.get_epsilon(delta))


def choose_noise_multiplier(
    history: Sequence[Spend],
    *,
    sample_rate: float,
    steps_per_round: int,
    rounds_left: int,
    epsilon_cap: float,
    delta: float,
) -> float:
    """Smallest sigma such that the past plus `rounds_left` such rounds stays within the cap.

    Spreading the remaining budget evenly over the rounds still to come keeps
    the last round as useful as the first, instead of spending everything early.
    """
    if rounds_left < 1:
        raise ValueError("rounds_left must be >= 1")
    planned_steps = steps_per_round * rounds_left

    def total(sigma: float) -> float:
        return epsilon_spent([*history, (sigma, sample_rate, planned_steps)], delta)

    if total(MAX_NOISE_MULTIPLIER) > epsilon_cap:
        spent = epsilon_spent(history, delta)
        raise BudgetExhausted(
            f"epsilon already spent on this dataset is {spent:.3f} of a cap of {epsilon_cap:g}; "
            f"{rounds_left} more round(s) of {steps_per_round} steps cannot fit even with noise "
            f"multiplier {MAX_NOISE_MULTIPLIER:g}. Raise the site's epsilon_cap (a policy decision) "
            "or use a new dataset."
        )
    lo, hi = MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER
    if total(lo) <= epsilon_cap:
        return lo
    for _ in range(40):
        mid = (lo + hi) / 2
        if total(mid) <= epsilon_cap:
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
) -> float:
    """Epsilon after one more round at a federation-fixed sigma, refused past the cap."""
    after = epsilon_spent([*history, (noise_multiplier, sample_rate, steps)], delta)
    if after > epsilon_cap:
        spent = epsilon_spent(history, delta)
        raise BudgetExhausted(
            f"this round would bring epsilon from {spent:.3f} to {after:.3f}, past the site's cap "
            f"of {epsilon_cap:g}; the site declines. Raise epsilon_cap or the federation's noise."
        )
    return after
