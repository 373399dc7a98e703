"""A malicious server (and colluding sites) against distributed noise: one secure sum per DP step.

For every value a site reads from a server message (the roster of signed adverts, the step number, the message
bound into the masks, the session id, the federation spec, sigma), the server may send each site a different one,
repeat it, or leave it out. The first part plays those moves against the real `StepSumSite` at the protocol level:
each is refused, or gives a sum under masks nobody will remove (uniform over uint32, uncorrelated with any one
site's input), never one site's input; with every peer of a session colluding the victim's vector comes out, which
is the stated bound. The second part runs the site's own code (`client/distributed.py`: advertise, step, its real
SQLite ledger and score meter), with the base model's pooled features replaced by small fixed ones, to show what a
server does with the values only that layer reads: the spec of each step, the session id the ledger is keyed by,
and which rounds a site has already scored. Two holes this review found are fixed and tested here: a spec changed
mid-session (each step's federation is checked against the session digest the site signed), and one site's
held-out figures alone in a sum (every scorer signs its threshold, all obey the largest, and figures carry a second
pairwise mask among the scorers, so they decode only if every scorer brings its own).
"""

from __future__ import annotations

import itertools
import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from scipy import stats
from torch.utils.data import TensorDataset

from fedtune.client import distributed
from fedtune.client.ledger import DatasetIdentity
from fedtune.client.scoring import ScoreMeter
from fedtune.client.secure_site import UsedTags
from fedtune.client.site import Site, accounting_delta, local_spec
from fedtune.client.tasks import EvalResult
from fedtune.common.adapter import AdapterRefused, to_record
from fedtune.common.config import DataSpec, FederationSpec, SiteSpec
from fedtune.common.noise import from_ring, to_ring
from fedtune.common.secagg import keys
from fedtune.common.secagg.errors import SecAggIntegrityError
from fedtune.common.secagg.masks import expand_mask
from fedtune.common.secagg.stepsum import _STEP, StepAdvert, StepSumSite, _ids, step_binding, unmask_sum

LENGTH = 20_000  # long enough that a correlation above 0.05 would be 7 standard errors from zero
SPAN = 2**20  # inputs in [-SPAN, SPAN): their sum over 5 sites stays well inside the signed 32-bit ring


# ------------------------------------------------------------------------------------------- protocol level


@dataclass
class Fed:
    """n sites of one session: identity keys pinned at every site, one signed advert each, a durable claim log."""

    ids: list[int]
    names: dict[int, str]
    idkeys: dict[int, Ed25519PrivateKey]
    pinned: dict[str, str]
    session: bytes
    digest: bytes
    sites: dict[int, StepSumSite]
    adverts: dict[int, StepAdvert]
    claims: dict[int, Callable[[str], None]]
    rng: np.random.Generator

    def roster(self, nodes: list[int] | None = None) -> list[StepAdvert]:
        return [self.adverts[n] for n in (nodes or self.ids)]

    def inputs(self) -> dict[int, np.ndarray]:
        return {n: self.rng.integers(-SPAN, SPAN, LENGTH) for n in self.ids}

    def binding(self, step: int, model: bytes = b"the global model") -> bytes:
        return step_binding(self.session.hex(), step, [model])

    def mask(self, node: int, step: int, x: np.ndarray, model: bytes = b"the global model") -> np.ndarray:
        return self.sites[node].mask(step, self.binding(step, model), to_ring(x), self.claims[node])


def make_fed(tmp_path: Path, n: int, *, seed: int, honest: int = 2, scores: bool = False) -> Fed:
    rng = np.random.default_rng(seed)
    ids = [int(x) for x in rng.choice(2**40, size=n, replace=False)]  # Flower's node ids: large, unordered
    names = {node: f"site-{i}" for i, node in enumerate(ids)}
    idkeys = {node: keys.generate_identity_key() for node in ids}
    pinned = {names[node]: keys.public_key_to_hex(idkeys[node]) for node in ids}
    session, digest = rng.bytes(16), rng.bytes(32)
    sites, adverts = {}, {}
    for node in ids:
        sites[node], adverts[node] = StepSumSite.open(
            node, names[node], idkeys[node], session=session, digest=digest, honest=honest, scores=scores
        )
    claims = {node: UsedTags(tmp_path / names[node] / "secagg-tags.log").claim_line for node in ids}
    return Fed(ids, names, idkeys, pinned, session, digest, sites, adverts, claims, rng)


def join_all(fed: Fed, min_sites: int = 3) -> None:
    for node in fed.ids:
        fed.sites[node].join(fed.roster(), fed.pinned, min_sites=min_sites)


def pair_mask(fed: Fed, a: int, b: int, seed_hex: str, step: int, binding: bytes) -> np.ndarray:
    """The mask of pair (a, b) at a step, as a colluding peer that reveals its seed lets the server compute it."""
    low, high = sorted((a, b))
    context = _STEP + fed.session + step.to_bytes(8, "big") + binding + _ids(low, high)
    return expand_mask(bytes.fromhex(seed_hex), LENGTH, context)


def looks_random(vector: np.ndarray, truth: np.ndarray) -> None:
    """What the server holds of one site: uniform over uint32 and uncorrelated with that site's input."""
    vector = np.asarray(vector, dtype=np.uint32)
    assert stats.chisquare(np.bincount(vector >> 24, minlength=256)).pvalue > 1e-4
    assert abs(np.corrcoef(vector.astype(np.float64), truth)[0, 1]) < 0.05
    assert abs(np.corrcoef(from_ring(vector).astype(np.float64), truth)[0, 1]) < 0.05


