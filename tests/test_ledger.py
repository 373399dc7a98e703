"""The privacy ledger under the ways a site can lose budget without meaning to (issues 11 and 12).

A. delta is pinned by the site; B. read-decide-write is one exclusive transaction, raced by real processes;
C. a dataset is its records, not its file bytes; D. a lost, emptied, corrupt or rolled-back ledger fails closed,
with verify / backup / restore; E. the held-out split seed belongs to the site.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import sqlite3
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w
from typer.testing import CliRunner

from fedtune.client.ledger import (
    LedgerCorrupt,
    LedgerRolledBack,
    LedgerUnavailable,
    PrivacyLedger,
    classification_identity,
    hwm_path,
    verify,
)
from fedtune.common.config import DataSpec, FederationSpec, SiteSpec
from fedtune.common.data import dataset_fingerprint, load_classification
from fedtune.common.privacy import BudgetExhausted, check_fixed_noise, epsilon_spent
from fedtune.common.synthetic import BANK_INTENTS

runner = CliRunner()
DELTA = 1e-5


def _spec(tiny_spec: FederationSpec, **privacy: object) -> FederationSpec:
    """The tiny federation with the cheap RDP accountant (the PRV one costs about a second per evaluation)."""
    return tiny_spec.model_copy(
        update={"privacy": tiny_spec.privacy.model_copy(update={"accountant": "rdp", **privacy})}
    )


def _write_csv(path: Path, rows: list[tuple[str, str]], *, newline: str = "\n", bom: bool = False) -> Path:
    text = newline.join(["text,label", *(f'"{t}",{y}' for t, y in rows)]) + newline
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


def _rows(n: int, start: int = 0) -> list[tuple[str, str]]:
    return [(f"message number {i} about my card", BANK_INTENTS[i % len(BANK_INTENTS)]) for i in range(start, start + n)]


def _identity(path: Path, name: str | None = None):
    """What `Site` computes for its train file (the same two calls, without loading a model)."""
    data = load_classification(path, "text", "label", BANK_INTENTS)
    return classification_identity(
        data.texts, data.labels, BANK_INTENTS, values=data.values, name=name, source=dataset_fingerprint(path)
    )


NEAR_CAP = (1.0, 0.1, 100)  # sigma, q, steps: epsilon 7.90 at delta 1e-5 (RDP), just under a cap of 8


# -- A. the site pins delta --------------------------------------------------------------------------------


def test_federation_with_a_larger_delta_is_declined_and_the_ledger_is_unchanged(tmp_path, tiny_spec):
    from fedtune.client.site import Declined, Site

    train = _write_csv(tmp_path / "bank.csv", _rows(60))
    site_spec = SiteSpec(name="bank", data=DataSpec(train=train), epsilon_cap=8.0, state_dir=tmp_path / "state")
    site = Site(site_spec, _spec(tiny_spec, target_delta=1e-2))
    sigma, q, steps = NEAR_CAP
    site.ledger.record_spend(
        site.identity, run_id="earlier", round_=1, noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA
    )
    near = site.ledger.epsilon(site.identity, DELTA, "rdp")
    assert 7.8 <= near <= 8.0
    # At the federation's delta the same history looks cheap: without the pin the site would train.
    assert epsilon_spent([NEAR_CAP], 1e-2, "rdp") < 6.0
    before, mark = site.ledger.entries(), hwm_path(site.ledger.path).read_bytes()
    with pytest.raises(Declined) as declined:
        site.commit_spend("greedy-run", 1, rounds_total=1)
    reason = str(declined.value)
    assert "target_delta = 0.01" in reason and "privacy_delta = 1e-05" in reason and "<= 1e-05" in reason
    assert site.ledger.entries() == before  # no spend
    assert hwm_path(site.ledger.path).read_bytes() == mark
    assert site.ledger.declines()[-1][:2] == ("greedy-run", 1)
    assert site.epsilon_spent() == pytest.approx(near)  # reported at the site's delta, not the federation's


def test_a_smaller_federation_delta_is_accounted_at_that_delta(tmp_path, tiny_spec):
    from fedtune.client.site import Declined, Site, accounting_delta

    train = _write_csv(tmp_path / "bank.csv", _rows(60))
    site_spec = SiteSpec(name="bank", data=DataSpec(train=train), epsilon_cap=8.0, state_dir=tmp_path / "state")
    strict = _spec(tiny_spec, target_delta=1e-7, noise_multiplier=3.0)
    assert accounting_delta(site_spec, strict) == 1e-7
    site = Site(site_spec, strict)
    spend = site.commit_spend("strict-run", 1, rounds_total=1)
    (entry,) = site.ledger.entries()
    assert entry.delta == 1e-7
    assert spend.epsilon_after == pytest.approx(epsilon_spent([(3.0, spend.sample_rate, spend.steps)], 1e-7, "rdp"))
    # A history just under the cap at the site's delta is over it at the smaller one: that federation is refused.
    site.ledger.record_spend(
        site.identity,
        run_id="earlier",
        round_=1,
        noise_multiplier=1.0,
        sample_rate=0.1,
        steps=100,
        delta=DELTA,
    )
    with pytest.raises(Declined, match="cap"):
        site.commit_spend("strict-run", 2, rounds_total=2)


# -- B. one exclusive transaction ----------------------------------------------------------------------------

CAP, SIGMA, Q, STEPS = 3.0, 2.0, 0.1, 10


def _race(paths: list[str], name: str, attempts: int, start: multiprocessing.synchronize.Barrier) -> None:
    epsilon_spent([(SIGMA, Q, STEPS)], DELTA, "rdp")  # warm up the accountant before the start line

    def decide(entries):
        history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]
        check_fixed_noise(
            history, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS, epsilon_cap=CAP, delta=DELTA, accountant="rdp"
        )
        time.sleep(0.002)  # widen the read-to-write window a racing writer would need
        return SIGMA, Q, STEPS

    for path in paths:  # one race per ledger file, both processes released together each time
        ledger = PrivacyLedger(Path(path))
        start.wait()
        for i in range(attempts):
            with contextlib.suppress(BudgetExhausted):
                ledger.commit("ds", run_id=name, round_=i, decide=decide, delta=DELTA, accountant="rdp")
            time.sleep(0.01)  # SQLite's busy handler polls: without a pause one process would take every turn
        ledger.close()


def test_two_processes_racing_commits_never_pass_the_cap_together(tmp_path):
    fits = 1
    while epsilon_spent([(SIGMA, Q, STEPS * (fits + 1))], DELTA, "rdp") <= CAP:
        fits += 1
    assert 10 < fits < 60
    paths = [tmp_path / f"ledger-{trial}.sqlite" for trial in range(4)]
    for path in paths:
        PrivacyLedger(path).close()
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(3)
    args = ([str(p) for p in paths], fits, start)
    procs = [ctx.Process(target=_race, args=(args[0], f"run-{p}", *args[1:])) for p in "ab"]
    for p in procs:
        p.start()
    for _ in paths:
        start.wait(timeout=300)
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    for path in paths:
        with PrivacyLedger(path) as ledger:
            entries = ledger.entries("ds")
            assert ledger.epsilon("ds", DELTA, "rdp") <= CAP
            assert len(entries) == fits  # the cap is used exactly, by both runs together
            assert {e.run_id for e in entries} == {"run-a", "run-b"}  # they really did interleave
            assert max(e.epsilon_after for e in entries) <= CAP


# -- C. a dataset is its records ------------------------------------------------------------------------------


def test_resaved_reordered_reencoded_and_extended_files_share_one_budget(tmp_path):
    rows = _rows(30)
    original = _write_csv(tmp_path / "a.csv", rows)
    ledger = PrivacyLedger(tmp_path / "state" / "ledger.sqlite")
    first = ledger.commit(
        _identity(original), run_id="r1", round_=1, decide=lambda _: (1.0, 0.1, 50), delta=DELTA, accountant="rdp"
    )
    spent = ledger.epsilon(_identity(original), DELTA, "rdp")
    assert spent > 0
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "label": BANK_INTENTS.index(y)}) + "\n" for t, y in rows))
    variants = {
        "extra newline": _write_csv(tmp_path / "b.csv", rows, newline="\n"),
        "crlf + bom": _write_csv(tmp_path / "c.csv", rows, newline="\r\n", bom=True),
        "reordered": _write_csv(tmp_path / "d.csv", rows[::-1]),
        "jsonl, label indices": jsonl,
        "extended": _write_csv(tmp_path / "e.csv", rows + _rows(10, start=100)),
    }
    variants["extra newline"].write_bytes(original.read_bytes() + b"\n")
    for what, path in variants.items():
        assert dataset_fingerprint(path) != dataset_fingerprint(original) or what == "extra newline"
        ident = _identity(path)
        assert ledger.resolve(ident)[0] == first.budget, what
        assert ledger.epsilon(ident, DELTA, "rdp") == pytest.approx(spent), what
    # The extended file's spend is charged to the same budget, so the original file now carries it too.
    extended = ledger.commit(
        _identity(variants["extended"]), run_id="r2", round_=1, decide=lambda _: (1.0, 0.1, 50), delta=DELTA,
        accountant="rdp",
    )  # fmt: skip
    assert extended.budget == first.budget
    assert ledger.epsilon(_identity(original), DELTA, "rdp") == pytest.approx(
        epsilon_spent([(1.0, 0.1, 100)], DELTA, "rdp")
    )
    assert ledger.datasets() == [first.budget]
    # Rows the ledger has never seen start their own budget.
    fresh = _identity(_write_csv(tmp_path / "f.csv", _rows(20, start=500)))
    assert ledger.resolve(fresh)[0] != first.budget and ledger.epsilon(fresh, DELTA, "rdp") == 0.0
    ledger.close()


def test_one_shared_row_composes_every_overlapping_history_and_a_name_ties_files(tmp_path):
    a, b = _rows(20), _rows(20, start=200)
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    for run, rows in (("ra", a), ("rb", b)):
        ledger.commit(
            _identity(_write_csv(tmp_path / f"{run}.csv", rows)), run_id=run, round_=1,
            decide=lambda _: (1.0, 0.1, 40), delta=DELTA, accountant="rdp",
        )  # fmt: skip
    mixed = _identity(_write_csv(tmp_path / "mixed.csv", [a[0], b[0], *_rows(5, start=900)]))
    assert len(ledger.resolve(mixed)[1]) == 2
    assert ledger.epsilon(mixed, DELTA, "rdp") == pytest.approx(epsilon_spent([(1.0, 0.1, 80)], DELTA, "rdp"))
    # data.dataset_name: files with no row in common, declared as one dataset, share one budget.
    one = _identity(_write_csv(tmp_path / "q1.csv", _rows(10, start=1000)), name="complaints")
    two = _identity(_write_csv(tmp_path / "q2.csv", _rows(10, start=2000)), name="complaints")
    ledger.commit(one, run_id="rq", round_=1, decide=lambda _: (1.0, 0.1, 40), delta=DELTA, accountant="rdp")
    assert ledger.resolve(two)[0] == "name:complaints"
    assert ledger.epsilon(two, DELTA, "rdp") == pytest.approx(epsilon_spent([(1.0, 0.1, 40)], DELTA, "rdp"))
    ledger.close()


def test_composed_names_every_budget_a_spend_on_a_budgets_rows_composes(tmp_path):
    """`client status` composes a budget's own-share-alone epsilon over these: never fewer than a commit did."""
    a, b = _rows(20), _rows(20, start=200)
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    charged = {}
    for run, rows in (("ra", a), ("rb", b)):
        charged[run] = ledger.commit(
            _identity(_write_csv(tmp_path / f"{run}.csv", rows)), run_id=run, round_=1,
            decide=lambda _: (1.0, 0.1, 40), delta=DELTA,
        ).budget  # fmt: skip
    assert ledger.composed(charged["ra"]) == (charged["ra"],)  # no shared row yet
    mixed = ledger.commit(
        _identity(_write_csv(tmp_path / "mixed.csv", [a[0], b[0]])), run_id="rm", round_=1,
        decide=lambda _: (1.0, 0.1, 40), delta=DELTA,
    )  # fmt: skip
    assert set(mixed.budgets) == set(charged.values())
    assert set(ledger.composed(charged["ra"])) == set(ledger.composed(charged["rb"])) == set(mixed.budgets)
    ledger.close()


