"""What a server gets from a real site (the production ClientApp, Site, ledger) when it asks as an attacker would.

For every value the site reads from a message, the server may send another, repeat it or leave it out: a round
without secure aggregation, a round number past the run, the same round twice, a final evaluation the site never
trained for, scores from a site that declines. Held-out figures leave only by the site's own choice, at most once
per round it trains in (and pays for), never with the label prior computed from its training rows; the spend it
reports is rounded and carries no sigma.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedtune.client.client_app import make_client_app
from fedtune.client.ledger import PrivacyLedger
from fedtune.client.scoring import MeterRefused
from fedtune.client.site import BUDGET_REFUSED, get_site
from fedtune.common.adapter import adapter_state, to_record
from fedtune.common.config import SITE_EPSILON_CAP, DataSpec, FederationSpec, SiteSpec
from fedtune.common.model import fingerprint_model
from fedtune.common.secagg import QuantSpec, RoundTag, SecAggConfigError, SecAggServer, keys, scores
from fedtune.common.secagg.errors import SecAggError
from fedtune.common.synthetic import BANK_INTENTS, generate_bank_messages

RUN = 7
PEERS = {"peer-a": 901, "peer-b": 902}


@pytest.fixture(autouse=True)
def flower_task(monkeypatch: pytest.MonkeyPatch) -> None:
    for attr, value in (("_run_id", RUN), ("_task_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


@pytest.fixture(scope="module")
def spec(base_model_path: Path) -> FederationSpec:
    return FederationSpec.model_validate(
        {
            "name": "metering",
            "base_model": {
                "path": str(base_model_path),
                "max_length": 32,
                "fingerprint": fingerprint_model(base_model_path),  # as the server sends it
            },
            "task": {"kind": "classification", "labels": list(BANK_INTENTS)},
            "training": {"rounds": 3, "min_sites": 1, "head": {"rounds": 3, "local_steps": 2}},
            "privacy": {"default_epsilon_cap": 50.0},
        }
    )


def _write(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def rows() -> list[tuple[str, str]]:
    texts, labels = generate_bank_messages(120, 5)
    return [(t, BANK_INTENTS[y]) for t, y in zip(texts, labels, strict=True)]


class Bank:
    """One real site behind the production ClientApp, and a server that sends it whatever it likes."""

    def __init__(self, tmp: Path, spec: FederationSpec, name: str, train: Path, **site: object) -> None:
        self.node = 1000 + len(name)
        own = keys.generate_identity_key()
        state = tmp / name
        keys.save_identity_key(own, state / "identity.pem")
        peers = {name: keys.public_key_to_hex(own)}
        peers |= {p: keys.public_key_to_hex(keys.generate_identity_key()) for p in PEERS}
        self.site = SiteSpec(
            name=name, data=DataSpec(train=train, **site.pop("data", {})), state_dir=state, peers=peers, **site
        )  # type: ignore[arg-type]
        self.spec = spec
        self.app = make_client_app(lambda _: self.site, in_process=True)
        self.context = Context(RUN, self.node, {}, RecordDict(), {})
        self.state = adapter_state(get_site(self.site, spec).loaded.model)

    def send(
        self,
        kind: str,
        round_: int,
        *,
        rounds: int | None = None,
        secure: bool = True,
        spec: FederationSpec | None = None,
        tag_round: int | None = None,
    ) -> Message:
        spec = spec or self.spec
        config = ConfigRecord(
            {
                "federation": spec.model_dump_json(),
                "run": "r1",
                "round": round_,
                "rounds": spec.training.rounds if rounds is None else rounds,
            }
        )
        content = RecordDict({"global": to_record(self.state), "config": config})
        if secure:
            participants = [(self.node, self.site.name), *((n, p) for p, n in PEERS.items())]
            tag = RoundTag.new(RUN, round_ if tag_round is None else tag_round)
            server = SecAggServer(tag, participants, 3, QuantSpec(0.5, 3))
            content["secagg"] = ConfigRecord(server.advertise_request().to_dict())
        return self.app(Message(content, dst_node_id=self.node, message_type=kind), self.context)

    def summed_scores(self) -> np.ndarray:
        """The score coordinates this site put into the round's secure sum (kept on the site until masking)."""
        return self.context.state["secagg-input"]["x"].numpy()[-scores.LENGTH :]

    def spends(self) -> int:
        ledger = PrivacyLedger(Path(self.site.state_dir) / "ledger.sqlite")
        try:
            return len(ledger.entries())
        finally:
            ledger.close()