@pytest.mark.parametrize("n", [3, 4, 5])
def test_honest_sessions_sum_exactly_and_hide_each_vector(tmp_path: Path, n: int) -> None:
    """The control: one roster for all, the same step and message at every site, and the masks cancel to the
    exact sum, step after step, while each masked vector alone is uniform noise."""
    fed = make_fed(tmp_path, n, seed=n)
    join_all(fed)
    for step in (1, 2, 7):
        x = fed.inputs()
        y = {node: fed.mask(node, step, x[node]) for node in fed.ids}
        np.testing.assert_array_equal(from_ring(unmask_sum(list(y.values()))), np.sum(list(x.values()), axis=0))
        for node in fed.ids:
            looks_random(y[node], x[node])


@pytest.mark.parametrize("attack", ["all-but-one", "victim-alone", "victim-step-k-others-k+1", "victim-twice"])
def test_omitted_or_mixed_vectors_give_noise_not_the_victim(tmp_path: Path, attack: str) -> None:
    """There is no dropout recovery: a sum that leaves out one site's vector, or that mixes steps, keeps masks
    nobody will ever remove. The server is even granted every other site's input, and still sees noise."""
    fed = make_fed(tmp_path, 4, seed=10)
    join_all(fed)
    victim, dropped, *_ = fed.ids
    x1, x2 = fed.inputs(), fed.inputs()
    if attack == "victim-twice":
        x2[victim] = x1[victim]  # the same gradient twice: equal masks would cancel to zero
    y1 = {node: fed.mask(node, 1, x1[node]) for node in fed.ids}
    y2 = {node: fed.mask(node, 2, x2[node]) for node in fed.ids}
    if attack == "all-but-one":  # the server says `dropped` never answered
        held = unmask_sum([y1[node] for node in fed.ids if node != dropped])
        known = sum(x1[node] for node in fed.ids if node not in (dropped, victim))
    elif attack == "victim-alone":
        held, known = y1[victim], 0
    elif attack == "victim-step-k-others-k+1":
        held = unmask_sum([y1[victim], *(y2[node] for node in fed.ids if node != victim)])
        known = sum(x2[node] for node in fed.ids if node != victim)
    else:
        held, known = y1[victim] - y2[victim], 0
    looks_random(held - to_ring(np.asarray(known)), x1[victim])


def test_split_rosters_leave_every_subset_sum_masked(tmp_path: Path) -> None:
    """Site A and C are shown {A, B, C}, B and D are shown {A, B, D}: every roster is signed, pinned and big
    enough, so all four mask. A pair's mask cancels only where both sides put the other in their roster; here some
    mask is left in every one of the 15 sums the server can form, so it gets no sum at all, and nothing that
    correlates with A's input (given every other input)."""
    fed = make_fed(tmp_path, 4, seed=20)
    a, b, c, d = fed.ids
    views = {a: [a, b, c], c: [a, b, c], b: [a, b, d], d: [a, b, d]}
    for node, view in views.items():
        fed.sites[node].join(fed.roster(view), fed.pinned, min_sites=3)
    x = fed.inputs()
    y = {node: fed.mask(node, 1, x[node]) for node in fed.ids}
    for size in range(1, 5):
        for subset in itertools.combinations(fed.ids, size):
            held = unmask_sum([y[node] for node in subset])
            assert not np.array_equal(held, to_ring(sum(x[node] for node in subset)))
            if a in subset:
                looks_random(held - to_ring(sum((x[node] for node in subset if node != a), np.int64(0))), x[a])


def _forged_peer(fed: Fed, forgery: str) -> StepAdvert | dict:
    b = fed.ids[1]
    honest = fed.adverts[b]
    if forgery == "swapped-public":  # the server's own X25519 key under B's name: a man in the middle
        return replace(honest, public=keys.generate_x25519()[1].hex())
    if forgery == "server-signed":  # ... and signed by the server's key, which nobody pinned for B
        forged = replace(honest, public=keys.generate_x25519()[1].hex(), signature="")
        return replace(forged, signature=keys.generate_identity_key().sign(forged.signed_bytes()).hex())
    if forgery == "other-session":  # B's genuine advert of another session
        return StepSumSite.open(b, fed.names[b], fed.idkeys[b], session=bytes(16), digest=fed.digest, honest=2)[1]
    if forgery == "other-digest":  # B's genuine advert after the server showed B another configuration
        return StepSumSite.open(b, fed.names[b], fed.idkeys[b], session=fed.session, digest=bytes(32), honest=2)[1]
    if forgery == "unpinned-site":  # a site the server made up, correctly signed by a key nobody pinned
        mallory = keys.generate_identity_key()
        return StepSumSite.open(b, "mallory", mallory, session=fed.session, digest=fed.digest, honest=2)[1]
    if forgery == "coerced-scores":  # "False" parses as True: the parse is checked by the signature, not trusted
        return {**honest.to_dict(), "scores": "False"}
    assert forgery == "malformed"
    return {k: v for k, v in honest.to_dict().items() if k != "public"}


@pytest.mark.parametrize(
    "forgery",
    [
        "swapped-public",
        "server-signed",
        "other-session",
        "other-digest",
        "unpinned-site",
        "coerced-scores",
        "malformed",
    ],
)
def test_a_peer_advert_the_server_altered_or_borrowed_is_refused(tmp_path: Path, forgery: str) -> None:
    """A roster with a replaced key for a peer, a peer's advert from another session or configuration, a site
    nobody pinned, or fields rewritten in transit: refused before any seed is derived."""
    fed = make_fed(tmp_path, 3, seed=30)
    a, _, c = fed.ids
    forged = _forged_peer(fed, forgery)
    with pytest.raises(SecAggIntegrityError):
        peer = forged if isinstance(forged, StepAdvert) else StepAdvert.from_dict(forged)
        fed.sites[a].join([fed.adverts[a], peer, fed.adverts[c]], fed.pinned, min_sites=3)
    assert not fed.sites[a].joined
    with pytest.raises(SecAggIntegrityError, match="before the session's roster"):
        fed.mask(a, 1, np.zeros(LENGTH, np.int64))


