"""The utility benchmark's core on a tiny synthetic scenario: every configuration runs and reports sane numbers.

Why: the lead quotes this benchmark's tables; a configuration that silently fails, an accuracy outside [0, 1] or
a malformed JSON/markdown file must fail CI rather than end up in a report. No real data is needed: the built-in
synthetic bank messages stand in for banking77, and one federated epsilon (with the real simulation engine and
secure aggregation) stands in for the three.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from bench_loader import load_benchmark

utility = load_benchmark("utility")


@pytest.fixture(scope="module")
def payload(base_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    scenario = utility.synthetic_scenario(num_sites=2, rows=120, seed=0)
    settings = utility.Settings(
        base_model_path,
        max_length=24,
        training={"rounds": 2, "local_steps": 2, "batch_size": 16, "head": {"rounds": 1, "local_steps": 5}},
        epsilons=(8.0,),
        alone_epsilons=(8.0,),
        seeds=(0, 1),
        parallel_sites=2,
    )
    work = tmp_path_factory.mktemp("utility")
    with utility.quiet():
        result = utility.run_scenario(scenario, settings, work / scenario.name)
    return utility.build_payload({scenario.name: result}, settings, "test", 0.0)


def test_every_configuration_reports_accuracies_in_unit_interval(payload: dict) -> None:
    sc = payload["scenarios"]["synthetic"]
    assert [s["name"] for s in sc["sites"]] == ["site-1", "site-2"]
    assert all(s["train_rows"] > 0 and s["eval_rows"] > 0 for s in sc["sites"])
    keys = [c["key"] for c in sc["configs"]]
    assert keys == ["majority", "logreg", "federated-eps8", "alone-eps8", "central-dp-eps8"]
    for c in sc["configs"]:
        assert set(c["accuracy"]) == {"site-1", "site-2", "pooled"}, c["key"]
        assert all(0.0 <= v <= 1.0 for v in c["accuracy"].values()), c
        assert c["test"] is not None and 0.0 <= c["test"] <= 1.0, c
    private = [c for c in sc["configs"] if c["epsilon_cap"] is not None]
    for c in private:  # every DP row ran once per seed and reports the spread
        assert [r["seed"] for r in c["runs"]] == [0, 1]
        assert set(c["accuracy_std"]) == {"site-1", "site-2", "pooled"} and c["test_std"] is not None
        assert all(0.0 < e <= 8.0 + 1e-6 for e in c["epsilon_spent"].values()), c
        means = [statistics.fmean(r["accuracy"]["pooled"] for r in c["runs"])]
        assert c["accuracy"]["pooled"] == pytest.approx(means[0])
    scenario = utility.synthetic_scenario(num_sites=2, rows=120, seed=0)
    for site in scenario.sites:  # the reference row, recomputed by hand from the same split
        counts = {y: site.train.labels.count(y) for y in set(site.train.labels)}
        tops = [y for y, n in counts.items() if n == max(counts.values())]  # any of a tie is a right answer
        scores = [sum(y == top for y in site.eval.labels) / len(site.eval.labels) for top in tops]
        assert any(sc["configs"][0]["accuracy"][site.name] == pytest.approx(s) for s in scores)
    assert set(sc["federation_beats_alone"]["8"]) == {"site-1", "site-2"}


def test_json_markdown_and_plot_are_written(payload: dict, tmp_path: Path) -> None:
    markdown = utility.render_markdown(payload)
    json_path, md_path = utility.write_outputs(tmp_path / "utility", payload, markdown)
    loaded = json.loads(json_path.read_text())
    assert loaded["benchmark"] == "utility" and loaded["recipe"]["training"]["rounds"] == 2
    table = [line for line in md_path.read_text().splitlines() if line.startswith("|")]
    assert table[0].startswith("| configuration | ε spent (max) |") and "test" in table[0]
    assert len(table) == 2 + 5  # header, rule, one row per configuration
    assert any("federated DP, secure aggregation, ε=8" in line and " ± " in line for line in table)
    pytest.importorskip("matplotlib")
    png = utility.plot(payload, tmp_path / "utility.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
