"""Pseudo-random mask expansion: 32-byte seed -> uint32 vector, via ChaCha20 from ``cryptography``.

Why ChaCha20: it is a standard stream cipher whose keystream is indistinguishable from uniform bytes,
and OpenSSL encrypts a zero buffer at several GB/s, so even a 14M-element adapter is masked in well
under a second. Why a context: the ChaCha20 key and nonce are derived with HKDF-SHA256 from the seed
*and* a context (round tag, purpose, node ids), so the same seed can never produce the same stream in
two rounds or for two purposes — reusing a one-time pad would leak the difference of two inputs.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import SecAggConfigError

_PRG_INFO = b"fedtune/secagg/v1/mask-prg"
# ChaCha20 in cryptography takes a 16-byte "nonce" = 4-byte little-endian block counter || 12-byte nonce.
# The counter starts at 0, so a single stream can hold 2**32 blocks of 64 bytes = 2**36 uint32 values.
MAX_LENGTH = 2**36


def _derive_key_nonce(seed: bytes, context: bytes) -> tuple[bytes, bytes]:
    okm = HKDF(algorithm=hashes.SHA256(), length=44, salt=None, info=_PRG_INFO + context).derive(seed)
    return okm[:32], b"\x00\x00\x00\x00" + okm[32:]


def expand_mask(seed: bytes, length: int, context: bytes) -> np.ndarray:
    """Expand a 32-byte ``seed`` into ``length`` uniform uint32 values, domain-separated by ``context``.

    The result is a read-only little-endian uint32 view over the keystream (no copy); use it as an
    operand (``y += mask``), not as an output buffer.
    """
    if len(seed) != 32:
        raise SecAggConfigError(f"Mask seeds must be 32 bytes, got {len(seed)}.")
    if not 0 <= length <= MAX_LENGTH:
        raise SecAggConfigError(f"Mask length must be in 0..{MAX_LENGTH}, got {length}.")
    key, nonce = _derive_key_nonce(seed, context)
    enc = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    stream = enc.update(bytes(4 * length))
    return np.frombuffer(stream, dtype="<u4")
