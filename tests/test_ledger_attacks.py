"""A malicious server against the site's privacy ledger: each attack of the review, rebuilt on the real Site and
ledger, now yields nothing (the round is refused, or its spend is charged to the budget the rows already have).

10. renamed labels; 11. near-identical text; 10/11 a ledger written by the hashing before; 12. a fresh run id each
round against `epsilon_per_run`; 13. a rolled-back ledger whose high-water mark went too; 14. a delta no accountant
can compose at.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sqlite3
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtune.client.audit import EgressLog, egress_path, logged_spends
from fedtune.client.ledger import (
    DatasetIdentity,
    LedgerRolledBack,
    PrivacyLedger,
    classification_identity,
    hwm_path,
    instruction_identity,
    normalise,
    restore,
    verify,
)
from fedtune.common.config import DataSpec, FederationSpec, SiteSpec
from fedtune.common.data import dataset_fingerprint, load_classification
from fedtune.common.privacy import epsilon_spent
from fedtune.common.synthetic import BANK_INTENTS

DELTA = 1e-5
TITLED = [name.title() for name in BANK_INTENTS]  # 'card_lost' -> 'Card_Lost': the server's renaming


def _spec(tiny_spec: FederationSpec, labels: list[str] | None = None, **privacy: object) -> FederationSpec:
    """The tiny federation with the cheap RDP accountant, optionally with the labels the server renamed."""
    update: dict[str, object] = {"privacy": tiny_spec.privacy.model_copy(update={"accountant": "rdp", **privacy})}
    if labels is not None:
        update["task"] = tiny_spec.task.model_copy(update={"labels": labels})
    return tiny_spec.model_copy(update=update)


def _csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in rows), encoding="utf-8")
    return path


def _indexed_rows(n: int = 80) -> list[tuple[str, str]]:
    """A file that stores labels as indices ("3"), as many exports do."""
    return [(f"message number {i} about my card", str(i % len(BANK_INTENTS))) for i in range(n)]


def _site_spec(tmp_path: Path, train: Path, **site: object) -> SiteSpec:
    """A site with the cap of the test federation (50) unless the test names its own."""
    site = {"epsilon_cap": 50.0, **site}
    return SiteSpec(name="bank", data=DataSpec(train=train), state_dir=tmp_path / "state", **site)  # type: ignore[arg-type]


def _identity(path: Path, labels: list[str] | tuple[str, ...] = BANK_INTENTS) -> DatasetIdentity:
    """What `Site._load_data` computes for a train file under the federation's `labels`."""
    data = load_classification(path, "text", "label", labels)
    return classification_identity(
        data.texts, data.labels, labels, values=data.values, source=dataset_fingerprint(path)
    )


# -- 10. renamed labels -------------------------------------------------------------------------------------


def test_renamed_labels_keep_the_budget_of_an_index_labelled_file(tmp_path, tiny_spec):
    from fedtune.client.site import Declined, Site

    train = _csv(tmp_path / "bank.csv", _indexed_rows())
    site_spec = _site_spec(tmp_path, train, epsilon_cap=8.0)
    first = Site(site_spec, _spec(tiny_spec))
    spent = first.commit_spend("run-1", 1, rounds_total=1).epsilon_after
    assert 7.0 < spent <= 8.0  # one run planned to the cap
    first.ledger.close()

    renamed = Site(site_spec, _spec(tiny_spec, TITLED))
    # The attack: under label-name hashing not one of the 80 records stays the same.
    assert not renamed.identity.legacy & first.identity.legacy
    # The file's cells are what the site holds: the records are unchanged, and so is the budget.
    assert renamed.identity.records == first.identity.records
    assert renamed.dataset == first.dataset
    assert renamed.epsilon_spent() == pytest.approx(spent)
    try:  # the second full run: declined, or (at most) what the cap still leaves, charged to the same budget
        renamed.commit_spend("run-2", 1, rounds_total=1)
    except Declined as exc:
        assert "cap" in str(exc)
    assert {e.dataset for e in renamed.ledger.entries()} == {first.dataset}
    assert renamed.epsilon_spent() <= 8.0  # was 12.2


# -- 11. near-identical text ----------------------------------------------------------------------------------

