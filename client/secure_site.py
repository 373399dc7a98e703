"""The site's half of secure aggregation, across the five stage messages of a secure sum.

Each stage may run in a fresh process, so the round's secrets (ephemeral keys,
self-mask seed, received shares) and the vector waiting to be masked live in the
node's Flower Context, which stays on the site. They are deleted after the
last stage. The identity key, pinned peer keys and threshold floor are always
re-read from the site's own configuration, never taken from the server, and
every round tag the site answers is recorded in its state dir so that no tag
is answered twice, in this run or any later one.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message

from fedtune.common.config import SiteSpec
from fedtune.common.secagg.errors import SecAggIntegrityError
from fedtune.common.secagg.keys import load_identity_key
from fedtune.common.secagg.messages import (
    ROLE_UPDATE,
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
)
from fedtune.common.secagg.protocol import SecAggSite

_STATE, _INPUT = "secagg-state", "secagg-input"
_STAGES = {"advert": "key advert", "masked": "masked input", "signed": "consistency signature"}


class UsedTags:
    """Append-only record of the round stages this site has answered (one line each, fsynced).

    A server that re-sends an earlier tag (to mix an earlier attempt's adverts into a new one) is refused
    before the site makes any key; a second masked input or consistency signature of one round (from a copy of
    the saved site state: two masked vectors for two U1 differ by one pairwise mask, two signatures sign two
    views) is refused before it exists. The file lock makes check-and-append atomic across the processes a
    SuperNode starts for concurrent messages. An advert's line is the tag in hex (as logs before the other
    stages had it), another stage's is `STAGE:tag`.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def claim(self, stage: str, tag: RoundTag) -> None:
        """Record that this site answers `stage` of `tag`, unless it already did (then refuse)."""
        if not self._append_once(self._line(stage, tag)):
            raise SecAggIntegrityError(
                f"round tag of run {tag.run_id}, round {tag.round} was already used on this site "
                f"({_STAGES[stage]}): refusing a replayed secure-aggregation stage (the server must start a "
                "new attempt with a fresh tag)"
            )

    def claim_line(self, line: str) -> None:
        """Record `line` (a distributed-noise session or step), unless it was recorded before (then refuse)."""
        if not self._append_once(line):
            raise SecAggIntegrityError(
                f"{line.split(':')[0]} {line.split(':', 1)[1]} was already used on this site: refusing a replay "
                "(the server must open a new session)"
            )

    def _append_once(self, line: str) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.seek(0)
            if any(old.strip() == line for old in fh):
                return False
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def check(self, tag: RoundTag) -> None:
        """Refuse a tag already advertised for, without claiming it (the advert claims it)."""
        line = self._line("advert", tag)
        if self.path.exists() and line in (old.strip() for old in self.path.open()):
            raise SecAggIntegrityError(
                f"round tag of run {tag.run_id}, round {tag.round} was already used on this site: refusing a "
                "replayed secure-aggregation round before training"
            )

    @staticmethod
    def _line(stage: str, tag: RoundTag) -> str:
        return tag.to_bytes().hex() if stage == "advert" else f"{stage}:{tag.to_bytes().hex()}"


def used_tags(site: SiteSpec) -> UsedTags:
    return UsedTags(Path(site.state_dir) / "secagg-tags.log")


def identity_key(site: SiteSpec) -> Ed25519PrivateKey:
    return load_identity_key(site.identity_key_path)


def pinned_peers(site: SiteSpec) -> dict[str, str]:
    if not site.peers:
        raise SecAggIntegrityError(
            f"site {site.name} has no pinned peer keys (`peers` in its site config): it cannot verify "
            "the other sites' keys, so it will not take part in secure aggregation"
        )
    return dict(site.peers)


def preflight(message: Message, site: SiteSpec) -> None:
    """Fail before training (and before spending budget) if this site cannot do secure aggregation, or would refuse
    this round's parameters anyway (participants, threshold, its minimum, run, round, a tag it has answered)."""
    req = AdvertiseRequest.from_dict(dict(message.content["secagg"]))
    _new_site(message, site, role=0, scores_length=0).check_request(req)
    used_tags(site).check(req.tag)


def _new_site(message: Message, site: SiteSpec, *, role: int, scores_length: int) -> SecAggSite:
    return SecAggSite(
        message.metadata.dst_node_id,
        site.name,
        identity_key(site),
        pinned_peers(site),
        expected_run_id=message.metadata.run_id,
        expected_round=int(message.content["config"]["round"]),
        threshold_fraction=site.threshold_floor,
        claim=used_tags(site).claim,
        bound=message_digest(message),
        min_sites=site.min_round_sites,
        role=role,
        scores_length=scores_length,
    )


