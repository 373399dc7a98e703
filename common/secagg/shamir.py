"""t-of-n Shamir secret sharing of 32-byte secrets over the prime field GF(2**521 - 1).

Why this field: 2**521 - 1 is a Mersenne prime far larger than any 256-bit secret, so every secret is a
field element without reduction and the shares reveal nothing about it (information-theoretic
secrecy for any t - 1 shares). Coefficients come from :mod:`secrets` (the OS CSPRNG).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import SecAggConfigError, SecAggIntegrityError

PRIME = 2**521 - 1
SECRET_LEN = 32
_X_LEN = 4
_Y_LEN = (PRIME.bit_length() + 7) // 8  # 66 bytes
SHARE_LEN = _X_LEN + _Y_LEN


@dataclass(frozen=True)
class Share:
    """One point (x, y) of the sharing polynomial; x is the 1-based index of the share holder."""

    x: int
    y: int

    def to_bytes(self) -> bytes:
        """Fixed-length big-endian encoding (4-byte x, 66-byte y) so shares can be concatenated."""
        return self.x.to_bytes(_X_LEN, "big") + self.y.to_bytes(_Y_LEN, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        """Decode :meth:`to_bytes`; refuses wrong lengths and out-of-field values."""
        if len(data) != SHARE_LEN:
            raise SecAggIntegrityError(
                f"Shamir share has {len(data)} bytes, expected {SHARE_LEN}; the share is corrupt or from an "
                "incompatible fedtune version."
            )
        x = int.from_bytes(data[:_X_LEN], "big")
        y = int.from_bytes(data[_X_LEN:], "big")
        if not 0 < x < PRIME or y >= PRIME:
            raise SecAggIntegrityError("Shamir share holds values outside the field; the share is corrupt.")
        return cls(x, y)


def split(secret: bytes, n: int, t: int) -> list[Share]:
    """Split ``secret`` (32 bytes) into ``n`` shares with x = 1..n, any ``t`` of which recover it."""
    if len(secret) != SECRET_LEN:
        raise SecAggConfigError(f"Shamir secrets must be exactly {SECRET_LEN} bytes, got {len(secret)}.")
    if not 1 <= t <= n:
        raise SecAggConfigError(f"Shamir threshold must satisfy 1 <= t <= n, got t={t}, n={n}.")
    if n >= 2 ** (8 * _X_LEN):
        raise SecAggConfigError(f"Too many Shamir shares requested ({n}).")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    shares = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coeffs):  # Horner's rule
            y = (y * x + c) % PRIME
        shares.append(Share(x, y))
    return shares


def combine(shares: Sequence[Share], t: int) -> bytes:
    """Recover the secret by Lagrange interpolation at 0 from the first ``t`` of ``shares``.

    Fewer than ``t`` shares or duplicate x raise :class:`SecAggIntegrityError`: in the protocol both mean
    the relayed share set is inconsistent, so the round must not continue.
    """
    if t < 1:
        raise SecAggConfigError(f"Shamir threshold must be >= 1, got {t}.")
    if len(shares) < t:
        raise SecAggIntegrityError(
            f"Need at least {t} Shamir shares to reconstruct, got {len(shares)}; wait for more sites or "
            "abort the round."
        )
    xs = [s.x for s in shares]
    if len(set(xs)) != len(xs):
        raise SecAggIntegrityError("Duplicate Shamir share x-coordinates; the share set is inconsistent.")
    use = shares[:t]
    secret = 0
    for i, si in enumerate(use):
        num, den = 1, 1
        for j, sj in enumerate(use):
            if i != j:
                num = num * (-sj.x) % PRIME
                den = den * (si.x - sj.x) % PRIME
        secret = (secret + si.y * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_LEN):
        raise SecAggIntegrityError(
            "Reconstructed Shamir secret is out of range: at least one share is corrupt or the shares belong "
            "to different secrets."
        )
    return secret.to_bytes(SECRET_LEN, "big")