VARIANTS = {
    "upper-cased": str.upper,
    "doubled inner spaces": lambda t: t.replace(" ", "  "),
    "zero-width spaces": lambda t: t.replace(" ", " \u200b"),
    "no-break spaces": lambda t: t.replace(" ", "\u00a0"),
    "decomposed accents": lambda t: unicodedata.normalize("NFD", t),
    "accents stripped": lambda t: t.replace("é", "e"),
    "fullwidth digits": lambda t: t.translate({ord(d): 0xFF10 + int(d) for d in "0123456789"}),
}


def _accented_rows(n: int = 40) -> list[tuple[str, str]]:
    return [(f"Café payment number {i} about my card", BANK_INTENTS[i % len(BANK_INTENTS)]) for i in range(n)]


def test_text_variants_a_tokenizer_cannot_tell_apart_hash_as_one_record(base_model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_model_path))
    text = "Café payment number 12 about my card"
    for what, variant in VARIANTS.items():
        if what != "fullwidth digits":  # (NFKC folds these; the tokenizer alone does not)
            assert tokenizer(variant(text))["input_ids"] == tokenizer(text)["input_ids"], what
        assert normalise(variant(text)) == normalise(text), what
    assert normalise(" a\t\r\nb\u2028c \u00ad") == "a b c"
    assert normalise("\u0130STANBUL") == normalise("istanbul")  # casefolding decomposes: accents after it
    # The same for prompts and responses.
    plain = instruction_identity(["Summarise the note"], ["The patient is well"])
    shouted = instruction_identity(["SUMMARISE  the \u200bnote "], ["The  patient is WELL"])
    assert plain.records == shouted.records and not plain.legacy & shouted.legacy


def test_near_identical_text_is_charged_to_the_original_budget(tmp_path, tiny_spec):
    from fedtune.client.site import Declined, Site

    rows = _accented_rows()
    original = _csv(tmp_path / "a.csv", rows)
    ledger = PrivacyLedger(tmp_path / "state" / "ledger.sqlite")
    first = ledger.commit(
        _identity(original), run_id="r1", round_=1, decide=lambda _: (1.0, 0.1, 100), delta=DELTA, accountant="rdp"
    )
    spent = ledger.epsilon(_identity(original), DELTA, "rdp")
    assert 7.5 < spent < 8.0
    for what, variant in VARIANTS.items():
        ident = _identity(_csv(tmp_path / "variant.csv", [(variant(t), y) for t, y in rows]))
        if what != "decomposed accents":  # (NFC already caught that one)
            assert not ident.legacy & _identity(original).legacy, what  # the attack under the old hashing
        assert ident.records == _identity(original).records, what
        assert ledger.resolve(ident)[0] == first.budget, what
        assert ledger.epsilon(ident, DELTA, "rdp") == pytest.approx(spent), what
    ledger.close()
    # A site on all the variants at once finds the history and declines a round past its cap.
    mixed = _csv(tmp_path / "mixed.csv", [(f"  {t.upper()}\u200b".replace(" ", "  "), y) for t, y in rows])
    site = Site(_site_spec(tmp_path, mixed, epsilon_cap=8.0), _spec(tiny_spec, noise_multiplier=1.0))
    assert site.dataset == first.budget and site.epsilon_spent() == pytest.approx(spent)
    with pytest.raises(Declined, match="cap"):
        site.commit_spend("r2", 1, rounds_total=1)
    assert len(site.ledger.entries()) == 1


# -- 10/11. a ledger written by the hashing before -----------------------------------------------------------


def _deployed_hash(kind: str, *fields: str) -> bytes:
    """The record hash ledgers deployed before this change hold, written out independently of the code."""
    digest = hashlib.sha256(kind.encode())
    for f in fields:
        data = unicodedata.normalize("NFC", f.replace("\r\n", "\n").replace("\r", "\n")).strip().encode()
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.digest()[:16]


