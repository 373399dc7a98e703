"""The privacy ledger is durable, composes every spend, and refuses to pass the cap."""

import sqlite3
import subprocess
import sys

import pytest

from fedtune.client.ledger import DuplicateRound, PrivacyLedger
from fedtune.common.privacy import BudgetExhausted, check_fixed_noise, choose_noise_multiplier, epsilon_spent

DELTA = 1e-5


def test_sigma_is_chosen_so_the_planned_rounds_end_exactly_at_the_cap():
    sigma = choose_noise_multiplier([], [(0.1, 20)] * 5, epsilon_cap=3.0, delta=DELTA)
    total = epsilon_spent([(sigma, 0.1, 100)], DELTA)
    assert total <= 3.0
    assert total > 2.9  # the budget is used, not wasted
    # With less budget left, the next round must be noisier.
    history = [(sigma, 0.1, 20)] * 3
    later = choose_noise_multiplier(history, [(0.1, 20)] * 2, epsilon_cap=3.0, delta=DELTA)
    assert later == pytest.approx(sigma, rel=0.05)
    assert epsilon_spent([*history, (later, 0.1, 40)], DELTA) <= 3.0


def test_memoised_per_step_rdp_gives_opacus_own_epsilon():
    """The cached per-step RDP is Opacus' function: PRV and RDP epsilons equal a fresh, uncached Opacus."""
    from opacus.accountants import PRVAccountant, RDPAccountant
    from opacus.accountants.analysis import rdp

    assert rdp._compute_rdp.cache_info().maxsize > 0  # installed by importing fedtune.common.privacy
    history = [(1.3, 0.25, 40), (2.1, 0.1, 25)]
    cached = {name: epsilon_spent(history, DELTA, name) for name in ("prv", "rdp")}
    memoised, rdp._compute_rdp = rdp._compute_rdp, rdp._compute_rdp.__wrapped__
    try:
        for name, accountant in (("prv", PRVAccountant()), ("rdp", RDPAccountant())):
            accountant.history = sorted(history)
            assert cached[name] == accountant.get_epsilon(DELTA)
    finally:
        rdp._compute_rdp = memoised


def test_exhausted_budget_is_refused_with_advice():
    history = [(0.5, 0.5, 500)]
    with pytest.raises(BudgetExhausted, match="epsilon_cap"):
        choose_noise_multiplier(history, [(0.5, 10)], epsilon_cap=1.0, delta=DELTA)
    with pytest.raises(BudgetExhausted, match="declines"):
        check_fixed_noise([], noise_multiplier=0.5, sample_rate=0.5, steps=200, epsilon_cap=1.0, delta=DELTA)