def _roster_for(fed: Fed, case: str) -> tuple[list[StepAdvert], int]:
    """(the roster the server shows site A, A's minimum)."""
    a, b, c, d = fed.ids
    ad = fed.adverts
    if case == "below-minimum":
        return [ad[a], ad[b], ad[c]], 4
    if case == "node-twice":
        return [ad[a], ad[b], ad[b], ad[c]], 3
    if case == "site-twice-under-two-nodes":  # B signed an advert for a second node id (say, a second SuperNode)
        extra = StepSumSite.open(d + 1, fed.names[b], fed.idkeys[b], session=fed.session, digest=fed.digest, honest=2)
        return [ad[a], ad[b], extra[1], ad[c]], 3
    if case == "own-missing":
        return [ad[b], ad[c], ad[d]], 3
    if case in ("own-honest-altered", "own-scores-altered", "own-key-altered"):
        field = {"own-honest-altered": {"honest": 1}, "own-scores-altered": {"scores": True}}.get(
            case, {"public": keys.generate_x25519()[1].hex()}
        )
        return [replace(ad[a], **field), ad[b], ad[c]], 3
    if case == "own-other-advert":  # A's own, validly signed advert of the same session, from another copy of A
        other = StepSumSite.open(a, fed.names[a], fed.idkeys[a], session=fed.session, digest=fed.digest, honest=2)
        return [other[1], ad[b], ad[c]], 3
    if case == "peer-honest-out-of-range":  # a peer that signed h = 5 in a session of 3
        odd = StepSumSite.open(b, fed.names[b], fed.idkeys[b], session=fed.session, digest=fed.digest, honest=5)
        return [ad[a], odd[1], ad[c]], 3
    assert case == "peer-honest-zero"
    odd = StepSumSite.open(b, fed.names[b], fed.idkeys[b], session=fed.session, digest=fed.digest, honest=0)
    return [ad[a], odd[1], ad[c]], 3


@pytest.mark.parametrize(
    "case",
    [
        "below-minimum",
        "node-twice",
        "site-twice-under-two-nodes",
        "own-missing",
        "own-honest-altered",
        "own-scores-altered",
        "own-key-altered",
        "own-other-advert",
        "peer-honest-out-of-range",
        "peer-honest-zero",
    ],
)
def test_rosters_a_site_must_refuse(tmp_path: Path, case: str) -> None:
    """Below the site's own minimum, a node or site twice, the site's own advert missing or changed (its h decides
    what its peers are charged, its scores flag whether its figures go in, its key its masks), a peer's h outside
    1..n: each refused, and the site stays unjoined (so it masks nothing)."""
    fed = make_fed(tmp_path, 4, seed=40)
    roster, minimum = _roster_for(fed, case)
    victim = fed.sites[fed.ids[0]]
    with pytest.raises(SecAggIntegrityError):
        victim.join(roster, fed.pinned, min_sites=minimum)
    assert not victim.joined


def test_a_second_roster_is_refused(tmp_path: Path) -> None:
    """A site joins once: the server cannot add or swap a peer under keys already agreed."""
    fed = make_fed(tmp_path, 4, seed=45)
    a, b, c, _ = fed.ids
    fed.sites[a].join(fed.roster(), fed.pinned, min_sites=3)
    with pytest.raises(SecAggIntegrityError, match="already joined"):
        fed.sites[a].join(fed.roster([a, b, c]), fed.pinned, min_sites=3)


def test_a_different_model_for_one_site_is_garbage_and_cannot_be_asked_again(tmp_path: Path) -> None:
    """The message a step asks about is bound into its masks: a site sent another model (to make its gradient
    stand out, or to score it alone) masks with other masks, and the sum is noise. The server cannot then ask it
    again with the right model: the step is claimed. The next step, sent alike to all, sums exactly again."""
    fed = make_fed(tmp_path, 4, seed=50)
    join_all(fed)
    victim = fed.ids[0]
    x = fed.inputs()
    y = {node: fed.mask(node, 1, x[node], b"model" if node != victim else b"crafted model") for node in fed.ids}
    held = unmask_sum(list(y.values()))
    looks_random(held - to_ring(sum(x[node] for node in fed.ids if node != victim)), x[victim])
    with pytest.raises(SecAggIntegrityError, match="already used"):
        fed.mask(victim, 1, x[victim], b"model")
    x2 = fed.inputs()
    total = unmask_sum([fed.mask(node, 2, x2[node], b"model") for node in fed.ids])
    np.testing.assert_array_equal(from_ring(total), np.sum(list(x2.values()), axis=0))


def test_a_replayed_step_or_a_restored_copy_never_masks_twice(tmp_path: Path) -> None:
    """Two masked vectors of one step under the same masks would give the difference of two inputs (and under a
    bigger and a smaller roster, a peer's mask). The step is claimed in the site's durable log before it is
    masked: the live site refuses a replay, and so does a copy restored from its saved state, in a new process
    (a fresh UsedTags on the same file), whatever message it is bound to. A new step is still masked."""
    fed = make_fed(tmp_path, 3, seed=60)
    join_all(fed)
    a = fed.ids[0]
    saved = fed.sites[a].to_state()
    x = fed.inputs()[a]
    fed.mask(a, 1, x)
    with pytest.raises(SecAggIntegrityError, match="already used"):
        fed.mask(a, 1, x)
    copy = StepSumSite.from_state(saved)
    assert copy == fed.sites[a]
    fresh_claim = UsedTags(tmp_path / fed.names[a] / "secagg-tags.log").claim_line
    for model in (b"the global model", b"another model"):
        with pytest.raises(SecAggIntegrityError, match="already used"):
            copy.mask(1, fed.binding(1, model), to_ring(x), fresh_claim)
    copy.mask(2, fed.binding(2), to_ring(x), fresh_claim)