def test_an_old_scheme_ledger_keeps_charging_after_the_upgrade(tmp_path, tiny_spec):
    from fedtune.client.site import Site

    rows = _indexed_rows()
    train = _csv(tmp_path / "bank.csv", rows)
    # The ledger as the old code wrote it: (text, label name) hashes, a budget keyed by them.
    old = frozenset(_deployed_hash("classification", t, BANK_INTENTS[int(y)]) for t, y in rows)
    path = tmp_path / "state" / "ledger.sqlite"
    with PrivacyLedger(path) as ledger:
        budget = ledger.commit(
            DatasetIdentity(old, source=dataset_fingerprint(train), rows=len(rows)), run_id="old-run", round_=1,
            decide=lambda _: (1.0, 0.1, 60), delta=DELTA, accountant="rdp",
        ).budget  # fmt: skip
        before = ledger.epsilon(budget, DELTA, "rdp")
    assert before > 0

    site = Site(_site_spec(tmp_path, train), _spec(tiny_spec, noise_multiplier=2.0))
    assert not site.identity.records & old  # the new hashes alone would start afresh
    assert site.dataset == budget and site.epsilon_spent() == pytest.approx(before)
    spend = site.commit_spend("new-run", 1, rounds_total=1)
    assert spend.epsilon_after > before
    assert {e.dataset for e in site.ledger.entries()} == {budget}  # charged to the old budget
    site.ledger.close()
    # The upgrade stored the new hashes: renaming the labels afterwards no longer loses the budget either.
    renamed = _identity(train, TITLED)
    assert not renamed.legacy & old
    with PrivacyLedger(path) as ledger:
        assert ledger.resolve(renamed)[0] == budget
        assert ledger.epsilon(renamed, DELTA, "rdp") == pytest.approx(spend.epsilon_after)


# -- 12. a fresh run id every round ---------------------------------------------------------------------------


def test_fresh_run_ids_share_one_allowance_per_window(tmp_path, tiny_spec):
    from fedtune.client.site import Declined, Site

    train = _csv(tmp_path / "bank.csv", _indexed_rows())
    site = Site(_site_spec(tmp_path, train, epsilon_cap=8.0, epsilon_per_run=2.0), _spec(tiny_spec))
    assert site.site.epsilon_window_hours == 24.0
    first = site.commit_spend("run-1", 1, rounds_total=1)
    assert 1.9 < first.epsilon_after <= 2.0
    for i in (2, 3, 4):  # the attack: one new run id per round, each asking for a fresh allowance
        with contextlib.suppress(Declined):
            site.commit_spend(f"run-{i}", 1, rounds_total=1)
        assert site.epsilon_spent() <= 2.0 + 1e-9  # was 2, 4, 6, 8
    spent = site.epsilon_spent()

    # Once the spends are older than the window (by the site's clock), the next run has its allowance again.
    with sqlite3.connect(site.ledger.path) as db:
        db.execute("UPDATE spends SET created = created - 25 * 3600")
    assert site.run_target("run-5") == pytest.approx(spent + 2.0)
    later = site.commit_spend("run-5", 1, rounds_total=1)
    assert spent + 1.5 < later.epsilon_after <= spent + 2.0
    # run-5 is inside the next run's window; run-1's own spend counts for its next attempt however old it is.
    assert site.run_target("run-6") == pytest.approx(spent + 2.0)
    others = [(e.noise_multiplier, e.sample_rate, e.steps) for e in site.ledger.entries() if e.run_id[-1] in "234"]
    assert site.run_target("run-1.2") == pytest.approx(epsilon_spent(others, site.delta, "rdp") + 2.0)
    # A spend without a timestamp counts as recent (fails closed).
    with sqlite3.connect(site.ledger.path) as db:
        db.execute("UPDATE spends SET created = 0 WHERE run_id = 'run-1'")
    assert site.run_target("run-6") == pytest.approx(2.0)


# -- 13. a rolled-back ledger -----------------------------------------------------------------------------------


def _reply(site, run: str, round_: int, *, plaintext: bool = False) -> None:
    """What the ClientApp's train handler logs for a round it trained (and paid for), after the spend."""
    from fedtune.client.site import egress_log

    spend = site.commit_spend(run, round_, rounds_total=10)
    metrics = MetricRecord({"epsilon": round(spend.epsilon_after, 1), "epsilon-cap": site.epsilon_cap})
    content = RecordDict({"metrics": metrics, "info": ConfigRecord({"site": site.site.name})})
    kinds = {"metrics": "metrics", "info": "metrics"}
    if plaintext:
        content["delta"] = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
        kinds["delta"] = "adapter-delta"
    else:
        content["keys"], kinds["keys"] = ConfigRecord({"pk": b"x" * 32}), "public-keys"
    egress_log(site.site).record(run=run, round_=round_, kinds=kinds, content=content, delivered=True, spend=True)


