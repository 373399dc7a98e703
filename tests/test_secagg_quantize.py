"""Fixed-point quantisation into uint32: overflow sizing, error bound, unbiasedness, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.common.secagg import QuantSpec, SecAggConfigError
from fedtune.common.secagg.quantize import MIN_SCALE, MODULUS


@pytest.mark.parametrize(("clip", "n"), [(0.5, 3), (0.5, 10), (1.0, 100), (4.0, 1000), (1e-3, 2)])
def test_scale_is_largest_without_overflow(clip: float, n: int) -> None:
    q = QuantSpec(clip, n)
    assert n * q.per_site_max <= MODULUS - 1
    assert 2 * clip * q.scale <= q.per_site_max
    assert 2 * clip * (q.scale + 1) > q.per_site_max  # largest such integer


@pytest.mark.parametrize("n", [3, 10])
def test_error_bound_holds_including_extremes(n: int) -> None:
    q = QuantSpec(0.5, n)
    rng = np.random.default_rng(1)
    xs = [rng.uniform(-0.5, 0.5, 20_000) for _ in range(n)]
    xs[0][:4] = [0.5, -0.5, 0.5, -0.5]
    xs[1][:4] = [0.5, -0.5, 0.5, 0.5]
    total = np.zeros(20_000, dtype=np.uint32)
    for x in xs:
        qx = q.quantize(x)
        assert qx.dtype == np.uint32
        assert int(qx.max()) <= q.per_site_max
        total += qx
    est = q.dequantize_sum(total, n)
    err = np.abs(est - np.sum(xs, axis=0))
    assert err.max() <= q.error_bound(n)
    assert q.max_abs_error == pytest.approx(n / q.scale)


def test_all_sites_at_clip_do_not_wrap() -> None:
    n = 7
    q = QuantSpec(0.3, n)
    total = np.zeros(5, dtype=np.uint32)
    for _ in range(n):
        total += q.quantize(np.full(5, 10.0))  # clipped to +c
    np.testing.assert_allclose(q.dequantize_sum(total, n), n * 0.3, atol=q.error_bound(n))


def test_stochastic_rounding_is_unbiased() -> None:
    q = QuantSpec(0.5, 4)
    x = np.full(200_000, 0.123456789 + 0.37 / q.scale)  # frac part ~0.37 units
    rng = np.random.default_rng(3)
    qx = q.quantize(x, rng=rng).astype(np.float64)
    est = qx / q.scale - q.clip_range
    bias = (est.mean() - x[0]) * q.scale  # in quantisation units
    assert abs(bias) < 0.01  # std of the mean is ~0.0011 units


def test_clipping_and_refusals() -> None:
    q = QuantSpec(0.5, 3)
    out = q.dequantize_sum(q.quantize(np.array([5.0, -5.0])), 1)
    np.testing.assert_allclose(out, [0.5, -0.5], atol=q.error_bound(1))
    with pytest.raises(SecAggConfigError, match="NaN"):
        q.quantize(np.array([0.0, np.nan]))
    with pytest.raises(SecAggConfigError):
        q.quantize(np.array([1, 2]))
    with pytest.raises(SecAggConfigError):
        q.dequantize_sum(np.zeros(2, dtype=np.uint32), 4)


def test_overflow_config_refused_with_actionable_message() -> None:
    with pytest.raises(SecAggConfigError, match="Lower clip_range"):
        QuantSpec(1e6, 100)  # scale would be 0
    with pytest.raises(SecAggConfigError, match=str(MIN_SCALE)):
        QuantSpec(100.0, 100_000)
    with pytest.raises(SecAggConfigError):
        QuantSpec(0.0, 3)
    with pytest.raises(SecAggConfigError):
        QuantSpec(0.5, 0)


@pytest.mark.parametrize(("clip", "n"), [(0.5, 3), (0.5, 5), (0.25, 10)])
def test_relative_error_on_lora_magnitudes(clip: float, n: int) -> None:
    q = QuantSpec(clip, n)
    rng = np.random.default_rng(5)
    xs = rng.normal(0.0, 1e-3, size=(n, 10_000))
    total = np.zeros(10_000, dtype=np.uint32)
    for x in xs:
        total += q.quantize(x)
    ref = xs.sum(axis=0)
    rel = np.linalg.norm(q.dequantize_sum(total, n) - ref) / np.linalg.norm(ref)
    assert rel <= 1e-6
    assert rel == pytest.approx(q.typical_rel_l2(1e-3), rel=0.1)