def test_a_round_without_secure_aggregation_is_declined_before_any_spend(
    tmp_path: Path, spec: FederationSpec, rows: list
) -> None:
    """The downgrade: a training message without the `secagg` record. The site sends no delta, no row count and
    no scores, and spends nothing, unless its own file allows plaintext rounds."""
    bank = Bank(tmp_path, spec, "downgraded", _write(tmp_path / "a.csv", rows), share_eval_metrics=True)
    reply = bank.send("train", 1, secure=False)
    assert "decline" in reply.content and "allow_plaintext" in str(reply.content["decline"]["reason"])
    assert not {"delta", "scores", "keys"} & set(reply.content)
    assert "num-examples" not in reply.content["metrics"]
    assert bank.spends() == 0
    with pytest.raises(MeterRefused, match="allow_plaintext"):
        bank.send("evaluate", 3, secure=False)


def test_by_default_no_held_out_figure_leaves_and_the_spend_is_rounded(
    tmp_path: Path, spec: FederationSpec, rows: list
) -> None:
    bank = Bank(tmp_path, spec, "quiet", _write(tmp_path / "a.csv", rows))
    reply = bank.send("train", 1)
    assert "keys" in reply.content and "scores" not in reply.content
    assert np.all(bank.summed_scores() == 0)
    metrics = dict(reply.content["metrics"])
    assert set(metrics) == {"epsilon", "epsilon-cap"}  # no sigma, no row count
    assert metrics["epsilon"] > 0 and round(metrics["epsilon"] * 10) == pytest.approx(metrics["epsilon"] * 10)


def test_scores_leave_once_per_round_trained_within_the_announced_rounds(
    tmp_path: Path, spec: FederationSpec, rows: list
) -> None:
    bank = Bank(tmp_path, spec, "metered", _write(tmp_path / "a.csv", rows), secure_scores=True)
    bank.send("train", 1)
    first = bank.summed_scores()
    assert first[1] > 0  # the adapter it was sent, scored on its held-out rows (rows coordinate)
    # The same round again (a fresh tag): the ledger refuses the spend, so no score either.
    reply = bank.send("train", 1)
    assert "decline" in reply.content and np.all(bank.summed_scores() == 0)
    # Round numbers past the run, another run length, a final evaluation it did not train for: refused.
    with pytest.raises(MeterRefused, match="outside the run's announced rounds"):
        bank.send("train", 300)
    with pytest.raises(MeterRefused, match=r"training\.rounds = 3"):
        bank.send("train", 2, rounds=40)  # the meter's bound is the federation's own run length
    longer = spec.model_copy(update={"training": spec.training.model_copy(update={"rounds": 40})})
    with pytest.raises(MeterRefused, match="began as"):
        bank.send("train", 2, spec=longer)
    with pytest.raises(MeterRefused, match="after training in the run's last round"):
        bank.send("evaluate", 3)
    # The run goes on: rounds 2 and 3 are scored once each, then the final adapter once.
    bank.send("train", 2)
    assert bank.summed_scores()[1] > 0
    bank.send("train", 3)
    bank.send("evaluate", 3)
    assert bank.summed_scores()[1] > 0
    with pytest.raises(MeterRefused):
        bank.send("evaluate", 3)
    assert bank.spends() == 3


def test_a_site_that_declines_sends_no_scores(tmp_path: Path, spec: FederationSpec, rows: list) -> None:
    broke = Bank(tmp_path, spec, "broke", _write(tmp_path / "a.csv", rows), secure_scores=True, share_eval_metrics=True)
    tight = spec.model_copy(update={"privacy": spec.privacy.model_copy(update={"target_delta": 1e-3})})
    broke.spec = tight  # asks for a larger delta than the site's: declined
    reply = broke.send("train", 1)
    assert "decline" in reply.content and "scores" not in reply.content
    assert np.all(broke.summed_scores() == 0)