def _decline_reply(site, run: str, round_: int) -> None:
    from fedtune.client.site import egress_log

    content = RecordDict(
        {"decline": ConfigRecord({"reason": "cap"}), "metrics": MetricRecord({"declined": 1, "epsilon": 1.0})}
    )
    kinds = {"decline": "decline", "metrics": "metrics"}
    egress_log(site.site).record(run=run, round_=round_, kinds=kinds, content=content, delivered=True, spend=False)


def _put_back(path: Path, copy: Path, mark: Path | None) -> None:
    """Replace the ledger with an older copy, and its high-water mark with the copy's (or none)."""
    for side in ("-wal", "-shm"):
        Path(f"{path}{side}").unlink(missing_ok=True)
    shutil.copy(copy, path)
    if mark is None:
        hwm_path(path).unlink(missing_ok=True)
    else:
        shutil.copy(mark, hwm_path(path))


def test_a_rolled_back_ledger_is_refused_by_the_egress_log_even_without_its_mark(tmp_path, tiny_spec):
    from fedtune.client.site import Declined, Site

    train = _csv(tmp_path / "bank.csv", _indexed_rows())
    site_spec = _site_spec(tmp_path, train)
    spec = _spec(tiny_spec, noise_multiplier=2.0)
    site = Site(site_spec, spec)
    path = site.ledger.path
    _reply(site, "run-1", 1)
    snapshot = tmp_path / "snapshot.sqlite"
    site.ledger.backup(snapshot)
    snapshot_mark = tmp_path / "snapshot.hwm"
    shutil.copy(hwm_path(path), snapshot_mark)
    _reply(site, "run-1", 2, plaintext=True)
    _reply(site, "run-1", 3)
    _decline_reply(site, "run-1", 4)  # declines spent nothing and are not asked for
    spent = site.epsilon_spent()
    latest = tmp_path / "latest.sqlite"
    site.ledger.backup(latest)
    site.ledger.close()
    log = egress_path(site_spec.state_dir)
    assert logged_spends(log) == {("run-1", 1): 1, ("run-1", 2): 1, ("run-1", 3): 1}
    PrivacyLedger(path).close()  # the whole ledger opens: every logged spend is in it

    for mark in (None, snapshot_mark):  # mark deleted, or restored from the snapshot along with the ledger
        _put_back(path, snapshot, mark)
        with pytest.raises(LedgerRolledBack) as refused:
            PrivacyLedger(path)
        message = str(refused.value)
        assert "egress" in message and "run run-1 round 2" in message and "2 spend(s)" in message
        assert "fedtune client ledger restore" in message and "\n" not in message
        assert (mark is None) == (not hwm_path(path).exists())  # no fresh mark blesses the old copy
        restarted = Site(site_spec, spec)
        assert restarted.ledger is None and restarted.epsilon_spent() >= 0
        with pytest.raises(Declined, match="rolled back"):
            restarted.commit_spend("run-1", 5, rounds_total=10)
        result = verify(path)
        assert not result.ok and any(line.startswith("behind the egress log") for line in result.lines)

    # The way back: a backup that holds every logged spend restores; the old copy only when forced.
    with pytest.raises(LedgerRolledBack, match="older than the egress log"):
        restore(path, snapshot)
    restore(path, latest)
    with PrivacyLedger(path) as ledger:
        assert len(ledger.entries()) == 3
    assert Site(site_spec, spec).epsilon_spent() == pytest.approx(spent)
    lines = restore(path, snapshot, force=True)
    assert any("waived" in line for line in lines)
    PrivacyLedger(path).close()  # the administrator's forced choice is kept
    assert verify(path).ok