def test_a_session_id_is_answered_once_and_two_opens_share_their_steps(tmp_path: Path) -> None:
    """`advertise` claims `dsession:ID` before it makes a key, so a repeated session id is refused (a second key
    under one session would let the server show each peer a different key of the site). Even were it not, every
    copy of the site in a session claims the same step lines, so only one of them masks any step."""
    fed = make_fed(tmp_path, 3, seed=70)
    a, b, c = fed.ids
    used = UsedTags(tmp_path / fed.names[a] / "secagg-tags.log")
    used.claim_line(f"dsession:{fed.session.hex()}")
    with pytest.raises(SecAggIntegrityError, match="already used"):
        UsedTags(used.path).claim_line(f"dsession:{fed.session.hex()}")

    second, second_advert = StepSumSite.open(
        a, fed.names[a], fed.idkeys[a], session=fed.session, digest=fed.digest, honest=2
    )
    fed.sites[a].join(fed.roster(), fed.pinned, min_sites=3)
    second.join([second_advert, fed.adverts[b], fed.adverts[c]], fed.pinned, min_sites=3)
    fed.mask(a, 1, fed.inputs()[a])
    with pytest.raises(SecAggIntegrityError, match="already used"):
        second.mask(1, fed.binding(1), np.zeros(LENGTH, np.uint32), fed.claims[a])


def test_two_sessions_of_the_same_sites_never_reuse_a_mask(tmp_path: Path) -> None:
    """The same sites, identity keys and roster in a new session (fresh X25519 keys, a new id), the same input at
    the same step: the difference of the site's two masked vectors is noise, and so is that of the two sums of
    all but one site."""
    one = make_fed(tmp_path / "one", 3, seed=80)
    two = make_fed(tmp_path / "two", 3, seed=80)
    two.session = bytes(reversed(one.session))
    for node in two.ids:  # the very sites of `one`, opening the second session
        two.sites[node], two.adverts[node] = StepSumSite.open(
            node, one.names[node], one.idkeys[node], session=two.session, digest=one.digest, honest=2
        )
    two.idkeys, two.pinned = one.idkeys, one.pinned
    join_all(one)
    join_all(two)
    victim, dropped, _ = one.ids
    x = one.inputs()
    y1 = {node: one.mask(node, 1, x[node]) for node in one.ids}
    y2 = {node: two.mask(node, 1, x[node]) for node in one.ids}
    looks_random(y1[victim] - y2[victim], x[victim])
    partial = [y1[n] - y2[n] for n in one.ids if n != dropped]
    looks_random(unmask_sum(partial), x[victim])


@pytest.mark.parametrize(("n", "colluders"), [(3, 2), (3, 1), (4, 3), (4, 2), (5, 4), (5, 3)])
def test_the_collusion_bound_is_every_peer_of_the_session(tmp_path: Path, n: int, colluders: int) -> None:
    """The stated bound: colluding peers reveal their pairwise seed with the victim and the server peels those
    masks off its vector. With all n - 1 peers it gets the victim's input exactly (as it would from the sum minus
    their inputs); with one honest peer left out its view is noise."""
    fed = make_fed(tmp_path, n, seed=90 + n + colluders)
    join_all(fed)
    victim, *peers = fed.ids
    x = fed.inputs()
    y = {node: fed.mask(node, 1, x[node]) for node in fed.ids}
    binding = fed.binding(1)
    peeled = y[victim].copy()
    for peer in peers[:colluders]:
        mask = pair_mask(fed, victim, peer, fed.sites[peer].seeds[victim], 1, binding)
        peeled = peeled - mask if victim < peer else peeled + mask
    if colluders == n - 1:
        np.testing.assert_array_equal(from_ring(peeled), x[victim])
        known = sum(x[p] for p in peers)
        np.testing.assert_array_equal(from_ring(unmask_sum(list(y.values())) - to_ring(known)), x[victim])
    else:
        looks_random(peeled, x[victim])


def test_a_colluding_peer_cannot_pin_the_pair_key_to_a_known_value(tmp_path: Path) -> None:
    """A peer (validly signed, pinned) that advertises a low-order X25519 point would make the pairwise secret
    one the server knows without the peer: refused at join."""
    fed = make_fed(tmp_path, 3, seed=100)
    a, b, c = fed.ids
    low = StepAdvert(b, fed.names[b], fed.session.hex(), fed.digest.hex(), bytes(32).hex(), 2)
    low = replace(low, signature=fed.idkeys[b].sign(low.signed_bytes()).hex())
    with pytest.raises(SecAggIntegrityError, match="X25519"):
        fed.sites[a].join([fed.adverts[a], low, fed.adverts[c]], fed.pinned, min_sites=3)


# ----------------------------------------------------------------------------------------------- site level

RUN = 7
LABELS = ["a", "b", "c"]
FEATURES = 6