def test_the_label_prior_never_enters_released_scores(tmp_path: Path, spec: FederationSpec, rows: list) -> None:
    """The review removed one training row and saw the released loss move by 300 quantisation steps: the site's
    label prior (its training-label frequencies) was added to the logits it scored with. Released figures are now
    scored without it: two sites whose training rows differ in one row release the same scores, to the bit."""
    held = _write(tmp_path / "held.csv", rows[:30])
    full = _write(tmp_path / "full.csv", rows[30:])
    minus_one = _write(tmp_path / "minus.csv", rows[31:])
    a = Bank(tmp_path, spec, "with-row", full, secure_scores=True, data={"eval": held})
    b = Bank(tmp_path, spec, "without-row", minus_one, secure_scores=True, data={"eval": held})
    assert get_site(a.site, spec).logit_shift is not None  # the prior exists, and differs between the two
    assert not np.array_equal(get_site(a.site, spec).logit_shift, get_site(b.site, spec).logit_shift)
    a.send("train", 1)
    b.send("train", 1)
    assert np.array_equal(a.summed_scores(), b.summed_scores())


def test_a_decline_says_why_without_numbers_that_tell_the_row_count(
    tmp_path: Path, spec: FederationSpec, rows: list
) -> None:
    """The review's row-count oracle: a spec with a tiny fixed sigma and batch 1 makes the site decline with
    "would bring epsilon from 0.000 to 27.691", and that epsilon (at q = 1/rows, steps = rows) gives the row count;
    declines spend nothing, so it repeats for free. The reply now carries a fixed sentence; the detail stays in the
    site's ledger. A declining site's advert says it brings nothing (role 0), so no site counts it."""
    bank = Bank(tmp_path, spec, "oracle", _write(tmp_path / "a.csv", rows))
    training = spec.training.model_copy(
        update={"batch_size": 1, "local_epochs": 1.0, "head": spec.training.head.model_copy(update={"rounds": 0})}
    )
    bank.spec = spec.model_copy(
        update={"training": training, "privacy": spec.privacy.model_copy(update={"noise_multiplier": 0.3})}
    )
    reply = bank.send("train", 1)
    reason = str(reply.content["decline"]["reason"])
    assert reason == f"site oracle: {BUDGET_REFUSED}" and not any(ch.isdigit() for ch in BUDGET_REFUSED)
    assert int(reply.content["keys"]["role"]) == 0
    ledger = PrivacyLedger(Path(bank.site.state_dir) / "ledger.sqlite")
    try:
        assert "epsilon" in ledger.declines()[-1][2]  # the detail, at the site
    finally:
        ledger.close()


def test_a_round_the_site_would_refuse_on_its_face_costs_no_budget(
    tmp_path: Path, spec: FederationSpec, rows: list
) -> None:
    """The review burned a site's budget with rounds it then refused (two participants, a threshold below its
    floor): the spend came first. The request is now checked before the site trains."""
    bank = Bank(tmp_path, spec, "burn", _write(tmp_path / "a.csv", rows))
    config = ConfigRecord(
        {"federation": spec.model_dump_json(), "run": "r1", "round": 1, "rounds": spec.training.rounds}
    )
    two = SecAggServer(RoundTag.new(RUN, 1), [(bank.node, bank.site.name), (901, "peer-a")], 2, QuantSpec(0.5, 2))
    content = RecordDict(
        {
            "global": to_record(bank.state),
            "config": config,
            "secagg": ConfigRecord(two.advertise_request().to_dict()),
        }
    )
    with pytest.raises(SecAggConfigError, match="at least 3 sites"):
        bank.app(Message(content, dst_node_id=bank.node, message_type="train"), bank.context)
    assert bank.spends() == 0


def test_an_uncapped_site_never_takes_a_looser_cap_from_the_federation(tmp_path: Path, spec: FederationSpec) -> None:
    site = SiteSpec(name="uncapped", data=DataSpec(train=tmp_path / "x.csv"), state_dir=tmp_path / "s")
    loose = spec.model_copy(update={"privacy": spec.privacy.model_copy(update={"default_epsilon_cap": 1e6})})
    strict = spec.model_copy(update={"privacy": spec.privacy.model_copy(update={"default_epsilon_cap": 2.0})})
    assert site.cap_under(loose) == SITE_EPSILON_CAP and site.cap_under(strict) == 2.0


