"""A run store as a real bank run leaves it, for the console tests: a full federation spec, accuracy that climbs
from 0.88 to 0.92 (what a fixed 0-1 axis draws flat), each site's epsilon, cap and sigma per round, and a decline
reason a hostile site could write (a spreadsheet formula)."""

from __future__ import annotations

from pathlib import Path

from fedtune.common.config import (
    BaseModelSpec,
    FederationSpec,
    LoraSpec,
    PrivacySpec,
    TaskSpec,
    TrainingSpec,
)
from fedtune.server.aggregation import RoundUpdate, SiteTrain
from fedtune.server.federation import RoundReport
from fedtune.server.scores import SiteEval

RUN = "bank0run0001"
NODES = {11: "lender", 22: "branch"}
ACCURACY = {0: (0.88, 0.885), 1: (0.9, 0.905), 2: (0.915, 0.92)}  # (lender, branch) per round
CAPS = {"lender": 6.0, "branch": 4.0}
SIGMA = {"lender": 1.1, "branch": 1.3}
HOSTILE = '=HYPERLINK("http://evil.example","budget")'
FINGERPRINT = "9f" * 32


def bank_spec() -> FederationSpec:
    return FederationSpec(
        name="card-disputes",
        base_model=BaseModelSpec(path=Path("/srv/models/minilm"), fingerprint=FINGERPRINT, max_length=96),
        task=TaskSpec(labels=[f"intent_{i}" for i in range(15)]),
        lora=LoraSpec(r=4, target_modules=["query", "value", "dense"], layers=2),
        training=TrainingSpec(rounds=2, local_steps=12, batch_size=32, learning_rate=0.05),
        privacy=PrivacySpec(target_delta=1e-6, max_grad_norm=0.8, accountant="rdp", default_epsilon_cap=6.0),
    )


def _report(round_: int) -> RoundReport:
    report = RoundReport(round=round_, sampled=2, wall_s=3.0)
    report.evals = {
        node: SiteEval(site, 50, 0.6 - 0.1 * round_, ACCURACY[round_][i], 1.5 * round_)
        for i, (node, site) in enumerate(NODES.items())
    }
    report.bytes_down = {11: 5000 + round_, 22: 6000 + round_}
    if round_:
        sites = {
            node: SiteTrain(site, 100, 1.5 * round_, CAPS[site], SIGMA[site], 3000 + round_)
            for node, site in NODES.items()
        }
        if round_ == 2:
            sites[22] = SiteTrain("branch", 0, 1.5, 0.0, 0.0, 64, declined=HOSTILE)
        report.update = RoundUpdate(mean_delta=None, sites=sites)
    return report


def write_bank_store(path: Path) -> Path:
    """Rounds 0-2 of RUN, completed, in a store at `path`."""
    from fedtune.server.store import RunStore

    spec = bank_spec()
    with RunStore(path) as store:
        store.create_run(
            RUN,
            name=spec.name,
            federation_json=spec.model_dump_json(),
            rounds_total=2,
            fingerprint=FINGERPRINT,
            out_dir=path.parent,
        )
        for r in range(3):
            store.record_round(RUN, _report(r), names=NODES, attempt=1)
        store.finish_run(RUN, "completed")
    return path