def test_a_site_charges_an_extended_file_with_the_original_history(tmp_path, tiny_spec):
    from fedtune.client.site import Site

    rows = _rows(40)
    spec = _spec(tiny_spec, noise_multiplier=2.0)
    state = tmp_path / "state"
    train = _write_csv(tmp_path / "a.csv", rows)
    site = Site(SiteSpec(name="bank", data=DataSpec(train=train), epsilon_cap=50.0, state_dir=state), spec)
    first = site.commit_spend("run-1", 1, rounds_total=1)
    site.ledger.close()
    grown = _write_csv(tmp_path / "grown.csv", _rows(15, start=300) + rows[::-1], newline="\r\n")
    again = Site(SiteSpec(name="bank", data=DataSpec(train=grown), epsilon_cap=50.0, state_dir=state), spec)
    assert again.epsilon_spent() == pytest.approx(first.epsilon_after)
    second = again.commit_spend("run-2", 1, rounds_total=1)
    assert second.epsilon_after > first.epsilon_after
    assert again.dataset == site.dataset and len(again.ledger.entries(again.dataset)) == 2


# -- D. fails closed --------------------------------------------------------------------------------------


def _spend(path: Path, round_: int, dataset: str = "ds") -> float:
    with PrivacyLedger(path) as ledger:
        return ledger.record_spend(
            dataset, run_id="r", round_=round_, noise_multiplier=1.0, sample_rate=0.1, steps=20, delta=DELTA,
            accountant="rdp",
        )  # fmt: skip