def test_a_label_list_that_leaves_one_out_reads_nothing_of_the_file(
    tmp_path: Path, spec: FederationSpec, rows: list
) -> None:
    """The server sends a label list without one of the site's labels: the site cannot read its file. The error it
    raised named the file, the line and the label, and went back unlogged; now the server reads one fixed sentence
    (no label, no line), the site's log keeps the reason, and the egress log holds the error reply like any other."""
    from fedtune.client.audit import EgressLog, egress_path
    from fedtune.client.client_app import SITE_FAILED, SiteFailed

    bank = Bank(tmp_path, spec, "probed", _write(tmp_path / "a.csv", rows))
    held = sorted({label for _, label in rows})
    bank.spec = spec.model_copy(
        update={"task": spec.task.model_copy(update={"labels": [x for x in spec.task.labels if x != held[0]]})}
    )
    with pytest.raises(SiteFailed) as info:
        bank.send("train", 1)
    assert str(info.value) == SITE_FAILED
    text = str(info.value)
    assert held[0] not in text and "a.csv" not in text and not any(c.isdigit() for c in text)
    errors = [e for e in EgressLog(egress_path(bank.site.state_dir)).entries() if e.kind == "error"]
    assert len(errors) == 1 and errors[0].round == 1
    assert bank.spends() == 0


def test_a_declined_distributed_step_earns_no_final_score(tmp_path: Path, spec: FederationSpec, rows: list) -> None:
    """A federation asking for a larger delta than the site's: every distributed step is declined (noise only, no
    spend). Those rounds must not count as trained, or the site would score the final adapter for free."""
    from fedtune.client import distributed
    from fedtune.client.scoring import ScoreMeter

    bank = Bank(tmp_path, spec, "declines", _write(tmp_path / "a.csv", rows), min_honest_sites=2)
    loose = spec.model_copy(update={"privacy": spec.privacy.model_copy(update={"target_delta": 1e-3})})
    site = get_site(bank.site, loose)
    out = distributed.StepOut(np.zeros(1, np.uint32), "r1.x", declined="declined: delta")
    calls = []

    def declining(message: Message, context: Context, s: object, *, may_score: bool = False) -> distributed.StepOut:
        calls.append(s)
        return out

    app = bank.app
    original = distributed.step
    distributed.step = declining  # the site's own decision under test is the meter's, not the step's
    try:
        bank.spec = loose
        for round_ in (1, 2, 3):
            content = RecordDict(
                {
                    "config": ConfigRecord(
                        {"federation": loose.model_dump_json(), "run": "r1", "round": round_, "rounds": 3}
                    ),
                    "dstep": ConfigRecord({"session": "00", "step": round_}),
                }
            )
            app(Message(content, dst_node_id=bank.node, message_type="train.dp_step"), bank.context)
    finally:
        distributed.step = original
    assert len(calls) == 3 and site is not None
    assert not ScoreMeter.admit(bank.context, "r1", 3, 3).may_score_final(3)
    with pytest.raises(MeterRefused):
        bank.send("evaluate", 3)


def test_a_server_named_base_model_directory_learns_nothing_of_the_site_s_files(
    tmp_path: Path, spec: FederationSpec, rows: list
) -> None:
    """A site without its own `base_model_path` checks the directory the server names. The refusal said whether the
    directory existed, whether it held weights and 16 hex digits of their hash; now the same sentence for any."""
    from fedtune.client.client_app import BASE_MODEL_REFUSED

    bank = Bank(tmp_path, spec, "probed", _write(tmp_path / "a.csv", rows))
    weights = tmp_path / "elsewhere"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"not the federation's model")
    dangling = tmp_path / "dangling"
    dangling.mkdir()
    (dangling / "cohort-2024.safetensors").symlink_to(tmp_path / "gone")
    real = fingerprint_model(spec.base_model.path)
    reasons = []
    probes = [(tmp_path / "no-such-directory", real), (tmp_path, real), (weights, real), (dangling, real)]
    for probe, fingerprint in [*probes, (weights, "")]:  # no fingerprint: "ok" would say the folder holds weights
        named = {"path": str(probe), "fingerprint": fingerprint}
        bank.spec = spec.model_copy(update={"base_model": spec.base_model.model_copy(update=named)})
        reply = bank.send("query", 1, secure=False)
        reasons.append(str(reply.content["decline"]["reason"]))
    assert reasons == [BASE_MODEL_REFUSED] * 5


