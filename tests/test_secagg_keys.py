"""Key helpers and mask expansion: permissions, AES-GCM tamper detection, ChaCha20 mask stream."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from fedtune.common.secagg import SecAggConfigError, SecAggIntegrityError, keys
from fedtune.common.secagg.masks import expand_mask


def test_identity_key_save_load_0600(tmp_path: Path) -> None:
    k = keys.generate_identity_key()
    p = tmp_path / "id.pem"
    keys.save_identity_key(k, p)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert keys.public_key_bytes(keys.load_identity_key(p)) == keys.public_key_bytes(k)
    with pytest.raises(SecAggConfigError, match="overwrite"):
        keys.save_identity_key(k, p)
    os.chmod(p, 0o644)
    with pytest.raises(SecAggConfigError, match="chmod 600"):
        keys.load_identity_key(p)


def test_public_key_hex_round_trip() -> None:
    k = keys.generate_identity_key()
    h = keys.public_key_to_hex(k)
    assert len(h) == 64
    assert keys.public_key_bytes(keys.public_key_from_hex(h)) == keys.public_key_bytes(k)
    with pytest.raises(SecAggConfigError):
        keys.public_key_from_hex("abcd")


def test_agree_is_symmetric_and_info_separated() -> None:
    a, a_pk = keys.generate_x25519()
    b, b_pk = keys.generate_x25519()
    assert keys.agree(a, b_pk, b"x") == keys.agree(b, a_pk, b"x")
    assert keys.agree(a, b_pk, b"x") != keys.agree(a, b_pk, b"y")
    with pytest.raises(SecAggIntegrityError):
        keys.agree(a, bytes(32), b"x")  # low-order point -> all-zero shared secret refused


def test_seal_open_detects_tampering() -> None:
    key = os.urandom(32)
    blob = keys.seal(key, b"secret share", b"aad")
    assert keys.open_(key, blob, b"aad") == b"secret share"
    bad = bytearray(blob)
    bad[-1] ^= 1
    with pytest.raises(SecAggIntegrityError):
        keys.open_(key, bytes(bad), b"aad")
    with pytest.raises(SecAggIntegrityError):
        keys.open_(key, blob, b"other aad")
    with pytest.raises(SecAggIntegrityError):
        keys.open_(key, blob[:10], b"aad")


def test_mask_deterministic_context_separated_uniform() -> None:
    seed = os.urandom(32)
    m1 = expand_mask(seed, 50_000, b"round1")
    assert m1.dtype == np.uint32 and m1.size == 50_000
    np.testing.assert_array_equal(m1, expand_mask(seed, 50_000, b"round1"))
    assert not np.array_equal(m1, expand_mask(seed, 50_000, b"round2"))
    counts = np.bincount(m1 >> 24, minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-4


def test_mask_speed_14m() -> None:
    seed = os.urandom(32)
    expand_mask(seed, 1000, b"warm")
    t0 = time.perf_counter()
    m = expand_mask(seed, 14_000_000, b"ctx")
    elapsed = time.perf_counter() - t0
    assert m.size == 14_000_000
    assert elapsed < 1.0, f"expand_mask took {elapsed:.2f}s for 14M values"