def test_missing_empty_or_garbage_ledger_is_refused_in_one_line(tmp_path):
    path = tmp_path / "state" / "ledger.sqlite"
    _spend(path, 1)
    assert json.loads(hwm_path(path).read_text())["spends"] == 1
    os.truncate(path, 0)
    for side in ("-wal", "-shm"):
        Path(f"{path}{side}").unlink(missing_ok=True)
    with pytest.raises(LedgerUnavailable) as empty:
        PrivacyLedger(path)
    assert "empty (0 bytes)" in str(empty.value) and "ledger restore" in str(empty.value)
    assert "\n" not in str(empty.value)
    assert path.stat().st_size == 0  # refused, not silently re-created
    path.unlink()
    with pytest.raises(LedgerUnavailable, match="is missing"):
        PrivacyLedger(path)
    path.write_bytes(b"this is not a database, " * 100)
    with pytest.raises(LedgerCorrupt) as garbage:
        PrivacyLedger(path)
    assert "\n" not in str(garbage.value) and "ledger restore" in str(garbage.value)
    # Evidence can also be the egress log alone (a site whose ledger and mark were both deleted).
    other = tmp_path / "other" / "ledger.sqlite"
    other.parent.mkdir()
    (other.parent / "egress.jsonl").write_text('{"run": "r", "round": 1}\n')
    with pytest.raises(LedgerUnavailable, match="egress audit log"):
        PrivacyLedger(other)
    # A site that never trained simply starts one.
    PrivacyLedger(tmp_path / "new" / "ledger.sqlite").close()