def test_a_bounded_lora_that_overflows_on_some_rows_still_gets_a_normal_reply(
    tmp_path: Path, spec: FederationSpec, rows: list
) -> None:
    """Values within the 1e4 bound on chained LoRA modules (intermediate.dense -> output.dense) overflow float32 for
    some rows only, and those rows' pooled features came out NaN: the head's update was NaN, and the site refused
    it after its spend, which answered whether such a row was there. Now such rows count as zero features: the
    site replies as for any round, with a finite update under its masks, and its features are all finite."""
    from fedtune.client.tasks import pooled_dataset

    chained = spec.model_copy(
        update={"lora": spec.lora.model_copy(update={"target_modules": ["intermediate.dense", "output.dense"]})}
    )
    bank = Bank(tmp_path, chained, "overflowed", _write(tmp_path / "a.csv", rows), secure_scores=True)
    sign = np.random.default_rng(0)
    for name, value in bank.state.items():
        if "lora_A" in name:
            value[:] = 1e4 * np.sign(sign.standard_normal(value.shape))
        elif "lora_B" in name:
            value[:] = 1e4
    site = get_site(bank.site, chained)
    from fedtune.common.adapter import load_adapter_state

    load_adapter_state(site.loaded.model, bank.state)
    features = pooled_dataset(site.loaded.model, site.train_data).tensors[0]
    assert torch.isfinite(features).all()
    assert (features.abs().sum(dim=1) == 0).any()  # the overflowing rows, tamed to zero
    reply = bank.send("train", 1)
    assert "keys" in reply.content and "decline" not in reply.content
    assert bank.spends() == 1


def test_a_held_out_loss_that_is_not_finite_still_counts_its_rows_and_keeps_the_role():
    """Zeros for a NaN loss told the server, through the signed role (`scored.any()`), the round's row count and
    a zero scorer whose figures let two colluders isolate a victim's, whether some held-out row met its adapter's
    condition. Now such a loss counts as LOSS_CAP a row, the rows stay, and the role comes from settings alone."""
    from fedtune.client import distributed
    from fedtune.client.client_app import _brings_scores
    from fedtune.client.tasks import EvalResult

    nan = EvalResult(num_examples=40, loss=float("nan"), accuracy=0.25, perplexity=None)
    fine = EvalResult(num_examples=40, loss=2.0, accuracy=0.25, perplexity=None)
    coded = scores.encode(40, float("nan"), 0.25, 1.0, 100)
    assert coded[1] == scores.encode(40, 2.0, 0.25, 1.0, 100)[1] > 0  # the rows count
    assert coded[2] == pytest.approx(40 / 100)  # LOSS_CAP a row: the top of the loss coordinate
    site = SiteSpec(name="s", data=DataSpec(train=Path("unused.csv")), secure_scores=True)
    assert _brings_scores(site, nan) and _brings_scores(site, fine)
    stand_in = type(
        "S", (), {"spec": FederationSpec.model_validate({"base_model": {"path": "x"}, "task": {"labels": ["a", "b"]}})}
    )
    figures = distributed._figures(stand_in, nan, 3)
    assert figures[1] == 40 and figures[2] == scores.LOSS_CAP * 40 * scores.loss_units(3, 100_000)


