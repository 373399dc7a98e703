"""A run never ends because of one site: thousands of malformed replies of every kind, fuzzed.

One site of four answers each stage with whatever hypothesis makes up (missing records, wrong types,
huge lists, arrays of the wrong shape, error replies, silence); the three honest sites run the real
site-side protocol. The server's secure sum must never raise: it either sums the honest sites exactly
or ends the round with a short error, and every reason it stores is bounded.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtune.client import secure_site
from fedtune.common.adapter import to_record
from fedtune.common.config import DataSpec, FederationSpec, SiteSpec
from fedtune.common.secagg import keys, scores
from fedtune.common.secagg.errors import MAX_REASON
from fedtune.common.secagg.quantize import QuantSpec
from fedtune.common.secagg.weighting import pack, site_weight
from fedtune.server.aggregation import RoundUpdate, plain_round
from fedtune.server.secure_round import secure_round

LENGTH = 24  # adapter values; the masked vector has one more, the site's weight
FIELDS = [
    "kind", "run_id", "round", "tag_nonce", "node_id", "site_name", "c_pk", "s_pk", "site_nonce", "signature",
    "dst_node_ids", "blobs", "length", "b_owner_ids", "b_shares", "sk_owner_ids", "sk_shares", "site",
]  # fmt: skip
RECORDS = ["keys", "shares", "header", "masked", "signature", "unmask", "metrics", "scores", "info", "decline", "delta"]

scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=40),
    st.booleans(),
)
values = st.one_of(
    scalars,
    st.lists(st.integers(min_value=0, max_value=2**64 - 1), max_size=8),
    st.lists(st.binary(max_size=40), max_size=8),
    st.lists(st.text(max_size=5), min_size=2000, max_size=2000),  # an oversize list
)
config_records = st.dictionaries(st.sampled_from(FIELDS), values, max_size=8).map(
    lambda d: ConfigRecord({k: v for k, v in d.items() if not isinstance(v, bool)})
)
arrays = st.builds(
    lambda n, kind: ArrayRecord({"y": Array(np.zeros(n, dtype=kind))}),
    st.integers(min_value=0, max_value=3 * LENGTH),
    st.sampled_from([np.uint32, np.float32, np.int64]),
)
replies = st.one_of(
    st.none(),  # silence: the stage times out for this node
    st.just("error"),  # a Flower error reply
    st.dictionaries(st.sampled_from(RECORDS), st.one_of(config_records, arrays), max_size=5),
)


class FuzzGrid:
    """Flower's Grid interface over an in-memory hop: honest nodes run the site-side protocol, one node
    answers with the fuzzed replies, one per stage."""

    def __init__(self, sites: dict[int, SiteSpec], fuzzed: int, fuzz: list, vectors: dict[int, np.ndarray]) -> None:
        self.run = SimpleNamespace(run_id=7)
        self.sites, self.fuzzed, self.fuzz, self.vectors = sites, fuzzed, list(fuzz), vectors
        self.contexts = {n: Context(7, n, {}, RecordDict(), {}) for n in sites}
        self.outbox: list[Message] = []

    def _honest(self, node: int, msg: Message) -> RecordDict:
        spec, ctx, kind = self.sites[node], self.contexts[node], msg.metadata.message_type
        if kind == "train":
            advert = secure_site.start(msg, ctx, spec, self.vectors[node])
            info = ConfigRecord({"site": spec.name})
            return RecordDict(
                {"keys": ConfigRecord(advert.to_dict()), "info": info, "metrics": MetricRecord({"epsilon": 1.0})}
            )
        stage = kind.removeprefix("train.secagg_")
        if stage == "share":
            return RecordDict({"shares": ConfigRecord(secure_site.share(msg, ctx, spec).to_dict())})
        if stage == "mask":
            m = secure_site.mask(msg, ctx, spec)
            return RecordDict({"header": ConfigRecord(m.to_dict()), "masked": ArrayRecord({"y": Array(m.vector)})})
        if stage == "consistency":
            return RecordDict({"signature": ConfigRecord(secure_site.consistency(msg, ctx, spec).to_dict())})
        return RecordDict({"unmask": ConfigRecord(secure_site.unmask(msg, ctx, spec).to_dict())})

    def push_messages(self, messages: list[Message]) -> list[str]:
        """Each message gets its id (as Flower's grids give it) and its reply, or none (silence)."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            ids.append(msg.metadata.message_id)
            node = msg.metadata.dst_node_id
            if node != self.fuzzed:
                self.outbox.append(Message(self._honest(node, msg), reply_to=msg))
                continue
            reply = self.fuzz.pop(0) if self.fuzz else None
            if reply == "error":
                from flwr.app import Error

                self.outbox.append(Message(Error(code=0, reason="x" * 100_000), reply_to=msg))
            elif reply is not None:
                self.outbox.append(Message(RecordDict(reply), reply_to=msg))
        return ids

    def pull_messages(self, ids: set[str]) -> list[Message]:
        replies = [m for m in self.outbox if m.metadata.reply_to_message_id in ids]
        self.outbox = [m for m in self.outbox if m not in replies]
        return replies


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, base_model_path: Path):
    tmp = tmp_path_factory.mktemp("fuzz")
    ids = [101, 202, 303, 404]
    idkeys = {n: keys.generate_identity_key() for n in ids}
    names = {n: f"site-{n}" for n in ids}
    peers = {names[n]: keys.public_key_to_hex(idkeys[n]) for n in ids}
    sites = {}
    for n in ids:
        keys.save_identity_key(idkeys[n], tmp / names[n] / "identity.pem")
        sites[n] = SiteSpec(name=names[n], data=DataSpec(train=tmp / "x.csv"), state_dir=tmp / names[n], peers=peers)
    spec = FederationSpec.model_validate(
        {
            "base_model": {"path": str(base_model_path)},
            "task": {"labels": ["a", "b"]},
            # the in-memory grid answers at once: a silent node is given up on after the first poll
            "secagg": {"stage_timeout_s": 0.001},
            "training": {"round_timeout_s": 0.001},
        }
    )
    rng = np.random.default_rng(0)
    vectors = {n: rng.uniform(-0.1, 0.1, LENGTH) for n in ids}
    return spec, sites, names, vectors