@pytest.fixture
def flower_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps messages with the task's identity (a Grid would have set it). The stand-in sites have no
    base model to load an adapter into; every call that reads the training rows for a gradient is recorded."""
    for attr, value in (("_run_id", RUN), ("_task_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    monkeypatch.setattr(distributed, "load_adapter_state", lambda model, state: None, raising=False)
    gradient_sum = distributed._gradient_sum

    def recorded(site: _Site, *args: object, **kwargs: object) -> np.ndarray:
        site.sampled_at.append((site.round, site.spec.training.head.distributed.sample_rate))
        return gradient_sum(site, *args, **kwargs)

    monkeypatch.setattr(distributed, "_gradient_sum", recorded)


def fed_spec(
    tmp_path: Path, *, steps: int, rounds: int = 2, rate: float = 0.2, weight_cap: int = 100_000
) -> FederationSpec:
    return FederationSpec.model_validate(
        {
            "base_model": {"path": str(tmp_path / "base")},
            "task": {"kind": "classification", "labels": LABELS},
            "training": {
                "rounds": rounds,
                "min_sites": 2,
                "head": {"rounds": rounds, "distributed": {"steps": steps, "sample_rate": rate}},
            },
            "privacy": {"noise": "distributed", "accountant": "rdp"},
            "secagg": {"weight_cap": weight_cap},
        }
    )


class _Site(Site):
    """The real `Site` for everything a DP step decides with (commit_spend, its SQLite ledger, the cap and delta);
    only the base model's pooled features and held-out scores are stand-ins (a head-phase step reads nothing else
    of the model). `spec` is set to each message's spec, as `get_site` does by building a Site per spec."""

    def __init__(self, site: SiteSpec, spec: FederationSpec, rows: int, held: EvalResult) -> None:
        self.site, self.spec, self.kind = site, spec, "classification"
        self.identity = DatasetIdentity(name=f"rows-of-{site.name}")
        self.epsilon_cap = site.cap_under(spec)
        self.delta = accounting_delta(site, spec)
        self.ledger_path = Path(site.state_dir) / "ledger.sqlite"
        self.ledger, self.ledger_error, self.dataset = None, None, self.identity.key  # type: ignore[assignment]
        self._open_ledger()
        g = np.random.default_rng(rows)
        self.train_data = TensorDataset(
            torch.from_numpy(g.normal(size=(rows, FEATURES))).float(), torch.from_numpy(g.integers(0, 3, rows))
        )
        self.eval_data = self.train_data
        self.held = held
        self.loaded = SimpleNamespace(model=None)
        self.layout = GLOBAL  # the model's adapter: what `accept` checks a sent one against
        self.sampled_at: list[tuple[int, float]] = []  # (round, rate) of every step that read the training rows
        self.round = 0

    def features(self, global_state: object) -> tuple[TensorDataset, TensorDataset]:
        return self.train_data, self.train_data

    def features_under(self, encoder: str) -> tuple[TensorDataset, TensorDataset]:
        return self.train_data, self.train_data

    def evaluate(self, global_state: object, *, prior: bool = True) -> EvalResult:
        return self.held


@dataclass
class Member:
    node: int
    spec: SiteSpec
    site: _Site
    context: Context
    sites: int  # the session's size, which the loss units follow (`scores.loss_units`)

    def figures(self) -> np.ndarray:
        return distributed._figures(self.site, self.site.held, self.sites)

    def count(self) -> int:
        return distributed._count(self.site)


def members(
    tmp_path: Path, spec: FederationSpec, n: int, *, seed: int, settings: dict[int, dict] | None = None
) -> list[Member]:
    """n sites pinning each other's keys, each with h = 2 and `secure_scores` unless `settings[i]` says else."""
    rng = np.random.default_rng(seed)
    ids = [int(x) for x in rng.choice(2**40, size=n, replace=False)]
    idkeys = {node: keys.generate_identity_key() for node in ids}
    peers = {f"site-{i}": keys.public_key_to_hex(idkeys[node]) for i, node in enumerate(ids)}
    out = []
    for i, node in enumerate(ids):
        state = tmp_path / f"site-{i}"
        keys.save_identity_key(idkeys[node], state / "identity.pem")
        site = SiteSpec(
            name=f"site-{i}",
            data=DataSpec(train=tmp_path / "unused.csv"),
            state_dir=state,
            peers=peers,
            **({"min_honest_sites": 2, "secure_scores": True} | (settings or {}).get(i, {})),
        )
        held = EvalResult(num_examples=40 + 7 * i, loss=0.5 + 0.25 * i, accuracy=0.5 + 0.1 * i, perplexity=None)
        out.append(
            Member(node, site, _Site(site, spec, 50 + 11 * i, held), Context(RUN, node, {}, RecordDict(), {}), n)
        )
    return out


def _config(spec: FederationSpec, round_: int) -> ConfigRecord:
    return ConfigRecord({"federation": spec.model_dump_json(), "run": "r1", "round": round_, "rounds": 2})


GLOBAL = OrderedDict(
    [
        ("classifier.weight", np.linspace(-0.5, 0.5, 3 * FEATURES, dtype=np.float32).reshape(3, FEATURES)),
        ("classifier.bias", np.zeros(3, dtype=np.float32)),
    ]
)


def open_session(group: list[Member], spec: FederationSpec, session: bytes, sigma: float = 1.5) -> list[str]:
    """The advert stage, as `client_app.dp_advert` runs it: the adverts the server relays with the first step."""
    adverts = []
    for m in group:
        content = RecordDict(
            {
                "config": _config(spec, 1),
                "dsession": ConfigRecord({"session": session.hex(), "noise-multiplier": sigma}),
            }
        )
        msg = Message(content, dst_node_id=m.node, message_type="train.dp_advert")
        adverts.append(json.dumps(distributed.advertise(msg, m.context, m.spec).to_dict()))
    return adverts


def dp_step(
    m: Member,
    spec: FederationSpec,
    round_: int,
    session: bytes,
    k: int,
    adverts: list[str] | None = None,
    sent: OrderedDict[str, np.ndarray] = GLOBAL,
) -> distributed.StepOut:
    """One step message, as `client_app.dp_step` handles it (its score meter included), less the reply."""
    request: dict[str, object] = {"session": session.hex(), "step": k}
    if adverts is not None:
        request["adverts"] = adverts
    content = RecordDict({"config": _config(spec, round_), "dstep": ConfigRecord(request), "global": to_record(sent)})
    msg = Message(content, dst_node_id=m.node, message_type="train.dp_step")
    m.site.spec, m.site.round = local_spec(spec, m.spec), round_  # as `get_site` builds it
    meter = ScoreMeter.admit(m.context, "r1", round_, 2)
    out = distributed.step(msg, m.context, m.site, may_score=meter.may_score_before_training(round_))
    meter.record(m.context, trained=round_, scored=round_ - 1 if out.result else None)
    return out


def step_all(
    group: list[Member], spec: FederationSpec, round_: int, session: bytes, k: int, adverts: list[str] | None = None
) -> np.ndarray:
    """Every member's masked vector for step k, summed and decoded: [gradient + noise, count, figures]."""
    return from_ring(unmask_sum([dp_step(m, spec, round_, session, k, adverts).masked for m in group]))