def test_a_rolled_back_or_swapped_ledger_is_refused(tmp_path):
    path = tmp_path / "ledger.sqlite"
    _spend(path, 1)
    old = tmp_path / "old-copy.sqlite"
    with PrivacyLedger(path) as ledger:
        ledger.backup(old)
    _spend(path, 2)
    shutil.copy(old, path)
    for side in ("-wal", "-shm"):
        Path(f"{path}{side}").unlink(missing_ok=True)
    with pytest.raises(LedgerRolledBack, match=r"1 spend.*recorded 2"):
        PrivacyLedger(path)
    path.unlink()
    PrivacyLedger(tmp_path / "elsewhere.sqlite").close()
    shutil.copy(tmp_path / "elsewhere.sqlite", path)
    with pytest.raises(LedgerRolledBack, match="high-water mark is of ledger"):
        PrivacyLedger(path)


def test_verify_backup_and_restore(tmp_path):
    path = tmp_path / "ledger.sqlite"
    _spend(path, 1)
    early = tmp_path / "backups" / "early.sqlite"
    with PrivacyLedger(path) as ledger:
        ledger.backup(early)
    after_two = _spend(path, 2)
    latest = tmp_path / "backups" / "latest.sqlite"
    with PrivacyLedger(path) as ledger:  # a backup of an open, WAL-mode ledger is one consistent file
        ledger.backup(latest)
    assert not Path(f"{latest}-wal").exists()
    ok = verify(path)
    assert ok.ok and ok.lines[0] == "integrity_check: ok"
    with sqlite3.connect(path) as db:  # someone deletes a spend behind the ledger's back
        db.execute("DELETE FROM spends WHERE round = 2")
    bad = verify(path)
    assert not bad.ok and any("high-water mark recorded 2" in line for line in bad.lines)

    from fedtune.client.ledger import restore

    os.truncate(path, 0)
    with pytest.raises(LedgerRolledBack, match="older than the high-water mark"):
        restore(path, early)
    assert path.stat().st_size == 0  # a refused restore leaves things as they were
    restore(path, latest)
    with PrivacyLedger(path) as ledger:
        assert ledger.epsilon("ds", DELTA, "rdp") == pytest.approx(after_two)
    assert verify(path).ok
    # Forced restore of the older backup: the spend it lacks is re-added from the high-water mark.
    lines = restore(path, early, force=True)
    assert any("re-added 1 spend" in line for line in lines)
    with PrivacyLedger(path) as ledger:
        assert ledger.epsilon("ds", DELTA, "rdp") == pytest.approx(after_two)
        assert [e.run_id for e in ledger.entries()] == ["r", "restored-from-high-water-mark"]
    assert list(tmp_path.glob("ledger.sqlite.replaced-*"))  # the replaced files are kept, not deleted