def test_an_unreadable_config_s_error_reply_is_in_the_egress_log_as_sent(
    tmp_path: Path, spec: FederationSpec, rows: list
) -> None:
    """A federation the site cannot parse: the refusal (public: its words come from the message) leaves, and the
    egress log holds it, as the text Flower sends, under run "" and round 0."""
    import json

    from pydantic import ValidationError

    from fedtune.client.audit import EgressLog, egress_path

    bank = Bank(tmp_path, spec, "garbled", _write(tmp_path / "a.csv", rows))
    config = ConfigRecord({"federation": "{", "run": "r1", "round": 1, "rounds": 3})
    message = Message(RecordDict({"config": config}), dst_node_id=bank.node, message_type="train")
    with pytest.raises(ValidationError) as info:
        bank.app(message, bank.context)
    (entry,) = [e for e in EgressLog(egress_path(bank.site.state_dir)).entries() if e.kind == "error"]
    assert (entry.run, entry.round) == ("", 0)
    sent = str(type(info.value)) + ":<'" + str(info.value) + "'>"
    assert entry.bytes == len(json.dumps({"reason": sent}, sort_keys=True).encode())


@pytest.mark.parametrize("probe", ["max-length-past-positions", "no-fingerprint-loadable", "no-fingerprint-missing"])
def test_what_a_message_asks_of_the_model_is_refused_before_any_row_is_read(
    tmp_path: Path, spec: FederationSpec, rows: list, probe: str
) -> None:
    """A max_length past MiniLM's 512 learned positions failed only on a batch with a row that long (a membership
    bit, free where the site scores before training); a train message without a fingerprint loaded any folder the
    server named (whether it loads was the answer). Both are refused from the message: the same fixed sentence
    with or without a long row, for a loadable and a missing folder alike, nothing spent."""
    from fedtune.client.client_app import SITE_FAILED, SiteFailed

    long_row = ("word " * 700, rows[0][1])
    outcomes = []
    for variant, data in (("a", rows), ("b", [*rows, long_row])):
        base = spec.base_model
        if probe == "max-length-past-positions":
            base = base.model_copy(update={"max_length": 1024})
        elif probe == "no-fingerprint-loadable":
            base = base.model_copy(update={"fingerprint": None})
        else:
            base = base.model_copy(update={"fingerprint": None, "path": str(tmp_path / f"missing-{variant}")})
        bank = Bank(tmp_path / variant, spec, "probed", _write(tmp_path / f"{variant}.csv", data), secure_scores=True)
        bank.spec = spec.model_copy(update={"base_model": base})
        with pytest.raises(SiteFailed) as info:
            bank.send("train", 1)
        outcomes.append(str(info.value))
        assert bank.spends() == 0
    assert outcomes == [SITE_FAILED, SITE_FAILED]


def test_a_head_row_whose_logits_overflow_adds_nothing():
    """Within a round the head can grow past the bound a site checks on receipt (the noise of a step at a large
    clip and step size): a row whose logits overflow gets a zero loss and a zero gradient, not a NaN update."""
    from fedtune.client.site import _head_loss

    head = torch.nn.Linear(3, 2)
    with torch.no_grad():
        head.weight.fill_(1e30)
    features = torch.tensor([[1e10, 0.0, 0.0], [1e-30, 0.0, 0.0]])
    losses = _head_loss(head, (features, torch.tensor([0, 1])))
    assert torch.isfinite(losses).all() and losses[0] == 0
    losses.sum().backward()
    assert torch.isfinite(head.weight.grad).all() and torch.isfinite(head.bias.grad).all()


def test_a_clip_norm_too_small_to_scale_is_refused_by_the_spec():
    """At a clip below about 3e-36, CLIP_UNITS / clip overflowed float32 and every sampled row broke the norm
    bound; the spec now keeps the clip within [1e-6, 1e3]."""
    from pydantic import ValidationError

    for clip in (1e-40, 1e6):
        with pytest.raises(ValidationError):
            FederationSpec.model_validate(
                {"base_model": {"path": "x"}, "task": {"labels": ["a", "b"]}, "privacy": {"max_grad_norm": clip}}
            )