def _pin_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps replies with the task's identity; a Grid would have set it."""
    for attr, value in (("_run_id", 7), ("_task_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fuzz=st.lists(replies, min_size=5, max_size=5))
def test_a_fuzzed_site_never_ends_a_secure_round(federation, fuzz, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, sites, names, vectors = federation
    _pin_identity(monkeypatch)
    fuzzed, rows = 404, {101: 100, 202: 300, 303: 600}
    held = {101: (20, 1.0, 0.5), 202: (30, 2.0, 0.6), 303: (50, 3.0, 0.7)}  # held-out rows, loss, accuracy
    packed = {
        n: np.concatenate(
            [
                pack(vectors[n], site_weight("examples", rows.get(n, 1), 1000), 0.5),
                scores.encode(*held.get(n, (0, 0.0, None)), 0.5, spec.secagg.weight_cap),
            ]
        )
        for n in names
    }
    grid = FuzzGrid(sites, fuzzed, fuzz, packed)
    content = RecordDict({"config": ConfigRecord({"round": 1, "run": "r", "rounds": 1})})
    template = OrderedDict(w=np.zeros(LENGTH, dtype=np.float32))
    update = secure_round(grid, spec, content, sorted(names), names=names, round_=1, group="g", template=template)
    if update.mean_delta is not None:
        expected = sum(rows[n] * vectors[n] for n in rows) / sum(rows.values())
        assert np.abs(update.mean_delta["w"] - expected).max() < 1e-5
        # the honest sites' held-out scores, summed in the same vector, to the quantiser's step: a row is
        # clip / weight_cap, each coordinate of the sum is within sites / scale of the truth
        assert update.totals is not None and update.totals.num_examples == 100
        rows_err = 4 / QuantSpec(0.5, 4).scale / (0.5 / spec.secagg.weight_cap)
        assert update.totals.accuracy == pytest.approx((20 * 0.5 + 30 * 0.6 + 50 * 0.7) / 100, abs=rows_err / 50)
        loss_err = rows_err * scores.LOSS_CAP / 100
        assert update.totals.loss == pytest.approx((20 * 1.0 + 30 * 2.0 + 50 * 3.0) / 100, abs=loss_err * 2)
    else:
        assert update.error and len(update.error) < 400
    assert set(update.failed) <= {fuzzed}  # the honest sites are never blamed
    assert all(len(reason) <= MAX_REASON + 20 for reason in update.failed.values())


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fuzz=replies)
def test_a_fuzzed_site_never_ends_a_plaintext_round(federation, fuzz, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, sites, names, vectors = federation
    _pin_identity(monkeypatch)
    spec = spec.model_copy(update={"secagg": spec.secagg.model_copy(update={"enabled": False})})
    template = OrderedDict(w=np.zeros(LENGTH, dtype=np.float32))

    class PlainGrid(FuzzGrid):
        def _honest(self, node: int, msg: Message) -> RecordDict:
            delta = OrderedDict(w=vectors[node].astype(np.float32))
            return RecordDict(
                {
                    "delta": to_record(delta),
                    "metrics": MetricRecord({"num-examples": 100, "epsilon": 1.0}),
                    "info": ConfigRecord({"site": sites[node].name}),
                }
            )

    fuzzed = 404
    grid = PlainGrid(sites, fuzzed, [fuzz], vectors)
    content = RecordDict({"config": ConfigRecord({"round": 1, "run": "r", "rounds": 1})})
    update = plain_round(grid, spec, content, sorted(names), names=names, group="g", template=template)
    assert update.mean_delta is not None  # three honest sites are enough, whatever the fourth sent
    expected = np.mean([vectors[n] for n in names if n != fuzzed], axis=0)  # junk never enters the mean
    assert np.abs(update.mean_delta["w"] - expected).max() < 1e-5
    assert all(len(reason) <= MAX_REASON + 20 for reason in update.failed.values())


# -- attacks by one site on the server's bookkeeping: each rebuilt against the real round, each now yields nothing

ROWS = {101: 100, 202: 300, 303: 600, 404: 1000}
STAGE_RECORD = {"train": "keys", "share": "shares", "mask": "header", "consistency": "signature", "unmask": "unmask"}


def _inputs(spec: FederationSpec, vectors: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Each site's packed secure-sum input: its self-weighted delta, its weight, no held-out scores."""
    return {
        n: np.concatenate(
            [
                pack(v, site_weight("examples", ROWS[n], 1000), 0.5),
                scores.encode(0, 0.0, None, 0.5, spec.secagg.weight_cap),
            ]
        )
        for n, v in vectors.items()
    }


class LyingGrid(FuzzGrid):
    """Every node runs the real site protocol; `liar` then rewrites its own reply with `lie(stage, reply)`."""

    def __init__(self, federation, liar: int, lie: Callable[[str, RecordDict], None]) -> None:
        spec, sites, _, vectors = federation
        super().__init__(sites, fuzzed=-1, fuzz=[], vectors=_inputs(spec, vectors))
        self.liar, self.lie = liar, lie

    def _honest(self, node: int, msg: Message) -> RecordDict:
        reply = super()._honest(node, msg)
        if node == self.liar:
            self.lie(msg.metadata.message_type.removeprefix("train.secagg_"), reply)
        return reply


def _secure_round(federation, grid: FuzzGrid) -> RoundUpdate:
    spec, _, names, _ = federation
    content = RecordDict({"config": ConfigRecord({"round": 1, "run": "r", "rounds": 1})})
    template = OrderedDict(w=np.zeros(LENGTH, dtype=np.float32))
    return secure_round(grid, spec, content, sorted(names), names=names, round_=1, group="g", template=template)


@pytest.mark.parametrize("stage", list(STAGE_RECORD))
def test_a_reply_naming_another_node_drops_its_sender_never_the_named_node(
    federation, stage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack 7a: site 404 answers one stage with its own message relabelled as node 101's. Before, the server
    took the parsed node id at its word and dropped 101 (two replies), or counted 404's message for it. Replies
    are now bound to the sender Flower authenticated: 404 is dropped, 101 keeps its place and its input."""
    _pin_identity(monkeypatch)
    _, _, _, vectors = federation
    liar, victim = 404, 101

    def relabel(at: str, reply: RecordDict) -> None:
        if at == stage:
            record = STAGE_RECORD[stage]
            reply[record] = ConfigRecord({**dict(reply[record]), "node_id": victim})

    update = _secure_round(federation, LyingGrid(federation, liar, relabel))
    assert victim not in update.failed
    assert set(update.failed) == {liar}
    assert f"names node {victim}" in update.failed[liar]
    # Dropped before its masked input arrived, the liar is out of the sum; after, its input is in it as sent.
    summed = [101, 202, 303] if stage in ("train", "share", "mask") else [101, 202, 303, 404]
    expected = sum(ROWS[n] * vectors[n] for n in summed) / sum(ROWS[n] for n in summed)
    assert update.mean_delta is not None
    assert np.abs(update.mean_delta["w"] - expected).max() < 1e-5


def _claims_site_101(reply: RecordDict) -> None:
    """The liar's first reply: another site's name, a 1 MB decline reason, and held-out scores of its own."""
    reply["info"] = ConfigRecord({"site": "site-101"})
    reply["decline"] = ConfigRecord({"reason": "budget exhausted " + "x" * 1_000_000})
    reply["scores"] = MetricRecord({"num-examples": 5, "eval-loss": 9.0, "eval-accuracy": 0.01, "epsilon": 9.0})


def test_site_text_is_capped_and_rows_filed_by_the_roster_secure(federation, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attacks 8a and 8b under secure aggregation: site 404's reply calls itself site-101 and declines with a
    1 MB reason. Its figures are filed under its own roster name, and the reason is cut to MAX_REASON."""
    _pin_identity(monkeypatch)
    _, _, names, _ = federation

    def lie(at: str, reply: RecordDict) -> None:
        if at == "train":
            _claims_site_101(reply)

    update = _secure_round(federation, LyingGrid(federation, 404, lie))
    assert update.mean_delta is not None  # a decline record alone changes nothing in the sum
    assert {n: s.site for n, s in update.sites.items()} == names
    assert update.evals[404].site == "site-404" and set(update.evals) == {404}
    assert update.sites[404].declined.startswith("budget exhausted")
    assert len(update.sites[404].declined) <= MAX_REASON


def test_site_text_is_capped_and_rows_filed_by_the_roster_plain(
    federation, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Attacks 8a and 8b in a plaintext round, down to the run store: nothing site 404 writes lands in site-101's
    row, and no stored text it supplied is longer than MAX_REASON."""
    from fedtune.server.federation import RoundReport, _missing
    from fedtune.server.store import RunStore

    spec, sites, names, vectors = federation
    _pin_identity(monkeypatch)
    spec = spec.model_copy(update={"secagg": spec.secagg.model_copy(update={"enabled": False})})

    class PlainGrid(FuzzGrid):
        def _honest(self, node: int, msg: Message) -> RecordDict:
            reply = RecordDict(
                {
                    "delta": to_record(OrderedDict(w=vectors[node].astype(np.float32))),
                    "metrics": MetricRecord({"num-examples": 100, "epsilon": 1.0}),
                    "scores": MetricRecord(
                        {"num-examples": 50, "eval-loss": 0.5, "eval-accuracy": 0.9, "epsilon": 1.0}
                    ),
                    "info": ConfigRecord({"site": sites[node].name}),
                }
            )
            if node == 404:
                del reply["delta"]
                _claims_site_101(reply)
            return reply

    content = RecordDict({"config": ConfigRecord({"round": 1, "run": "r", "rounds": 1})})
    template = OrderedDict(w=np.zeros(LENGTH, dtype=np.float32))
    grid = PlainGrid(sites, -1, [], vectors)
    update = plain_round(grid, spec, content, sorted(names), names=names, group="g", template=template)
    assert {n: s.site for n, s in update.sites.items()} == names
    assert {n: e.site for n, e in update.evals.items()} == names

    report = RoundReport(round=1, sampled=4, update=update, evals=update.evals)
    report.missing = _missing(update, sorted(names), names)
    assert set(report.missing) == {"site-404"}
    assert len(report.missing["site-404"]) <= MAX_REASON + len("declined: ")
    with RunStore(tmp_path / "store.sqlite") as store:
        store.create_run("r", name="r", federation_json="{}", rounds_total=1, fingerprint="", out_dir=tmp_path)
        store.record_round("r", report, names=names, attempt=1)
        store.record_scores("r", report, names=names)
        rows = {r["site"]: r for r in store.site_rounds("r")}
        registry = {s["name"]: s for s in store.sites()}
    assert set(rows) == set(names.values())
    honest = rows["site-101"]
    assert (honest["node_id"], honest["eval_accuracy"], honest["epsilon"]) == ("101", 0.9, 1.0)
    assert (honest["trained"], honest["declined"]) == (1, None)
    liar = rows["site-404"]
    assert (liar["node_id"], liar["eval_accuracy"], liar["trained"]) == ("404", 0.01, 0)
    assert len(liar["declined"]) <= MAX_REASON
    assert all(len(v) <= MAX_REASON for s in registry.values() for v in s.values() if isinstance(v, str))