def _site_config(tmp_path: Path, train: Path) -> Path:
    from fedtune.client.cli import app

    result = runner.invoke(app, ["init", str(tmp_path / "bank"), "--name", "bank"])
    assert result.exit_code == 0, result.output
    config = tmp_path / "bank" / "site.toml"
    data = tomllib.loads(config.read_text())
    data["data"]["train"] = str(train)
    data["peers"]["hospital"] = "ab" * 32
    config.write_text(tomli_w.dumps(data))
    return config


def test_truncated_ledger_cli_status_and_check_are_not_ready_and_training_is_refused(tmp_path, tiny_spec, monkeypatch):
    from fedtune.client import cli
    from fedtune.client.cli import app
    from fedtune.client.site import Declined, Site
    from fedtune.common.config import load_site

    monkeypatch.setattr(cli.console, "width", 250)
    monkeypatch.setattr(cli.err_console, "width", 250)
    spec = _spec(tiny_spec, noise_multiplier=8.0)
    federation = tmp_path / "federation.toml"
    federation.write_text(tomli_w.dumps(spec.model_dump(mode="json", exclude_none=True)))
    config = _site_config(tmp_path, _write_csv(tmp_path / "bank.csv", _rows(40)))
    site_spec = load_site(config)
    site = Site(site_spec, spec)
    site.commit_spend("run-1", 1, rounds_total=1)
    site.ledger.close()

    status = runner.invoke(app, ["status", str(config), "--federation", str(federation)])
    assert status.exit_code == 0, status.output
    assert "current train file" in status.output and "accounting delta: 1e-05" in status.output
    backup = tmp_path / "ledger-backup.sqlite"
    saved = runner.invoke(app, ["ledger", "backup", str(config), str(backup)])
    assert saved.exit_code == 0, saved.output
    assert runner.invoke(app, ["ledger", "verify", str(config)]).exit_code == 0

    ledger = Path(site_spec.state_dir) / "ledger.sqlite"
    os.truncate(ledger, 0)  # `truncate -s 0 ledger.sqlite`
    status = runner.invoke(app, ["status", str(config)])
    assert status.exit_code == 1 and "NOT READY" in status.output and "empty (0 bytes)" in status.output
    assert isinstance(status.exception, SystemExit)
    check = runner.invoke(app, ["check", str(config), "--federation", str(federation), "--no-inspect-model"])
    assert check.exit_code == 1 and "ready" not in check.output.replace("NOT READY", "")
    assert "privacy ledger" in check.output and "empty (0 bytes)" in " ".join(check.output.split())
    verified = runner.invoke(app, ["ledger", "verify", str(config)])
    assert verified.exit_code == 1
    ledger.write_bytes(b"\x00garbage" * 512)  # a corrupt file: one line too, not sqlite3's traceback
    corrupt = runner.invoke(app, ["status", str(config)])
    assert corrupt.exit_code == 1 and "corrupt" in corrupt.output
    assert isinstance(corrupt.exception, SystemExit)  # a handled exit, not an escaped sqlite3 error
    os.truncate(ledger, 0)
    refused = Site(site_spec, spec)
    with pytest.raises(Declined, match="empty"):
        refused.commit_spend("run-2", 1, rounds_total=1)
    assert ledger.stat().st_size == 0

    restored = runner.invoke(app, ["ledger", "restore", str(config), str(backup)])
    assert restored.exit_code == 0, restored.output
    assert refused.commit_spend("run-2", 1, rounds_total=1).epsilon_after > 0  # the same process trains again