def test_site_level_honest_session_decodes_and_charges_each_round_once(tmp_path: Path, flower_task: None) -> None:
    """The control for the attacks below: three sites, two rounds of two steps. Every sum carries the summed row
    count; a round's first step carries the summed held-out figures; each site charged each round once for its
    two steps at the spec's rate, and read its rows once per step."""
    spec = fed_spec(tmp_path, steps=4)
    group = members(tmp_path, spec, 3, seed=1)
    session = bytes(range(16))
    adverts = open_session(group, spec, session)
    for round_, k in ((1, 1), (1, 2), (2, 3), (2, 4)):
        total = step_all(group, spec, round_, session, k, adverts if k == 1 else None)
        assert total[-4] == sum(m.count() for m in group)
        first = k in (1, 3)
        expected = sum(m.figures() for m in group) if first else np.zeros(3)
        np.testing.assert_array_equal(total[-3:], expected)
    for m in group:
        entries = m.site.ledger.entries(m.site.identity)
        assert [(e.round, e.steps, e.sample_rate) for e in entries] == [(1, 2, 0.2), (2, 2, 0.2)]
        assert len(m.site.sampled_at) == 4


def test_site_level_replays_and_foreign_steps_are_refused(tmp_path: Path, flower_task: None) -> None:
    """What the site's own code checks on every step message: the same step again (the durable claim), a step of
    another round, another session id, the roster a second time, and the session id advertised again."""
    spec = fed_spec(tmp_path, steps=4)
    group = members(tmp_path, spec, 3, seed=6)
    session = bytes(range(6, 22))
    adverts = open_session(group, spec, session)
    step_all(group, spec, 1, session, 1, adverts)
    m = group[0]
    with pytest.raises(SecAggIntegrityError, match="already used"):
        dp_step(m, spec, 1, session, 1)
    with pytest.raises(SecAggIntegrityError, match="not a step of round 1"):
        dp_step(m, spec, 1, session, 3)
    with pytest.raises(SecAggIntegrityError, match="another session"):
        dp_step(m, spec, 1, bytes(16), 2)
    with pytest.raises(SecAggIntegrityError, match="already joined"):
        dp_step(m, spec, 1, session, 2, adverts)
    with pytest.raises(SecAggIntegrityError, match="already used"):
        open_session([m], spec, session)
    assert [e.round for e in m.site.ledger.entries(m.site.identity)] == [1]  # charged once, for round 1


@pytest.mark.parametrize("differs", ["sigma", "spec"])
def test_site_level_per_site_sigma_or_spec_is_refused_or_garbage(
    tmp_path: Path, flower_task: None, differs: str
) -> None:
    """Sigma per site: it is in the session digest every advert signs, so the others refuse the victim's advert
    (and it theirs) at the first step. A spec per site at a step (here a huge weight cap for the victim): it is
    in the message bound into the masks, so the sum is garbage."""
    spec = fed_spec(tmp_path, steps=4)
    group = members(tmp_path, spec, 3, seed=2)
    victim, *others = group
    session = bytes(range(1, 17))
    if differs == "sigma":
        adverts = open_session(others, spec, session) + open_session([victim], spec, session, sigma=0.9)
        for m in group:
            with pytest.raises(SecAggIntegrityError, match="another session or configuration"):
                dp_step(m, spec, 1, session, 1, adverts)
        return
    adverts = open_session(group, spec, session)
    other_spec = fed_spec(tmp_path, steps=4, weight_cap=10**9)
    vectors = [dp_step(m, spec, 1, session, 1, adverts).masked for m in others]
    try:
        vectors.append(dp_step(victim, other_spec, 1, session, 1, adverts).masked)
    except SecAggIntegrityError:
        return  # refused outright (a site that checks each step's spec against the session's): no sum at all
    total = from_ring(unmask_sum(vectors))
    assert total[-4] != sum(m.count() for m in group)
    assert not np.array_equal(total[-3:], sum(m.figures() for m in group))


def test_a_spec_changed_mid_session_cannot_send_more_data_than_was_charged(tmp_path: Path, flower_task: None) -> None:
    """The server opens the session with 1 step a round at rate 0.05, so the first step of round 1 charges one step
    at 0.05. It then sends every site (alike, so the masks cancel) a spec with 5 steps a round at rate 1.0: steps
    2..5 now belong to round 1, which is already charged, so each site sends four more full-data gradients (every
    row, noise for one step each) that its ledger never sees. Safe: every step that read the rows is covered by a
    charge of its round at a rate no smaller."""
    charged_spec = fed_spec(tmp_path, steps=2, rate=0.05)
    drifted = fed_spec(tmp_path, steps=10, rate=1.0)
    group = members(tmp_path, charged_spec, 3, seed=3)
    session = bytes(range(2, 18))
    adverts = open_session(group, charged_spec, session)
    total = step_all(group, charged_spec, 1, session, 1, adverts)
    assert total[-4] == sum(m.count() for m in group)
    for k in range(2, 6):
        try:
            total = step_all(group, drifted, 1, session, k)
        except SecAggIntegrityError:
            break
        assert total[-4] == sum(m.count() for m in group)  # a real sum of every site's full data
    for m in group:
        charges = m.site.ledger.entries(m.site.identity)
        for round_ in {r for r, _ in m.site.sampled_at}:
            reads = [rate for r, rate in m.site.sampled_at if r == round_]
            paid = [e for e in charges if e.round == round_]
            assert len(reads) <= sum(e.steps for e in paid)
            assert max(reads) <= min(e.sample_rate for e in paid)


