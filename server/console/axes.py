"""Y axes fitted to the data, chosen in Python so the page, its tests and any other reader agree on them.

A fixed 0-1 accuracy axis draws a run that moves from 0.88 to 0.92 as a flat line at the top: the change an
operator is looking for is a few pixels. So each axis spans the data with a little padding, clamped to what the
quantity can take (accuracy within 0-1, loss and epsilon from 0), and is rounded outward to a round step
(1, 2, 2.5 or 5 times a power of ten) so its tick labels are short numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from decimal import Decimal
from typing import TypedDict

TICKS = 4  # intervals between gridlines the page aims for (the rounding may add one or two)


class Axis(TypedDict):
    min: float
    max: float
    step: float
    digits: int  # decimals that print every tick distinctly
    label: str


def nice_step(raw: float) -> float:
    """The smallest of 1, 2, 2.5, 5 (times a power of ten) at or above `raw`."""
    exponent = math.floor(math.log10(raw))
    base = 10.0**exponent
    for factor in (1.0, 2.0, 2.5, 5.0, 10.0):
        if raw <= factor * base * (1 + 1e-9):
            return factor * base
    return 10.0 * base  # unreachable: raw / base < 10


def _digits(step: float) -> int:
    exponent = Decimal(repr(step)).normalize().as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


def fitted_axis(
    values: Iterable[float | None],
    label: str,
    *,
    floor: float | None = None,
    ceil: float | None = None,
    empty: tuple[float, float] = (0.0, 1.0),
    min_span: float = 0.0,
) -> Axis:
    """An axis that shows every value in `values` (None ignored) with room to spare, within [floor, ceil].

    `min_span` keeps a nearly flat series from being blown up into noise: two rounds at 0.9001 and 0.9003
    should not look like a swing.
    """
    data = [v for v in values if v is not None and math.isfinite(v)]
    lo, hi = (min(data), max(data)) if data else empty
    pad = max((hi - lo) * 0.1, abs(hi) * 0.01, 1e-3)  # a flat series still gets a band around it
    lo, hi = lo - pad, hi + pad
    if hi - lo < min_span:
        mid = (lo + hi) / 2
        lo, hi = mid - min_span / 2, mid + min_span / 2
    if floor is not None and lo < floor:  # shift rather than cut, so the span stays
        lo, hi = floor, hi + (floor - lo)
    if ceil is not None and hi > ceil:
        lo, hi = lo - (hi - ceil), ceil
        lo = lo if floor is None else max(lo, floor)
    step = nice_step((hi - lo) / TICKS)
    lo = round(math.floor(lo / step + 1e-9) * step, 12)
    hi = round(math.ceil(hi / step - 1e-9) * step, 12)
    if floor is not None:
        lo = max(lo, floor)
    if ceil is not None:
        hi = min(hi, ceil)
    return Axis(min=lo, max=hi, step=step, digits=_digits(step), label=label)