def test_egress_lines_logged_before_the_spend_field_are_still_counted(tmp_path):
    """Old lines carry no `spend`: a delta, or metrics with the spend's keys (sigma, then the cap), mark a spend."""
    log = tmp_path / "egress.jsonl"

    def line(run: str, round_: int, kind: str, record: str, detail: str, reply: str) -> str:
        entry = {"time": time.time(), "run": run, "round": round_, "kind": kind, "record": record, "bytes": 1,
                 "sha256": "0" * 64, "detail": detail, "reply": reply}  # fmt: skip
        return json.dumps(entry) + "\n"

    log.write_text(
        line("a", 1, "metrics", "metrics", "keys: epsilon, epsilon-cap, noise-multiplier", "x1")
        + line("a", 1, "adapter-delta", "delta", "2 arrays: w", "x1")
        + line("a", 2, "metrics", "metrics", "keys: epsilon, epsilon-cap", "x2")
        + line("a", 3, "metrics", "metrics", "keys: declined, epsilon", "x3")
        + line("a", 3, "decline", "decline", "keys: reason", "x3")
        + '{"time": 1.0, "delivered": "x1"}\n'
        + '{"run": "a", "round": 9, "kind": "adapter-de'  # a crash mid-append
    )
    assert logged_spends(log) == {("a", 1): 1, ("a", 2): 1}
    ledger = PrivacyLedger(tmp_path / "fresh.sqlite", checked=False)
    assert [(run, round_) for run, round_, _ in ledger.egress_shortfall()] == [("a", 1), ("a", 2)]
    ledger.close()
    # A long log of other replies is read without parsing them all: a site's every open stays cheap.
    PrivacyLedger(tmp_path / "long" / "ledger.sqlite").close()
    filler = EgressLog(tmp_path / "long" / "egress.jsonl")
    content = RecordDict({"shares": ConfigRecord({"s": b"y" * 8})})
    for r in range(200):
        filler.record(
            run="b", round_=r, kinds={"shares": "encrypted-shares"}, content=content, delivered=True, spend=False
        )
    assert logged_spends(filler.path) == {}
    with PrivacyLedger(tmp_path / "long" / "ledger.sqlite") as fresh:  # no spend logged: nothing to hold
        assert fresh.egress_shortfall() == []


# -- 14. a delta no accountant can compose at -------------------------------------------------------------------


@pytest.mark.parametrize("target_delta", [1e-30, 1e-13])
def test_an_absurd_federation_delta_is_declined_without_a_crash(tmp_path, tiny_spec, target_delta):
    from fedtune.client.site import Declined, Site, accounting_delta

    train = _csv(tmp_path / "bank.csv", _indexed_rows())
    site_spec = _site_spec(tmp_path, train)
    spec = _spec(tiny_spec, target_delta=target_delta, accountant="prv")
    assert accounting_delta(site_spec, spec) == site_spec.privacy_delta  # not an unusable delta
    site = Site(site_spec, spec)
    with pytest.raises(Declined) as declined:
        site.commit_spend("run-1", 1, rounds_total=1)
    reason = str(declined.value)
    assert f"target_delta = {target_delta:g}" in reason and "between 1e-12 and 1e-05" in reason
    assert site.ledger.entries() == [] and site.ledger.declines()[-1][:2] == ("run-1", 1)
    assert site.epsilon_spent() == 0.0  # what a decline reports is computable


def test_an_accountant_error_at_commit_is_a_decline(tmp_path, tiny_spec, monkeypatch):
    from opacus.accountants import RDPAccountant

    from fedtune.client.site import Declined, Site
    from fedtune.common import privacy

    def refuse(self, delta, **kwargs):  # what Opacus raises for a delta its numerics cannot reach
        raise ValueError("Floating point errors will dominate for such small values of delta.")

    train = _csv(tmp_path / "bank.csv", _indexed_rows())
    site = Site(_site_spec(tmp_path, train), _spec(tiny_spec, noise_multiplier=2.0))
    monkeypatch.setattr(RDPAccountant, "get_epsilon", refuse)
    privacy._epsilon.cache_clear()
    try:
        with pytest.raises(Declined) as declined:
            site.commit_spend("run-1", 1, rounds_total=1)
    finally:
        privacy._epsilon.cache_clear()
    reason = str(declined.value)
    assert "Floating point errors" in reason and "Nothing was spent" in reason and "privacy_delta" in reason
    assert site.ledger.entries() == [] and site.ledger.declines()[-1][:2] == ("run-1", 1)


@pytest.mark.parametrize("sigma", [1e6, float("inf"), 0.01])
def test_a_fixed_spend_outside_the_noise_a_site_composes_is_declined(tmp_path, tiny_spec, sigma):
    """A distributed round's spend is fixed by the session, not by the spec's validation: the site checks it too."""
    from fedtune.client.site import Declined, Site

    train = _csv(tmp_path / "bank.csv", _indexed_rows())
    site = Site(_site_spec(tmp_path, train), _spec(tiny_spec))
    with pytest.raises(Declined, match=r"outside \[0.3, 64\]"):
        site.commit_spend("run-1", 1, rounds_total=1, fixed=(sigma, 0.2, 10))
    assert site.ledger.entries() == []