@pytest.mark.parametrize("attack", ["honest-server-mixed-h", "second-session", "second-session-same-8-hex-prefix"])
def test_one_site_s_figures_are_never_alone_in_a_sum(tmp_path: Path, flower_task: None, attack: str) -> None:
    """Zero colluders; site A (h = 2, minimum 3) is the victim.

    honest-server-mixed-h: an honest server, one session of A, B, C (h = 4) and D (no `secure_scores`). Three
    adverts signed `scores`: enough for A's threshold of 3, not for B's and C's of 4. A adds its exact correct
    answers, rows and loss; B and C add zeros. The sum's figures are A's.

    second-session: the server runs round 1's first step in a session of B, C, D (all scoring; a legitimate sum),
    then in a session of A, B, C, D with the same model. B, C and D scored round 1 already (their meters), so they
    add zeros there; A has not, and all four signed `scores`. With a session id sharing its first 8 hex digits with
    the first one, B, C and D also decline the round (their ledger has a spend for that run id and round): count 0,
    so the count is A's alone too."""
    spec = fed_spec(tmp_path, steps=2)
    if attack == "honest-server-mixed-h":
        settings = {1: {"min_honest_sites": 4}, 2: {"min_honest_sites": 4}, 3: {"secure_scores": False}}
        group = members(tmp_path, spec, 4, seed=5, settings=settings)
        second = bytes(range(5, 21))
    else:
        group = members(tmp_path, spec, 4, seed=4)
        first = bytes(range(3, 19))
        step_all(group[1:], spec, 1, first, 1, open_session(group[1:], spec, first))
        second = first[:4] + bytes(12) if attack.endswith("prefix") else bytes(range(4, 20))
    victim = group[0]
    adverts = open_session(group, spec, second)
    vectors = []
    for m in group:
        try:
            vectors.append(dp_step(m, spec, 1, second, 1, adverts).masked)
        except SecAggIntegrityError:
            return  # a site refused the step: no sum, nothing learnt
    total = from_ring(unmask_sum(vectors))
    alone_figures = np.array_equal(total[-3:], victim.figures())
    alone_count = total[-4] == victim.count()
    assert not alone_figures and not alone_count, (
        f"the sum's count and figures {total[-4:].tolist()}, site A's: {victim.count()}, {victim.figures().tolist()}"
    )


def _probe(kind: str) -> OrderedDict[str, np.ndarray]:
    """A head a server could send so that a step fails only where some sampled row meets its condition: a tensor
    the model does not have (its gradient would break the norm bound), a head narrower than the labels (a row of
    the last label would index past it), or a weight that overflows to inf only on rows with a large feature."""
    weight, bias = GLOBAL["classifier.weight"], GLOBAL["classifier.bias"]
    if kind == "extra-tensor":
        return OrderedDict([*GLOBAL.items(), ("classifier.zzfake", weight.copy())])
    if kind == "narrow-head":
        return OrderedDict([("classifier.weight", weight[:2]), ("classifier.bias", bias[:2])])
    huge = weight.copy()
    huge[0, 0] = 1e37
    return OrderedDict([("classifier.weight", huge), ("classifier.bias", bias)])


@pytest.mark.parametrize("kind", ["extra-tensor", "narrow-head", "overflowing-weight"])
def test_a_probe_head_is_refused_before_any_row_is_read(tmp_path: Path, flower_task: None, kind: str) -> None:
    """A step that failed after reading the rows would answer the server's question (does some sampled row meet
    its condition?), and a failed step is not charged, so it could be asked again and again. The site refuses such
    a head on the message alone: the same refusal with or without any row, no row read, nothing charged."""
    spec = fed_spec(tmp_path, steps=4)
    group = members(tmp_path, spec, 3, seed=11)
    session = bytes(range(11, 27))
    adverts = open_session(group, spec, session)
    step_all(group, spec, 1, session, 1, adverts)
    victim = group[0]
    reads, charges = len(victim.site.sampled_at), victim.site.ledger.entries(victim.site.identity)
    for _ in range(3):  # asked again: the same answer, still nothing read
        with pytest.raises(AdapterRefused):
            dp_step(victim, spec, 1, session, 2, sent=_probe(kind))
    assert len(victim.site.sampled_at) == reads
    assert victim.site.ledger.entries(victim.site.identity) == charges


def test_a_row_whose_gradient_is_not_finite_adds_nothing(tmp_path: Path) -> None:
    """The backstop behind the refusal above: should a row's gradient still come out non-finite, that row adds
    zero (a contribution of norm at most C, as DP-SGD allows any row), and the step neither fails nor carries a
    NaN: its sum is the other rows' sum."""
    spec = fed_spec(tmp_path, steps=4, rate=1.0)
    (m,) = members(tmp_path, spec, 1, seed=12)
    x, y = m.site.train_data.tensors
    poisoned = x.clone()
    poisoned[0, 0] = float("inf")
    head = OrderedDict((k, v.copy()) for k, v in GLOBAL.items())
    bound = 2.0 * distributed.CLIP_UNITS

    def total(features: torch.Tensor, rows: slice) -> np.ndarray:
        data = TensorDataset(features[rows], y[rows])
        return distributed._gradient_sum(m.site, data, head, bound, np.random.default_rng(0))

    with_bad = total(poisoned, slice(None))
    assert np.all(np.isfinite(with_bad))
    rest = total(x, slice(1, None))
    assert np.abs(with_bad - rest).max() <= len(y)  # the same rows, up to each row's randomized rounding


def test_a_site_with_its_own_copy_of_the_base_model_takes_part(tmp_path: Path, flower_task: None) -> None:
    """A site that names its own base model directory (`base_model_path`) signs the federation as the message
    carries it and must check each step against the same: comparing its local copy of the spec refused every step."""
    spec = fed_spec(tmp_path, steps=4)
    own = {i: {"base_model_path": tmp_path / f"models-{i}"} for i in range(3)}
    group = members(tmp_path, spec, 3, seed=13, settings=own)
    session = bytes(range(13, 29))
    adverts = open_session(group, spec, session)
    total = step_all(group, spec, 1, session, 1, adverts)
    assert total[-4] == sum(m.count() for m in group)