def test_a_fixed_sigma_past_the_top_or_infinite_is_refused_by_the_spec():
    """A sigma of 1e6 made a round (and the held-out scores it releases) cost about nothing; an infinite one hung
    the accountant while it held the ledger's write lock (review round 4). The spec keeps sigma within [0.3, 64]."""
    from pydantic import ValidationError

    def privacy(sigma: str) -> FederationSpec:
        spec = '{"base_model": {"path": "x"}, "task": {"labels": ["a", "b"]}, "privacy": {"noise_multiplier": SIGMA}}'
        return FederationSpec.model_validate_json(spec.replace("SIGMA", sigma))

    assert privacy("64").privacy.noise_multiplier == 64
    for sigma in ("1e6", "Infinity", "1e309", "NaN"):
        with pytest.raises(ValidationError):
            privacy(sigma)


def test_held_out_figures_leave_at_most_max_score_releases_times(
    tmp_path: Path, spec: FederationSpec, rows: list
) -> None:
    """The free-scores attack (review round 4): the server makes rounds nearly free (sigma at its top, one step on a
    sliver of the rows) and reads an exact score of an adapter of its choosing each round. However cheap the round,
    the ledger counts every release of this dataset's held-out figures and stops them at the site's cap; the site
    still trains and is charged."""
    cheap = spec.model_copy(
        update={
            "privacy": spec.privacy.model_copy(update={"noise_multiplier": 64.0}),
            "training": spec.training.model_copy(
                update={"head": spec.training.head.model_copy(update={"local_steps": 1, "batch_fraction": 0.01})}
            ),
        }
    )
    bank = Bank(
        tmp_path, cheap, "capped", _write(tmp_path / "a.csv", rows), share_eval_metrics=True, max_score_releases=2
    )
    released = [("scores" in bank.send("train", r).content) for r in (1, 2, 3)]
    assert released == [True, True, False]
    assert "scores" not in bank.send("evaluate", 3).content
    assert bank.spends() == 3  # every round trained and charged; only the figures stayed
    with PrivacyLedger(Path(bank.site.state_dir) / "ledger.sqlite") as ledger:
        assert ledger.entries()[-1].epsilon_after < 0.01  # what made the attack cheap: the cap does not rely on it


def test_a_final_score_request_refused_on_its_face_uses_up_nothing(
    tmp_path: Path, spec: FederationSpec, rows: list
) -> None:
    """Review round 6: `evaluate` counted a release and used the run's one final score before checking the secure
    round's request; now a request the site refuses (a round tag of another round) costs neither."""
    bank = Bank(tmp_path, spec, "final", _write(tmp_path / "a.csv", rows), secure_scores=True)
    for round_ in (1, 2, 3):
        bank.send("train", round_)
    with pytest.raises(SecAggError):
        bank.send("evaluate", 3, tag_round=2)
    reply = bank.send("evaluate", 3)
    assert "keys" in reply.content and bank.summed_scores()[1] > 0  # the final adapter, scored once
    with PrivacyLedger(Path(bank.site.state_dir) / "ledger.sqlite") as ledger:
        assert ledger._query("SELECT COUNT(*) FROM releases")[0][0] == 4  # rounds 0, 1, 2 and the final one


def test_a_site_that_holds_out_no_rows_trains_and_is_charged_once_per_round(
    tmp_path: Path, spec: FederationSpec, rows: list
) -> None:
    """Review round 7: with eval_fraction = 0 the held-out features failed after the spend, every round: the
    server could drain the budget with nothing trained. Features now come first, and zero held-out rows are fine."""
    bank = Bank(tmp_path, spec, "no-holdout", _write(tmp_path / "a.csv", rows), data={"eval_fraction": 0.0})
    for round_ in (1, 2):
        reply = bank.send("train", round_)
        assert "keys" in reply.content and "decline" not in reply.content
    assert bank.spends() == 2


def test_features_are_cached_per_lora_setting(tmp_path: Path, spec: FederationSpec, rows: list) -> None:
    """Review round 7: the cache name left out lora.alpha, so features computed under one alpha were reused under
    another (same tensors, a different encoder)."""
    from fedtune.client.site import Site

    bank = Bank(tmp_path, spec, "cache", _write(tmp_path / "a.csv", rows))
    louder = spec.model_copy(update={"lora": spec.lora.model_copy(update={"alpha": spec.lora.alpha * 4})})
    names = {Site(bank.site, s)._features_file("same-tensors") for s in (spec, louder)}
    assert len(names) == 2
