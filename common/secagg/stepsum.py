"""A secure sum cheap enough to run once per DP step: keys agreed once per session, one exchange per step.

A session starts with one exchange of signed adverts (an ephemeral X25519 key, the digest of the session's
configuration, how many honest sites the site assumes). Every site then derives one pairwise seed per peer, and a
step is one message each way: the site adds, for every peer, a ChaCha20 mask expanded from their seed under a
context of the session, the step number and the digest of the step's message, with opposite signs on the two
sides of a pair. The masks cancel only in the sum of every session site's vector for the same step and message.

What this protocol does not have is what made a five-stage round expensive: there is no dropout recovery, so no
key and no share of one is ever revealed. A server that leaves one site out of a step, or sends one site another
model than the others, gets a sum under masks nobody will remove; a site that does not answer ends the session
(the server starts a new one, with fresh keys, among those left). Hence:

* isolating one site's vector needs every peer of its session (at least `min_sites` - 1 of them) to collude;
* a step is masked once: the site records (session, step) durably before it masks, so a replayed step, or a copy
  of the site's saved state, never gets a second vector under the same masks;
* a session's adverts are all signed over the same configuration digest; a site that was shown a different
  configuration, roster or key set than another derives different masks, and the sum is garbage, not a leak.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtune.common.secagg import keys
from fedtune.common.secagg.errors import SecAggIntegrityError
from fedtune.common.secagg.masks import expand_mask

_ADVERT = b"fedtune/stepsum/v1/advert"
_PAIR = b"fedtune/stepsum/v1/pair"
_STEP = b"fedtune/stepsum/v1/step"
_SCORES = b"fedtune/stepsum/v1/scores"
SESSION_BYTES = 16

Claim = Callable[[str], None]  # records a line durably, or raises if it was recorded before


@dataclass(frozen=True)
class StepAdvert:
    node_id: int
    site: str
    session: str  # hex
    digest: str  # hex SHA-256 of the session configuration
    public: str  # hex X25519 public key
    honest: int  # the h this site assumes; decides the others' charged epsilon, so it is signed
    scores: bool = False  # whether it adds its held-out figures to the sums (a site needs enough such peers)
    score_min: int = 0  # the fewest scoring sites this site releases its figures among; every scorer obeys the largest
    signature: str = ""  # hex Ed25519 over everything above

    def signed_bytes(self) -> bytes:
        fields = {k: v for k, v in asdict(self).items() if k != "signature"}
        return _ADVERT + json.dumps(fields, sort_keys=True).encode()

    def to_dict(self) -> dict[str, str | int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> StepAdvert:
        try:
            return cls(
                node_id=int(d["node_id"]),  # type: ignore[arg-type]
                site=str(d["site"]),
                session=str(d["session"]),
                digest=str(d["digest"]),
                public=str(d["public"]),
                honest=int(d["honest"]),  # type: ignore[arg-type]
                scores=bool(d["scores"]),
                score_min=int(d["score_min"]),  # type: ignore[arg-type]
                signature=str(d["signature"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SecAggIntegrityError(f"a step-sum advert is malformed ({exc}); refusing the session") from None


def verify_advert(advert: StepAdvert, pinned: Mapping[str, str]) -> None:
    """The advert is signed by the key this site pinned for the site it names."""
    key_hex = pinned.get(advert.site)
    if key_hex is None:
        raise SecAggIntegrityError(f"site {advert.site!r} has no pinned key here; refusing the session")
    try:
        keys.public_key_from_hex(key_hex).verify(bytes.fromhex(advert.signature), advert.signed_bytes())
    except (InvalidSignature, ValueError):
        raise SecAggIntegrityError(f"the advert of {advert.site!r} is not signed by its pinned key") from None


@dataclass
class StepSumSite:
    """One site's side of a session. `to_state`/`from_state` keep it in the node's Flower Context between steps."""

    node_id: int
    site: str
    session: str
    digest: str
    honest: int
    private: bytes  # X25519 private key, raw
    scores: bool = False
    score_min: int = 0
    seeds: dict[int, str] | None = None  # peer node -> hex pairwise seed, once joined
    peers_honest: dict[int, int] | None = None
    scoring_peers: list[int] | None = None  # peers that signed `scores`
    release_scores: bool = False  # the session's scorers are at least every scorer's signed minimum

    @classmethod
    def open(
        cls,
        node_id: int,
        site: str,
        identity: Ed25519PrivateKey,
        *,
        session: bytes,
        digest: bytes,
        honest: int,
        scores: bool = False,
        score_min: int = 0,
    ) -> tuple[StepSumSite, StepAdvert]:
        if len(session) != SESSION_BYTES:
            raise SecAggIntegrityError(f"a session id must be {SESSION_BYTES} bytes")
        sk, pk = keys.generate_x25519()
        private = keys.x25519_private_bytes(sk)
        state = cls(node_id, site, session.hex(), digest.hex(), honest, private, scores, score_min)
        advert = StepAdvert(node_id, site, session.hex(), digest.hex(), pk.hex(), honest, scores, score_min)
        signature = identity.sign(advert.signed_bytes()).hex()
        return state, StepAdvert(**{**asdict(advert), "signature": signature})

    @property
    def joined(self) -> bool:
        return self.seeds is not None

    def join(self, adverts: Sequence[StepAdvert], pinned: Mapping[str, str], *, min_sites: int) -> None:
        """Check the session's adverts and derive one pairwise seed per peer.

        Refused: an advert not signed by its site's pinned key, a different session or configuration digest, a
        site or node twice, this site's own advert missing or changed, fewer sites than `min_sites`.
        """
        if self.joined:
            raise SecAggIntegrityError("this site already joined the session; refusing a second roster")
        own_public = keys.x25519_public_bytes(keys.x25519_from_private_bytes(self.private)).hex()
        nodes, names = set(), set()
        for advert in adverts:
            verify_advert(advert, pinned)
            if advert.session != self.session or advert.digest != self.digest:
                raise SecAggIntegrityError(
                    f"the advert of {advert.site!r} was made for another session or configuration; refusing it"
                )
            if advert.node_id in nodes or advert.site in names:
                raise SecAggIntegrityError(f"{advert.site!r} (node {advert.node_id}) is in the session twice")
            if not 1 <= advert.honest <= len(adverts):
                raise SecAggIntegrityError(f"{advert.site!r} assumes {advert.honest} honest sites of {len(adverts)}")
            nodes.add(advert.node_id)
            names.add(advert.site)
        mine = [a for a in adverts if a.node_id == self.node_id]
        own = (self.site, own_public, self.honest, self.scores, self.score_min)
        if len(mine) != 1 or (mine[0].site, mine[0].public, mine[0].honest, mine[0].scores, mine[0].score_min) != own:
            raise SecAggIntegrityError("this site's own advert is missing or altered in the session roster")
        if len(adverts) < min_sites:
            raise SecAggIntegrityError(
                f"a session of {len(adverts)} site(s), fewer than this site's minimum of {min_sites}"
            )
        sk = keys.x25519_from_private_bytes(self.private)
        self.seeds, self.peers_honest = {}, {}
        for advert in adverts:
            if advert.node_id == self.node_id:
                continue
            low, high = sorted((self.node_id, advert.node_id))
            info = _PAIR + bytes.fromhex(self.session) + bytes.fromhex(self.digest) + _ids(low, high)
            self.seeds[advert.node_id] = keys.agree(sk, bytes.fromhex(advert.public), info).hex()
            self.peers_honest[advert.node_id] = advert.honest
        scorers = [a for a in adverts if a.scores]
        self.scoring_peers = [a.node_id for a in scorers if a.node_id != self.node_id]
        # Every site of the session scores, or none releases: the h honest sites a site assumes are somewhere in
        # the session, not necessarily among its scorers, and two colluding scorers beside a victim in a session
        # of honest non-scorers would leave its figures alone in the sum once theirs are subtracted.
        self.release_scores = (
            self.scores and len(scorers) == len(adverts) and len(scorers) >= max(a.score_min for a in scorers)
        )

    def mask(self, step: int, binding: bytes, values: np.ndarray, claim: Claim, *, figures: int = 0) -> np.ndarray:
        """`values` (uint32) plus every pairwise mask of this step and message. `claim` records the step first.

        `figures` > 0: the last `figures` coordinates carry this site's held-out figures, and it adds a second
        pairwise mask there with every other scoring site. Those cancel only if every scorer of the session
        brings its figures to the step, so a sum never holds the figures of fewer than all of them: a scorer that
        has none (its meter, a declined round) sends zeros without those masks, and the figures stay masked.
        """
        if self.seeds is None:
            raise SecAggIntegrityError("the step came before the session's roster; refusing it")
        claim(f"dstep:{self.session}:{step}")
        y = np.array(values, dtype=np.uint32)
        for peer, seed in self.seeds.items():
            y = self._add_pair_mask(y, peer, seed, _STEP, step, binding)
        if figures:
            tail = y[-figures:]
            for peer in self.scoring_peers or []:
                tail = self._add_pair_mask(tail, peer, self.seeds[peer], _SCORES, step, binding)
            y[-figures:] = tail
        return y

    def _add_pair_mask(
        self, y: np.ndarray, peer: int, seed: str, purpose: bytes, step: int, binding: bytes
    ) -> np.ndarray:
        low, high = sorted((self.node_id, peer))
        context = purpose + bytes.fromhex(self.session) + step.to_bytes(8, "big") + binding + _ids(low, high)
        mask = expand_mask(bytes.fromhex(seed), y.size, context)
        return y + mask if self.node_id == low else y - mask

    def to_state(self) -> str:
        return json.dumps(asdict(self) | {"private": self.private.hex()})

    @classmethod
    def from_state(cls, text: str) -> StepSumSite:
        d = json.loads(text)
        d["private"] = bytes.fromhex(d["private"])
        for key in ("seeds", "peers_honest"):
            if d[key] is not None:
                d[key] = {int(k): v for k, v in d[key].items()}
        return cls(**d)


def step_binding(session: str, step: int, parts: Sequence[bytes]) -> bytes:
    """SHA-256 of what a step's message asks a site to compute (the model, the round), bound into its masks."""
    h = hashlib.sha256(_STEP + bytes.fromhex(session) + step.to_bytes(8, "big"))
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()


def unmask_sum(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """The sum modulo 2^32 of every session site's masked vector for one step."""
    total = np.zeros_like(np.asarray(vectors[0], dtype=np.uint32))
    for v in vectors:
        total += np.asarray(v, dtype=np.uint32)
    return total


def _ids(low: int, high: int) -> bytes:
    return low.to_bytes(8, "big", signed=False) + high.to_bytes(8, "big", signed=False)
