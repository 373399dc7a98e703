"""SecAgg state machines (Bonawitz et al., CCS 2017), transport-agnostic.

One :class:`SecAggSite` per site per round and one :class:`SecAggServer` per round. The transport (the
Flower ServerApp/ClientApp) moves the message dataclasses of :mod:`.messages` and enforces timeouts; the
server object is told who answered at each stage (anyone missing from the replies, or listed in
``dropped``, is treated as dropped).

Why it is private: each site adds to its quantised vector a self-mask PRG(b_i) and, for every other
site j that sent shares, +/-PRG(KA(s_sk_i, s_pk_j)). Pairwise masks cancel in the sum; self-masks are
removed with b_i reconstructed from t Shamir shares, only for sites whose masked vector arrived. For a
site that dropped after sending shares, s_sk_j is reconstructed instead and only its pairwise masks are
removed. Each site reveals, per peer, either the b-share or the s_sk-share, never both, so the server
can never strip both masks of any single site: it learns only the sum of the survivors' vectors.

Integrity: ephemeral keys are signed with each site's Ed25519 identity key and verified by sites
against keys pinned in their own configuration; shares are AES-GCM encrypted between sites with AAD
binding (round tag, transcript of every advert, sender, receiver); every message carries the
:class:`RoundTag`.

Against a malicious server (which chooses the threshold, the survivor lists and the round tag) the
defences sit at the site: it refuses a threshold at or below its own floor (t > 2n/3 by default), a
round tag it has used before, and any unmask request that is not backed by ``t`` identity signatures on
the very survivor view it signed itself in the consistency stage. Two views that split one site's
masks would need ``2t - n > n/3`` sites to sign both, i.e. more colluding sites than the floor allows.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import keys, shamir
from .errors import SecAggAbort, SecAggConfigError, SecAggIntegrityError, short_reason
from .masks import expand_mask
from .messages import (
    B_COMMITMENT_LEN,
    ROLE_SCORES,
    ROLE_UPDATE,
    TAG_NONCE_LEN,
    AdvertiseRequest,
    ConsistencyRequest,
    EncryptedShares,
    KeyAdvert,
    MaskedInput,
    MaskedInputRequest,
    RoundTag,
    ShareRequest,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskShares,
    _u64,
)
from .quantize import QuantSpec

log = logging.getLogger(__name__)

MIN_THRESHOLD = 2
THRESHOLD_FRACTION = 2 / 3  # a site's default floor: t must exceed this fraction of the participants
MAX_SHARE_SUBSETS = 4096  # t-subsets the server tries per secret to get past corrupt unmask shares (bounds its work)

StageClaim = Callable[[str, "RoundTag"], None]
"""Records durably that the site answered one stage ("advert", "masked", "signed") of a round tag, raising
:class:`SecAggIntegrityError` if it already had: whatever saved state a stage runs from, it runs once."""


def threshold_above(fraction: float, n: int) -> int:
    """The least threshold t with t > fraction * n (and t >= 2): the rule both server and sites apply.

    The fraction is read as the nearest simple ratio (2/3 stays 2/3, not 0.6666...), so a site's floor and
    the server's choice agree exactly at every n.
    """
    exact = Fraction(fraction).limit_denominator(1000)
    return min(n, max(MIN_THRESHOLD, math.floor(exact * n) + 1))


__all__ = [
    "InProcessResult",
    "SecAggServer",
    "SecAggSite",
    "run_in_process",
    "run_in_process_detailed",
]


# ---------------------------------------------------------------- shared derivations


def _share_key(c_sk: keys.X25519PrivateKey, peer_c_pk: bytes, tag: RoundTag) -> bytes:
    return keys.agree(c_sk, peer_c_pk, b"share-key" + tag.to_bytes())


def _share_aad(tag: RoundTag, transcript: bytes, src: int, dst: int) -> bytes:
    return b"share" + tag.to_bytes() + transcript + _u64(src) + _u64(dst)


def _transcript(adverts: Mapping[int, KeyAdvert]) -> bytes:
    """Hash of every advert a site accepted: two sites that were shown different advert sets (a replayed
    advert, an extra or a missing site) derive different AADs, so their shares fail to decrypt."""
    h = hashlib.sha256(b"transcript")
    for nid in sorted(adverts):
        a = adverts[nid]
        h.update(_u64(nid) + a.c_pk + a.s_pk + a.site_nonce + a.signature + _u64(a.role))
    return h.digest()


def _pair_mask(s_sk: keys.X25519PrivateKey, peer_s_pk: bytes, a: int, b: int, tag: RoundTag, n: int) -> np.ndarray:
    lo, hi = min(a, b), max(a, b)
    seed = keys.agree(s_sk, peer_s_pk, b"pair-mask" + tag.to_bytes() + _u64(lo) + _u64(hi))
    return expand_mask(seed, n, b"pair" + tag.to_bytes() + _u64(lo) + _u64(hi))


def _self_mask(b: bytes, node_id: int, tag: RoundTag, n: int) -> np.ndarray:
    return expand_mask(b, n, b"self" + tag.to_bytes() + _u64(node_id))


def _check_tag(expected: RoundTag, got: RoundTag, what: str) -> None:
    if got != expected:
        raise SecAggIntegrityError(
            f"{what} carries round tag (run {got.run_id}, round {got.round}) that is not this round's "
            f"(run {expected.run_id}, round {expected.round}, or a different nonce): refusing a replayed or "
            "stale message; abort this round."
        )


def _check_participants(participants: Sequence[tuple[int, str]]) -> None:
    ids = [n for n, _ in participants]
    names = [s for _, s in participants]
    if len(set(ids)) != len(ids) or len(set(names)) != len(names):
        raise SecAggIntegrityError("Participant list has duplicate node ids or site names; abort the round.")
    if any(not 0 <= n < 2**64 for n in ids):
        raise SecAggIntegrityError("Participant node ids must be unsigned 64-bit integers.")


def _to_pubkey(v: Ed25519PublicKey | bytes | str) -> Ed25519PublicKey:
    if isinstance(v, Ed25519PublicKey):
        return v
    if isinstance(v, str):
        return keys.public_key_from_hex(v)
    return Ed25519PublicKey.from_public_bytes(v)


def _jsonable(d: Mapping[str, object]) -> dict[str, object]:
    """Message dicts hold bytes and 64-bit ints; JSON gets them as tagged hex and strings."""

    def enc(v: object) -> object:
        if isinstance(v, bytes):
            return {"b": v.hex()}
        if isinstance(v, int) and not isinstance(v, bool):
            return {"i": str(v)}
        if isinstance(v, list | tuple):
            return [enc(x) for x in v]
        return v

    return {k: enc(v) for k, v in d.items()}


def _unjsonable(d: Mapping[str, object]) -> dict[str, object]:
    def dec(v: object) -> object:
        if isinstance(v, dict):
            return bytes.fromhex(v["b"]) if "b" in v else int(v["i"])
        if isinstance(v, list):
            return [dec(x) for x in v]
        return v

    return {k: dec(v) for k, v in d.items()}


# ---------------------------------------------------------------- site


class SecAggSite:
    """Site-side state machine for one round; call the five stage methods in order, each once.

    ``pinned_keys`` maps site_name -> Ed25519 public key (object, raw bytes or hex) from the site's *own*
    configuration; keys supplied by the server are never trusted. ``expected_run_id`` /
    ``expected_round`` (from the Flower message metadata / round config) reject a stale advertise request.
    ``threshold_fraction`` is the site's floor: it accepts only t > fraction * n. ``claim`` records each
    round tag's advert, masked input and consistency signature in the site's own state before they leave, so
    that none is ever given twice.
    """

    def __init__(
        self,
        node_id: int,
        site_name: str,
        identity_key: Ed25519PrivateKey,
        pinned_keys: Mapping[str, Ed25519PublicKey | bytes | str],
        *,
        expected_run_id: int | None = None,
        expected_round: int | None = None,
        threshold_fraction: float = THRESHOLD_FRACTION,
        claim: StageClaim | None = None,
        bound: bytes = b"",
        min_sites: int = MIN_THRESHOLD,
        role: int = ROLE_UPDATE,
        scores_length: int = 0,
    ) -> None:
        self.node_id = node_id
        self.site_name = site_name
        self._identity = identity_key
        self._pinned = {name: _to_pubkey(k) for name, k in pinned_keys.items()}
        own = self._pinned.get(site_name)
        if own is not None and keys.public_key_bytes(own) != keys.public_key_bytes(identity_key):
            raise SecAggConfigError(
                f"Pinned key for this site ({site_name!r}) does not match its identity key; fix the site config."
            )
        self._expected_run_id = expected_run_id
        self._expected_round = expected_round
        if not 0.0 <= threshold_fraction < 1.0:
            raise SecAggConfigError(f"threshold_fraction must be in [0, 1), got {threshold_fraction}.")
        self._threshold_fraction = threshold_fraction
        if min_sites < MIN_THRESHOLD:
            raise SecAggConfigError(f"min_sites must be at least {MIN_THRESHOLD}, got {min_sites}.")
        self._min_sites = min_sites
        self._claim = claim
        self._bound = bound
        self._role = role
        self._scores_length = scores_length  # trailing input coordinates that carry held-out figures
        self._scores_in = False  # whether this site's masked input carries them (decided at stage 3)
        self._stage = 0
        self._req: AdvertiseRequest | None = None
        self._quant: QuantSpec | None = None
        self._xcoord: dict[int, int] = {}
        self._c_sk: keys.X25519PrivateKey | None = None
        self._s_sk: keys.X25519PrivateKey | None = None
        self._c_pk = b""
        self._s_pk = b""
        self._b: bytes | None = None
        self._site_nonce = b""
        self._transcript = b""
        self._view: tuple[int, ...] = ()
        self._adverts: dict[int, KeyAdvert] = {}
        self._own_shares: tuple[shamir.Share, shamir.Share] | None = None
        self._received: dict[int, tuple[shamir.Share, shamir.Share]] = {}
        self._u1: tuple[int, ...] = ()

    # -- persistence between stages
    def to_state(self) -> bytes:
        """Serialise the round's secrets so the next stage can run in another process.

        Flower may run each stage's message in a different worker (Ray actors in simulation, one
        ClientApp process per message in deployment); the node's Context survives between them and
        never leaves the site, so the secrets are kept there. The identity key and pinned keys are
        not included: they are re-read from the site's own configuration.
        """

        def hx(b: bytes | None) -> str | None:
            return None if b is None else b.hex()

        state = {
            "node_id": str(self.node_id),
            "site_name": self.site_name,
            "expected_run_id": None if self._expected_run_id is None else str(self._expected_run_id),
            "expected_round": self._expected_round,
            "threshold_fraction": self._threshold_fraction,
            "min_sites": self._min_sites,
            "bound": self._bound.hex(),
            "role": self._role,
            "scores_length": self._scores_length,
            "scores_in": self._scores_in,
            "stage": self._stage,
            "req": None if self._req is None else _jsonable(self._req.to_dict()),
            "c_sk": hx(None if self._c_sk is None else keys.x25519_private_bytes(self._c_sk)),
            "s_sk": hx(None if self._s_sk is None else keys.x25519_private_bytes(self._s_sk)),
            "b": hx(self._b),
            "site_nonce": self._site_nonce.hex(),
            "transcript": self._transcript.hex(),
            "view": [str(v) for v in self._view],
            "adverts": [_jsonable(a.to_dict()) for a in self._adverts.values()],
            "own_shares": None if self._own_shares is None else [s.to_bytes().hex() for s in self._own_shares],
            "received": {str(k): [s.to_bytes().hex() for s in v] for k, v in self._received.items()},
            "u1": [str(u) for u in self._u1],
        }
        return json.dumps(state).encode()

    @classmethod
    def from_state(
        cls,
        blob: bytes,
        identity_key: Ed25519PrivateKey,
        pinned_keys: Mapping[str, Ed25519PublicKey | bytes | str],
        *,
        claim: StageClaim | None = None,
    ) -> SecAggSite:
        st = json.loads(blob)
        site = cls(
            int(st["node_id"]),
            st["site_name"],
            identity_key,
            pinned_keys,
            expected_run_id=None if st["expected_run_id"] is None else int(st["expected_run_id"]),
            expected_round=st["expected_round"],
            threshold_fraction=st["threshold_fraction"],
            claim=claim,
            bound=bytes.fromhex(st["bound"]),
            min_sites=st["min_sites"],
            role=st["role"],
            scores_length=st["scores_length"],
        )
        site._scores_in = st["scores_in"]
        site._stage = st["stage"]
        if st["req"] is not None:
            site._req = AdvertiseRequest.from_dict(_unjsonable(st["req"]))
            site._quant = site._req.quant
            site._xcoord = {nid: i + 1 for i, (nid, _) in enumerate(site._req.participants)}
        if st["c_sk"] is not None:
            site._c_sk = keys.x25519_from_private_bytes(bytes.fromhex(st["c_sk"]))
            site._c_pk = keys.x25519_public_bytes(site._c_sk)
        if st["s_sk"] is not None:
            site._s_sk = keys.x25519_from_private_bytes(bytes.fromhex(st["s_sk"]))
            site._s_pk = keys.x25519_public_bytes(site._s_sk)
        site._b = None if st["b"] is None else bytes.fromhex(st["b"])
        site._site_nonce = bytes.fromhex(st["site_nonce"])
        site._transcript = bytes.fromhex(st["transcript"])
        site._view = tuple(int(v) for v in st["view"])
        adverts = [KeyAdvert.from_dict(_unjsonable(a)) for a in st["adverts"]]
        site._adverts = {a.node_id: a for a in adverts}
        if st["own_shares"] is not None:
            b_sh, sk_sh = (shamir.Share.from_bytes(bytes.fromhex(h)) for h in st["own_shares"])
            site._own_shares = (b_sh, sk_sh)
        site._received = {
            int(k): (shamir.Share.from_bytes(bytes.fromhex(v[0])), shamir.Share.from_bytes(bytes.fromhex(v[1])))
            for k, v in st["received"].items()
        }
        site._u1 = tuple(int(u) for u in st["u1"])
        return site

    def _signed_digest(self, req: AdvertiseRequest) -> bytes:
        """What every signature of this site binds: the round's parameters and everything the site was sent.

        ``bound`` is the site's own digest of the message that started the round (federation spec, run, round,
        adapter): a server that shows sites different specs or adapters (one site a huge weight cap, the others
        a delta that makes them decline) gets signatures that do not verify for each other, so the round fails.
        """
        return hashlib.sha256(b"signed-context" + req.config_digest() + self._bound).digest()

    def _need_sites(self, count: int, what: str) -> None:
        if count < self._min_sites:
            raise SecAggConfigError(
                f"Only {count} sites {what}; this site takes part only in secure sums of at least "
                f"{self._min_sites} sites (its min_round_sites): with fewer, the others' inputs are too few to hide "
                "its own. Refusing."
            )

    def _need_role(self, role: int, count: int, what: str) -> None:
        """At least max(t, min_sites) sites must carry `role`: zeros from sites that declined (or that release no
        scores) hide nothing, and a server that makes every other site decline must get no sum at all."""
        assert self._req is not None
        need = max(self._req.threshold, self._min_sites)
        if count < need:
            raise SecAggConfigError(
                f"Only {count} sites {what}; this site needs at least {need} (the threshold t, and at least its "
                "min_round_sites), or the sum would hide its input among too few others. Refusing."
            )

    def _count_role(self, role: int, nodes: Iterable[int]) -> int:
        return sum(1 for nid in nodes if nid in self._adverts and self._adverts[nid].role & role)

    @property
    def tag(self) -> RoundTag:
        """Tag of the round this site joined (after stage 1)."""
        if self._req is None:
            raise SecAggConfigError("The site has not joined a round yet (call advertise first).")
        return self._req.tag

    def _enter(self, stage: int) -> None:
        # Called first in every stage. The stage counter advances before any check, so a site that refused
        # a message (any exception) never answers again in this round: a refusal is final.
        if self._stage != stage - 1:
            raise SecAggIntegrityError(
                f"Stage {stage} requested while the site is after stage {self._stage}; stages must run once, "
                "in order, and a refused stage ends the site's part in the round. Abort the round."
            )
        self._stage = stage

    # -- stage 1
    def check_request(self, req: AdvertiseRequest) -> None:
        """Refuse round parameters this site would never accept: run before the site computes (and pays for)
        its input, so a request refused on its face costs no budget."""
        tag = req.tag
        if self._expected_run_id is not None and tag.run_id != self._expected_run_id:
            raise SecAggIntegrityError(
                f"Advertise request is for run {tag.run_id}, this site expects run {self._expected_run_id}."
            )
        if self._expected_round is not None and tag.round != self._expected_round:
            raise SecAggIntegrityError(
                f"Advertise request is for round {tag.round}, this site expects round {self._expected_round}: "
                "refusing a replayed or stale request."
            )
        _check_participants(req.participants)
        if (self.node_id, self.site_name) not in req.participants:
            raise SecAggIntegrityError(
                f"This site ({self.node_id}, {self.site_name!r}) is not in the participant list."
            )
        n = len(req.participants)
        self._need_sites(n, "take part in this round")
        floor = threshold_above(self._threshold_fraction, n)
        if not floor <= req.threshold <= n:
            raise SecAggConfigError(
                f"Threshold {req.threshold} is outside [{floor}, {n}] for {n} participants: this site requires "
                f"t > {self._threshold_fraction:.3g} x n, so that a server colluding with fewer than t sites "
                "cannot unmask one site. The operator must raise secagg.threshold_fraction."
            )
        if req.num_sites < n:
            raise SecAggConfigError(
                f"Quantisation sized for {req.num_sites} sites but {n} participate: the sum could overflow."
            )

    def advertise(self, req: AdvertiseRequest) -> KeyAdvert:
        """Check the round parameters, make the two X25519 key pairs and sign them (with this site's role)."""
        self._enter(1)
        self.check_request(req)
        tag = req.tag
        if self._claim is not None:
            self._claim("advert", tag)  # before any key material exists: a replayed tag gets nothing
        self._quant = req.quant
        self._req = req
        self._xcoord = {nid: i + 1 for i, (nid, _) in enumerate(req.participants)}
        self._c_sk, self._c_pk = keys.generate_x25519()
        self._s_sk, self._s_pk = keys.generate_x25519()
        self._site_nonce = os.urandom(TAG_NONCE_LEN)
        payload = KeyAdvert.signed_payload(
            tag,
            self.node_id,
            self.site_name,
            self._c_pk,
            self._s_pk,
            self._site_nonce,
            self._signed_digest(req),
            self._role,
        )
        signature = self._identity.sign(payload)
        return KeyAdvert(
            tag, self.node_id, self.site_name, self._c_pk, self._s_pk, self._site_nonce, signature, self._role
        )

    # -- stage 2
    def share(self, req: ShareRequest) -> EncryptedShares:
        """Verify every advert against pinned keys, then Shamir-share b and s_sk to the advertised peers."""
        self._enter(2)
        assert self._req is not None and self._c_sk is not None and self._s_sk is not None
        tag = self._req.tag
        _check_tag(tag, req.tag, "Share request")
        names = dict(self._req.participants)
        digest = self._signed_digest(self._req)
        adverts: dict[int, KeyAdvert] = {}
        seen_names: set[str] = set()
        for adv in req.adverts:
            _check_tag(tag, adv.tag, f"Advert of node {adv.node_id}")
            if adv.node_id in adverts or adv.site_name in seen_names:
                raise SecAggIntegrityError(
                    f"Duplicate advert for node {adv.node_id} / site {adv.site_name!r}; abort the round."
                )
            if names.get(adv.node_id) != adv.site_name:
                raise SecAggIntegrityError(
                    f"Advert names node {adv.node_id} as {adv.site_name!r}, which is not its entry in the "
                    "participant list; abort the round."
                )
            pinned = self._pinned.get(adv.site_name)
            if pinned is None:
                raise SecAggIntegrityError(
                    f"No pinned identity key for site {adv.site_name!r} in this site's config: cannot verify "
                    "it. Add its public key to the pinned keys (out of band) or exclude it from the federation."
                )
            if len(adv.c_pk) != 32 or len(adv.s_pk) != 32 or len(adv.site_nonce) != TAG_NONCE_LEN:
                raise SecAggIntegrityError(f"Advert of site {adv.site_name!r} has malformed keys or nonce.")
            payload = KeyAdvert.signed_payload(
                tag, adv.node_id, adv.site_name, adv.c_pk, adv.s_pk, adv.site_nonce, digest, adv.role
            )
            try:
                pinned.verify(adv.signature, payload)
            except InvalidSignature as exc:
                raise SecAggIntegrityError(
                    f"Signature of site {adv.site_name!r} (node {adv.node_id}) does not verify under its pinned "
                    "identity key: its keys were altered, or it was sent a different federation spec, adapter or "
                    "round parameters than this site. Abort the round and investigate the server."
                ) from exc
            adverts[adv.node_id] = adv
            seen_names.add(adv.site_name)
        mine = adverts.get(self.node_id)
        if mine is None or (mine.c_pk, mine.s_pk, mine.site_nonce) != (self._c_pk, self._s_pk, self._site_nonce):
            raise SecAggIntegrityError("This site's own advert is missing or altered in the share request.")
        t = self._req.threshold
        if len(adverts) < t:
            raise SecAggAbort(f"Only {len(adverts)} sites advertised keys, below the threshold {t}; round aborted.")
        self._need_sites(len(adverts), "advertised keys")
        if self._role & ROLE_UPDATE:
            self._need_role(ROLE_UPDATE, sum(1 for a in adverts.values() if a.role & ROLE_UPDATE), "bring an update")
        self._adverts = adverts
        self._transcript = _transcript(adverts)
        self._b = os.urandom(32)
        n = len(self._req.participants)
        b_shares = shamir.split(self._b, n, t)
        sk_shares = shamir.split(keys.x25519_private_bytes(self._s_sk), n, t)
        blobs: dict[int, bytes] = {}
        for nid, adv in adverts.items():
            x = self._xcoord[nid]
            pair = (b_shares[x - 1], sk_shares[x - 1])
            if nid == self.node_id:
                self._own_shares = pair
                continue
            key = _share_key(self._c_sk, adv.c_pk, tag)
            plaintext = pair[0].to_bytes() + pair[1].to_bytes()
            blobs[nid] = keys.seal(key, plaintext, _share_aad(tag, self._transcript, self.node_id, nid))
        # The server checks the b it reconstructs against this, so a corrupt unmask share cannot pass unseen.
        return EncryptedShares(tag, self.node_id, blobs, EncryptedShares.commit_b(tag, self.node_id, self._b))

    # -- stage 3
    def masked_input(
        self, req: MaskedInputRequest, x: np.ndarray, *, rounding: np.random.Generator | None = None
    ) -> MaskedInput:
        """Decrypt and keep the shares addressed to this site, then mask the quantised vector ``x``.

        ``rounding`` draws the stochastic rounding (default: fresh OS entropy); rounding acts on an update that is
        already DP, so a seeded simulation may seed it to repeat its figures exactly.
        """
        self._enter(3)
        assert self._req is not None and self._c_sk is not None and self._s_sk is not None
        assert self._b is not None and self._own_shares is not None and self._quant is not None
        tag = self._req.tag
        _check_tag(tag, req.tag, "Masked-input request")
        u1 = tuple(sorted(set(req.u1)))
        if len(u1) != len(req.u1):
            raise SecAggIntegrityError("U1 contains duplicates; abort the round.")
        if not set(u1) <= set(self._adverts) or self.node_id not in u1:
            raise SecAggIntegrityError("U1 is not a subset of the advertised sites or omits this site.")
        t = self._req.threshold
        if len(u1) < t:
            raise SecAggAbort(f"Only {len(u1)} sites sent shares, below the threshold {t}; round aborted.")
        expected = set(u1) - {self.node_id}
        if set(req.blobs) != expected:
            missing, extra = sorted(expected - set(req.blobs)), sorted(set(req.blobs) - expected)
            raise SecAggIntegrityError(
                f"Share blobs do not match U1 (missing from {missing}, unexpected from {extra}); abort the round."
            )
        my_x = self._xcoord[self.node_id]
        received = {self.node_id: self._own_shares}
        for src in sorted(expected):
            adv = self._adverts[src]
            key = _share_key(self._c_sk, adv.c_pk, tag)
            try:
                plain = keys.open_(key, req.blobs[src], _share_aad(tag, self._transcript, src, self.node_id))
                b_sh = shamir.Share.from_bytes(plain[: shamir.SHARE_LEN])
                sk_sh = shamir.Share.from_bytes(plain[shamir.SHARE_LEN :])
            except SecAggIntegrityError as exc:
                raise SecAggIntegrityError(
                    f"Encrypted share from site {adv.site_name!r} (node {src}) failed its integrity check: it "
                    "was tampered with, or the two sites were shown different adverts. Abort the round."
                ) from exc
            if b_sh.x != my_x or sk_sh.x != my_x:
                raise SecAggIntegrityError(f"Share from node {src} has the wrong x-coordinate; abort the round.")
            received[src] = (b_sh, sk_sh)
        self._received = received
        self._u1 = u1

        clipped = self._quant.count_clipped(x)
        if clipped:  # logged here, on the site, and never sent: the count itself says something about the delta
            log.warning(
                "%d of %d values of this site's weighted update exceed secagg.clip_range=%g and were clipped; "
                "the aggregate is biased. Ask the operator to raise secagg.clip_range.",
                clipped,
                np.asarray(x).size,
                self._quant.clip_range,
            )
        if self._role & ROLE_SCORES and self._scores_length:
            # Held-out figures go in only among at least max(t, min_sites) sites that put theirs in too.
            need = max(t, self._min_sites)
            self._scores_in = self._count_role(ROLE_SCORES, u1) >= need
            if not self._scores_in:
                log.info(
                    "Withholding this site's held-out figures: fewer than %d sites in this sum release theirs.", need
                )
                x = np.array(x, dtype=np.float64)
                x[-self._scores_length :] = 0.0
        if self._claim is not None:
            # Durably, before the masked vector exists: two masked vectors of one round (from two copies of the
            # saved state, with two different U1) would differ by one pairwise mask, and the server would peel
            # every pairwise mask off this site's input that way.
            self._claim("masked", tag)
        y = self._quant.quantize(x, rounding)
        n = y.size
        y += _self_mask(self._b, self.node_id, tag, n)
        for j in sorted(expected):
            m = _pair_mask(self._s_sk, self._adverts[j].s_pk, self.node_id, j, tag, n)
            if self.node_id < j:
                y += m
            else:
                y -= m
        return MaskedInput(tag, self.node_id, y)

    # -- stage 4
    def consistency(self, req: ConsistencyRequest) -> SurvivorSignature:
        """Sign the survivor view (U1, U2) once; stage 5 reveals shares only against this exact view."""
        self._enter(4)
        assert self._req is not None
        tag = self._req.tag
        _check_tag(tag, req.tag, "Consistency request")
        survivors = set(req.survivors)
        if len(survivors) != len(req.survivors) or len(set(req.u1)) != len(req.u1):
            raise SecAggIntegrityError("Consistency request lists a site twice; abort the round.")
        if set(req.u1) != set(self._u1):
            raise SecAggIntegrityError(
                "Consistency request names a U1 that differs from the one this site masked against; abort the round."
            )
        if not survivors <= set(self._u1) or self.node_id not in survivors:
            raise SecAggIntegrityError("Survivors are not a subset of U1 or omit this site; abort the round.")
        t = self._req.threshold
        if len(survivors) < t:
            raise SecAggAbort(f"Only {len(survivors)} sites sent masked inputs, below the threshold {t}.")
        self._need_sites(len(survivors), "sent masked inputs")
        if self._role & ROLE_UPDATE:
            self._need_role(ROLE_UPDATE, self._count_role(ROLE_UPDATE, survivors), "that bring an update survived")
        if self._scores_in:
            self._need_role(ROLE_SCORES, self._count_role(ROLE_SCORES, survivors), "that release scores survived")
        if self._claim is not None:
            self._claim("signed", tag)  # durably, before the signature exists: one signed view per round, ever
        self._view = tuple(sorted(survivors))
        payload = ConsistencyRequest.signed_payload(tag, self._u1, self._view, self._signed_digest(self._req))
        return SurvivorSignature(tag, self.node_id, self._identity.sign(payload))

    # -- stage 5
    def unmask(self, req: UnmaskRequest) -> UnmaskShares:
        """Reveal b-shares of survivors and s_sk-shares of dropped sites, never both for one site, and only
        for the view this site signed, backed by at least ``t`` valid signatures of other participants."""
        self._enter(5)
        assert self._req is not None
        tag = self._req.tag
        _check_tag(tag, req.tag, "Unmask request")
        surv, dropped = set(req.survivors), set(req.dropped)
        if len(surv) != len(req.survivors) or len(dropped) != len(req.dropped):
            raise SecAggIntegrityError("Unmask request lists a site twice; abort the round.")
        if surv & dropped:
            raise SecAggIntegrityError(
                f"Unmask request asks for both the self-mask and the key share of sites {sorted(surv & dropped)}: "
                "that would reveal their inputs. Refusing; abort the round."
            )
        if surv | dropped != set(self._u1):
            raise SecAggIntegrityError("Survivors and dropped sites do not partition U1; abort the round.")
        if self.node_id not in surv:
            raise SecAggIntegrityError(
                "Unmask request lists this site as dropped although it sent its masked input; refusing "
                "(revealing its key share would expose its input)."
            )
        if tuple(sorted(surv)) != self._view:
            raise SecAggIntegrityError(
                "Unmask request's survivors differ from the view this site signed in the consistency stage: "
                "the server is showing sites different views. Refusing; abort the round."
            )
        t = self._req.threshold
        names = dict(self._req.participants)
        payload = ConsistencyRequest.signed_payload(tag, self._u1, self._view, self._signed_digest(self._req))
        valid = set()
        for signer, signature in req.signatures.items():
            # An invalid or foreign signature is skipped, not fatal: one site (or the server) sending junk must not
            # end the round for everyone. Only t valid signatures on this very view release anything.
            pinned = self._pinned.get(names.get(signer, ""))
            if signer not in surv or pinned is None:
                log.warning("Ignoring a consistency signature from node %s: not a survivor of this view.", signer)
                continue
            try:
                pinned.verify(signature, payload)
            except InvalidSignature:
                log.warning("Ignoring node %s's consistency signature: it does not verify on this view.", signer)
                continue
            valid.add(signer)
        if len(valid) < t:
            raise SecAggIntegrityError(
                f"Only {len(valid)} survivors signed this view, below the threshold {t}: refusing to reveal shares."
            )
        b = {j: self._received[j][0].to_bytes() for j in sorted(surv)}
        sk = {j: self._received[j][1].to_bytes() for j in sorted(dropped)}
        self._received = {}
        self._b = None
        return UnmaskShares(tag, self.node_id, b, sk)


# ---------------------------------------------------------------- server


class SecAggServer:
    """Server-side state machine for one round.

    Call, in order: :meth:`advertise_request` -> :meth:`receive_adverts` -> :meth:`share_request` ->
    :meth:`receive_shares` -> :meth:`masked_input_request` (per site) -> :meth:`receive_masked_inputs` ->
    :meth:`consistency_request` -> :meth:`receive_consistency` -> :meth:`unmask_request` ->
    :meth:`receive_unmask` -> :meth:`aggregate`. Every ``receive_*`` treats a node that is absent from
    ``replies``, named in ``dropped`` (e.g. timed out) or whose reply is malformed as dropped (the reason,
    cut short, is in :attr:`rejected`), and raises :class:`SecAggAbort` when fewer than ``threshold``
    sites remain: one site's bad reply costs that site its part in the round, never the round itself.
    """

    def __init__(
        self,
        tag: RoundTag,
        participants: Sequence[tuple[int, str]],
        threshold: int,
        quant: QuantSpec,
        *,
        vector_length: int | None = None,
        max_share_subsets: int = MAX_SHARE_SUBSETS,
    ) -> None:
        participants = tuple((int(n), str(s)) for n, s in participants)
        _check_participants(participants)
        if max_share_subsets < 1:
            raise SecAggConfigError(f"max_share_subsets must be at least 1, got {max_share_subsets}.")
        if not MIN_THRESHOLD <= threshold <= len(participants):
            raise SecAggConfigError(
                f"Threshold {threshold} must be in [{MIN_THRESHOLD}, {len(participants)}] for "
                f"{len(participants)} participants."
            )
        if quant.num_sites < len(participants):
            raise SecAggConfigError(
                f"QuantSpec is sized for {quant.num_sites} sites but {len(participants)} participate; "
                "create it with num_sites >= the number of participants."
            )
        self.tag = tag
        self.participants = participants
        self.threshold = threshold
        self.quant = quant
        self.vector_length = vector_length
        self.max_share_subsets = max_share_subsets
        self.rejected: dict[int, str] = {}
        self._names = dict(participants)
        self._xcoord = {nid: i + 1 for i, (nid, _) in enumerate(participants)}  # as every site numbers shares
        self._req = AdvertiseRequest(tag, participants, threshold, quant.clip_range, quant.num_sites)
        self._stage = 0
        self._adverts: dict[int, KeyAdvert] = {}
        self._shares: dict[int, Mapping[int, bytes]] = {}
        self._b_commitments: dict[int, bytes] = {}
        self._u1: tuple[int, ...] = ()
        self._u2: tuple[int, ...] = ()
        self._dropped: tuple[int, ...] = ()
        self._signatures: dict[int, bytes] = {}
        self._sum: np.ndarray | None = None
        self._unmask: dict[int, UnmaskShares] = {}
        self._aborted: str | None = None

    # -- bookkeeping
    @property
    def u0(self) -> tuple[int, ...]:
        """Sites whose key adverts arrived (stage 1)."""
        return tuple(sorted(self._adverts))

    @property
    def u1(self) -> tuple[int, ...]:
        """Sites whose encrypted shares arrived (stage 2)."""
        return self._u1

    @property
    def survivors(self) -> tuple[int, ...]:
        """Sites whose masked input arrived (stage 3): exactly the contributors to the aggregate."""
        return self._u2

    @property
    def dropped(self) -> tuple[int, ...]:
        """Sites that sent shares but no masked input (their pairwise masks are removed via s_sk)."""
        return self._dropped

    @property
    def signers(self) -> tuple[int, ...]:
        """Survivors that signed the consistency view (stage 4): the ones asked to unmask."""
        return tuple(sorted(self._signatures))

    @property
    def unmask_responders(self) -> tuple[int, ...]:
        """Signers whose unmask shares arrived (stage 5)."""
        return tuple(sorted(self._unmask))

    def _enter(self, stage: int) -> None:
        if self._aborted is not None:
            raise SecAggAbort(f"Round already aborted: {self._aborted}")
        if self._stage != stage - 1:
            raise SecAggConfigError(f"Server step {stage} called after step {self._stage}; follow the stage order.")
        self._stage = stage

    def _need(self, alive: Iterable[int], stage: str) -> None:
        k = len(tuple(alive))
        if k < self.threshold:
            self._aborted = (
                f"only {k} of {len(self.participants)} sites survived {stage}, below the threshold "
                f"{self.threshold}; no aggregate this round. Retry the round (with a new RoundTag) or "
                "sample more sites."
            )
            raise SecAggAbort(self._aborted)

    def reject(self, node_id: int, reason: object) -> None:
        """Drop a node from the rest of the round, keeping a short reason (the transport calls this too,
        for replies it could not even parse)."""
        node = int(node_id)
        if node not in self.rejected:
            self.rejected[node] = short_reason(reason)
            log.warning("Secure aggregation: node %s dropped from the round: %s", node, self.rejected[node])

    def _collect(self, replies: Iterable[object], allowed: Iterable[int], dropped: Iterable[int], what: str) -> dict:
        allowed_set, dropped_set = set(allowed), set(dropped)
        got: dict[int, T_Msg] = {}
        twice: set[int] = set()
        for r in replies:
            node = getattr(r, "node_id", None)
            if not isinstance(node, int) or node not in allowed_set:
                log.warning("Ignoring a %s from node %s: not expected at this stage.", what, node)
                continue
            if getattr(r, "tag", None) != self.tag:
                self.reject(node, f"{what} carries another round's tag")
            elif node in got:
                twice.add(node)
                self.reject(node, f"two {what} replies")
            elif node not in dropped_set and node not in self.rejected:
                got[node] = r
        return {n: r for n, r in got.items() if n not in twice and n not in self.rejected}

    # -- stage 1
    def advertise_request(self) -> AdvertiseRequest:
        """Stage 1 request, identical for every participant."""
        return self._req

    def receive_adverts(self, replies: Iterable[KeyAdvert], dropped: Iterable[int] = ()) -> tuple[int, ...]:
        """Ingest stage-1 replies; returns U0 (sites that advertised)."""
        self._enter(1)
        got = self._collect(replies, self._names, dropped, "key advert")
        for nid, adv in list(got.items()):
            if adv.site_name != self._names[nid]:
                self.reject(nid, f"advert claims site name {adv.site_name!r}")
            elif len(adv.c_pk) != 32 or len(adv.s_pk) != 32 or len(adv.site_nonce) != TAG_NONCE_LEN:
                self.reject(nid, "advert has malformed keys or nonce")
            else:
                continue
            del got[nid]
        self._adverts = dict(sorted(got.items()))
        self._need(self._adverts, "key advertisement (stage 1)")
        return self.u0

    # -- stage 2
    def share_request(self) -> ShareRequest:
        """Stage 2 request: every advert relayed as received (signatures intact), same for every site."""
        if self._stage != 1:
            raise SecAggConfigError("share_request() needs receive_adverts() first.")
        return ShareRequest(self.tag, tuple(self._adverts.values()))

    def receive_shares(self, replies: Iterable[EncryptedShares], dropped: Iterable[int] = ()) -> tuple[int, ...]:
        """Ingest stage-2 replies; returns U1 (sites that sent a complete set of encrypted shares)."""
        self._enter(2)
        got = self._collect(replies, self._adverts, dropped, "encrypted shares")
        for nid, msg in list(got.items()):
            expected = set(self._adverts) - {nid}
            if set(msg.blobs) != expected:
                self.reject(nid, f"sent shares for {len(msg.blobs)} nodes, expected exactly the {len(expected)} others")
                del got[nid]
            elif not isinstance(msg.b_commitment, bytes) or len(msg.b_commitment) != B_COMMITMENT_LEN:
                self.reject(nid, f"sent no {B_COMMITMENT_LEN}-byte commitment to its self-mask seed")
                del got[nid]
        # A share addressed to a site that did not complete stage 2 is never delivered: drop it from U1's view.
        self._shares = {nid: got[nid].blobs for nid in sorted(got)}
        self._b_commitments = {nid: got[nid].b_commitment for nid in sorted(got)}
        self._u1 = tuple(sorted(got))
        self._need(self._u1, "share distribution (stage 2)")
        return self._u1

    # -- stage 3
    def masked_input_request(self, node_id: int) -> MaskedInputRequest:
        """Stage 3 request for one site in U1: U1 and the share blobs addressed to it."""
        if self._stage != 2:
            raise SecAggConfigError("masked_input_request() needs receive_shares() first.")
        if node_id not in self._shares:
            raise SecAggConfigError(f"Node {node_id} is not in U1; do not send it a masked-input request.")
        blobs = {src: self._shares[src][node_id] for src in self._u1 if src != node_id}
        return MaskedInputRequest(self.tag, self._u1, blobs)

    def receive_masked_inputs(self, replies: Iterable[MaskedInput], dropped: Iterable[int] = ()) -> tuple[int, ...]:
        """Ingest stage-3 replies, summing the masked vectors; returns U2 (survivors)."""
        self._enter(3)
        got = self._collect(replies, self._u1, dropped, "masked input")
        vectors = {nid: np.asarray(msg.vector) for nid, msg in got.items()}
        length = self.vector_length
        if length is None and vectors:  # without a stated length, the most common one is taken as right
            length = Counter(v.size for v in vectors.values()).most_common(1)[0][0]
        total: np.ndarray | None = None
        for nid in sorted(vectors):
            vec = vectors[nid]
            if vec.dtype != np.uint32 or vec.ndim != 1 or vec.size != length:
                self.reject(nid, f"masked input is not a 1-D uint32 vector of length {length}")
                del got[nid]
                continue
            total = vec.copy() if total is None else total + vec
        self._u2 = tuple(sorted(got))
        self._dropped = tuple(n for n in self._u1 if n not in got)
        self._need(self._u2, "masked input (stage 3)")
        self._sum = total
        return self._u2

    # -- stage 4
    def consistency_request(self) -> ConsistencyRequest:
        """Stage 4 request, identical for every survivor: the view each of them signs."""
        if self._stage != 3:
            raise SecAggConfigError("consistency_request() needs receive_masked_inputs() first.")
        return ConsistencyRequest(self.tag, self._u1, self._u2)

    def receive_consistency(self, replies: Iterable[SurvivorSignature], dropped: Iterable[int] = ()) -> tuple[int, ...]:
        """Ingest stage-4 signatures (sites verify them; the server only relays); returns the signers."""
        self._enter(4)
        got = self._collect(replies, self._u2, dropped, "consistency signature")
        self._signatures = {nid: msg.signature for nid, msg in sorted(got.items())}
        self._need(self._signatures, "the consistency check (stage 4)")
        return self.signers

    # -- stage 5
    def unmask_request(self) -> UnmaskRequest:
        """Stage 5 request, identical for every signer: the view and every signature on it."""
        if self._stage != 4:
            raise SecAggConfigError("unmask_request() needs receive_consistency() first.")
        return UnmaskRequest(self.tag, self._u2, self._dropped, dict(self._signatures))

    def receive_unmask(self, replies: Iterable[UnmaskShares], dropped: Iterable[int] = ()) -> tuple[int, ...]:
        """Ingest stage-5 replies; returns the responders."""
        self._enter(5)
        got = self._collect(replies, self._signatures, dropped, "unmask shares")
        for nid, msg in list(got.items()):
            if set(msg.b_shares) != set(self._u2) or set(msg.sk_shares) != set(self._dropped):
                self.reject(nid, "unmask reply does not cover exactly the survivors and the dropped sites")
                del got[nid]
        self._unmask = got
        self._need(got, "unmasking (stage 5)")
        return self.unmask_responders

    def _verifier(self, owner: int, field_name: str) -> Callable[[bytes], bool]:
        """The check a reconstructed secret must pass before it is used: a survivor's b against the commitment
        it sent in stage 2, a dropped site's s_sk against the s_pk it signed in stage 1."""
        if field_name == "b_shares":
            want = self._b_commitments[owner]
            return lambda secret: hmac.compare_digest(EncryptedShares.commit_b(self.tag, owner, secret), want)
        s_pk = self._adverts[owner].s_pk

        def key_matches(secret: bytes) -> bool:
            try:
                return keys.x25519_public_bytes(keys.x25519_from_private_bytes(secret)) == s_pk
            except ValueError:
                return False

        return key_matches

    def _reconstruct(self, owner: int, field_name: str) -> bytes:
        """``owner``'s secret from the unmask shares, verified before it is used.

        Why more than "combine t shares": with exactly t responders a corrupt share leaves no redundancy to
        notice it, and the aggregate would silently come out as noise. Each secret is checked (b against its
        commitment, s_sk against the advertised s_pk). If the first t shares fail (or the last t do), up to
        ``max_share_subsets`` t-subsets are tried; responders whose share is in no verifying t-subset are
        dropped with the reason (:attr:`rejected`; their masked input stays in the sum). If no subset verifies,
        the round is refused with :class:`SecAggAbort`: never a wrong aggregate.
        """
        t = self.threshold
        what = "self-mask seed" if field_name == "b_shares" else "key"
        whose = f"node {owner} ({self._names[owner]!r})"
        verify = self._verifier(owner, field_name)
        shares: dict[int, shamir.Share] = {}
        for r in sorted(self._unmask):
            try:
                share = shamir.Share.from_bytes(getattr(self._unmask[r], field_name)[owner])
            except (SecAggIntegrityError, KeyError, TypeError) as exc:
                self.reject(r, f"sent a malformed Shamir share of {whose}'s {what}: {exc}")
                continue
            if share.x != self._xcoord[r]:
                self.reject(r, f"sent a share of {whose}'s {what} at x={share.x}, not at its own x={self._xcoord[r]}")
                continue
            shares[r] = share
        # Responders already caught with a bad share go last: the first subset tried is then the likeliest good.
        order = sorted(shares, key=lambda r: (r in self.rejected, r))
        tried = 0

        def verified(subset: Sequence[int]) -> bytes | None:
            nonlocal tried
            tried += 1
            try:
                secret = shamir.combine([shares[r] for r in subset], t)
            except SecAggIntegrityError:  # out of the secret's range: a corrupt share in the subset
                return None
            return secret if verify(secret) else None

        good: tuple[int, ...] = tuple(order[:t])
        secret = verified(good) if len(good) == t else None
        if secret is not None and (len(order) == t or verified(order[-t:]) is not None):
            return secret  # the usual case: two combinations, between them covering every share when k <= 2t
        if secret is None:
            for subset in itertools.islice(itertools.combinations(order, t), 1, None):
                if tried >= self.max_share_subsets:
                    break
                if (secret := verified(subset)) is not None:
                    good = subset
                    break
        if len(order) < t:
            raise SecAggAbort(
                f"Only {len(order)} well-formed unmask shares of {whose}'s {what} arrived, below the threshold {t} "
                "(the senders of malformed ones are listed as dropped); no aggregate this round. Retry the round."
            )
        if secret is None:
            raise SecAggAbort(
                f"No {t} of the {len(order)} well-formed unmask shares of {whose}'s {what} reconstruct the "
                f"{'seed it committed to' if field_name == 'b_shares' else 'key it advertised'} ({tried} subsets "
                f"tried): at least one share is corrupt and {max(len(order) - t, 0)} spare share(s) were not enough "
                "to get past it. Refusing the aggregate rather than returning a wrong one; retry the round (sites "
                "caught sending bad shares are listed as dropped)."
            )
        for r in order:
            if r in good:
                continue
            pool = [x for x in dict.fromkeys((*good, *order)) if x != r]  # verified shares first
            subsets = itertools.combinations(pool, t - 1)
            # The first try (t - 1 verified shares and r's) is made whatever the budget: it decides for an honest r.
            consistent = verified((*next(subsets), r)) is not None
            for rest in subsets:
                if consistent or tried >= self.max_share_subsets:
                    break
                consistent = verified((*rest, r)) is not None
            if not consistent:
                self.reject(
                    r,
                    f"sent a share of {whose}'s {what} that no verifying set of {t} shares includes (a corrupt "
                    "share); its masked input stays in this round's sum",
                )
        return secret

    def aggregate(self) -> np.ndarray:
        """De-quantised float64 SUM of the survivors' input vectors (self- and pairwise masks removed).

        Each element is within ``quant.error_bound(len(survivors))`` (= survivors / scale) of the exact
        float64 sum of the survivors' inputs, provided the inputs lay inside [-clip_range, clip_range];
        see :mod:`.quantize` for the typical relative error. Every secret used is verified first
        (:meth:`_reconstruct`): a secret no set of shares verifies aborts the round instead.
        """
        self._enter(6)
        assert self._sum is not None
        total, self._sum = self._sum, None  # a half-unmasked sum is never kept
        n = total.size
        try:
            for j in self._u2:
                total -= _self_mask(self._reconstruct(j, "b_shares"), j, self.tag, n)
            for j in self._dropped:
                sk_j = keys.x25519_from_private_bytes(self._reconstruct(j, "sk_shares"))  # matches its s_pk
                for k in self._u2:
                    m = _pair_mask(sk_j, self._adverts[k].s_pk, j, k, self.tag, n)
                    if k < j:  # k added +m
                        total -= m
                    else:  # k added -m
                        total += m
        except SecAggAbort as exc:
            self._aborted = str(exc)
            raise
        return self.quant.dequantize_sum(total, len(self._u2))


T_Msg = KeyAdvert | EncryptedShares | MaskedInput | SurvivorSignature | UnmaskShares


# ---------------------------------------------------------------- in-process driver


@dataclass
class InProcessResult:
    """Outcome of :func:`run_in_process_detailed`: the aggregate, the server object and every message."""

    aggregate: np.ndarray
    server: SecAggServer
    transcript: dict[str, list] = field(default_factory=dict)


def run_in_process_detailed(
    vectors: Mapping[int, np.ndarray],
    site_names: Mapping[int, str],
    identity_keys: Mapping[int, Ed25519PrivateKey],
    threshold: int,
    quant: QuantSpec,
    drop_after_stage: Mapping[int, int] | None = None,
    *,
    run_id: int = 0,
    round_num: int = 1,
    persist_between_stages: bool = False,
    site_threshold_fraction: float = THRESHOLD_FRACTION,
) -> InProcessResult:
    """Run one round with every message passed through ``to_dict``/``from_dict`` as a transport would.

    ``drop_after_stage[node] = k`` makes that site answer stages 1..k only (k = 0: never answers).
    ``persist_between_stages`` rebuilds every site from ``to_state()`` before each stage, as a
    deployment does when each stage's message runs in a fresh process.
    """
    drops = dict(drop_after_stage or {})
    ids = sorted(vectors)
    participants = [(n, site_names[n]) for n in ids]
    pinned = {site_names[n]: keys.public_key_bytes(identity_keys[n]) for n in ids}
    tag = RoundTag.new(run_id, round_num)
    server = SecAggServer(tag, participants, threshold, quant)
    sites = {
        n: SecAggSite(
            n,
            site_names[n],
            identity_keys[n],
            pinned,
            expected_run_id=run_id,
            expected_round=round_num,
            threshold_fraction=site_threshold_fraction,
        )
        for n in ids
    }
    tr: dict[str, list] = {k: [] for k in ("advertise", "adverts", "share", "shares", "masked_req", "masked")}
    tr.update(consistency_req=[], signatures=[], unmask_req=[], unmask=[])

    def alive(n: int, stage: int) -> bool:
        if persist_between_stages:
            sites[n] = SecAggSite.from_state(sites[n].to_state(), identity_keys[n], pinned)
        return drops.get(n, 99) >= stage

    req1 = AdvertiseRequest.from_dict(server.advertise_request().to_dict())
    adverts = [KeyAdvert.from_dict(sites[n].advertise(req1).to_dict()) for n in ids if alive(n, 1)]
    tr["advertise"].append(req1)
    tr["adverts"] += adverts
    server.receive_adverts(adverts)

    req2 = ShareRequest.from_dict(server.share_request().to_dict())
    shares = [EncryptedShares.from_dict(sites[n].share(req2).to_dict()) for n in server.u0 if alive(n, 2)]
    tr["share"].append(req2)
    tr["shares"] += shares
    server.receive_shares(shares)

    masked = []
    for n in server.u1:
        req3 = MaskedInputRequest.from_dict(server.masked_input_request(n).to_dict())
        tr["masked_req"].append(req3)
        if alive(n, 3):
            msg = sites[n].masked_input(req3, vectors[n])
            masked.append(MaskedInput.from_dict(msg.to_dict(), msg.vector.copy()))
    tr["masked"] += masked
    server.receive_masked_inputs(masked)

    req4 = ConsistencyRequest.from_dict(server.consistency_request().to_dict())
    tr["consistency_req"].append(req4)
    signed = [
        SurvivorSignature.from_dict(sites[n].consistency(req4).to_dict()) for n in server.survivors if alive(n, 4)
    ]
    tr["signatures"] += signed
    server.receive_consistency(signed)

    req5 = UnmaskRequest.from_dict(server.unmask_request().to_dict())
    tr["unmask_req"].append(req5)
    unmask = [UnmaskShares.from_dict(sites[n].unmask(req5).to_dict()) for n in server.signers if alive(n, 5)]
    tr["unmask"] += unmask
    server.receive_unmask(unmask)
    return InProcessResult(server.aggregate(), server, tr)


def run_in_process(
    vectors: Mapping[int, np.ndarray],
    site_names: Mapping[int, str],
    identity_keys: Mapping[int, Ed25519PrivateKey],
    threshold: int,
    quant: QuantSpec,
    drop_after_stage: Mapping[int, int] | None = None,
) -> np.ndarray:
    """One in-process SecAgg round; returns the de-quantised sum of the surviving sites' vectors."""
    return run_in_process_detailed(vectors, site_names, identity_keys, threshold, quant, drop_after_stage).aggregate