def _forget(context: Context) -> None:
    for key in (_STATE, _INPUT):
        if key in context.state:
            del context.state[key]


@contextmanager
def _stage(context: Context, site: SiteSpec) -> Iterator[SecAggSite]:
    """Load the round, run one stage, save it; a refused stage ends the site's part in the round for good
    (its secrets are deleted), so no later message, in this process or another, gets a second answer."""
    if _STATE not in context.state:
        raise SecAggIntegrityError("no secure-aggregation round in progress on this site; refusing the stage")
    secagg = SecAggSite.from_state(
        bytes(context.state[_STATE]["site"]),
        identity_key(site),
        pinned_peers(site),
        claim=used_tags(site).claim,
    )
    try:
        yield secagg
    except BaseException:
        _forget(context)
        raise
    context.state[_STATE] = ConfigRecord({"site": secagg.to_state()})


def message_digest(message: Message) -> bytes:
    """The digest of the message that starts the round (see `round_digest`)."""
    return round_digest(message.content["config"], message.content.get("global"))


def round_digest(config: ConfigRecord, adapter: ArrayRecord | None) -> bytes:
    """SHA-256 of everything in the round's first message that decides what this site computes and sends: the
    round config (federation spec, run, round, rounds) and the adapter. Signed inside the site's advert and its
    consistency signature, so that every site in a completed round was provably sent the same."""
    h = hashlib.sha256(b"fedtune-round-message")

    def field(data: bytes) -> None:  # length-prefixed: no two messages hash as one (review round 6: without it, an
        h.update(len(data).to_bytes(8, "big"))  # array's trailing bytes, which decoding ignores, could move into the
        h.update(data)  # next array's field, and two sites loading different adapters held one digest)

    for key in sorted(config):
        field(repr((key, config[key])).encode())
    for key in sorted(adapter or {}):
        arr = adapter[key]  # its serialised bytes as they arrived: no copy into numpy to hash them
        field(repr((key, arr.dtype, tuple(arr.shape), arr.stype)).encode())
        field(arr.data)
    return h.digest()


def start(
    message: Message,
    context: Context,
    site: SiteSpec,
    vector: np.ndarray,
    *,
    role: int = ROLE_UPDATE,
    scores_length: int = 0,
) -> KeyAdvert:
    """Stage 1, once the site's contribution is computed: keep it on the site, advertise signed keys.

    `role` says what the vector carries (ROLE_UPDATE, ROLE_SCORES in its last `scores_length` coordinates, or 0
    for zeros): it is signed, and a site refuses a sum in which fewer than t sites bring what it brings.
    """
    _forget(context)  # whatever an earlier, unfinished round left
    req = AdvertiseRequest.from_dict(dict(message.content["secagg"]))
    secagg = _new_site(message, site, role=role, scores_length=scores_length)
    advert = secagg.advertise(req)
    context.state[_INPUT] = ArrayRecord({"x": Array(np.asarray(vector, dtype=np.float64))})
    context.state[_STATE] = ConfigRecord({"site": secagg.to_state()})
    return advert


def share(message: Message, context: Context, site: SiteSpec) -> EncryptedShares:
    with _stage(context, site) as secagg:
        return secagg.share(ShareRequest.from_dict(dict(message.content["secagg"])))


def mask(message: Message, context: Context, site: SiteSpec) -> MaskedInput:
    """Stage 3: mask the vector kept at stage 1 (weighted by the site itself: the server sends no weight)."""
    with _stage(context, site) as secagg:
        vector = context.state[_INPUT]["x"].numpy()
        req = MaskedInputRequest.from_dict(dict(message.content["secagg"]))
        masked = secagg.masked_input(req, vector, rounding=_seeded_rounding(site, req))
        del context.state[_INPUT]
        return masked


def _seeded_rounding(site: SiteSpec, req: MaskedInputRequest) -> np.random.Generator | None:
    """A seeded site (simulation, benchmarks) draws its stochastic rounding from its seed and the round, so a
    repeated simulation repeats to the last digit; a real site (no seed) leaves it to fresh OS entropy."""
    if site.seed is None:
        return None
    digest = hashlib.sha256(f"{site.seed}:secagg-rounding:{req.tag.round}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest, "big"))


def consistency(message: Message, context: Context, site: SiteSpec) -> SurvivorSignature:
    with _stage(context, site) as secagg:
        return secagg.consistency(ConsistencyRequest.from_dict(dict(message.content["secagg"])))


def unmask(message: Message, context: Context, site: SiteSpec) -> UnmaskShares:
    try:
        with _stage(context, site) as secagg:
            return secagg.unmask(UnmaskRequest.from_dict(dict(message.content["secagg"])))
    finally:
        _forget(context)  # the round is over for this site, whatever happened