def _spend_in_subprocess(path, round_):
    code = (
        "from fedtune.client.ledger import PrivacyLedger;"
        f"l = PrivacyLedger({str(path)!r});"
        f"print(l.record_spend('ds', run_id='r1', round_={round_}, noise_multiplier=1.0, sample_rate=0.1, steps=50,"
        f" delta={DELTA}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def test_ledger_survives_a_process_restart_and_composes_across_processes(tmp_path):
    path = tmp_path / "ledger.sqlite"
    eps1 = _spend_in_subprocess(path, 1)
    eps2 = _spend_in_subprocess(path, 2)
    assert eps2 > eps1 > 0
    with PrivacyLedger(path) as ledger:
        assert ledger.history("ds") == [(1.0, 0.1, 50), (1.0, 0.1, 50)]
        assert ledger.epsilon("ds", DELTA) == pytest.approx(epsilon_spent([(1.0, 0.1, 100)], DELTA))
        assert ledger.epsilon("other-dataset", DELTA) == 0.0  # keyed by dataset fingerprint


def test_a_round_is_paid_for_once(tmp_path):
    with PrivacyLedger(tmp_path / "l.sqlite") as ledger:
        ledger.record_spend("ds", run_id="r", round_=1, noise_multiplier=1.0, sample_rate=0.1, steps=5, delta=DELTA)
        with pytest.raises(DuplicateRound):
            ledger.record_spend("ds", run_id="r", round_=1, noise_multiplier=1.0, sample_rate=0.1, steps=5, delta=DELTA)
        assert len(ledger.history("ds")) == 1


def test_site_refuses_to_exceed_its_cap_after_restart(tmp_path, tiny_spec):
    """Spend near the cap in one process; a fresh Site in this one declines and records why."""
    from fedtune.client.site import Declined, Site
    from fedtune.common.config import DataSpec, SiteSpec
    from fedtune.common.synthetic import write_demo_sites

    files = write_demo_sites(tmp_path / "data", 1, 40, alpha=1.0, seed=0)
    site_spec = SiteSpec(name="bank", data=DataSpec(train=files[0]), epsilon_cap=1.0, state_dir=tmp_path / "state")
    site = Site(site_spec, tiny_spec)
    first = site.commit_spend("run-a", 1, rounds_total=1)
    assert first.epsilon_after <= 1.0
    site.ledger.close()
    restarted = Site(site_spec, tiny_spec)
    assert restarted.epsilon_spent() == pytest.approx(first.epsilon_after)
    with pytest.raises(Declined, match="cap"):
        restarted.commit_spend("run-b", 1, rounds_total=1)
    assert restarted.ledger.declines()[-1][0] == "run-b"
    assert len(restarted.ledger.history(restarted.dataset)) == 1  # the refused round spent nothing


def test_epsilon_per_run_keeps_budget_for_later_runs(tmp_path, tiny_spec):
    from fedtune.client.site import Site
    from fedtune.common.config import DataSpec, SiteSpec
    from fedtune.common.synthetic import write_demo_sites

    files = write_demo_sites(tmp_path / "data", 1, 40, alpha=1.0, seed=0)
    spec = SiteSpec(
        name="bank", data=DataSpec(train=files[0]), epsilon_cap=4.0, epsilon_per_run=1.0, state_dir=tmp_path / "s"
    )
    site = Site(spec, tiny_spec)
    first = site.commit_spend("run-a", 1, rounds_total=1)
    assert first.epsilon_after == pytest.approx(1.0, abs=0.05)
    # The allowance is measured over the site's own window (epsilon_window_hours, 24 h), not by run id: run-b
    # gets one once run-a's spend is older than the window.
    with sqlite3.connect(tmp_path / "s" / "ledger.sqlite") as db:
        db.execute("UPDATE spends SET created = created - 25 * 3600")
    second = site.commit_spend("run-b", 1, rounds_total=2)  # a later run still has budget
    assert 1.0 < second.epsilon_after < 2.0
    resumed = site.commit_spend("run-b.2", 2, rounds_total=2)  # a resumed attempt shares run-b's allowance
    assert resumed.epsilon_after == pytest.approx(2.0, abs=0.05)


def test_below_1e_10_the_prv_figure_is_rdp_s_bound_and_grows_with_every_spend():
    """At delta 1e-12 PRV under-counted a history a server can shape by up to 0.5 epsilon against a tight PLD
    accountant, and adding a spend could lower it (review round 4); there the ledger takes RDP's bound."""
    history = [(1.0, 0.5, 40)]
    assert epsilon_spent(history, 1e-12, "prv") == epsilon_spent(history, 1e-12, "rdp")
    assert epsilon_spent(history, 1e-5, "prv") < epsilon_spent(history, 1e-5, "rdp")  # PRV's own figure above
    for extra in [(64.0, 1.0, 10_000), (64.0, 1.0, 100)]:
        assert epsilon_spent([*history, extra], 1e-12, "prv") >= epsilon_spent(history, 1e-12, "prv")


def test_a_recorded_epsilon_never_falls_below_what_a_composed_budget_already_recorded(tmp_path, monkeypatch):
    """However an accountant's estimate moves with its history, the ledger's recorded figure does not fall."""
    from fedtune.client import ledger as ledger_module

    with PrivacyLedger(tmp_path / "l.sqlite") as ledger:
        first = ledger.record_spend(
            "d", run_id="r", round_=1, noise_multiplier=1.0, sample_rate=0.5, steps=40, delta=1e-5
        )
        monkeypatch.setattr(ledger_module, "epsilon_spent", lambda *a, **k: first / 2)  # an estimate that fell
        second = ledger.record_spend(
            "d", run_id="r", round_=2, noise_multiplier=2.0, sample_rate=0.1, steps=1, delta=1e-5
        )
        assert second == first and ledger.entries()[-1].epsilon_after == first