# -- E. the split seed is the site's -----------------------------------------------------------------------


def test_split_seed_is_drawn_once_by_the_site_and_kept(tmp_path):
    from fedtune.client.site import split_seed

    a = SiteSpec(name="a", data=DataSpec(train=tmp_path / "x.csv"), state_dir=tmp_path / "a")
    b = SiteSpec(name="b", data=DataSpec(train=tmp_path / "x.csv"), state_dir=tmp_path / "b")
    first = split_seed(a)
    assert (tmp_path / "a" / "split-seed").read_text().strip() == str(first)
    assert split_seed(a) == first  # kept across calls (and processes: it is a file)
    assert split_seed(b) != first  # drawn from the OS, not from anything the federation sends
    seeded = a.model_copy(update={"seed": 7, "state_dir": tmp_path / "sim"})
    assert split_seed(seeded) == split_seed(seeded.model_copy(update={"state_dir": tmp_path / "sim2"}))
    assert not (tmp_path / "sim" / "split-seed").exists()


def test_the_federation_seed_does_not_move_the_held_out_split(tmp_path, tiny_spec):
    import torch

    from fedtune.client.site import Site

    train = _write_csv(tmp_path / "bank.csv", _rows(50))
    site_spec = SiteSpec(name="bank", data=DataSpec(train=train), state_dir=tmp_path / "state")
    held = []
    for seed in (0, 12345):
        spec = tiny_spec.model_copy(update={"training": tiny_spec.training.model_copy(update={"seed": seed})})
        site = Site(site_spec, spec)
        held.append(site.eval_data.tensors[0])
        site.ledger.close()
    assert torch.equal(held[0], held[1])
