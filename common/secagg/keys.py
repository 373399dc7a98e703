"""Key helpers: Ed25519 identity keys, X25519 ephemeral keys, HKDF key agreement, AES-GCM sealing.

Why these primitives: Ed25519 signatures bind each site's ephemeral keys to its long-term identity so an
honest-but-curious (or key-swapping) server cannot impersonate a site; X25519 + HKDF-SHA256 gives each
pair of sites a shared secret the server never learns; AES-GCM gives authenticated encryption so shares
relayed through the server are confidential and any tampering is detected. All from ``cryptography``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import SecAggConfigError, SecAggIntegrityError

_AGREE_SALT = b"fedtune/secagg/v1/x25519-hkdf"
NONCE_LEN = 12

# ---------------------------------------------------------------- Ed25519 identity keys


def generate_identity_key() -> Ed25519PrivateKey:
    """New long-term site identity key (its public half is pinned in every peer's config)."""
    return Ed25519PrivateKey.generate()


def save_identity_key(key: Ed25519PrivateKey, path: str | Path, *, overwrite: bool = False) -> None:
    """Write the private key as unencrypted PKCS#8 PEM, created with mode 0600 (owner-only).

    The file is opened with ``O_CREAT | O_EXCL`` and mode 0600 so it is never world-readable, not even
    briefly; pass ``overwrite=True`` to replace an existing key.
    """
    p = Path(path)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    if overwrite and p.exists():
        p.unlink()
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise SecAggConfigError(f"Identity key {p} already exists; pass overwrite=True to replace it.") from exc
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(p, 0o600)  # in case the umask or filesystem altered the mode


def load_identity_key(path: str | Path) -> Ed25519PrivateKey:
    """Load a PEM identity key, refusing files readable by group or others (fix with ``chmod 600``)."""
    p = Path(path)
    mode = p.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecAggConfigError(
            f"Identity key {p} has permissions {stat.filemode(mode)}; it must be private: run `chmod 600 {p}`."
        )
    key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SecAggConfigError(f"{p} does not hold an Ed25519 private key.")
    return key


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """Raw 32-byte Ed25519 public key."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_to_hex(key: Ed25519PrivateKey | Ed25519PublicKey | bytes) -> str:
    """Hex form of the raw public key, for site configs (pinned peer keys)."""
    raw = key if isinstance(key, bytes) else public_key_bytes(key)
    return raw.hex()


def public_key_from_hex(text: str) -> Ed25519PublicKey:
    """Parse a pinned peer key from hex; raises :class:`SecAggConfigError` with the bad value."""
    try:
        raw = bytes.fromhex(text.strip())
        if len(raw) != 32:
            raise ValueError("wrong length")
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise SecAggConfigError(
            f"Invalid Ed25519 public key {text!r}: expected 64 hex characters (32 raw bytes)."
        ) from exc


# ---------------------------------------------------------------- X25519 ephemeral keys


def generate_x25519() -> tuple[X25519PrivateKey, bytes]:
    """New ephemeral X25519 pair; returns (private key, raw 32-byte public key)."""
    sk = X25519PrivateKey.generate()
    return sk, x25519_public_bytes(sk)


def x25519_public_bytes(sk: X25519PrivateKey) -> bytes:
    """Raw 32-byte X25519 public key of ``sk``."""
    return sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def x25519_private_bytes(sk: X25519PrivateKey) -> bytes:
    """Raw 32-byte X25519 private key (what gets Shamir-shared so a dropped site can be unmasked)."""
    return sk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def x25519_from_private_bytes(raw: bytes) -> X25519PrivateKey:
    """Inverse of :func:`x25519_private_bytes`."""
    return X25519PrivateKey.from_private_bytes(raw)


def agree(private: X25519PrivateKey, peer_public_bytes: bytes, info: bytes) -> bytes:
    """X25519 shared secret of (private, peer) passed through HKDF-SHA256 with ``info``; 32 bytes.

    Both sides of a pair get the same value; ``info`` must carry the purpose and the round tag so keys are
    never reused across purposes or rounds. A peer key of low order (all-zero shared secret) is refused.
    """
    try:
        peer = X25519PublicKey.from_public_bytes(peer_public_bytes)
        shared = private.exchange(peer)
    except ValueError as exc:
        raise SecAggIntegrityError(f"Invalid X25519 peer public key: {exc}; abort the round.") from exc
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=_AGREE_SALT, info=info).derive(shared)


# ---------------------------------------------------------------- AES-GCM


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM encrypt with a fresh random 96-bit nonce; returns ``nonce || ciphertext+tag``."""
    nonce = os.urandom(NONCE_LEN)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Decrypt :func:`seal` output; any change to blob or aad raises :class:`SecAggIntegrityError`."""
    if len(blob) < NONCE_LEN + 16:
        raise SecAggIntegrityError("Sealed blob is too short to be valid; it was truncated or tampered with.")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_LEN], blob[NONCE_LEN:], aad)
    except InvalidTag as exc:
        raise SecAggIntegrityError(
            "AES-GCM authentication failed: the ciphertext or its context was altered; abort the round."
        ) from exc
