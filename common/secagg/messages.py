"""Typed, frozen protocol messages and their Flower-ConfigRecord-compatible dict form.

Why a separate module: the lead wires these into Flower ``Message`` contents; each ``to_dict`` holds only
``int | float | str | bytes | list[int] | list[str] | list[bytes]`` values so it fits a ``ConfigRecord``
unchanged. The masked vector is kept outside the dict (it travels as an ``ArrayRecord``). Every message
carries the :class:`RoundTag`, and ``from_dict`` refuses malformed input with
:class:`SecAggIntegrityError` instead of a ``KeyError`` deep inside the protocol.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np

from .errors import SecAggIntegrityError
from .quantize import QuantSpec

DictValue = int | float | str | bytes | list[int] | list[str] | list[bytes]
MessageDict = dict[str, DictValue]
T = TypeVar("T")

PROTOCOL_VERSION = b"fedtune/secagg/v1"
TAG_NONCE_LEN = 16
ROLE_UPDATE = 1  # the site's masked vector carries its (DP-noised) update and weight
ROLE_SCORES = 2  # ... and its held-out figures
_U64 = 2**64


def _u64(v: int) -> bytes:
    return struct.pack(">Q", v)


def _field(d: Mapping[str, Any], key: str, typ: type[T]) -> T:
    if key not in d:
        raise SecAggIntegrityError(f"Secure-aggregation message is missing field {key!r}; abort the round.")
    v = d[key]
    if typ is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise SecAggIntegrityError(f"Field {key!r} has type {type(v).__name__}, expected {typ.__name__}.")
    return v


def _list(d: Mapping[str, Any], key: str, typ: type[T]) -> list[T]:
    if key not in d:
        raise SecAggIntegrityError(f"Secure-aggregation message is missing field {key!r}; abort the round.")
    v = d[key]
    if not isinstance(v, list | tuple) or not all(isinstance(e, typ) and not isinstance(e, bool) for e in v):
        raise SecAggIntegrityError(f"Field {key!r} must be a list of {typ.__name__}.")
    return list(v)


def _check_kind(d: Mapping[str, Any], kind: str) -> None:
    got = d.get("kind")
    if got != kind:
        raise SecAggIntegrityError(f"Expected a {kind!r} message, got {got!r}; stages are out of order.")


def _int_bytes_map(d: Mapping[str, Any], ids_key: str, blobs_key: str) -> dict[int, bytes]:
    ids = _list(d, ids_key, int)
    blobs = _list(d, blobs_key, bytes)
    if len(ids) != len(blobs) or len(set(ids)) != len(ids):
        raise SecAggIntegrityError(f"Fields {ids_key!r}/{blobs_key!r} are inconsistent (length or duplicates).")
    return dict(zip(ids, blobs, strict=True))


@dataclass(frozen=True)
class RoundTag:
    """Identity of one secure-aggregation round: (run_id, round, 16-byte server nonce).

    Every signature and AES-GCM AAD includes :meth:`to_bytes`, so material from another run, another
    round or an earlier attempt of the same round (different nonce) is refused.
    """

    run_id: int
    round: int
    nonce: bytes

    def __post_init__(self) -> None:
        if not (0 <= self.run_id < _U64 and 0 <= self.round < _U64):
            raise SecAggIntegrityError("RoundTag run_id and round must be unsigned 64-bit integers.")
        if len(self.nonce) != TAG_NONCE_LEN:
            raise SecAggIntegrityError(f"RoundTag nonce must be {TAG_NONCE_LEN} bytes, got {len(self.nonce)}.")

    @classmethod
    def new(cls, run_id: int, round: int) -> RoundTag:
        """Fresh tag with a random nonce (chosen by the server at the start of each round attempt)."""
        return cls(run_id, round, os.urandom(TAG_NONCE_LEN))

    def to_bytes(self) -> bytes:
        """Canonical encoding used inside signatures, AADs and KDF contexts."""
        return PROTOCOL_VERSION + _u64(self.run_id) + _u64(self.round) + self.nonce

    def to_dict(self) -> MessageDict:
        """Tag fields merged into every message dict."""
        return {"run_id": self.run_id, "round": self.round, "tag_nonce": self.nonce}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoundTag:
        """Parse the tag fields of a message dict."""
        return cls(_field(d, "run_id", int), _field(d, "round", int), _field(d, "tag_nonce", bytes))


@dataclass(frozen=True)
class AdvertiseRequest:
    """Stage 1, server -> every participant: round tag, participants, threshold and quantisation."""

    KIND: ClassVar[str] = "secagg.advertise_request"
    tag: RoundTag
    participants: tuple[tuple[int, str], ...]
    threshold: int
    clip_range: float
    num_sites: int

    @property
    def quant(self) -> QuantSpec:
        """The :class:`QuantSpec` every site must use this round."""
        return QuantSpec(self.clip_range, self.num_sites)

    def config_digest(self) -> bytes:
        """SHA-256 of the whole request; signed inside every advert so all sites provably saw the same
        participants, threshold and quantisation (a server cannot give one site a lower threshold)."""
        h = hashlib.sha256(b"advertise" + self.tag.to_bytes())
        for node_id, name in self.participants:
            raw = name.encode()
            h.update(_u64(node_id) + _u64(len(raw)) + raw)
        h.update(_u64(self.threshold) + struct.pack(">d", self.clip_range) + _u64(self.num_sites))
        return h.digest()

    def to_dict(self) -> MessageDict:
        """ConfigRecord-compatible form."""
        return {
            "kind": self.KIND,
            **self.tag.to_dict(),
            "node_ids": [n for n, _ in self.participants],
            "site_names": [s for _, s in self.participants],
            "threshold": self.threshold,
            "clip_range": self.clip_range,
            "num_sites": self.num_sites,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AdvertiseRequest:
        """Inverse of :meth:`to_dict`."""
        _check_kind(d, cls.KIND)
        ids, names = _list(d, "node_ids", int), _list(d, "site_names", str)
        if len(ids) != len(names):
            raise SecAggIntegrityError("node_ids and site_names have different lengths.")
        return cls(
            RoundTag.from_dict(d),
            tuple(zip(ids, names, strict=True)),
            _field(d, "threshold", int),
            _field(d, "clip_range", float),
            _field(d, "num_sites", int),
        )


@dataclass(frozen=True)
class KeyAdvert:
    """Stage 1 reply, site -> server: two X25519 public keys signed with the site's Ed25519 identity.

    ``site_nonce`` is 16 fresh bytes of the site's own: the server alone no longer decides what makes a
    round fresh, and every site's nonce enters the transcript that binds the encrypted shares.
    """

    KIND: ClassVar[str] = "secagg.key_advert"
    tag: RoundTag
    node_id: int
    site_name: str
    c_pk: bytes
    s_pk: bytes
    site_nonce: bytes
    signature: bytes
    role: int = ROLE_UPDATE  # what the site's input carries (ROLE_* bits; 0: zeros, e.g. a declined round)

    @staticmethod
    def signed_payload(
        tag: RoundTag,
        node_id: int,
        site_name: str,
        c_pk: bytes,
        s_pk: bytes,
        site_nonce: bytes,
        config_digest: bytes,
        role: int = ROLE_UPDATE,
    ) -> bytes:
        """Exact bytes that are signed: tag || node_id || site_name || c_pk || s_pk || site nonce || config digest
        || role. The role is signed so that no site can be counted as a contributor that contributes nothing."""
        raw = site_name.encode()
        return (
            b"advert"
            + tag.to_bytes()
            + _u64(node_id)
            + _u64(len(raw))
            + raw
            + c_pk
            + s_pk
            + site_nonce
            + config_digest
            + _u64(role)
        )

    def to_dict(self) -> MessageDict:
        """ConfigRecord-compatible form."""
        return {
            "kind": self.KIND,
            **self.tag.to_dict(),
            "node_id": self.node_id,
            "site_name": self.site_name,
            "c_pk": self.c_pk,
            "s_pk": self.s_pk,
            "site_nonce": self.site_nonce,
            "signature": self.signature,
            "role": self.role,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> KeyAdvert:
        """Inverse of :meth:`to_dict`."""
        _check_kind(d, cls.KIND)
        return cls(
            RoundTag.from_dict(d),
            _field(d, "node_id", int),
            _field(d, "site_name", str),
            _field(d, "c_pk", bytes),
            _field(d, "s_pk", bytes),
            _field(d, "site_nonce", bytes),
            _field(d, "signature", bytes),
            _field(d, "role", int),
        )


@dataclass(frozen=True)
class ShareRequest:
    """Stage 2, server -> every site that advertised: all adverts, relayed unmodified."""

    KIND: ClassVar[str] = "secagg.share_request"
    tag: RoundTag
    adverts: tuple[KeyAdvert, ...]

    def to_dict(self) -> MessageDict:
        """ConfigRecord-compatible form (parallel lists, one entry per advert)."""
        a = self.adverts
        return {
            "kind": self.KIND,
            **self.tag.to_dict(),
            "advert_run_ids": [x.tag.run_id for x in a],
            "advert_rounds": [x.tag.round for x in a],
            "advert_tag_nonces": [x.tag.nonce for x in a],
            "node_ids": [x.node_id for x in a],
            "site_names": [x.site_name for x in a],
            "c_pks": [x.c_pk for x in a],
            "s_pks": [x.s_pk for x in a],
            "site_nonces": [x.site_nonce for x in a],
            "signatures": [x.signature for x in a],
            "roles": [x.role for x in a],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShareRequest:
        """Inverse of :meth:`to_dict`."""
        _check_kind(d, cls.KIND)
        cols = [
            _list(d, "advert_run_ids", int),
            _list(d, "advert_rounds", int),
            _list(d, "advert_tag_nonces", bytes),
            _list(d, "node_ids", int),
            _list(d, "site_names", str),
            _list(d, "c_pks", bytes),
            _list(d, "s_pks", bytes),
            _list(d, "site_nonces", bytes),
            _list(d, "signatures", bytes),
            _list(d, "roles", int),
        ]
        if len({len(c) for c in cols}) > 1:
            raise SecAggIntegrityError("ShareRequest advert columns have different lengths.")
        adverts = tuple(
            KeyAdvert(RoundTag(r, rd, n), nid, name, c, s, sn, sig, role)
            for r, rd, n, nid, name, c, s, sn, sig, role in zip(*cols, strict=True)
        )
        return cls(RoundTag.from_dict(d), adverts)


B_COMMITMENT_LEN = 32  # SHA-256


@dataclass(frozen=True)
class EncryptedShares:
    """Stage 2 reply, site -> server: AES-GCM blobs of Shamir shares, keyed by destination node id, and the
    sender's commitment to its self-mask seed b.

    Why the commitment: the server reconstructs b from the unmask stage's shares, and with exactly t shares
    there is no redundancy to notice one corrupt share, which would silently turn the aggregate into noise.
    ``b_commitment`` (:meth:`commit_b`) lets the server check the reconstructed b before using it. b is 32
    fresh random bytes, so its hash reveals nothing about it or about the site's input.
    """

    KIND: ClassVar[str] = "secagg.encrypted_shares"
    tag: RoundTag
    node_id: int
    blobs: Mapping[int, bytes]
    b_commitment: bytes

    @staticmethod
    def commit_b(tag: RoundTag, node_id: int, b: bytes) -> bytes:
        """SHA-256 of a domain label, the round tag, the owner's node id and its seed b (all fixed-length,
        so the encoding is unambiguous): binds b to this owner in this round, never reusable elsewhere."""
        return hashlib.sha256(b"fedtune/secagg/b-commitment" + tag.to_bytes() + _u64(node_id) + b).digest()

    def to_dict(self) -> MessageDict:
        """ConfigRecord-compatible form."""
        ids = sorted(self.blobs)
        return {
            "kind": self.KIND,
            **self.tag.to_dict(),
            "node_id": self.node_id,
            "dst_node_ids": ids,
            "blobs": [self.blobs[i] for i in ids],
            "b_commitment": self.b_commitment,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EncryptedShares:
        """Inverse of :meth:`to_dict`; a missing or wrong-length commitment is refused."""
        _check_kind(d, cls.KIND)
        commitment = _field(d, "b_commitment", bytes)
        if len(commitment) != B_COMMITMENT_LEN:
            raise SecAggIntegrityError(
                f"b_commitment has {len(commitment)} bytes, expected {B_COMMITMENT_LEN} (SHA-256); the reply is "
                "corrupt or from an incompatible fedtune version."
            )
        return cls(
            RoundTag.from_dict(d),
            _field(d, "node_id", int),
            _int_bytes_map(d, "dst_node_ids", "blobs"),
            commitment,
        )


@dataclass(frozen=True)
class MaskedInputRequest:
    """Stage 3, server -> each site in U1: the list U1 and the share blobs addressed to that site."""

    KIND: ClassVar[str] = "secagg.masked_input_request"
    tag: RoundTag
    u1: tuple[int, ...]
    blobs: Mapping[int, bytes]  # source node id -> blob

    def to_dict(self) -> MessageDict:
        """ConfigRecord-compatible form."""
        ids = sorted(self.blobs)
        return {
            "kind": self.KIND,
            **self.tag.to_dict(),
            "u1": list(self.u1),
            "src_node_ids": ids,
            "blobs": [self.blobs[i] for i in ids],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MaskedInputRequest:
        """Inverse of :meth:`to_dict`."""
        _check_kind(d, cls.KIND)
        return cls(RoundTag.from_dict(d), tuple(_list(d, "u1", int)), _int_bytes_map(d, "src_node_ids", "blobs"))


@dataclass(frozen=True)
class MaskedInput:
    """Stage 3 reply, site -> server. ``vector`` (uint32) is NOT in :meth:`to_dict`: send it as an
    ``ArrayRecord`` next to the ConfigRecord and pass it back to :meth:`from_dict`."""

    KIND: ClassVar[str] = "secagg.masked_input"
    tag: RoundTag
    node_id: int
    vector: np.ndarray = field(compare=False, repr=False)

    def to_dict(self) -> MessageDict:
        """ConfigRecord-compatible header (length is repeated so a truncated array is detected)."""
        return {"kind": self.KIND, **self.tag.to_dict(), "node_id": self.node_id, "length": int(self.vector.size)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], vector: np.ndarray) -> MaskedInput:
        """Inverse of :meth:`to_dict`, re-attaching the separately transported vector."""
        _check_kind(d, cls.KIND)
        vec = np.asarray(vector)
        if vec.dtype != np.uint32 or vec.ndim != 1:
            raise SecAggIntegrityError(f"Masked vector must be 1-D uint32, got {vec.dtype} with shape {vec.shape}.")
        if vec.size != _field(d, "length", int):
            raise SecAggIntegrityError("Masked vector length differs from the header; it was truncated.")
        return cls(RoundTag.from_dict(d), _field(d, "node_id", int), vec)


@dataclass(frozen=True)
class ConsistencyRequest:
    """Stage 4, server -> each survivor: the survivor set U2 (those whose masked input arrived) within U1.

    Each survivor signs this view; no share is revealed until a site holds ``threshold`` signatures on
    the very view it signed, so a server cannot tell some sites that a peer survived and others that it
    dropped (Bonawitz et al. 2017, malicious setting).
    """

    KIND: ClassVar[str] = "secagg.consistency_request"
    tag: RoundTag
    u1: tuple[int, ...]
    survivors: tuple[int, ...]

    @staticmethod
    def signed_payload(tag: RoundTag, u1: Iterable[int], survivors: Iterable[int], context: bytes) -> bytes:
        """Exact bytes each survivor signs: tag || sorted U1 || sorted U2 || the signer's context digest (round
        parameters and what the site was sent), so a signature counts only among sites shown the same round."""
        a, b = sorted(set(u1)), sorted(set(survivors))
        return (
            b"consistency"
            + context
            + tag.to_bytes()
            + _u64(len(a))
            + b"".join(_u64(x) for x in a)
            + _u64(len(b))
            + b"".join(_u64(x) for x in b)
        )

    def to_dict(self) -> MessageDict:
        """ConfigRecord-compatible form."""
        return {"kind": self.KIND, **self.tag.to_dict(), "u1": list(self.u1), "survivors": list(self.survivors)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConsistencyRequest:
        """Inverse of :meth:`to_dict`."""
        _check_kind(d, cls.KIND)
        return cls(RoundTag.from_dict(d), tuple(_list(d, "u1", int)), tuple(_list(d, "survivors", int)))


@dataclass(frozen=True)
class SurvivorSignature:
    """Stage 4 reply, survivor -> server: its identity-key signature over the consistency view."""

    KIND: ClassVar[str] = "secagg.survivor_signature"
    tag: RoundTag
    node_id: int
    signature: bytes

    def to_dict(self) -> MessageDict:
        """ConfigRecord-compatible form."""
        return {"kind": self.KIND, **self.tag.to_dict(), "node_id": self.node_id, "signature": self.signature}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SurvivorSignature:
        """Inverse of :meth:`to_dict`."""
        _check_kind(d, cls.KIND)
        return cls(RoundTag.from_dict(d), _field(d, "node_id", int), _field(d, "signature", bytes))


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 5, server -> each survivor that signed: U2, dropped D = U1 - U2, and the signatures on that view."""

    KIND: ClassVar[str] = "secagg.unmask_request"
    tag: RoundTag
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    signatures: Mapping[int, bytes] = field(default_factory=dict)  # signer node id -> signature

    def to_dict(self) -> MessageDict:
        """ConfigRecord-compatible form."""
        ids = sorted(self.signatures)
        return {
            "kind": self.KIND,
            **self.tag.to_dict(),
            "survivors": list(self.survivors),
            "dropped": list(self.dropped),
            "signer_ids": ids,
            "signatures": [self.signatures[i] for i in ids],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UnmaskRequest:
        """Inverse of :meth:`to_dict`."""
        _check_kind(d, cls.KIND)
        return cls(
            RoundTag.from_dict(d),
            tuple(_list(d, "survivors", int)),
            tuple(_list(d, "dropped", int)),
            _int_bytes_map(d, "signer_ids", "signatures"),
        )


@dataclass(frozen=True)
class UnmaskShares:
    """Stage 5 reply: serialised Shamir shares of b (survivors) and of s_sk (dropped), keyed by owner."""

    KIND: ClassVar[str] = "secagg.unmask_shares"
    tag: RoundTag
    node_id: int
    b_shares: Mapping[int, bytes]
    sk_shares: Mapping[int, bytes]

    def to_dict(self) -> MessageDict:
        """ConfigRecord-compatible form."""
        b_ids, sk_ids = sorted(self.b_shares), sorted(self.sk_shares)
        return {
            "kind": self.KIND,
            **self.tag.to_dict(),
            "node_id": self.node_id,
            "b_owner_ids": b_ids,
            "b_shares": [self.b_shares[i] for i in b_ids],
            "sk_owner_ids": sk_ids,
            "sk_shares": [self.sk_shares[i] for i in sk_ids],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UnmaskShares:
        """Inverse of :meth:`to_dict`."""
        _check_kind(d, cls.KIND)
        return cls(
            RoundTag.from_dict(d),
            _field(d, "node_id", int),
            _int_bytes_map(d, "b_owner_ids", "b_shares"),
            _int_bytes_map(d, "sk_owner_ids", "sk_shares"),
        )