def test_two_colluding_scorers_cannot_isolate_a_victim_s_figures(tmp_path: Path, flower_task: None) -> None:
    """A session of 8: the victim and two colluding sites advertise `scores`, five honest sites do not. The three
    scorers met every scorer's minimum (3), so each added its figures; the colluders know theirs, and the sum less
    theirs was the victim's exactly. Now figures are released only when every site of the session scores."""
    spec = fed_spec(tmp_path, steps=2)
    settings = {i: {"secure_scores": False} for i in range(3, 8)}
    group = members(tmp_path, spec, 8, seed=14, settings=settings)
    session = bytes(range(14, 30))
    adverts = open_session(group, spec, session)
    total = step_all(group, spec, 1, session, 1, adverts)
    victim, colluders = group[0], group[1:3]
    recovered = total[-3:] - sum(m.figures() for m in colluders)
    assert not np.array_equal(recovered, victim.figures()), "the victim's held-out figures, isolated"
    assert total[-4] == sum(m.count() for m in group)  # the step itself went through


def test_figures_decode_when_every_site_of_the_session_scores(tmp_path: Path, flower_task: None) -> None:
    """The control: the same session with all 8 scoring gives the sum of all 8 sites' figures."""
    spec = fed_spec(tmp_path, steps=2)
    group = members(tmp_path, spec, 8, seed=15)
    session = bytes(range(15, 31))
    total = step_all(group, spec, 1, session, 1, open_session(group, spec, session))
    np.testing.assert_array_equal(total[-3:], sum(m.figures() for m in group))


def test_large_sessions_figures_decode_exactly_in_coarser_loss_units() -> None:
    """Ten sites of 20,000 held-out rows at a loss of 12 nats: in thousandths of a nat their summed loss passes
    2^31, and each site's clamped figure read 10.74. The units now follow the session's size and weight_cap, on
    both ends, so the sum fits and the federation's loss decodes to within a unit."""
    from fedtune.common.secagg import scores
    from fedtune.server.distributed import _totals

    spec = FederationSpec.model_validate({"base_model": {"path": "x"}, "task": {"labels": ["a", "b"]}})
    stand_in = SimpleNamespace(spec=spec)
    result = EvalResult(num_examples=20_000, loss=12.0, accuracy=0.5, perplexity=None)
    sites, cap = 10, spec.secagg.weight_cap
    assert scores.loss_units(sites, cap) < scores.LOSS_UNITS
    total = sum(distributed._figures(stand_in, result, sites) for _ in range(sites))
    assert int(total.max()) < 2**31
    decoded = _totals(from_ring(unmask_sum([to_ring(total)])), sites, cap)
    assert decoded is not None and decoded.loss == pytest.approx(12.0, abs=1 / scores.loss_units(sites, cap))
    assert decoded.num_examples == 200_000 and decoded.accuracy == pytest.approx(0.5)


@pytest.mark.parametrize("sigma", [float("inf"), float("nan"), 1e6, 0.0])
def test_a_session_sigma_outside_what_a_site_composes_is_refused_at_the_advert(
    tmp_path: Path, flower_task: None, sigma: float
) -> None:
    """A sigma of 1e6 made each step (and the figures its first step releases) cost about nothing; an infinite one
    hung the accountant under the ledger's lock (review round 4). Refused before the session opens."""
    spec = fed_spec(tmp_path, steps=2)
    (m,) = members(tmp_path, spec, 1, seed=5)
    with pytest.raises(SecAggIntegrityError, match="outside"):
        open_session([m], spec, bytes(range(16)), sigma=sigma)


def test_a_head_without_a_bias_sums_the_weight_s_gradients() -> None:
    """Review round 7: a decoder's classifier (`score`) has no bias, and the step raised after the round was
    charged. Unclipped (a clip above every row's norm), its sum is the weight part of the head with a zero bias."""
    g = np.random.default_rng(0)
    x = torch.from_numpy(g.normal(size=(64, FEATURES))).float()  # gradient norms under 10: none clipped
    features = TensorDataset(x, torch.from_numpy(g.integers(0, 3, 64)))
    spec = SimpleNamespace(
        training=SimpleNamespace(head=SimpleNamespace(distributed=SimpleNamespace(sample_rate=0.5))),
        privacy=SimpleNamespace(max_grad_norm=10.0),
    )
    site = SimpleNamespace(spec=spec)
    from fedtune.common.noise import CLIP_UNITS, rounded_norm_bound

    weight = GLOBAL["classifier.weight"]
    bound = rounded_norm_bound(CLIP_UNITS, weight.size + 3)
    without = distributed._gradient_sum(site, features, OrderedDict(w=weight), bound, np.random.default_rng(1))
    with_zero = OrderedDict(w=weight, b=np.zeros(3, dtype=np.float32))
    full = distributed._gradient_sum(site, features, with_zero, bound, np.random.default_rng(1))
    assert without.shape == (weight.size,) and np.abs(without).sum() > 0
    np.testing.assert_allclose(without, full[: weight.size], atol=40)  # ~100 units a row, each rounded on its own


def test_a_head_that_is_not_one_linear_layer_is_refused_before_the_round_is_charged() -> None:
    """Review round 8: a RoBERTa-style head (dense + out_proj) was charged, then failed at every step."""
    roberta = OrderedDict(
        dense_w=np.zeros((FEATURES, FEATURES), np.float32),
        dense_b=np.zeros(FEATURES, np.float32),
        out_w=np.zeros((3, FEATURES), np.float32),
        out_b=np.zeros(3, np.float32),
    )
    with pytest.raises(SecAggIntegrityError, match="one-Linear classifier head"):
        distributed._require_linear_head(roberta)
    distributed._require_linear_head(GLOBAL)  # the head fedtune's classifiers have
